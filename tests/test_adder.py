"""Adder2d / adder2d: forward and the AdderNet backward against float64 brute-force loops, every backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_effnets.cost import profile
from lightning_effnets.layers import Adder2d, SelfShortcut, adder2d
from lightning_effnets.layers.adder import load_extension

# (input shape, weight shape, stride, padding, dilation, groups)
CASES = [
    ((2, 4, 7, 9), (5, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 6, 9, 7), (4, 3, 3, 2), (2, 1), (0, 2), (1, 2), 2),
    ((1, 4, 8, 8), (4, 1, 3, 3), (2, 2), (1, 1), (1, 1), 4),  # depthwise
    ((3, 3, 5, 6), (7, 3, 1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1, O not a multiple of any block
    ((1, 2, 11, 10), (3, 2, 5, 3), (3, 2), (2, 1), (2, 1), 1),
    ((2, 16, 6, 6), (20, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # wider than one register block
]


def brute_force(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None, stride, padding, dilation, groups):
    """Output, input gradient and weight gradient by explicit loops over output positions (float64)."""
    x, w = x.double(), w.double()
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = torch.zeros(n, o, oh, ow, dtype=torch.float64)
    dxp = torch.zeros_like(xp)
    dw = torch.zeros_like(w)
    for a, b in itertools.product(range(oh), range(ow)):
        rows = slice(a * stride[0], a * stride[0] + dilation[0] * (kh - 1) + 1, dilation[0])
        cols = slice(b * stride[1], b * stride[1] + dilation[1] * (kw - 1) + 1, dilation[1])
        for oc in range(o):
            grp = oc // og
            patch = xp[:, grp * cg:(grp + 1) * cg, rows, cols]  # (n, cg, kh, kw)
            y[:, oc, a, b] = -(patch - w[oc]).abs().sum(dim=(1, 2, 3))
            if g is not None:
                gv = g[:, oc, a, b].double().view(n, 1, 1, 1)
                dw[oc] += (gv * (patch - w[oc])).sum(0)  # full-precision gradient X - W
                dxp[:, grp * cg:(grp + 1) * cg, rows, cols] += gv * (w[oc] - patch).clamp(-1, 1)  # HardTanh
    dx = dxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd]
    return y, dx, dw


def _backends() -> list[str]:
    return ["cpp", "torch"] if load_extension() else ["torch"]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_brute_force(case: int, backend: str, monkeypatch) -> None:
    if backend not in _backends():
        pytest.skip("C++ extension unavailable")
    monkeypatch.setenv("EFFNETS_ADDER_BACKEND", backend)
    xs, ws, stride, padding, dilation, groups = CASES[case]
    x = torch.randn(xs, dtype=torch.float64, requires_grad=True)
    w = (0.8 * torch.randn(ws, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(ws[0], dtype=torch.float64, requires_grad=True)
    y = adder2d(x, w, bias, stride, padding, dilation, groups)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, bias), g)
    y_ref, gx_ref, gw_ref = brute_force(x.detach(), w.detach(), g, stride, padding, dilation, groups)
    torch.testing.assert_close(y, y_ref + bias.detach().view(1, -1, 1, 1), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gb, g.sum(dim=(0, 2, 3)))


def test_every_cpu_kernel_variant_float32() -> None:
    """Each instruction-set build the CPU can run (baseline, AVX2, AVX-512) gives the same numbers."""
    if not load_extension():
        pytest.skip("C++ extension unavailable")
    ops = torch.ops.effnets_adder
    variants = [isa for isa in (1, 2, 3) if ops.isa_available(isa)]
    assert 1 in variants
    for xs, ws, stride, padding, dilation, groups in CASES:
        x, w = torch.randn(xs), torch.randn(ws)
        y_ref, _, _ = brute_force(x, w, None, stride, padding, dilation, groups)
        g = torch.randn(y_ref.shape)
        _, gx_ref, _ = brute_force(x, w, g, stride, padding, dilation, groups)
        for isa in variants:
            y = ops.forward(x, w, list(stride), list(padding), list(dilation), groups, isa)
            gx = ops.input_grad(g, x, w, list(stride), list(padding), list(dilation), groups, isa)
            torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4, msg=f"forward isa={isa}")
            torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-4, msg=f"input grad isa={isa}")


def test_backends_agree_on_a_resnet_shape(monkeypatch) -> None:
    """A batch large enough to span many panels and samples (panels cross sample boundaries)."""
    x = torch.randn(5, 16, 10, 10, requires_grad=True)
    layer = Adder2d(16, 24, 3, padding=1)
    results = {}
    for backend in _backends():
        monkeypatch.setenv("EFFNETS_ADDER_BACKEND", backend)
        y = layer(x)
        gx, gw = torch.autograd.grad(y, (x, layer.weight), torch.ones_like(y) / y.numel())
        results[backend] = (y, gx, gw)
    y_ref, gx_ref, gw_ref = brute_force(x.detach(), layer.weight.detach(), torch.ones(5, 24, 10, 10) / (5 * 24 * 100),
                                        (1, 1), (1, 1), (1, 1), 1)
    for backend, (y, gx, gw) in results.items():
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-3, msg=backend)
        torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-6, msg=backend)
        torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-6, msg=backend)


def test_half_precision_computes_in_float32() -> None:
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    y = adder2d(x.bfloat16(), w.bfloat16(), padding=1)
    assert y.dtype == torch.bfloat16
    y_ref = adder2d(x.bfloat16().float(), w.bfloat16().float(), padding=1)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=0.5)


def test_module_matches_conv2d_interface_and_padding_modes() -> None:
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, bias=True, padding_mode="reflect")
    layer = Adder2d.from_conv(conv, copy_weights=True)
    assert layer.weight.shape == conv.weight.shape and layer.bias is not None
    assert (layer.kernel_size, layer.stride, layer.padding, layer.groups) == ((3, 3), (2, 2), (1, 1), 2)
    torch.testing.assert_close(layer.weight, conv.weight)
    x = torch.randn(2, 6, 9, 9)
    expected = adder2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), conv.weight, conv.bias, 2, 0, 1, 2)
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape == conv(x).shape
    same = Adder2d(3, 5, 4, padding="same", dilation=2)  # even kernel: asymmetric zero padding like Conv2d
    xs = torch.randn(1, 3, 7, 8)
    ys = same(xs)
    assert ys.shape == (1, 5, 7, 8)
    xpad = F.pad(xs, (3, 3, 3, 3))  # total padding 6 per side pair, split 3/3
    torch.testing.assert_close(ys, brute_force(xpad, same.weight.detach(), None, (1, 1), (0, 0), (2, 2), 1)[0].float(),
                               rtol=1e-5, atol=1e-4)


def test_init_follows_the_authors() -> None:
    layer = Adder2d(64, 64, 3)
    assert layer.bias is None
    assert abs(layer.weight.std().item() - 1.0) < 0.05 and abs(layer.weight.mean().item()) < 0.05


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="divisible by groups"):
        Adder2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match=r"expects input \(N, 4, H, W\)"):
        Adder2d(4, 8, 3)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="expects 6"):
        adder2d(torch.randn(1, 4, 8, 8), torch.randn(8, 3, 3, 3), groups=2)
    with pytest.raises(ValueError, match="not divisible by groups"):
        adder2d(torch.randn(1, 4, 8, 8), torch.randn(5, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="strided"):
        Adder2d(4, 4, 3, stride=2, padding="same")(torch.randn(1, 4, 8, 8))


def test_self_shortcut_adds_the_input() -> None:
    body = Adder2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(SelfShortcut(body)(x), x + body(x))
    with pytest.raises(ValueError, match="differs from its input"):
        SelfShortcut(Adder2d(4, 8, 3, padding=1))(x)


def test_cost_counts_additions_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Adder2d(8, 16, 3, stride=2, padding=1, groups=2))
    report = profile(model, torch.randn(2, 3, 16, 16), measure_latency=False)
    conv_macs = 2 * 8 * 16 * 16 * 3 * 9
    adder_positions = 2 * 16 * 8 * 8 * 4 * 9
    assert report.mults == conv_macs
    assert report.adds == conv_macs + 2 * adder_positions
    assert report.macs == conv_macs + adder_positions


@pytest.mark.parametrize("tile", [64, 2000])
def test_torch_path_tiles_match_brute_force(tile: int, monkeypatch) -> None:
    """Tiny tiles force the pure-PyTorch path through its sample and output-channel chunk loops."""
    import lightning_effnets.layers.adder as adder_module

    monkeypatch.setattr(adder_module, "_TILE_ELEMENTS", tile)
    monkeypatch.setenv("EFFNETS_ADDER_BACKEND", "torch")
    xs, ws, stride, padding, dilation, groups = CASES[1]
    x = torch.randn(5, *xs[1:], dtype=torch.float64, requires_grad=True)
    w = torch.randn(ws, dtype=torch.float64, requires_grad=True)
    y = adder2d(x, w, None, stride, padding, dilation, groups)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    y_ref, gx_ref, gw_ref = brute_force(x.detach(), w.detach(), g, stride, padding, dilation, groups)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
