"""``CostReport``: log what the trained network costs at the start and end of fit.

Compression callbacks change ``pl_module.model`` (conversion in ``setup``, pruning during training), so
the figures at fit start and fit end, side by side, are what a user wants to see.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_effnets.cost import profile

__all__ = ["CostReport"]


class CostReport(pl.Callback):
    """Profile ``pl_module.model`` on ``pl_module.example_input_array`` at fit start and end.

    Logs ``effnets/cost/{start,end}/{macs,params,adds,mults,binary_ops,energy_pj,latency_ms}`` to every
    logger and prints a rich table on rank 0.

    Args:
        latency_repeats: forwards timed for the latency median (0 skips the latency measurement).
        print_table: print a rich table to the console.
    """

    def __init__(self, latency_repeats: int = 10, print_table: bool = True) -> None:
        if latency_repeats < 0:
            raise ValueError(f"latency_repeats must be >= 0, got {latency_repeats}")
        self.latency_repeats = latency_repeats
        self.print_table = print_table
        self.reports: dict[str, dict[str, float]] = {}

    def _example_input(self, pl_module: pl.LightningModule) -> Any:
        example = pl_module.example_input_array
        if example is None:
            raise ValueError(f"CostReport needs {type(pl_module).__name__}.example_input_array to be set")
        from lightning.fabric.utilities.apply_func import move_data_to_device

        return move_data_to_device(example, pl_module.device)

    def _profile(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise ValueError(f"CostReport needs the task's network in {type(pl_module).__name__}.model")
        report = profile(model, self._example_input(pl_module), latency_repeats=max(self.latency_repeats, 1),
                         measure_latency=self.latency_repeats > 0)
        figures = report.as_dict()
        self.reports[when] = figures
        metrics = {f"effnets/cost/{when}/{k}": v for k, v in figures.items() if v == v}  # drop NaN latency
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.print_table:
            self._print(report.table(title=f"effnets cost at fit {when}"))

    @rank_zero_only
    def _print(self, table: Any) -> None:
        from rich.console import Console

        Console().print(table)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "start" not in self.reports:  # on resume keep the original starting figures
            self._profile(trainer, pl_module, "start")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._profile(trainer, pl_module, "end")
        start, end = self.reports.get("start"), self.reports["end"]
        if start and start["macs"] > 0:
            rank_zero_info(f"effnets cost: MACs {start['macs'] / 1e6:.2f}M -> {end['macs'] / 1e6:.2f}M, "
                           f"energy {start['energy_pj'] / 1e6:.3f}uJ -> {end['energy_pj'] / 1e6:.3f}uJ")

    def state_dict(self) -> dict[str, Any]:
        return {"reports": {k: dict(v) for k, v in self.reports.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = {k: dict(v) for k, v in state_dict.get("reports", {}).items()}
