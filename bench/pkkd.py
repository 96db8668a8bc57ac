"""Training-step time of an adder student with PKKD vs the same student trained plainly, side by side.

    python bench/pkkd.py --threads 1                          # both settings below, 3 rounds x 25 steps each
    python bench/pkkd.py --threads 1 --settings digits-hard   # the recipe's network only
    python bench/pkkd.py --threads 1 --quick                  # 2 rounds x 12 steps

On a machine shared with other jobs use ``--threads 1``: oversubscribed OpenMP threads make step times
meaningless (we measured 0.9 s/step instead of 21 ms for the small setting with 2 threads on 2 busy cores).

Settings (ImageClassifier + AdderConversion + AdaptiveAdderLR, SGD; PKKD adds ProgressiveKernelDistillation with
its defaults: CNN teacher trained jointly, kernel feature loss on every adder layer, logit KD):

* ``digits-hard``: the recipe ``recipes/classification/adder_pkkd.yaml`` (ResNet-10t 16-32-64-128, 16 px, batch 32);
* ``resnet18-32px``: ``recipes/classification/adder.yaml``'s network (ResNet-18, 32 px, batch 64).

A step is the time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, both backward passes, the
optimizer step, logging): what a user waits for. The two variants alternate in rounds (fresh Trainer each
time, same seed and data) so load changes on a shared machine hit both alike; the first 3 steps of every run
are dropped (extension load, allocator warm-up) and the median over all remaining steps is reported.

Target (issue 7): PKKD step <= 2.3x the plain adder step (the teacher's own forward+backward is the ~2x floor
when teacher and student cost the same; on CPU the CNN teacher is cheaper than the adder student).
Measured (1 thread, shared loaded machine): digits-hard 21.3 -> 43.8 ms/step (2.05x); resnet18-32px (--quick)
538 -> 794 ms/step (1.48x). Small networks pay relatively more for the per-layer kernel terms and Python overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_effnets.callbacks import AdaptiveAdderLR, AdderConversion, ProgressiveKernelDistillation  # noqa: E402
from lightning_effnets.data import DigitsDataModule  # noqa: E402
from lightning_effnets.tasks import ImageClassifier  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "digits-hard": dict(backbone="resnet10t", image_size=16, batch_size=32,
                        backbone_kwargs=dict(channels=(16, 32, 64, 128), stem_width=8)),
    "resnet18-32px": dict(backbone="resnet18", image_size=32, batch_size=64, backbone_kwargs={}),
}


class StepTimer(pl.Callback):
    """Wall time of every training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(setting: dict[str, Any], pkkd: bool, steps: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(backbone=setting["backbone"], in_chans=1, image_size=setting["image_size"],
                             backbone_kwargs=setting["backbone_kwargs"], log_samples=0,
                             optimizer=partial(torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=5e-4))
    data = DigitsDataModule(batch_size=setting["batch_size"], image_size=setting["image_size"], in_chans=1,
                            augment=False)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [AdderConversion(), AdaptiveAdderLR(log_norms=False), timer]
    if pkkd:
        callbacks.insert(0, ProgressiveKernelDistillation())
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps + 3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    trainer.fit(module, data)
    return timer.times[3:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 12 steps")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, steps = (2, 12) if args.quick else (3, 25)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {rounds} rounds x {steps} steps")
    for name in args.settings:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for pkkd in (False, True):
                times[pkkd] += run(SETTINGS[name], pkkd, steps)
        plain, distil = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:14s} adder {plain * 1e3:8.1f} ms/step   adder+PKKD {distil * 1e3:8.1f} ms/step   "
              f"ratio {distil / plain:.2f}x (target <= 2.3x)")


if __name__ == "__main__":
    main()
