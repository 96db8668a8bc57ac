"""Structural channel pruning vs masking, side by side in one run, plus a coverage sweep over timm families.

    python bench/pruning.py                      # speed table (resnet18, mobilenetv3_large_100, efficientnet_b0, ...)
    python bench/pruning.py --coverage           # prune + forward/backward on 20+ timm architectures
    python bench/pruning.py --models resnet18 --batch 8 --size 224 --repeats 10
    python bench/pruning.py --models resnet18 --threads 1 --round-to 1 8 16 --breakdown   # latency investigation

For each model, 50% of the channels of every prunable group are removed (L1 magnitude, output layer kept):

* MACs / params ratio of the pruned model (``lightning_effnets.cost.profile``);
* measured CPU latency ratio, pruned vs dense: fastest of ``--repeats`` forwards each, interleaved, so that
  other processes on a shared machine disturb both alike (the minimum is the least disturbed run);
* time of the pruning step (fastest of 3, alternating): ``lightning_effnets.pruning.prune`` (graph + scoring +
  index-tracked surgery + record + a verification forward) vs calling Torch-Pruning directly
  (``MetaPruner(...).step()``);
* Lightning's ``ModelPruning`` (``ln_structured`` masks, amount 0.5 on every conv/linear weight): latency ratio.

With ``--round-to`` each model is pruned once per value (channel counts multiples of it: SIMD/oneDNN-friendly
widths), and ``--breakdown`` splits dense and pruned forward time into convolutions (``aten::convolution`` and
below) and everything else (batch norm, activations, pooling, additions, copies), measured with
``torch.profiler``: convolution time falls with the MACs, the memory-bound rest only with the width.

Targets (issue 5): latency ratio within 1.2x of the MACs ratio on ResNet-18; our pruning step no slower than
Torch-Pruning directly.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from torch import nn  # noqa: E402

from lightning_effnets.cost import profile  # noqa: E402
from lightning_effnets.pruning import prune  # noqa: E402
from lightning_effnets.pruning.pruner import default_output_modules  # noqa: E402

SPEED_MODELS = ["resnet18", "mobilenetv3_large_100", "efficientnet_b0", "resnet50", "regnetx_004"]
COVERAGE_MODELS = [
    # plain / residual
    "resnet10t", "resnet18", "resnet50", "resnext26ts", "seresnet18", "wide_resnet50_2", "vgg11_bn", "regnetx_002",
    "regnety_002", "dla34", "cspresnet50", "darknet17",
    # depthwise / inverted residual
    "mobilenetv2_050", "mobilenetv3_large_100", "efficientnet_b0", "mnasnet_050", "ghostnet_050", "lcnet_050",
    "tinynet_e", "fbnetc_100", "mixnet_s", "rexnet_100",
    # dense / multi-branch / concat
    "densenet121", "dpn68", "inception_v3", "res2net50_14w_8s", "hrnet_w18_small", "selecsls42b",
    # normalisation-heavy / attention
    "convnext_atto", "repvgg_a0", "vit_tiny_patch16_224",
]


def _fastest_interleaved(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    times_a, times_b = [], []
    with torch.inference_mode():
        for _ in range(2):
            a(x), b(x)
        for _ in range(repeats):
            for model, times in ((a, times_a), (b, times_b)):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    return min(times_a) * 1e3, min(times_b) * 1e3


def _torch_pruning_direct(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  ignored_layers=default_output_modules(model))
    pruner.step()
    return time.perf_counter() - start


def _masked(model: nn.Module) -> nn.Module:
    from lightning.pytorch.callbacks import ModelPruning

    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    callback = ModelPruning("ln_structured", parameters_to_prune=params, amount=0.5, pruning_dim=0, pruning_norm=1,
                            make_pruning_permanent=False, use_global_unstructured=False, verbose=0)
    callback.setup(None, model, "fit")  # type: ignore[arg-type]
    callback.apply_pruning(0.5)
    return model


def _breakdown(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(convolution, other) milliseconds per forward, from the profiler's per-op self times."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.inference_mode():
        model(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x)
    conv = other = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / repeats
        if "conv" in event.key or "mkldnn" in event.key:
            conv += ms
        else:
            other += ms
    return conv, other


def speed(models: list[str], batch: int, size: int, repeats: int, round_to: list[int], breakdown: bool) -> None:
    x = torch.randn(batch, 3, size, size)
    header = (f"{'model':24s} {'round':>5s} {'MACs':>6s} {'params':>6s} {'latency':>8s} {'lat/MACs':>8s} "
              f"{'masked':>7s} {'ours[s]':>8s} {'TP[s]':>7s} {'ours/TP':>7s}")
    print(f"batch {batch}x3x{size}x{size}, {torch.get_num_threads()} threads, ratios pruned/dense, 50% channels, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(header)
    print("-" * len(header))
    for name in models:
        dense = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        masked = _masked(copy.deepcopy(dense)).eval()
        x_trace = x[:1]
        before = profile(dense, x_trace, measure_latency=False)
        dense_ms2, masked_ms = _fastest_interleaved(dense, masked, x, repeats)
        for multiple in round_to:
            ours_s = tp_s = float("inf")
            for _ in range(3):  # alternate, fresh copies, fastest of 3 (the first call also warms up kernels)
                ours = copy.deepcopy(dense)
                start = time.perf_counter()
                prune(ours, x_trace, "l1", ratio=0.5, round_to=multiple if multiple > 1 else None)
                ours_s = min(ours_s, time.perf_counter() - start)
                tp_s = min(tp_s, _torch_pruning_direct(copy.deepcopy(dense), x_trace))
            ours.eval()
            after = profile(ours, x_trace, measure_latency=False)
            dense_ms, ours_ms = _fastest_interleaved(dense, ours, x, repeats)
            macs_r, lat_r = after.macs / before.macs, ours_ms / dense_ms
            print(f"{name:24s} {multiple:5d} {macs_r:6.3f} {after.params / before.params:6.3f} {lat_r:8.3f} "
                  f"{lat_r / macs_r:8.2f} {masked_ms / dense_ms2:7.3f} {ours_s:8.2f} {tp_s:7.2f} "
                  f"{ours_s / tp_s:7.2f}", flush=True)
            if breakdown:
                dense_conv, dense_other = _breakdown(dense, x, max(repeats // 2, 1))
                ours_conv, ours_other = _breakdown(ours, x, max(repeats // 2, 1))
                print(f"{'':24s}   dense {dense_conv:7.1f} ms conv + {dense_other:6.1f} ms other | pruned "
                      f"{ours_conv:7.1f} ms conv ({ours_conv / dense_conv:.3f}x) + {ours_other:6.1f} ms other "
                      f"({ours_other / dense_other:.3f}x)", flush=True)
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _timeout(signum: int, frame: object) -> None:
    raise TimeoutError("did not finish within the time limit")


def coverage(models: list[str], size: int, limit: int) -> None:
    print(f"coverage: prune 50% (L1), forward+backward at 2x3x{size}x{size}, output shape checked, {limit}s limit")
    failures = 0
    signal.signal(signal.SIGALRM, _timeout)
    for name in models:
        signal.alarm(limit)
        try:
            side = max(size, 96) if "inception" in name else size  # inception needs >= 75 pixels
            kwargs = {"img_size": side} if "vit" in name else {}
            model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs)
            x = torch.randn(2, 3, side, side)
            before = profile(model, x[:1], measure_latency=False).macs
            start = time.perf_counter()
            prune(model, x[:1], "l1", ratio=0.5)
            seconds = time.perf_counter() - start
            model.train()
            out = model(x)
            out.float().sum().backward()
            assert out.shape == (2, 7), f"output shape {tuple(out.shape)}"
            after = profile(model, x[:1], measure_latency=False).macs
            print(f"  ok    {name:24s} MACs ratio {after / before:.3f}  prune {seconds:.2f}s", flush=True)
        except Exception as error:  # report every failure and go on
            failures += 1
            last = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
            print(f"  FAIL  {name:24s} {type(error).__name__}: {str(error).splitlines()[0][:150]} "
                  f"({os.path.basename(last.filename)}:{last.lineno})" if last else "", flush=True)
        finally:
            signal.alarm(0)
    print(f"{len(models) - failures}/{len(models)} architectures pruned, ran forward/backward with the right shape")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--coverage", action="store_true", help="run the architecture coverage sweep instead")
    parser.add_argument("--limit", type=int, default=120, help="seconds per architecture in the coverage sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--round-to", type=int, nargs="*", default=[1],
                        help="prune once per value, keeping channel counts multiples of it (1 = no rounding)")
    parser.add_argument("--breakdown", action="store_true",
                        help="split forward time into convolutions and other ops (torch.profiler)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.coverage:
        coverage(args.models or COVERAGE_MODELS, 64 if args.size == 224 else args.size, args.limit)
    else:
        speed(args.models or SPEED_MODELS, args.batch, args.size, args.repeats, args.round_to, args.breakdown)


if __name__ == "__main__":
    sys.exit(main())
