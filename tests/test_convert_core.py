import pytest
import torch
from torch import nn

from lightning_effnets.convert import replace_layers


class Marker(nn.Conv2d):
    pass


def _to_marker(name, conv):
    new = Marker(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    new.load_state_dict(conv.state_dict())
    return new


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)),
                         nn.Conv2d(4, 2, 1))


def _is_conv(name, m):
    return type(m) is nn.Conv2d


def test_keeps_first_and_last_by_default_and_reports():
    net = _net()
    report = replace_layers(net, kind="marker", candidate=_is_conv, build=_to_marker)
    assert report.converted == ["1.0", "1.1"]
    assert set(report.kept) == {"0", "2"}
    assert isinstance(net[1][0], Marker) and type(net[0]) is nn.Conv2d and type(net[2]) is nn.Conv2d
    assert "converted 2 layer(s)" in str(report)


def test_include_exclude_patterns_and_predicates():
    net = _net()
    report = replace_layers(net, kind="marker", candidate=_is_conv, build=_to_marker, include="1.*",
                            exclude=lambda n, m: n == "1.1")
    assert report.converted == ["1.0"]
    assert report.kept["1.1"] == "excluded" and report.kept["0"] == "not included"


def test_weights_preserved_and_output_unchanged():
    net = _net()
    x = torch.randn(1, 3, 9, 9)
    y = net(x)
    replace_layers(net, kind="marker", candidate=_is_conv, build=_to_marker, keep_first=False, keep_last=False)
    assert all(isinstance(m, Marker) for m in net.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(net(x), y)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no layers this conversion can act on"):
        replace_layers(nn.Linear(2, 2), kind="marker", candidate=_is_conv, build=_to_marker)
    with pytest.raises(ValueError, match="matches none"):
        replace_layers(_net(), kind="marker", candidate=_is_conv, build=_to_marker, include="backbone.*")
