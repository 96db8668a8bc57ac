"""Adder2d vs Conv2d vs the authors' formulation: forward+backward time and peak memory, side by side.

    python bench/adder.py                 # ResNet-20 CIFAR shapes (batch 64) + one ResNet-18 layer
    python bench/adder.py --threads 1     # single-threaded
    python bench/adder.py --quick         # fewer repetitions

What is compared, per layer shape (k=3, stride 1, padding 1, in = out channels):

* ``conv``: ``nn.Conv2d`` (oneDNN), the multiplicative baseline;
* ``adder``: :class:`lightning_effnets.layers.Adder2d` (direct C++ kernels + a Conv2d-class weight gradient);
* ``reference``: the authors' formulation (huawei-noah/AdderNet ``adder.py``), written here from the formula:
  ``unfold`` the input to ``X_col`` (K x N*L), broadcast against ``W_col`` (O x K) into an O x K x N*L tensor,
  ``-|W - X|.sum(K)``; backward broadcasts again for ``(X - W) * g`` and ``clamp(W - X, -1, 1) * g`` and folds.
  (The authors also rescale the weight gradient inside backward; that is AdaptiveAdderLR's job and is left out
  here, as in Adder2d.)

Time: one step is ``y = layer(x); y.backward(g)`` with ``x`` and the weight requiring gradients; the three
implementations run round-robin (so load changes hit all of them alike) and the median step is reported.

Peak memory: each (implementation, shape) runs in a fresh subprocess with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor-sized block is mmapped and returned to the OS on free and
the resident set size follows live allocations; a thread samples ``/proc/self/statm`` every 0.2 ms during three
steps (after a warm-up step). Reported: peak RSS during a step minus RSS before it (input, weight and upstream
gradient already allocated). This counts everything the step allocates -- tensors, oneDNN scratch, the C++
kernels' thread-local panels -- which allocator-level tensor accounting would miss.

Targets (issue 6): adder forward+backward within 3x of Conv2d on CPU; at least 20x faster than the reference;
peak memory within 2x of Conv2d's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_effnets.layers.adder import Adder2d, adder_backend, load_extension  # noqa: E402

IMPLS = ("conv", "adder", "reference")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    size: int

    def reference_bytes(self) -> int:
        """Size of one O x K x N*L float32 tensor of the reference formulation."""
        return 4 * self.channels * self.channels * 9 * self.batch * self.size * self.size


SHAPES = [
    Shape("resnet20 stage1 16ch@32x32", 64, 16, 32),
    Shape("resnet20 stage2 32ch@16x16", 64, 32, 16),
    Shape("resnet20 stage3 64ch@8x8", 64, 64, 8),
    Shape("resnet18 layer3 256ch@14x14", 16, 256, 14),
]
#: The reference keeps about three O x K x N*L tensors alive; skip it where that exceeds this.
REFERENCE_LIMIT_BYTES = 3 << 30


# ------------------------------------------------------------------------------------------ reference
class _ReferenceAdder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w_col: Tensor, x_col: Tensor) -> Tensor:  # (O, K), (K, N*L) -> (O, N*L)
        ctx.save_for_backward(w_col, x_col)
        return -(w_col.unsqueeze(2) - x_col.unsqueeze(0)).abs().sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        w_col, x_col = ctx.saved_tensors
        grad_w = ((x_col.unsqueeze(0) - w_col.unsqueeze(2)) * grad.unsqueeze(1)).sum(2)
        grad_x = ((w_col.unsqueeze(2) - x_col.unsqueeze(0)).clamp(-1, 1) * grad.unsqueeze(1)).sum(0)
        return grad_w, grad_x


class ReferenceAdder2d(nn.Module):
    """The authors' unfold-and-broadcast AdderNet layer (stride/padding only), for comparison."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        x_col = F.unfold(x, 3, padding=1)  # (N, K, L)
        x_col = x_col.permute(1, 0, 2).reshape(x_col.shape[1], -1)  # (K, N*L)
        out = _ReferenceAdder.apply(self.weight.view(self.weight.shape[0], -1), x_col)
        return out.view(-1, n, h, w).permute(1, 0, 2, 3)


def make_layer(impl: str, channels: int) -> nn.Module:
    if impl == "conv":
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if impl == "adder":
        return Adder2d(channels, channels, 3, padding=1)
    return ReferenceAdder2d(channels)


def make_step(impl: str, shape: Shape):
    torch.manual_seed(0)
    layer = make_layer(impl, shape.channels)
    x = torch.randn(shape.batch, shape.channels, shape.size, shape.size, requires_grad=True)
    g = torch.randn(shape.batch, shape.channels, shape.size, shape.size)

    def reset() -> None:
        x.grad = None
        layer.weight.grad = None

    def step() -> None:
        layer(x).backward(g)

    return step, reset


