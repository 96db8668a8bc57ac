"""Channel pruning: library functions checked against hand computations, and the callback inside Trainer.fit."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.callbacks import ChannelPruning
from lightning_effnets.cost import profile
from lightning_effnets.pruning import (MagnitudeCriterion, PruningRecord, get_record, load_pruned, prune,
                                       remap_optimizer, replay)
from lightning_effnets.pruning.graph import build_graph
from lightning_effnets.pruning.surgery import apply_decisions
from lightning_effnets.tasks import ImageClassifier
from lightning_effnets.tasks.base import EffnetsTaskMixin


def _chain(widths=(1, 16, 32, 32), classes=4) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))


class TinyTask(EffnetsTaskMixin, pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, zero_loss: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = _chain()
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        factories = {"sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
                     "plain_sgd": lambda p: torch.optim.SGD(p, lr=lr),
                     "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)}
        self.init_optimization(optimizer=factories[optimizer], lr_schedule="cosine", no_weight_decay_norm_bias=False)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        loss = 0.0 * out.sum() if self.hparams.zero_loss else F.cross_entropy(out, y)
        return loss + self.pop_auxiliary_loss(loss)


def _loader(n=64, size=8, chans=1, classes=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, chans, size, size, generator=g),
                                    torch.randint(0, classes, (n,), generator=g)), batch_size=batch)


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


# ------------------------------------------------------------------------------------ library
def test_magnitude_removes_smallest_l1_filters_and_macs_match_formula():
    torch.manual_seed(0)
    model = _chain(widths=(1, 8, 8), classes=3)
    x = torch.zeros(1, 1, 6, 6)
    l1 = model[0].weight.detach().abs().flatten(1).sum(1)  # hand-computed L1 of the first conv's filters
    expected_kept = sorted(torch.argsort(l1, descending=True)[:4].tolist())
    old_first = model[0].weight.detach().clone()
    model, record = prune(model, x, MagnitudeCriterion(p=1, reduction="first"), ratio=0.5)
    kept = [int(torch.nonzero((old_first == w).flatten(1).all(1))[0]) for w in model[0].weight.detach()]
    assert kept == expected_kept
    # conv MACs = H*W*Cout*Cin*9: (1->4) + (4->4) on 6x6, plus the untouched-width classifier 4->3
    assert profile(model, x, measure_latency=False).macs == 36 * 9 * (1 * 4 + 4 * 4) + 4 * 3
    assert model[-1].out_features == 3  # the output layer keeps its outputs
    assert len(record.steps) == 1 and {r for r, _ in record.steps[0]} == {"0", "3"}


def test_bn_scale_global_threshold_prunes_smallest_gammas():
    model = _chain(widths=(1, 4, 4), classes=2)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, 0.01, 0.8, 0.02]))
        model[4].weight.copy_(torch.tensor([0.03, 0.7, 0.6, 0.5]))
    model, _ = prune(model, torch.zeros(1, 1, 5, 5), "bn_scale", ratio=0.375)  # 3 of 8 channels, one threshold
    assert model[1].weight.detach().tolist() == pytest.approx([0.9, 0.8])
    assert model[4].weight.detach().tolist() == pytest.approx([0.7, 0.6, 0.5])


def test_replayed_record_rebuilds_identical_timm_model():
    timm = pytest.importorskip("timm")
    for name in ("resnet10t", "mobilenetv3_small_050"):
        model = timm.create_model(name, num_classes=5).eval()
        fresh = copy.deepcopy(model)
        x = torch.randn(2, 3, 32, 32)
        model, record = prune(model, x, "l2", ratio=0.5, round_to=4)
        assert model(x).shape == (2, 5)
        replay(fresh, PruningRecord.from_dict(record.to_dict()))
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh.eval()(x), model(x))
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        assert widths and all(w % 4 == 0 for w in widths[:-1])


def test_optimizer_state_sliced_like_weights_without_trainer():
    model = _chain()
    x = torch.randn(4, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    with torch.no_grad():  # plant a known relation between every parameter and its state
        for p in model.parameters():
            opt.state[p]["exp_avg"].copy_(3 * p + 1)
            opt.state[p]["exp_avg_sq"].copy_(p * p)
    old_values = {n: p.detach().clone() for n, p in model.named_parameters()}
    decisions = [("0", [1, 5, 7]), ("3", list(range(0, 32, 2)))]
    changes = apply_decisions(model, build_graph(model, x), decisions).changes
    assert remap_optimizer(opt, changes) == len(changes) > 0
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], 3 * p.detach() + 1)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], p.detach() ** 2)
    # the conv between the two pruned groups lost inputs {1,5,7} and every second output
    keep_out, keep_in = list(range(1, 32, 2)), [i for i in range(16) if i not in (1, 5, 7)]
    torch.testing.assert_close(model[3].weight.detach(), old_values["3.weight"][keep_out][:, keep_in])
    assert int(opt.state[params[0]]["step"]) == 1


def test_project_layers_are_pruned():
    from lightning_effnets.layers.adder import Adder2d
    from lightning_effnets.layers.binary import BinaryConv2d, RPReLU, is_binary

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Adder2d(8, 16, 3, padding=1),
                          nn.BatchNorm2d(16), BinaryConv2d(16, 16, 3, padding=1, scale=True), nn.BatchNorm2d(16),
                          RPReLU(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(2, 3, 8, 8)
    model, _ = prune(model, x, "l1", ratio=0.5)
    assert (model[2].out_channels, model[4].out_channels, model[4].scale.numel()) == (8, 8, 8)
    assert model[6].weight.numel() == 8 and is_binary(model[4].weight)
    assert model(x).shape == (2, 4)


def test_bad_input_errors():
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
            ChannelPruning(ratio=ratio)
    with pytest.raises(ValueError, match="macs_target"):
        ChannelPruning(macs_target=0.0)
    with pytest.raises(ValueError, match="end_epoch"):
        ChannelPruning(start_epoch=3, end_epoch=1)
    with pytest.raises(ValueError, match="unknown pruning criterion"):
        ChannelPruning(criterion="magnitud")
    only_output = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="nothing to prune"):
        prune(only_output, torch.zeros(1, 16), "magnitude", 0.5)
    with pytest.raises(ValueError, match="nothing to prune"):  # slimming needs BN
        prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4), "bn_scale", 0.5)
    with pytest.raises(ValueError, match="matches no module"):
        prune(_chain(), torch.zeros(1, 1, 8, 8), ignored_layers=["layer9.*"])
    with pytest.raises(ValueError, match="cannot be met"):
        prune(_chain(widths=(1, 4)), torch.zeros(1, 1, 8, 8), macs_target=0.01)


def test_export_torchscript_and_onnx(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", num_classes=3, in_chans=1).eval()
    x = torch.randn(1, 1, 32, 32)
    model, _ = prune(model, x, "l1", ratio=0.5)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), model(x))
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    conv_shapes = [list(i.dims) for i in graph.graph.initializer if len(i.dims) == 4]
    assert conv_shapes[0][0] == model.conv1[0].out_channels  # exported with the pruned widths


# ------------------------------------------------------------------------------------ callback
class _Probe(pl.Callback):
    """Runs before ChannelPruning at every epoch start: snapshots weights and plants optimizer state."""

    def __init__(self, prune_epoch: int) -> None:
        self.prune_epoch, self.before, self.after, self.checked = prune_epoch, {}, {}, False

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.prune_epoch:
            return
        opt = trainer.optimizers[0]
        with torch.no_grad():
            for p in pl_module.parameters():
                for key, value in opt.state[p].items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.copy_(2 * p + 1 if key != "exp_avg_sq" else p * p)
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class _After(pl.Callback):
    """Runs after ChannelPruning: checks the optimizer right after the step, snapshots weights."""

    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.probe.prune_epoch:
            return
        opt = trainer.optimizers[0]
        optimized = {id(p) for g in opt.param_groups for p in g["params"]}
        assert optimized == {id(p) for p in pl_module.parameters()}  # every remaining parameter is trained
        for p in pl_module.parameters():
            for key, value in opt.state[p].items():
                if torch.is_tensor(value) and value.ndim:
                    assert value.shape == p.shape
                    expected = 2 * p.detach() + 1 if key != "exp_avg_sq" else p.detach() ** 2
                    torch.testing.assert_close(value, expected)
        for name, p in pl_module.named_parameters():  # surviving weights are a subset of the old ones
            assert torch.isin(p.detach(), self.probe.before[name]).all(), name
        self.probe.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.probe.checked = True


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_continues_after_pruning(optimizer):
    pl.seed_everything(0)
    task = TinyTask(optimizer=optimizer)
    probe = _Probe(prune_epoch=1)
    pruning = ChannelPruning(criterion="l1", ratio=0.5, start_epoch=1, latency_repeats=0, print_table=False)
    _trainer(max_epochs=2, callbacks=[probe, pruning, _After(probe)]).fit(task, _loader())
    assert probe.checked
    assert task.model[0].out_channels == 8 and task.model[3].out_channels == 16 and task.model[-1].out_features == 4
    for name, p in task.named_parameters():  # every parameter kept training after the step
        assert not torch.equal(p.detach(), probe.after[name]), name
    assert pruning.history[0]["macs"] < 0.5 * pruning.initial["macs"]


def test_slimming_changes_gamma_by_exactly_lr_s_sign():
    pl.seed_everything(0)
    task = TinyTask(optimizer="plain_sgd", lr=0.1, zero_loss=True)
    task.lr_schedule = "constant"
    with torch.no_grad():
        task.model[1].weight.uniform_(-1, 1)
    gammas = [m.weight.detach().clone() for m in task.model if isinstance(m, nn.BatchNorm2d)]
    pruning = ChannelPruning(criterion="bn_scale", ratio=0.5, start_epoch=1, sparsity=1e-3, latency_repeats=0,
                             print_table=False)
    _trainer(max_epochs=2, max_steps=1, callbacks=[pruning]).fit(task, _loader())
    after = [m.weight.detach() for m in task.model if isinstance(m, nn.BatchNorm2d)]
    for old, new in zip(gammas, after):
        torch.testing.assert_close(new, old - 0.1 * 1e-3 * torch.sign(old), rtol=0, atol=1e-7)


def _fit_with_checkpoints(tmp_path, max_epochs, ckpt_path=None):
    pl.seed_everything(0)
    task = TinyTask(optimizer="sgd")
    pruning = ChannelPruning(criterion="taylor", ratio=0.6, start_epoch=1, end_epoch=3, steps=3,
                             latency_repeats=0, print_table=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(max_epochs=max_epochs, callbacks=[pruning, ckpt], enable_checkpointing=True)
    trainer.fit(task, _loader(), ckpt_path=ckpt_path)
    return task, pruning


def test_resume_mid_schedule_gives_same_structure(tmp_path):
    full, full_cb = _fit_with_checkpoints(tmp_path, max_epochs=4)
    resumed, resumed_cb = _fit_with_checkpoints(tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert resumed_cb.done == full_cb.done == 3
    assert get_record(resumed.model) == get_record(full.model)
    assert [tuple(p.shape) for p in resumed.parameters()] == [tuple(p.shape) for p in full.parameters()]
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b)


def test_pruned_checkpoint_loads_tests_and_validates_in_a_fresh_module(tmp_path):
    pl.seed_everything(0)
    task = ImageClassifier(backbone="resnet10t", num_classes=4, in_chans=1, image_size=16, log_samples=0)
    pruning = ChannelPruning(ratio=0.5, start_epoch=0, latency_repeats=2, print_table=True)
    trainer = _trainer(max_steps=3, callbacks=[pruning])
    trainer.fit(task, _loader(size=16))
    assert task.model.fc.out_features == 4 and task.model.fc.in_features < 512  # output layer kept its outputs
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(2, 1, 16, 16)
    expected = task.eval()(x)
    # plain Lightning loading: EffnetsTaskMixin.on_load_checkpoint replays the recorded structure first
    torch.testing.assert_close(ImageClassifier.load_from_checkpoint(path).eval()(x), expected)
    torch.testing.assert_close(load_pruned(ImageClassifier, path).eval()(x), expected)  # the explicit one-liner
    # Trainer.test / validate(ckpt_path=...) on a freshly built, unpruned module without the callback
    data = _loader(n=32, size=16, seed=3)
    with torch.no_grad():  # accuracy computed by hand with the pruned model
        hits = sum(int((task(xb).argmax(1) == yb).sum()) for xb, yb in data)
    for run in ("test", "validate"):
        fresh = ImageClassifier(backbone="resnet10t", num_classes=4, in_chans=1, image_size=16, log_samples=0)
        assert fresh.model.fc.in_features == 512
        result = getattr(_trainer(), run)(fresh, data, ckpt_path=str(path), verbose=False)[0]
        stage = "test" if run == "test" else "val"
        assert result[f"{stage}/acc"] == pytest.approx(hits / 32)
        assert fresh.model.fc.in_features == task.model.fc.in_features
    # the same in a fresh Python process (no state left by this one): plain Trainer.test(ckpt_path=...)
    xs, ys = (torch.cat(t) for t in zip(*data))
    torch.save({"x": xs, "y": ys}, tmp_path / "data.pt")
    script = textwrap.dedent(f"""
        import lightning.pytorch as pl, torch
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_effnets.tasks import ImageClassifier
        data = torch.load({str(tmp_path / "data.pt")!r})
        task = ImageClassifier(backbone="resnet10t", num_classes=4, in_chans=1, image_size=16, log_samples=0)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        result = trainer.test(task, DataLoader(TensorDataset(data["x"], data["y"]), batch_size=16),
                              ckpt_path={str(path)!r}, verbose=False)[0]
        print("ACC", result["test/acc"], task.model.fc.in_features)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    acc, width = out.stdout.split("ACC")[-1].split()
    assert float(acc) == pytest.approx(hits / 32) and int(width) == task.model.fc.in_features
    again = io.BytesIO()  # a loaded model carries its record into its own state dict
    torch.save(fresh.state_dict(), again)
    again.seek(0)
    state = torch.load(again, weights_only=True)
    other = ImageClassifier(backbone="resnet10t", num_classes=4, in_chans=1, image_size=16)
    from lightning_effnets.pruning import restore_structure
    assert restore_structure(other, state) == ["model"]
    other.load_state_dict(state)


