"""Optimizer step time on a ResNet-18-sized parameter set: Bop vs SGD(momentum, foreach) vs Adam, side by side.

Every optimizer gets the 62 parameter tensors of torchvision's ResNet-18 (11.7 M values; ±1 for Bop) with
fixed random gradients, and the steps are timed round-robin (one step of each, repeated) so that load
from other processes hits all of them alike. Reported: median milliseconds per step, and the median over
rounds of the per-round ratio to SGD (paired, so it is robust to load that drifts between rounds).
Target: Bop <= 1.5x SGD.

    python bench/bop.py                    # CPU, the machine's default thread count
    python bench/bop.py --device cuda      # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from lightning_effnets.optim import Bop


def _params(shapes: list[torch.Size], binary: bool, device: str, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        value = torch.randn(shape, generator=gen)
        p = torch.nn.Parameter((torch.where(value >= 0, 1.0, -1.0) if binary else value).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


SGD = "SGD(momentum=0.9, foreach=True)"


def _race(optimizers: dict[str, torch.optim.Optimizer], rounds: int, sync: Callable[[], None]) -> None:
    """Time the optimizers round-robin and print median ms/step and the paired ratio to SGD."""
    for opt in optimizers.values():  # warm-up: allocate state, first-call overheads
        for _ in range(3):
            opt.step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - start)
    print(f"{'optimizer':40s} {'ms/step':>10s} {'vs SGD':>8s}")
    for name, values in times.items():
        ratio = statistics.median(v / s for v, s in zip(values, times[SGD]))
        print(f"{name:40s} {statistics.median(values) * 1e3:10.2f} {ratio:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=50, help="timed steps per optimizer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [p.shape for p in torchvision.models.resnet18().parameters()]
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    numel = sum(s.numel() for s in shapes)
    print(f"{len(shapes)} tensors, {numel / 1e6:.1f} M values, device={dev}, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds")

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(_params(shapes, False, dev, 0), lr=0.1, momentum=0.9, foreach=True)

    print("\nThe comparison (target: Bop <= 1.5x SGD):")
    _race({SGD: sgd(), "Adam(foreach=True)": torch.optim.Adam(_params(shapes, False, dev, 0), lr=1e-3, foreach=True),
           "Bop (default, threshold=1e-8)": Bop(_params(shapes, True, dev, 1))}, args.rounds, sync)
    # Variants that allocate temporaries every step race separately: their allocations (page faults) would
    # slow down whatever runs next to them.
    print("\nBop variants:")
    _race({SGD: sgd(), "Bop (threshold=0)": Bop(_params(shapes, True, dev, 1), threshold=0.0),
           "Bop + flip counting (logging steps)": Bop(_params(shapes, True, dev, 1), track_flips=True),
           "Bop per-tensor loop (foreach=False)": Bop(_params(shapes, True, dev, 1), foreach=False)},
          args.rounds, sync)


if __name__ == "__main__":
    main()
