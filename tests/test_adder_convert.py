"""to_adder / restore_adder on timm models, AdderSR pieces (self-shortcut, PowerActivation)."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_effnets.convert import restore_adder, to_adder
from lightning_effnets.layers import Adder2d, PowerActivation, SelfShortcut
from lightning_effnets.layers.activations import power_activation


@pytest.mark.parametrize("name", ["resnet10t", "regnetx_002", "mobilenetv2_035", "efficientnet_lite0",
                                  "mobilenetv3_small_050"])
def test_timm_models_convert_and_train(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=5)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = to_adder(model)
    assert report.kept == {convs[0]: "first layer kept full precision"}
    assert sorted(report.converted) == sorted(convs[1:])  # classifier is a Linear: every other conv converts
    assert isinstance(model.get_submodule(convs[0]), nn.Conv2d)
    assert all(isinstance(model.get_submodule(n), Adder2d) for n in report.converted)
    # MobileNetV3's squeeze-excitation convs and its 1x1 conv head have no BN after them: their adder outputs
    # (large negative distances) saturate the following activation, which kills the gradient -- hence the warning.
    has_se = name == "mobilenetv3_small_050"
    assert any("not followed by a normalisation layer" in str(w.message) for w in caught) == has_se
    for m in model.modules():  # undo timm's zero-init of each block's last BN, which zeroes those gradients
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    for n in report.converted:
        grad = model.get_submodule(n).weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert has_se or grad.abs().sum() > 0, n


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 4, 1),  # output head: a 1x1 conv
    )


def test_include_exclude_and_output_conv() -> None:
    model = _small_net()
    report = to_adder(model)
    assert report.converted == ["3", "6"]
    assert report.kept == {"0": "first layer kept full precision", "9": "last layer kept full precision"}
    report = to_adder(_small_net(), exclude="6")
    assert report.converted == ["3"] and report.kept["6"] == "excluded"
    with pytest.warns(UserWarning, match=r"not followed by a normalisation layer \(9\)"):
        report = to_adder(_small_net(), include=["6", "9"], skip_last=False)
    assert report.converted == ["6", "9"]
    with pytest.raises(ValueError, match="matches none"):
        to_adder(_small_net(), include="layer1.*")
    with pytest.raises(ValueError, match="no layers"):
        to_adder(nn.Sequential(nn.Linear(4, 4)))


def test_geometry_and_weights_carry_over() -> None:
    conv = nn.Conv2d(6, 9, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3, bias=True)
    model = nn.Sequential(nn.Conv2d(6, 6, 1), conv, nn.BatchNorm2d(9))
    to_adder(model, skip_last=False, copy_weights=True)
    layer = model[1]
    assert isinstance(layer, Adder2d)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups) == (
        (3, 5), (2, 1), (1, 2), (1, 2), 3)
    torch.testing.assert_close(layer.weight, conv.weight)
    torch.testing.assert_close(layer.bias, conv.bias)


def test_addersr_shortcut_and_power_activation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 3, 3, padding=1))
    report = to_adder(model, self_shortcut=True, power_activation=True)
    assert report.converted == ["1", "2"]
    assert isinstance(model[1], nn.Sequential) and isinstance(model[1][0], SelfShortcut)
    assert isinstance(model[2], nn.Sequential) and isinstance(model[2][0], Adder2d)  # stride 2: no shortcut
    x = torch.randn(2, 8, 6, 6)
    adder, act = model[1][0].body, model[1][1]
    with torch.no_grad():
        act.alpha.fill_(0.5)
        y = x + adder(x)
        expected = torch.sign(y) * y.abs().sqrt()
        torch.testing.assert_close(model[1](x), expected)


def test_norm_puts_batch_norm_inside_the_shortcut() -> None:
    """``norm=True``: ``P(x + BN(adder(x)))`` -- the BN brings the large negative distances back to unit scale."""
    def build() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 3, 3, padding=1))

    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BN follows every adder layer now: no normalisation warning
        report = to_adder(model, norm=True, self_shortcut=True, power_activation=True)
    assert report.converted == ["1", "2"]
    assert isinstance(model[2][0].body, Adder2d)  # already followed by a BN: none added
    shortcut, act = model[1][0], model[1][1]
    adder, bn = shortcut.body[0], shortcut.body[1]
    assert isinstance(adder, Adder2d) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        a = adder(x)
        assert a.max() < -5  # raw adder outputs: large negative distances
        normed = (a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(a.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                    + bn.eps).view(1, -1, 1, 1)
        y = x + normed
        torch.testing.assert_close(model[1](x), torch.sign(y) * y.abs() ** act.alpha, rtol=1e-4, atol=1e-4)
    fresh = build()
    restore_adder(fresh, {"converted": report.converted,
                          "options": {"norm": True, "self_shortcut": True, "power_activation": True}})
    fresh.load_state_dict(model.state_dict())  # strict: the BN is rebuilt too


def test_restore_rebuilds_the_same_structure() -> None:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    report = to_adder(model, exclude="layer4.*", self_shortcut=True)
    record = {"converted": report.converted, "options": {"self_shortcut": True}}
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    restore_adder(fresh, record)
    fresh.load_state_dict(model.state_dict())  # strict: same names, same shapes
    assert [n for n, m in fresh.named_modules() if isinstance(m, Adder2d)] == \
        [n for n, m in model.named_modules() if isinstance(m, Adder2d)]
    x = torch.randn(1, 3, 32, 32)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(ValueError, match="not the architecture"):
        restore_adder(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)), record)


def test_unfreeze_bn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4), nn.Conv2d(4, 2, 1))
    to_adder(model, unfreeze_bn=True)
    assert type(model[2]) is nn.BatchNorm2d and model[2].weight.requires_grad


def test_warns_when_no_norm_follows() -> None:
    with pytest.warns(UserWarning, match="not followed by a normalisation layer"):
        to_adder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))


def test_power_activation_values_and_finite_gradients() -> None:
    act = PowerActivation(num_parameters=3, init=0.5)
    x = torch.tensor([[-4.0, 0.0, 9.0]]).view(1, 3, 1, 1).requires_grad_()
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([0.5, 0.5, 2.0]))
    y = act(x)
    torch.testing.assert_close(y.flatten(), torch.tensor([-2.0, 0.0, 81.0]))
    y.sum().backward()
    # d/dx sign(x)|x|^a = a|x|^(a-1); d/da = sign(x)|x|^a log|x|; both finite (zero) at x = 0
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([0.5 / 2.0, 0.0, 2.0 * 9.0]))
    torch.testing.assert_close(act.alpha.grad, torch.tensor([-2.0 * math.log(4.0), 0.0, 81.0 * math.log(9.0)]))
    assert torch.isfinite(power_activation(torch.zeros(3, requires_grad=True), torch.tensor(0.3))).all()
    with pytest.raises(ValueError, match="3 exponents"):
        act(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        PowerActivation(init=0.0)
