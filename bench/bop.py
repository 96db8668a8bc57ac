"""Optimizer step time on a ResNet-18-sized parameter set: Bop vs SGD(momentum, foreach) vs Adam, side by side.

Every optimizer gets the 62 parameter tensors of torchvision's ResNet-18 (11.7 M values; ±1 for Bop) with
fixed random gradients, and the steps are timed round-robin (one step of each, repeated) so that load
from other processes hits all of them alike. Reported: median milliseconds per step and the ratio to
SGD. Target: Bop <= 1.5x SGD.

    python bench/bop.py                    # CPU, the machine's default thread count
    python bench/bop.py --device cuda      # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [p.shape for p in torchvision.models.resnet18().parameters()]
    dev = args.device
    optimizers = {
        "SGD(momentum=0.9, foreach=True)": torch.optim.SGD(_params(shapes, False, dev, 0), lr=0.1, momentum=0.9,
                                                           foreach=True),
        "Adam(foreach=True)": torch.optim.Adam(_params(shapes, False, dev, 0), lr=1e-3, foreach=True),
        "Bop (default, threshold=1e-8)": Bop(_params(shapes, True, dev, 1)),
        "Bop (threshold=0)": Bop(_params(shapes, True, dev, 1), threshold=0.0),
        "Bop + flip counting": Bop(_params(shapes, True, dev, 1), track_flips=True),
        "Bop per-tensor loop (foreach=False)": Bop(_params(shapes, True, dev, 1), foreach=False),
    }
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    for opt in optimizers.values():  # warm-up: allocate state, first-call overheads
        for _ in range(3):
            opt.step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - start)
    numel = sum(s.numel() for s in shapes)
    sgd = statistics.median(times["SGD(momentum=0.9, foreach=True)"])
    print(f"{len(shapes)} tensors, {numel / 1e6:.1f} M values, device={dev}, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds")
    print(f"{'optimizer':40s} {'ms/step':>10s} {'vs SGD':>8s}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:40s} {med * 1e3:10.2f} {med / sgd:7.2f}x")


if __name__ == "__main__":
    main()