def test_untraceable_recurrent_consumer_is_left_unpruned_with_a_warning():
    class WithGRU(nn.Module):  # a CPU GRU is unrolled into gate ops whose channel mapping Torch-Pruning cannot infer
        def __init__(self) -> None:
            super().__init__()
            self.a, self.gru, self.b = nn.Linear(4, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 3)
            self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.gru(self.a(x))[0]).sum(1) + self.d(self.c(x)).sum(1)

    model = WithGRU()
    x = torch.randn(2, 5, 4)
    with pytest.warns(UserWarning, match="leaves 'a' unpruned"):
        model, record = prune(model, x, "l1", ratio=0.5, output_modules=[model.b, model.d])
    assert (model.a.out_features, model.gru.input_size, model.c.out_features) == (8, 8, 3)
    assert [root for root, _ in record.steps[0]] == ["c"]
    assert model(x).shape == (2, 3)


class _TwoHeads(nn.Module):
    """Projections reshaped into ``num_heads`` heads (like an attention block): heads must stay equally wide."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.q, self.k, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        b, c, h, w = q.shape
        mixed = (q * k).reshape(b, self.num_heads, c // self.num_heads, h * w).softmax(2).reshape(b, c, h, w)
        return self.out(mixed)


def test_attention_heads_lose_the_same_channels():
    torch.manual_seed(0)
    model = _TwoHeads()
    old_q = model.q.weight.detach().clone()
    # per slot s (channel s of head 0 and s + 4 of head 1): mean over q, k filters and out columns of the L1 norms
    w = [model.q.weight.flatten(1).abs().sum(1), model.k.weight.flatten(1).abs().sum(1),
         model.out.weight.transpose(0, 1).flatten(1).abs().sum(1)]
    per_channel = torch.stack(w).mean(0).detach()
    slot_score = per_channel.view(2, 4).mean(0)
    kept_slots = sorted(torch.argsort(slot_score, descending=True)[:2].tolist())
    model, _ = prune(model, torch.randn(1, 3, 4, 4), "l1", ratio=0.375)  # 5 of 8 channels would split the heads
    kept = [int(torch.nonzero((old_q == f).flatten(1).all(1))[0]) for f in model.q.weight.detach()]
    assert kept == kept_slots + [s + 4 for s in kept_slots]
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 4)


def test_callback_rejects_unreachable_budget_and_late_schedule():
    with pytest.raises(ValueError, match="cannot be met"):
        _trainer(max_epochs=1, callbacks=[ChannelPruning(macs_target=0.001, latency_repeats=0)]).fit(
            TinyTask(), _loader())
    with pytest.raises(ValueError, match="max_epochs=2"):
        _trainer(max_epochs=2, callbacks=[ChannelPruning(start_epoch=2, latency_repeats=0)]).fit(TinyTask(), _loader())


def test_macs_target_is_met():
    pl.seed_everything(0)
    task = TinyTask()
    pruning = ChannelPruning(macs_target=0.4, start_epoch=0, latency_repeats=0, print_table=False)
    _trainer(max_steps=2, callbacks=[pruning]).fit(task, _loader())
    ratio = pruning.history[-1]["macs"] / pruning.initial["macs"]
    assert 0.3 < ratio <= 0.4


def test_schedule_epochs_and_targets():
    from lightning_effnets.pruning import PruningSchedule

    schedule = PruningSchedule(start_epoch=6, end_epoch=8, steps=3)
    assert schedule.epochs() == [6, 7, 8]
    assert [schedule.steps_due(e) for e in (5, 6, 7, 8, 20)] == [0, 1, 2, 3, 3]
    assert [schedule.fraction(k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert PruningSchedule(start_epoch=0, end_epoch=9, steps=4).epochs() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="at least 3 epochs"):
        PruningSchedule(start_epoch=1, end_epoch=2, steps=3)


def test_taylor_scores_match_hand_computation():
    from lightning_effnets.pruning import TaylorCriterion, prunable_groups

    torch.manual_seed(1)
    model = _chain(widths=(1, 4, 3), classes=2)
    x = torch.randn(3, 1, 5, 5)
    F.cross_entropy(model(x), torch.tensor([0, 1, 1])).backward()
    group = next(g for g in prunable_groups(build_graph(model, x[:1]), [model[-1]]) if g.root == "0")
    scores = TaylorCriterion().score(group)
    conv0, bn, conv3 = model[0], model[1], model[3]
    expected = []
    for c in range(4):  # mean over the group's layers of |sum over the channel's weights of w * dL/dw|
        terms = [(conv0.weight[c] * conv0.weight.grad[c]).sum().abs(),
                 (bn.weight[c] * bn.weight.grad[c]).abs(),
                 (conv3.weight[:, c] * conv3.weight.grad[:, c]).sum().abs()]
        expected.append(torch.stack(terms).mean())
    torch.testing.assert_close(scores, torch.stack(expected).detach(), rtol=1e-5, atol=1e-8)


def test_layer_ratios_and_ignored_layers():
    model = _chain(widths=(1, 16, 16, 16))
    model, record = prune(model, torch.zeros(1, 1, 6, 6), "l1", ratio=0.5, layer_ratios={"3": 0.25},
                          ignored_layers=["6"])
    assert (model[0].out_channels, model[3].out_channels, model[6].out_channels) == (8, 12, 16)


def test_camera_batchnorm_is_pruned_per_camera():
    from lightning_effnets.layers.camera_bn import CameraBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), CameraBatchNorm2d(6, num_cameras=6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.arange(36.0).view(6, 6))
    model, _ = prune(model, torch.randn(1, 3, 8, 8), MagnitudeCriterion(reduction="first"), ratio=0.5)
    kept = model[0].out_channels
    bn = model[1]
    assert kept == 3 and bn.num_features == 3 and bn.weight.shape == (3,) and bn.num_batches_tracked.shape == (6,)
    assert bn.running_mean.shape == (6, 3)
    columns = (bn.running_mean[0]).long().tolist()  # row 0 holds the original channel indices
    torch.testing.assert_close(bn.running_mean, torch.arange(36.0).view(6, 6)[:, columns])
    assert model.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 2)


# ------------------------------------------------------------------------------------ FilterSketch
def _fd_bound_holds(a: np.ndarray, b: np.ndarray, rows: int) -> None:
    error = a.T @ a - b.T @ b
    scale = np.linalg.norm(a) ** 2
    assert np.linalg.eigvalsh(error).min() >= -1e-9 * scale  # A^T A - B^T B is positive semi-definite
    assert np.linalg.norm(error, 2) <= scale / (rows + 1) + 1e-9 * scale  # Ghashami et al. 2016


def _shrunk_svd(a: np.ndarray, rows: int) -> np.ndarray:
    """Reference for one shrink step: sqrt(s_i^2 - s_rows^2) v_i for the top ``rows`` singular directions."""
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    return np.sqrt(np.clip(s[:rows] ** 2 - s[rows] ** 2, 0, None))[:, None] * vt[:rows]


def test_frequent_directions_guarantees_and_single_shrink_reference():
    from lightning_effnets.pruning import frequent_directions

    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 12)) * np.linspace(3, 0.1, 12)  # a decaying spectrum, many shrinks
    b = frequent_directions(torch.from_numpy(a), 5).numpy()
    assert b.shape == (5, 12)
    _fd_bound_holds(a, b, 5)
    low_rank = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 12))  # rank 3 <= 5 rows: exact
    exact = frequent_directions(torch.from_numpy(low_rank), 5).numpy()
    np.testing.assert_allclose(exact.T @ exact, low_rank.T @ low_rank, atol=1e-8)
    small = rng.standard_normal((8, 9))  # fewer than 2 * rows rows: one shrink of the whole matrix
    ours = frequent_directions(torch.from_numpy(small), 5).numpy()
    ref = _shrunk_svd(small, 5)
    np.testing.assert_allclose(ours.T @ ours, ref.T @ ref, atol=1e-10)  # sign-free comparison


def test_filter_sketch_rewrites_surviving_filters():
    torch.manual_seed(0)
    model = _chain(widths=(1, 8, 8), classes=3)
    w0, w3 = model[0].weight.detach().double().clone(), model[3].weight.detach().double().clone()
    gamma = model[1].weight.detach().clone()
    kept0 = sorted(torch.argsort(w0.flatten(1).norm(dim=1), descending=True)[:4].tolist())  # by filter L2 norm
    model, _ = prune(model, torch.zeros(1, 1, 6, 6), "filter_sketch", ratio=0.5)
    assert model[0].out_channels == 4 and model[3].in_channels == 4 and model[3].out_channels == 4
    torch.testing.assert_close(model[1].weight.detach(), gamma[kept0])  # BN entries follow the ranking
    b0 = model[0].weight.detach().double().flatten(1).numpy()
    ref0 = _shrunk_svd(w0.flatten(1).numpy(), 4)  # 8 filters -> 4: one shrink of the whole filter matrix
    np.testing.assert_allclose(b0.T @ b0, ref0.T @ ref0, atol=1e-5)
    # the second conv is sketched over the input channels that survived the same step
    a3 = w3[:, kept0].flatten(1).numpy()
    b3 = model[3].weight.detach().double().flatten(1).numpy()
    ref3 = _shrunk_svd(a3, 4)
    np.testing.assert_allclose(b3.T @ b3, ref3.T @ ref3, atol=1e-5)
    _fd_bound_holds(a3, b3, 4)
    assert model(torch.randn(2, 1, 6, 6)).shape == (2, 3)


def test_filter_sketch_inside_fit_keeps_optimizer_consistent():
    pl.seed_everything(0)
    task = TinyTask(optimizer="sgd")
    pruning = ChannelPruning(criterion="filter_sketch", ratio=0.5, start_epoch=1, latency_repeats=0,
                             print_table=False)
    _trainer(max_epochs=2, callbacks=[pruning]).fit(task, _loader())
    optimizer = task.trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in task.parameters()}
    assert task.model[0].out_channels == 8 and task.model[3].out_channels == 16


def test_round_to_rounds_the_kept_width_up():
    model, _ = prune(_chain(widths=(1, 24, 16)), torch.zeros(1, 1, 6, 6), "l1", ratio=0.5, round_to=8)
    assert (model[0].out_channels, model[3].out_channels) == (16, 8)  # 12 kept -> 16, never more removed than asked
