"""Binary layers, sign estimators, to_binary / restore_binary and the cost counter, against formulas."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_effnets import cost
from lightning_effnets.convert import restore_binary, to_binary
from lightning_effnets.layers import (BinaryConv2d, BinaryLinear, RPReLU, RSign, approx_sign, binarize,
                                      binary_parameters, is_binary, mark_binary, sign_ste)

POINTS = torch.tensor([-2.0, -1.0, -0.75, -0.5, -0.25, -1e-3, 0.0, 1e-3, 0.25, 0.5, 0.75, 1.0, 1.5])


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def test_sign_is_plus_minus_one_with_sign_of_zero_positive():
    for fn in (sign_ste, approx_sign):
        assert fn(POINTS).tolist() == [-1.0] * 6 + [1.0] * 7


def test_ste_gradient_is_clipped_identity():
    expected = [1.0 if abs(v) <= 1 else 0.0 for v in POINTS.tolist()]
    assert _grad(sign_ste, POINTS).tolist() == expected


def test_approx_sign_gradient_is_bireal_piecewise_formula():
    def formula(x):  # Bi-Real Net (arXiv:1808.00278): 2+2x on [-1,0), 2-2x on [0,1), 0 elsewhere
        if -1 <= x < 0:
            return 2 + 2 * x
        if 0 <= x < 1:
            return 2 - 2 * x
        return 0.0

    expected = torch.tensor([formula(v) for v in POINTS.tolist()])
    torch.testing.assert_close(_grad(approx_sign, POINTS), expected)
    with pytest.raises(ValueError, match="unknown sign estimator"):
        binarize(POINTS, "tanh")


@pytest.mark.parametrize("scale", [False, True])
def test_binary_conv_forward_and_gradients_match_plain_conv(scale):
    torch.manual_seed(0)
    layer = BinaryConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True, activation="approx_sign", scale=scale)
    assert set(layer.weight.unique().tolist()) == {-1.0, 1.0} and is_binary(layer.weight)
    with torch.no_grad():
        if scale:
            layer.scale.copy_(torch.rand(6) + 0.5)
        layer.bias.normal_()
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    y = layer(x)
    # independent computation: scale * conv(sign(x), W) + bias, differentiated by autograd on plain tensors
    xb = torch.where(x.detach() >= 0, 1.0, -1.0).requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    s = layer.scale.detach().view(1, -1, 1, 1) if scale else 1.0
    ref = F.conv2d(xb, w, None, stride=2, padding=1, groups=2) * s + layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(y, ref)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(layer.weight.grad, w.grad)  # Bop sees the plain conv weight gradient
    dx = xb.grad * (2 - 2 * x.detach().abs()).clamp(min=0)  # chain rule through approx-sign
    torch.testing.assert_close(x.grad, dx)


def test_latent_balanced_binarisation_formula_and_ste():
    torch.manual_seed(1)
    layer = BinaryLinear(5, 3, activation=None, latent=True, balanced=True, scale=True)
    assert not is_binary(layer.weight) and binary_parameters(layer) == []
    x = torch.randn(4, 5)
    y = layer(x)
    w = layer.weight.detach()
    centred = w - w.mean(dim=1, keepdim=True)
    wb = torch.where(centred >= 0, 1.0, -1.0) * centred.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(y, x @ wb.t())
    upstream = torch.randn_like(y)
    y.backward(upstream)
    # STE through sign(W - mean W): d/dW of (W - mean W) is the centring projection
    g = (upstream.t() @ x) * centred.abs().mean(dim=1, keepdim=True) * (centred.abs() <= 1)
    expected = g - g.mean(dim=1, keepdim=True)
    torch.testing.assert_close(layer.weight.grad, expected)
    with pytest.raises(ValueError, match="latent=True"):
        BinaryLinear(5, 3, balanced=True)


def test_rsign_and_rprelu_formulas():
    rs = RSign(3, estimator="ste")
    rp = RPReLU(3)
    with torch.no_grad():
        rs.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
        rp.shift_in.copy_(torch.tensor([0.1, -0.2, 0.3]))
        rp.shift_out.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(2, 3, 4, 4)
    b = torch.tensor([0.5, -0.5, 0.0]).view(1, 3, 1, 1)
    assert torch.equal(rs(x), torch.where(x + b >= 0, 1.0, -1.0))
    z = x + torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)
    expected = torch.where(z > 0, z, 0.25 * z) + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(rp(x), expected)
    torch.testing.assert_close(rp(x[:, :, 0, 0]), expected[:, :, 0, 0])  # (N, C) inputs


def test_binary_mark_survives_copy_pickle_and_discovery_by_layer_type():
    layer = BinaryConv2d(2, 2, 3)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), layer.to(torch.float64)):
        assert is_binary(clone.weight) and binary_parameters(clone) == [clone.weight]
    model = nn.Sequential(BinaryLinear(3, 3), nn.Linear(3, 3))
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())  # a fresh, unmarked Parameter
    assert binary_parameters(model) == [model[0].weight]
    custom = nn.Module()  # a user-defined layer marks its own ±1 parameter
    custom.real = nn.Parameter(torch.ones(3))
    custom.signs = mark_binary(nn.Parameter(torch.ones(3)))
    assert binary_parameters(custom) == [custom.signs]


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))


def test_to_binary_converts_middle_layers_keeps_first_and_last():
    torch.manual_seed(0)
    net = _net()
    old = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    report = to_binary(net)
    assert report.converted == ["3.0", "4", "9", "2", "3.2", "6", "10"]
    assert report.kept == {"0": "first layer kept full precision", "11": "last layer kept full precision"}
    assert type(net[0]) is nn.Conv2d and type(net[11]) is nn.Linear
    assert isinstance(net[3][0], BinaryConv2d) and isinstance(net[9], BinaryLinear)
    assert all(isinstance(net[i], nn.Identity) for i in (2, 6, 10))
    for name in ("3.0", "4", "9"):
        layer = net.get_submodule(name)
        assert torch.equal(layer.weight, torch.where(old[name] >= 0, 1.0, -1.0))  # sign of the real weights
    assert net[4].bias is not None
    assert len(binary_parameters(net)) == 3
    net(torch.randn(2, 1, 8, 8)).sum().backward()


def test_to_binary_options_and_errors():
    net = _net()
    report = to_binary(net, skip_first=False, include=["0", "3.*", "4"], exclude="3.0", relu="hardtanh",
                       activation=None, scale=True)
    assert report.converted == ["0", "4", "3.2"]
    assert report.kept["3.0"] == "excluded" and report.kept["9"] == "not included"
    assert isinstance(net[3][2], nn.Hardtanh) and type(net[2]) is nn.ReLU and type(net[3][0]) is nn.Conv2d
    assert net[0].activation is None and net[0].scale is not None
    with pytest.raises(ValueError, match="include="):
        to_binary(_net(), include="nothing.*")
    with pytest.raises(ValueError, match="no layers"):
        to_binary(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="relu must be"):
        to_binary(_net(), relu="gelu")
    with pytest.raises(ValueError, match="latent=True"):
        to_binary(_net(), balanced=True)


def test_restore_binary_rebuilds_the_structure_for_loading():
    torch.manual_seed(0)
    net = _net()
    report = to_binary(net, scale=True, relu="prelu")
    record = {"converted": report.converted, "options": {"activation": "ste", "scale": True,
                                                           "balanced": False, "latent": False, "relu": "prelu"}}
    fresh = _net()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(net.state_dict())  # scales and PReLU slopes have no place in the real model
    restore_binary(fresh, record)
    fresh.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 8, 8)
    net.eval(), fresh.eval()
    assert torch.equal(net(x), fresh(x))
    with pytest.raises(ValueError, match="no convertible layer"):
        restore_binary(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)), {"converted": ["0", "5"],
                                                                               "options": record["options"]})


def test_cost_counts_binary_ops_for_binary_inputs_and_additions_for_real_inputs():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), BinaryConv2d(8, 16, 3, padding=1, scale=True),
                        BinaryConv2d(16, 4, 1, activation=None), nn.Flatten(), BinaryLinear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    report = cost.profile(net, x, measure_latency=False)
    macs_real = 2 * 8 * 6 * 6 * (3 * 9)
    macs_b1 = 2 * 16 * 6 * 6 * (8 * 9)
    macs_b2 = 2 * 4 * 6 * 6 * 16
    macs_lin = 2 * 5 * (4 * 6 * 6)
    assert report.binary_ops == macs_b1 + macs_lin
    assert report.mults == macs_real + 2 * 16 * 6 * 6  # the real conv + one rescale per scaled output
    assert report.adds == macs_real + macs_b2  # a ±1-weight layer on real inputs only adds
    assert report.macs == macs_real + macs_b1 + macs_b2 + macs_lin
    assert report.energy_pj == pytest.approx(report.mults * 3.7 + report.adds * 0.9)  # binary ops not priced
