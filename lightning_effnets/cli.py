"""``effnets``: a LightningCLI over every task, datamodule and callback of the package.

``effnets fit --config recipes/classification/baseline.yaml`` trains from a recipe; a bundled recipe
can also be named without its path (``--config classification/baseline``), which works after a
non-editable install too. ``effnets recipes`` lists the bundled recipes. After ``fit`` the best
checkpoint is evaluated on the test split (``--test_after_fit false`` turns this off).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

__all__ = ["EffnetsCLI", "main", "recipes_dir", "list_recipes", "resolve_recipe"]


def recipes_dir() -> Path:
    """Folder of the bundled recipes: inside the installed package, or ``recipes/`` of a source checkout."""
    packaged = Path(__file__).resolve().parent / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[str]:
    """Names of the bundled recipes, e.g. ``classification/baseline``."""
    root = recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_recipe(value: str) -> str:
    """An existing path is returned unchanged; otherwise a bundled recipe name is resolved to its file."""
    if Path(value).exists():
        return value
    name = value[len("recipes/"):] if value.startswith("recipes/") else value
    candidate = recipes_dir() / name
    for path in (candidate, candidate.with_suffix(".yaml")):
        if path.is_file():
            return str(path)
    if value.endswith((".yaml", ".yml")) or "/" in value:
        available = ", ".join(list_recipes())
        raise SystemExit(f"effnets: config {value!r} is neither a file nor a bundled recipe. Bundled: {available}")
    return value  # an inline YAML/JSON string: let jsonargparse parse it


def _resolve_config_args(args: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            out += [arg, resolve_recipe(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_recipe(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


class EffnetsCLI(LightningCLI):
    """LightningCLI with any LightningModule/DataModule by ``class_path`` and test-after-fit."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the best checkpoint (or the last weights) on the test split.")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.fast_dev_run or self.datamodule is None:
            return
        has_test = type(self.datamodule).test_dataloader is not LightningDataModule.test_dataloader
        if not has_test:
            return
        callback = self.trainer.checkpoint_callback
        ckpt = "best" if callback is not None and getattr(callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def main(args: list[str] | None = None) -> EffnetsCLI | None:
    """Entry point of the ``effnets`` script; tests call it with an argument list."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "recipes":
        root = recipes_dir()
        for name in list_recipes():
            print(f"{name:40s} {root / name}.yaml")
        return None
    argv = _resolve_config_args(argv)
    if args is None:  # LightningCLI reads sys.argv itself; give it the resolved recipe paths
        sys.argv = sys.argv[:1] + argv
    cli = EffnetsCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )
    _finish_wandb_runs(cli)
    return cli


def _finish_wandb_runs(cli: LightningCLI) -> None:
    """Close W&B runs so the offline run is complete on disk and a second ``main()`` starts a new run
    (WandbLogger would otherwise silently reuse the still-open run)."""
    from lightning.pytorch.loggers import WandbLogger

    trainer = getattr(cli, "trainer", None)
    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def entry_point() -> int:
    """Console-script wrapper: ``main()`` returns the CLI object, a script must return an exit code."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(entry_point())