# ------------------------------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(impl: str, shape: Shape, steps: int = 3) -> int:
    """Peak resident bytes a step adds (run inside a fresh process; see the module docstring)."""
    step, reset = make_step(impl, shape)
    step()  # warm-up: one-time caches (oneDNN primitives, the C++ extension) are not the step's memory
    peaks = []
    for _ in range(steps):
        reset()
        base = _rss_bytes()
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.0002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        step()
        peak[0] = max(peak[0], _rss_bytes())
        stop.set()
        sampler.join()
        peaks.append(peak[0] - base)
    return max(peaks)


def memory_in_subprocess(impl: str, shape: Shape, threads: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--_memory", json.dumps([impl, shape.__dict__]), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ time
def measure_times(shape: Shape, impls: list[str], repeats: int, warmup: int = 2) -> dict[str, float]:
    steps = {impl: make_step(impl, shape) for impl in impls}
    for _ in range(warmup):
        for step, reset in steps.values():
            reset()
            step()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(repeats):
        for impl in impls if i % 2 == 0 else reversed(impls):  # round-robin, alternating order
            step, reset = steps[impl]
            reset()
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) * 1e3 for impl, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory:
        impl, shape = json.loads(args._memory)
        if impl == "adder":
            load_extension()
        print(measure_memory(impl, Shape(**shape)))
        return

    start = time.perf_counter()
    ok = load_extension()
    print(f"C++ kernels: {'available' if ok else 'NOT available'} (first build/load {time.perf_counter() - start:.1f} s);"
          f" backend for float32 CPU: {adder_backend(torch.zeros(1))}; torch {torch.__version__}, "
          f"{args.threads} thread(s); CPU capability {torch.backends.cpu.get_cpu_capability()}")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share the CPU; ratios are "
              "measured side by side)")
    except OSError:
        pass

    rows = []
    for shape in SHAPES:
        impls = ["conv", "adder"]
        run_reference = 3 * shape.reference_bytes() <= REFERENCE_LIMIT_BYTES
        if run_reference:
            impls.append("reference")
        repeats = 5 if args.quick else 15
        if run_reference:
            repeats = 3 if args.quick else 7
        times = measure_times(shape, impls, repeats)
        mem = {} if args.no_memory else {impl: memory_in_subprocess(impl, shape, args.threads) for impl in impls}
        rows.append((shape, times, mem, run_reference))
        print(f"  measured {shape.name}")

    mb = 1 / 2**20
    header = (f"{'layer (batch)':34s} {'conv ms':>8s} {'adder ms':>9s} {'ref ms':>9s} {'adder/conv':>10s} "
              f"{'ref/adder':>9s} | {'conv MB':>8s} {'adder MB':>8s} {'ref MB':>8s} {'adder/conv':>10s}")
    print("\nforward+backward per step (median) and peak memory added by a step")
    print(header)
    print("-" * len(header))
    worst_time = worst_mem = 0.0
    best_speedup = float("inf")
    for shape, times, mem, run_reference in rows:
        ratio = times["adder"] / times["conv"]
        worst_time = max(worst_time, ratio)
        ref = f"{times['reference']:9.1f}" if run_reference else f"{'n/a':>9s}"
        speedup = f"{times['reference'] / times['adder']:8.1f}x" if run_reference else f"{'n/a':>9s}"
        if run_reference:
            best_speedup = min(best_speedup, times["reference"] / times["adder"])
        if mem:
            mratio = mem["adder"] / max(mem["conv"], 1)
            worst_mem = max(worst_mem, mratio)
            ref_mb = f"{mem['reference'] * mb:8.1f}" if run_reference else f"{'n/a':>8s}"
            mem_cols = f"{mem['conv'] * mb:8.1f} {mem['adder'] * mb:8.1f} {ref_mb} {mratio:9.2f}x"
        else:
            mem_cols = "(skipped)"
        label = f"{shape.name} ({shape.batch})"
        print(f"{label:34s} {times['conv']:8.1f} {times['adder']:9.1f} {ref} {ratio:9.2f}x {speedup} | {mem_cols}")
    for shape, _, _, run_reference in rows:
        if not run_reference:
            print(f"reference not run for {shape.name}: each O x K x N*L intermediate would take "
                  f"{shape.reference_bytes() / 2**30:.1f} GiB")
    print(f"\ntargets: adder/conv time <= 3x: worst {worst_time:.2f}x -> {'met' if worst_time <= 3 else 'NOT met'}; "
          f"reference/adder >= 20x: lowest {best_speedup:.1f}x -> {'met' if best_speedup >= 20 else 'NOT met'}"
          + (f"; adder/conv memory <= 2x: worst {worst_mem:.2f}x -> {'met' if worst_mem <= 2 else 'NOT met'}"
             if not args.no_memory else ""))


if __name__ == "__main__":
    main()
