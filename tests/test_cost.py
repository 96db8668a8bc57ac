import math

import pytest
import torch
from torch import nn

from lightning_effnets import cost
from lightning_effnets.cost import OpCount, profile, register_cost


def _conv_macs(c_in, c_out, k, h_out, w_out, groups=1, batch=1):
    return batch * c_out * h_out * w_out * (c_in // groups) * k * k


def test_profile_macs_of_small_conv_net_match_formula():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),          # 16x16 -> 16x16
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # -> 8x8
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # grouped, 8x8
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )
    x = torch.randn(2, 3, 16, 16)
    expected = (_conv_macs(3, 8, 3, 16, 16, batch=2) + _conv_macs(8, 16, 3, 8, 8, batch=2)
                + _conv_macs(16, 16, 3, 8, 8, groups=4, batch=2) + 2 * 16 * 10)
    report = profile(net, x, latency_repeats=2)
    assert report.macs == expected
    assert report.mults == expected and report.adds == expected and report.binary_ops == 0
    assert report.params == sum(p.numel() for p in net.parameters())
    assert report.energy_pj == pytest.approx(expected * 3.7 + expected * 0.9)
    assert report.latency_ms > 0 and math.isfinite(report.latency_ms)


def test_profile_restores_mode_and_leaves_batchnorm_statistics_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).train()
    before = net[1].running_mean.clone()
    profile(net, torch.randn(4, 1, 8, 8) + 3.0, latency_repeats=1)
    assert net.training
    torch.testing.assert_close(net[1].running_mean, before)
    assert int(net[1].num_batches_tracked) == 0


class _Doubler(nn.Module):
    """A layer whose inner matmul must be replaced by its registered count."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.lin(x) * 2


def test_registered_counter_replaces_flop_counter_figures():
    @register_cost(_Doubler)
    def _count(module, inputs, output):
        n = inputs[0].shape[0] * 16
        return OpCount(macs=n, adds=2 * n)

    try:
        net = nn.Sequential(nn.Linear(4, 4), _Doubler())
        report = profile(net, torch.randn(3, 4), measure_latency=False)
        assert report.macs == 3 * 16 + 3 * 16
        assert report.mults == 3 * 16  # only the plain Linear multiplies
        assert report.adds == 3 * 16 + 2 * 3 * 16
        assert math.isnan(report.latency_ms)
    finally:
        cost._REGISTRY.pop(_Doubler)


def test_profile_accepts_tuple_and_dict_inputs_and_rejects_non_modules():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x, y):
            return self.a(x) + y

    net = Two()
    assert profile(net, (torch.randn(1, 3), torch.randn(1, 2)), measure_latency=False).macs == 6
    assert profile(net, {"x": torch.randn(1, 3), "y": torch.randn(1, 2)}, measure_latency=False).macs == 6
    with pytest.raises(TypeError, match="nn.Module"):
        profile(lambda x: x, torch.zeros(1))


@pytest.mark.parametrize("layer, gates", [
    (nn.GRU(4, 3, batch_first=True, bidirectional=True), 3),
    (nn.LSTM(4, 3, batch_first=True, bidirectional=True), 4),
    (nn.RNN(4, 3, batch_first=True, bidirectional=True), 1),
])
def test_recurrent_layers_are_counted(layer, gates):
    """FlopCounterMode does not see inside the fused RNN op; the built-in counter does."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = layer

        def forward(self, x):
            return self.rnn(x)[0]

    report = profile(Wrapped(), torch.zeros(1, 5, 4), measure_latency=False)
    # 5 tokens x 2 directions x gates x (4 inputs x 3 + 3 x 3 hidden) MACs
    assert report.macs == 5 * 2 * gates * (4 * 3 + 3 * 3)
