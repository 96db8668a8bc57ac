import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import read_wandb_history

from lightning_effnets.cli import list_recipes, main, recipes_dir

FAST = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2",
        "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        "--model.init_args.backbone=resnet10t"]


def test_recipe_runs_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "recipes/classification/baseline.yaml", "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert cli.trainer.state.finished


def test_recipe_logs_metrics_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "classification/baseline", *FAST])
    assert cli.trainer.global_step == 3
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    history = read_wandb_history(run_dirs[0])
    for key in ("train/loss_step", "val/acc", "val/acc_top5", "test/acc", "effnets/cost/start/macs",
                "effnets/cost/end/energy_pj", "val/samples/count"):
        assert key in history, f"{key} not logged; logged: {sorted(history)}"
    assert len(history["train/loss_step"]) == 3
    assert 0.0 <= history["test/acc"][-1] <= 1.0
    assert history["effnets/cost/start/macs"][0] > 0
    assert history["val/samples/count"][-1] == 16
    # the checkpoint written during fit was used by test-after-fit
    assert list(tmp_path.rglob("*.ckpt"))


def test_print_config_and_recipe_listing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "classification/baseline", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "lightning_effnets.tasks.ImageClassifier"
    assert config["data"]["init_args"]["image_size"] == 32

    assert "classification/baseline" in list_recipes()
    main(["recipes"])
    listing = capsys.readouterr().out
    assert "classification/baseline" in listing
    for name in list_recipes():
        assert (recipes_dir() / f"{name}.yaml").is_file()


def test_unknown_recipe_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="classification/baseline"):
        main(["fit", "--config", "classification/does_not_exist"])


def test_every_recipe_parses(tmp_path, monkeypatch, capsys):
    """Each bundled recipe is a valid LightningCLI config (classes importable, arguments known)."""
    monkeypatch.chdir(tmp_path)
    for name in list_recipes():
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", name, "--print_config"])
        assert exit_info.value.code in (0, None), name
        capsys.readouterr()


def test_console_script_exits_zero():
    script = Path(sys.executable).with_name("effnets")
    result = subprocess.run([str(script), "recipes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "classification/baseline" in result.stdout
