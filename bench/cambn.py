"""Camera-based BN (arXiv:2001.08680) vs plain BN on the procedural multi-camera re-id data, side by side.

    python bench/cambn.py                      # accuracy (both recipes, full schedule) + training step time
    python bench/cambn.py --epochs 4 --seeds 0 1
    python bench/cambn.py --speed-only --steps 40

Accuracy: ``recipes/reid/baseline.yaml`` (plain BN) and ``recipes/reid/cambn.yaml`` (CamBN) are trained with the
same seed, data and schedule (W&B logger and progress bar off), and the best-validation checkpoint is tested.
Reported: mAP / rank-1 on the cameras held out of training (``test/held_out/...``) and on the seen cameras. A
third row takes the plain-BN model and only adds CamBN's test-time adaptation (convert, then re-estimate every
test camera's statistics from its images), the paper's "direct transfer" use.

Speed: the training step (forward, losses, backward, AdamW step) of the baseline's PersonReID (resnet10t, 64x32,
P x K = 16 x 4 batches from the training split) with plain BN vs CamBN, including the CameraBN callback's
per-batch work (reading camera ids, dropping single-image cameras, opening the camera context). Steps alternate
between the two models on the same batches, so other processes on a shared machine disturb both alike; the
median of the per-step ratios is printed for wall-clock time and for process CPU time (with one thread,
``OMP_NUM_THREADS=1``, CPU time is the work done, undisturbed by waiting for a busy machine's cores; with more
threads it also counts OpenMP spin-waiting). Target (issue 9): <= 1.15x.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_effnets.callbacks import CameraBN  # noqa: E402
from lightning_effnets.cli import main  # noqa: E402
from lightning_effnets.convert import to_camera_bn  # noqa: E402

ROWS = ("plain BN", "CamBN (train + adapt)", "plain BN + CamBN adapt at test")


def _callbacks(cambn: bool) -> str:
    items = ['{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
             '"init_args": {"monitor": "val/mAP", "mode": "max"}}']
    if cambn:
        items.append('{"class_path": "lightning_effnets.callbacks.CameraBN"}')
    return "--trainer.callbacks=[" + ", ".join(items) + "]"


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    keys = ("held_out/mAP", "held_out/rank1", "seen/mAP", "seen/rank1", "mAP", "rank1")
    return {k: float(metrics[f"test/{k}"]) for k in keys if f"test/{k}" in metrics}


def train_and_test(recipe: str, seed: int, epochs: int | None, workdir: str,
                   overrides: list[str] | None = None) -> tuple[dict[str, float], Any, float]:
    """Fit a recipe (test on its best checkpoint); returns test scores, the CLI and the wall time."""
    args = ["fit", "--config", recipe, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--seed_everything={seed}", f"--trainer.default_root_dir={workdir}", _callbacks("cambn" in recipe)]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    args += overrides or []
    start = time.perf_counter()
    cli = main(args)
    return _scores(cli.trainer.callback_metrics), cli, time.perf_counter() - start


def adapt_only(cli: Any) -> dict[str, float]:
    """Test the plain-BN model (best checkpoint) after converting it to CamBN and adapting every test camera."""
    task = copy.deepcopy(cli.model)
    best = cli.trainer.checkpoint_callback.best_model_path
    if best:
        task.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    to_camera_bn(task.model, cli.datamodule.num_cameras)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CameraBN()])
    trainer.test(task, datamodule=cli.datamodule, verbose=False)
    return _scores(trainer.callback_metrics)


def step_time(steps: int, warmup: int = 3) -> dict[str, tuple[float, float, float]]:
    """Interleaved training steps, plain BN vs CamBN, timed by wall clock and by process CPU time:
    ``{clock: (median plain s, median CamBN s, median of the per-step ratios)}``."""
    from lightning_effnets.data import MultiCameraReIDDataModule
    from lightning_effnets.tasks import PersonReID

    pl.seed_everything(0)
    data = MultiCameraReIDDataModule(num_cameras=8, held_out_cameras=3, num_train_ids=150, num_val_ids=4,
                                     num_test_ids=4, train_images_per_camera=3, image_size=(64, 32), p=16, k=4)
    data.setup("fit")
    batches = [b for _, b in zip(range(steps + warmup), data.train_dataloader())]
    plain = PersonReID(backbone="resnet10t", num_classes=150, image_size=(64, 32), log_samples=0)
    cam = copy.deepcopy(plain)
    callback = CameraBN(num_cameras=8)
    to_camera_bn(cam.model, 8)
    callback.camera_map = {c: c for c in range(8)}
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, cam)}

    def run(module: PersonReID, batch: dict[str, Any], with_cameras: bool) -> tuple[float, float]:
        batch = dict(batch)
        start, cpu_start = time.perf_counter(), time.process_time()
        if with_cameras:
            callback.on_train_batch_start(None, module, batch, 0)  # type: ignore[arg-type]
        loss = module.training_step(batch, 0)
        optimizers[id(module)].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[id(module)].step()
        if with_cameras:
            callback.on_train_batch_end(None, module, None, batch, 0)  # type: ignore[arg-type]
        return time.perf_counter() - start, time.process_time() - cpu_start

    import warnings

    times_plain: list[tuple[float, float]] = []
    times_cam: list[tuple[float, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        plain.train()
        cam.train()
        for i, batch in enumerate(batches):
            a, b = run(plain, batch, False), run(cam, batch, True)
            if i >= warmup:
                times_plain.append(a)
                times_cam.append(b)
    result = {}
    for i, clock in enumerate(("wall", "cpu")):
        plain_t, cam_t = [t[i] for t in times_plain], [t[i] for t in times_cam]
        ratios = [b / a for a, b in zip(plain_t, cam_t)]
        result[clock] = (statistics.median(plain_t), statistics.median(cam_t), statistics.median(ratios))
    return result


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' max_epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="an extra effnets CLI argument for both recipes (repeatable), "
                             "e.g. --override=--data.init_args.p=8")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if not args.speed_only:
        results: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
        times: dict[str, list[float]] = {row: [] for row in ROWS[:2]}
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as workdir:
                scores, cli, seconds = train_and_test("reid/baseline", seed, args.epochs, workdir, args.override)
                results[ROWS[0]].append(scores)
                times[ROWS[0]].append(seconds)
                results[ROWS[2]].append(adapt_only(cli))
                scores, _, seconds = train_and_test("reid/cambn", seed, args.epochs, workdir, args.override)
                results[ROWS[1]].append(scores)
                times[ROWS[1]].append(seconds)
        print(f"\nTest on the procedural multi-camera data, seeds {args.seeds} (mean), "
              f"epochs {args.epochs or 'as in the recipes'}")
        header = f"{'':34s} {'held-out mAP':>12s} {'held-out R1':>11s} {'seen mAP':>9s} {'seen R1':>8s} {'fit s':>7s}"
        print(header)
        for row in ROWS:
            mean = {k: statistics.mean(r[k] for r in results[row]) for k in results[row][0]}
            fit = f"{statistics.mean(times[row]):7.0f}" if row in times else f"{'-':>7s}"
            print(f"{row:34s} {100 * mean['held_out/mAP']:12.1f} {100 * mean['held_out/rank1']:11.1f} "
                  f"{100 * mean['seen/mAP']:9.1f} {100 * mean['seen/rank1']:8.1f} {fit}")
    timing = step_time(args.steps)
    print(f"\nTraining step (resnet10t, 64 images 64x32, {args.steps} interleaved steps, "
          f"{torch.get_num_threads()} thread(s)); target CamBN / plain <= 1.15x")
    for clock, (plain_s, cam_s, ratio) in timing.items():
        print(f"  {clock + ' time':9s} plain BN {1e3 * plain_s:8.1f} ms   CamBN {1e3 * cam_s:8.1f} ms   "
              f"CamBN / plain (median of per-step ratios) {ratio:.3f}x")


if __name__ == "__main__":
    main_bench()
