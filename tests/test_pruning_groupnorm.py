"""GroupNorm under channel pruning: ``group_norm="keep_group_size"`` removes whole groups (arXiv:1803.08494).

The key property checked: a GroupNorm group's statistics depend only on its own channels, so removing whole
groups leaves every surviving channel's normalised value unchanged. The pruned network must therefore compute
exactly what the original computes when the removed channels are zeroed after the activation, a reference that
needs no pruning code at all. Torch-Pruning's convention (``"keep_groups"``) does not have this property.
"""

from __future__ import annotations

import copy
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.callbacks import ChannelPruning
from lightning_effnets.cost import profile
from lightning_effnets.pruning import get_record, prune
from lightning_effnets.pruning.layers import GroupNormPruner
from lightning_effnets.tasks.base import EffnetsTaskMixin


def _conv_gn(channels: int = 16, groups: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(),
                          nn.Conv2d(channels, 5, 3, padding=1))
    with torch.no_grad():  # non-trivial affine parameters, so a wrong channel mapping shows
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _groups(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, nn.GroupNorm)]


def _kept_channels(old: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Original index of every surviving filter (matched by value)."""
    return [int(torch.nonzero((old == w).flatten(1).all(1))[0]) for w in new]


def test_keep_group_size_removes_least_important_whole_groups_exactly():
    model = _conv_gn()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    # group magnitude by hand: per channel the mean of the producer's filter L1 and the consumer's input-column L1;
    # a group's importance is the mean over its 4 contiguous channels
    w1, w2 = model[0].weight.detach(), model[3].weight.detach()
    per_channel = (w1.abs().flatten(1).sum(1) + w2.abs().transpose(0, 1).flatten(1).sum(1)) / 2
    per_group = per_channel.view(4, 4).mean(1)
    kept_groups = sorted(torch.argsort(per_group, descending=True)[:2].tolist())
    expected = [g * 4 + j for g in kept_groups for j in range(4)]

    prune(model, x, "magnitude", ratio=0.5, group_norm="keep_group_size")
    gn = model[1]
    assert (gn.num_groups, gn.num_channels) == (2, 8)
    assert gn.num_channels // gn.num_groups == 4 and gn.num_groups * 4 == gn.num_channels  # group size kept
    kept = _kept_channels(w1, model[0].weight.detach())
    assert kept == expected
    torch.testing.assert_close(gn.weight.detach(), original[1].weight.detach()[expected])
    torch.testing.assert_close(model[3].weight.detach(), w2[:, expected])

    # reference without any pruning code: the original network with the removed channels zeroed after the ReLU
    removed = [c for c in range(16) if c not in expected]
    mask = torch.ones(1, 16, 1, 1)
    mask[:, removed] = 0
    original.eval()
    model.eval()
    with torch.no_grad():
        reference = original[3](original[2](original[1](original[0](x))) * mask)
        torch.testing.assert_close(model(x), reference)
        # the same channels under Torch-Pruning's convention: the groups change, and so does the output
        other = copy.deepcopy(original)
        prune(other, x, "magnitude", ratio=0.5, group_norm="keep_groups")
        assert _groups(other) == [(4, 8)]
        assert not torch.allclose(other(x), reference, atol=1e-3)


def test_default_is_torch_pruning_convention():
    model = _conv_gn()
    prune(model, torch.randn(1, 3, 8, 8), "l1", ratio=0.5)
    assert _groups(model) == [(4, 8)]  # num_groups kept, two channels left per group


def test_round_to_combines_with_the_group_size_by_lcm():
    x = torch.randn(1, 3, 8, 8)
    # 48 channels in 8 groups of 6; ratio 0.4 keeps floor(28.8) = 28 channels before rounding up
    plain = prune(_conv_gn(48, 8), x, "l1", ratio=0.4, group_norm="keep_group_size")[0]
    assert _groups(plain) == [(5, 30)]  # 28 -> next multiple of the group size 6
    rounded = prune(_conv_gn(48, 8), x, "l1", ratio=0.4, round_to=4, group_norm="keep_group_size")[0]
    assert _groups(rounded) == [(6, 36)]  # 28 -> next multiple of lcm(4, 6) = 12
    glob = prune(_conv_gn(48, 8), x, "l1", ratio=0.4, round_to=4, group_norm="keep_group_size",
                 global_pruning=True)[0]
    assert _groups(glob) == [(6, 36)]


def test_macs_target_is_met_with_whole_groups():
    model = _conv_gn(48, 8)
    x = torch.randn(1, 3, 8, 8)
    before = profile(model, x, measure_latency=False).macs
    prune(model, x, "l1", macs_target=0.5, group_norm="keep_group_size")
    after = profile(model, x, measure_latency=False).macs
    groups, channels = _groups(model)[0]
    assert channels == 6 * groups and channels < 48
    # conv MACs are linear in the width here: the largest multiple of 6 within half the MACs is 24 channels
    assert after <= 0.5 * before and channels == 24


def test_unaligned_group_norm_is_left_unpruned_with_a_warning():
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
            self.norm = nn.GroupNorm(2, 10)  # groups of 5 channels straddle the two branches
            self.c = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(18, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([self.norm(torch.cat([self.a(x), self.b(x)], 1)), self.c(x)], 1))

    model = Concat()
    with pytest.warns(UserWarning, match="cannot be removed whole"):
        prune(model, torch.randn(1, 3, 4, 4), "l1", ratio=0.5, group_norm="keep_group_size")
    assert (model.a.out_channels, model.b.out_channels, _groups(model)) == (4, 6, [(2, 10)])
    assert model.c.out_channels == 4  # a layer outside any GroupNorm is still pruned


def test_bad_option_and_bad_removal_are_clear_errors():
    with pytest.raises(ValueError, match="group_norm must be 'keep_groups'.*'keep_group_size'.*got 'groups'"):
        prune(_conv_gn(), torch.randn(1, 3, 8, 8), group_norm="groups")
    with pytest.raises(ValueError, match="keep_group_size"):
        ChannelPruning(group_norm="keep_size")
    with pytest.raises(ValueError, match="cannot be grouped"):  # one channel of one group only
        GroupNormPruner().prune_out_channels(nn.GroupNorm(4, 16), [0])


class GNTask(EffnetsTaskMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(8, 16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.init_optimization(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), lr_schedule="constant")

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        return loss + self.pop_auxiliary_loss(loss)


def test_callback_checkpoint_reloads_pruned_group_norms(tmp_path):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                      batch_size=8)
    task = GNTask()
    pruning = ChannelPruning(ratio=0.5, start_epoch=0, round_to=2, group_norm="keep_group_size", latency_repeats=0,
                             print_table=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning])
    trainer.fit(task, data)
    assert _groups(task.model) == [(4, 8), (2, 8)]  # group sizes 2 and 4 kept
    optimizer = trainer.optimizers[0]  # training went on with the pruned parameters
    assert {id(p) for grp in optimizer.param_groups for p in grp["params"]} == {id(p) for p in task.parameters()}
    path = tmp_path / "gn.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(3, 1, 8, 8)
    expected = task.eval()(x)
    loaded = GNTask.load_from_checkpoint(path).eval()
    assert _groups(loaded.model) == [(4, 8), (2, 8)] and get_record(loaded.model) == get_record(task.model)
    torch.testing.assert_close(loaded(x), expected)


def test_detection_head_towers_keep_their_group_size():
    from lightning_effnets.tasks import ObjectDetector

    task = ObjectDetector(backbone="resnet10t", num_classes=4, in_chans=3, image_size=32, strides=[4, 8, 16],
                          fpn_channels=64, head_convs=2, log_samples=0)
    x = torch.zeros(1, 3, 32, 32)
    prune(task.model, x, "l1", ratio=0.5, round_to=8, group_norm="keep_group_size",
          output_modules=task.output_modules())
    towers = [f"{head}.conv.{i}" for head in ("cls_head", "box_head") for i in (1, 4)]
    assert [(task.model.get_submodule(n).num_groups, task.model.get_submodule(n).num_channels)
            for n in towers] == [(16, 32)] * 4  # GroupNorm(32, 64) halved: 2 channels per group, as trained
    assert {o.shape[1] for o in task.model(x)} == {4 + 5}  # every level's outputs keep their channels
