"""Camera-based BN (arXiv:2001.08680): layers, conversion, CameraBN callback, recipe.

References are independent computations: one ``nn.BatchNorm2d``/``1d`` per camera fed only that camera's
images (the authors' one-forward-per-camera training), and means / variances computed directly over a camera's
features.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_effnets.callbacks import CameraBN
from lightning_effnets.cli import main
from lightning_effnets.convert import to_camera_bn
from lightning_effnets.layers import (CameraBatchNorm1d, CameraBatchNorm2d, camera_bn_layers,
                                      collect_camera_statistics, use_camera)
from lightning_effnets.tasks.base import EffnetsTaskMixin


def _affine(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g, dtype=layer.weight.dtype) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))


def _per_camera_reference(layer: nn.Module, num_cameras: int, cls: type[nn.Module]) -> list[nn.Module]:
    refs = []
    for _ in range(num_cameras):
        ref = cls(layer.num_features, momentum=layer.momentum, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(layer.weight)
            ref.bias.copy_(layer.bias)
        refs.append(ref)
    return refs


# ---------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("cls, ref_cls, shape, momentum", [
    (CameraBatchNorm2d, nn.BatchNorm2d, (11, 5, 3, 4), 0.1),
    (CameraBatchNorm2d, nn.BatchNorm2d, (11, 5, 3, 4), None),
    (CameraBatchNorm1d, nn.BatchNorm1d, (11, 5), 0.3),
    (CameraBatchNorm1d, nn.BatchNorm1d, (11, 5, 6), 0.1),
])
def test_grouped_forward_equals_one_forward_per_camera(cls, ref_cls, shape, momentum):
    """One forward with per-sample ids == the authors' separate forward per camera: outputs, all gradients,
    running statistics (two steps, so the running average is exercised)."""
    cams = 4
    layer = cls(shape[1], cams, momentum=momentum, dtype=torch.float64)
    _affine(layer)
    refs = _per_camera_reference(layer, cams, ref_cls)
    ids_per_step = [torch.tensor([2, 0, 0, 2, 1, 0, 2, 2, 0, 1, 1]), torch.tensor([0, 0, 3, 3, 3, 1, 1, 0, 0, 3, 1])]
    for step, ids in enumerate(ids_per_step):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
        grad_out = torch.randn(shape, dtype=torch.float64)
        layer.zero_grad()
        with use_camera(layer, ids):
            y = layer(x)
        y.backward(grad_out)
        y_ref, gx_ref = torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
        gw_ref, gb_ref = torch.zeros(shape[1], dtype=torch.float64), torch.zeros(shape[1], dtype=torch.float64)
        for k in ids.unique().tolist():
            mask = ids == k
            xk = x.detach()[mask].clone().requires_grad_()
            refs[k].zero_grad()
            yk = refs[k](xk)
            yk.backward(grad_out[mask])
            y_ref[mask], gx_ref[mask] = yk.detach(), xk.grad
            gw_ref += refs[k].weight.grad
            gb_ref += refs[k].bias.grad
        torch.testing.assert_close(y.detach(), y_ref)
        torch.testing.assert_close(x.grad, gx_ref)
        torch.testing.assert_close(layer.weight.grad, gw_ref)
        torch.testing.assert_close(layer.bias.grad, gb_ref)
        torch.testing.assert_close(layer.running_mean, torch.stack([r.running_mean for r in refs]))
        torch.testing.assert_close(layer.running_var, torch.stack([r.running_var for r in refs]))
        assert layer.num_batches_tracked.tolist() == [int(r.num_batches_tracked) for r in refs]
    # eval: per-sample ids select each camera's running statistics
    layer.eval()
    for r in refs:
        r.eval()
    x = torch.randn(shape, dtype=torch.float64)
    ids = ids_per_step[1]
    with use_camera(layer, ids):
        y = layer(x)
    for k in ids.unique().tolist():
        torch.testing.assert_close(y[ids == k], refs[k](x[ids == k]))
    with use_camera(layer, 3):  # one camera for the whole batch: exactly F.batch_norm on that camera's stats
        torch.testing.assert_close(layer(x), refs[3](x))


@pytest.mark.parametrize("affine", [True, False])
def test_grouped_backward_passes_gradcheck(affine):
    from lightning_effnets.layers.camera_bn import _GroupedBatchNormFn

    groups = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    counts = torch.bincount(groups).double()[:, None]
    x = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)] if affine else [None, None]
    inputs = (x, *[p for p in params if p is not None])

    def fn(x: Tensor, *wb: Tensor) -> Tensor:
        w, b = wb if affine else (None, None)
        return _GroupedBatchNormFn.apply(x, groups, counts, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, inputs)


def test_mixed_batch_differs_from_plain_bn_and_single_camera_is_plain_bn():
    layer = CameraBatchNorm2d(3, 2)
    plain = nn.BatchNorm2d(3)
    x = torch.cat([torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 4 + 2])  # two differently-exposed cameras
    with use_camera(layer, torch.tensor([0] * 4 + [1] * 4)):
        y = layer(x)
    assert (y - plain(x)).abs().max() > 0.5  # per-camera normalisation is not plain BN over the mixed batch
    torch.testing.assert_close(y[:4], nn.BatchNorm2d(3)(x[:4]))
    with use_camera(layer, torch.zeros(8, dtype=torch.long)):  # all one camera == plain BN
        torch.testing.assert_close(layer(x), nn.BatchNorm2d(3)(x))


def test_adaptation_equals_statistics_computed_directly():
    """Collected over unequal mixed batches, a camera's running mean / var == mean / unbiased var of that
    camera's features computed directly; camera A's statistics do not depend on camera B's presence (all layers);
    running statistics of cameras not collected stay untouched."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), CameraBatchNorm2d(6, 4), nn.ReLU(), nn.Conv2d(6, 5, 3),
                          CameraBatchNorm2d(5, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), CameraBatchNorm1d(5, 4))
    model.eval()
    before = copy.deepcopy(model[1].running_mean[3])
    images = {0: torch.randn(9, 3, 8, 8) * 2 + 1, 1: torch.randn(7, 3, 8, 8) - 3}
    batches = [(torch.cat([images[0][:4], images[1][:2]]), torch.tensor([0] * 4 + [1] * 2)),
               (torch.cat([images[1][2:7], images[0][4:6]]), torch.tensor([1] * 5 + [0] * 2)),
               (images[0][6:], torch.tensor([0] * 3))]

    def collect(batches):
        with collect_camera_statistics(model) as stats, torch.no_grad():
            for x, ids in batches:
                with use_camera(model, ids):
                    model(x)
        stats.apply({0: 0, 1: 1})
        return [layer.running_mean.clone() for _, layer in camera_bn_layers(model)], \
            [layer.running_var.clone() for _, layer in camera_bn_layers(model)]

    means, variances = collect(batches)
    with torch.no_grad():
        for camera in (0, 1):
            features = model[0](images[camera])  # the first layer's input, computed independently
            torch.testing.assert_close(means[0][camera], features.mean(dim=(0, 2, 3)))
            torch.testing.assert_close(variances[0][camera], features.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(model[1].running_mean[3], before)
    # camera 0 alone, batched the same way: identical statistics in every layer
    only_a = [(x[ids == 0], ids[ids == 0]) for x, ids in batches]
    means_a, variances_a = collect(only_a)
    for m, m_a, v, v_a in zip(means, means_a, variances, variances_a):
        torch.testing.assert_close(m_a[0], m[0])
        torch.testing.assert_close(v_a[0], v[0])


def test_slots_added_at_test_time_start_from_the_camera_mixture():
    layer = CameraBatchNorm2d(3, 2)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]))
        layer.running_var.copy_(torch.tensor([[1.0, 1.0, 4.0], [1.0, 9.0, 4.0]]))
    assert layer.add_cameras(2) == [2, 3]
    assert layer.running_mean.shape == (4, 3) and layer.num_batches_tracked.shape == (4,)
    # equal mixture of two Gaussians: mean = mean of means, var = mean of vars + variance of the means
    # channel 0: N(0,1)+N(2,1) -> 1 + 1; channel 1: N(1,1)+N(1,9) -> 5 + 0; channel 2: N(2,4)+N(0,4) -> 4 + 1
    torch.testing.assert_close(layer.running_mean[3], torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(layer.running_var[3], torch.tensor([2.0, 5.0, 5.0]))
    layer.eval()
    x = torch.randn(2, 3, 4, 4)
    with use_camera(layer, 3):
        y = layer(x)
    torch.testing.assert_close(y, layer(x))  # no camera context in eval: the same camera-agnostic mixture


def test_state_dict_resizes_slots_and_accepts_plain_bn_weights():
    source = CameraBatchNorm2d(3, 2)
    source.add_cameras(3)
    with torch.no_grad():
        source.running_mean.normal_()
    target = CameraBatchNorm2d(3, 2)
    target.load_state_dict(source.state_dict())
    assert target.num_cameras == 5
    torch.testing.assert_close(target.running_mean, source.running_mean)
    plain = nn.BatchNorm2d(3)
    plain.running_mean.normal_()
    plain.running_var.uniform_(0.5, 2)
    target.load_state_dict(plain.state_dict())  # a pretrained BN checkpoint fills every camera slot
    torch.testing.assert_close(target.running_mean, plain.running_mean.expand(5, 3))


def test_layer_errors_name_the_fix():
    layer = CameraBatchNorm1d(4, 2)
    with pytest.raises(RuntimeError, match="use_camera"):
        layer(torch.randn(3, 4))
    with pytest.raises(IndexError, match=r"camera id 2 is outside the 2 camera slot.*add_cameras"):
        with use_camera(layer, torch.tensor([0, 2])):
            pass
    with pytest.raises(ValueError, match=r"single sample.*drop_single_image_cameras"):
        with use_camera(layer, torch.tensor([0, 0, 1])):
            layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        with use_camera(layer, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match="4-D input"):
        with use_camera(CameraBatchNorm2d(4, 2), 0):
            CameraBatchNorm2d(4, 2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="no camera BN layers.*to_camera_bn"):
        with use_camera(nn.Linear(2, 2), 0):
            pass


# ---------------------------------------------------------------------------------------------- conversion
def test_to_camera_bn_converts_every_bn_and_keeps_the_function():
    from timm.layers import BatchNormAct2d

    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    with torch.no_grad():  # non-trivial statistics, as in a trained model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    report = to_camera_bn(model, 3)
    assert report.converted == bn_names and not report.kept
    assert all(isinstance(model.get_submodule(n), CameraBatchNorm2d) for n in bn_names)
    with use_camera(model, torch.tensor([2, 0])):
        torch.testing.assert_close(model(x), expected)  # every slot starts with the original statistics
    fused = nn.Sequential(BatchNormAct2d(4, act_layer=nn.ReLU))
    to_camera_bn(fused, 2)
    assert isinstance(fused[0], CameraBatchNorm2d) and isinstance(fused[0].act, nn.ReLU)
    with use_camera(fused, 0):
        assert fused.train()(torch.randn(2, 4, 3, 3)).min() >= 0  # the activation still runs
    with pytest.raises(ValueError, match="no layers"):
        to_camera_bn(nn.Sequential(nn.Linear(2, 2)), 2)
    with pytest.raises(ValueError, match="num_cameras must be >= 1"):
        to_camera_bn(nn.Sequential(nn.BatchNorm1d(2)), 0)


# ---------------------------------------------------------------------------------------------- callback
class _CameraImages(Dataset):
    def __init__(self, images: Tensor, cameras: Tensor) -> None:
        self.images, self.cameras = images, cameras

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"images": self.images[i], "camera_ids": self.cameras[i]}


def _camera_data(cameras: list[int], per_camera: list[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(n, 3, 8, 8, generator=g) * (1 + c) + c for c, n in zip(cameras, per_camera)]
    ids = torch.cat([torch.full((n,), c) for c, n in zip(cameras, per_camera)])
    order = torch.randperm(len(ids), generator=g)
    return torch.cat(images)[order], ids[order]


class _CameraTask(EffnetsTaskMixin, pl.LightningModule):
    """A tiny camera-aware task: conv-BN-conv-BN-pool-BN1d, loss = mean output (training only exercises hooks)."""

    def __init__(self, with_cameras: bool = True) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                   nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4))
        self.example_input_array = torch.zeros(2, 3, 8, 8)
        self.init_optimization(lambda p: torch.optim.SGD(p, lr=0.01), lr_schedule="constant")
        self.with_cameras = with_cameras
        self.seen_batch_sizes: list[int] = []

    def side_information(self, batch: Any) -> dict[str, Any]:
        return {"camera_ids": batch["camera_ids"]} if self.with_cameras else {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen_batch_sizes.append(len(batch["images"]))
        return self.model(batch["images"]).square().mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.model(batch["images"])

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.model(batch["images"])


def _trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def test_callback_adapts_seen_and_unseen_cameras_from_their_images():
    """num_cameras=2 but the evaluation data has cameras 0, 1, 3, 6 (and 9 with one image): new slots are created
    in id order; each adapted slot's first-layer statistics equal those computed directly over the camera's
    images; the single-image camera gets a slot holding the camera mixture, with a warning."""
    images, ids = _camera_data([0, 1, 3, 6, 9], [7, 5, 9, 4, 1])
    task, callback = _CameraTask(), CameraBN(num_cameras=2, adapt_batch_size=3)
    loader = DataLoader(_CameraImages(images, ids), batch_size=5)
    with pytest.warns(UserWarning, match=r"camera\(s\) \[9\] have a single image"):
        _trainer(callbacks=[callback]).validate(task, loader)
    assert callback.camera_map == {0: 0, 1: 1, 3: 2, 6: 3, 9: 4}
    assert callback.last_adaptation["adapted"] == [0, 1, 3, 6] and callback.last_adaptation["new"] == [3, 6, 9]
    first = task.model[1]
    assert isinstance(first, CameraBatchNorm2d) and first.num_cameras == 5
    with torch.no_grad():
        for camera in (0, 1, 3, 6):
            features = task.model[0](images[ids == camera])
            slot = callback.camera_map[camera]
            torch.testing.assert_close(first.running_mean[slot], features.mean(dim=(0, 2, 3)))
            torch.testing.assert_close(first.running_var[slot], features.var(dim=(0, 2, 3)))
    mixture_mean = first.running_mean[:4].mean(0)
    torch.testing.assert_close(first.running_mean[4], mixture_mean)


def test_callback_trains_per_camera_and_drops_single_image_cameras():
    images, ids = _camera_data([0, 1, 2], [6, 6, 6])
    ids[:8] = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0])  # first batch of 8: camera 2 has a single image
    task, callback = _CameraTask(), CameraBN(adapt=True, num_cameras=3)
    loader = DataLoader(_CameraImages(images, ids), batch_size=8)
    _trainer(callbacks=[callback], max_steps=2, limit_val_batches=1).fit(task, loader, loader)
    assert task.seen_batch_sizes[0] == 7  # the lone camera-2 image was removed before the forward
    bn1d = task.model[-1]
    assert int(bn1d.num_batches_tracked[0]) >= 1 and callback.trained_cameras == {0, 1, 2}


def test_checkpoint_round_trip_keeps_every_camera_statistic(tmp_path):
    images, ids = _camera_data([0, 1, 4], [6, 6, 6])
    loader = DataLoader(_CameraImages(images, ids), batch_size=6)
    task, callback = _CameraTask(), CameraBN(num_cameras=2)
    train_loader = DataLoader(_CameraImages(images[ids < 2], ids[ids < 2]), batch_size=6)
    trainer = _trainer(callbacks=[callback], max_steps=2, limit_val_batches=3)
    trainer.fit(task, train_loader, loader)  # validation adapts camera 4 into a new slot
    assert callback.camera_map[4] == 2
    path = tmp_path / "cambn.ckpt"
    trainer.save_checkpoint(path)
    task2, callback2 = _CameraTask(), CameraBN(num_cameras=2)
    _trainer(callbacks=[callback2], max_steps=2).fit(task2, train_loader, ckpt_path=path)
    assert callback2.camera_map == callback.camera_map and callback2.trained_cameras == {0, 1}
    for (name, a), (_, b) in zip(camera_bn_layers(task.model), camera_bn_layers(task2.model)):
        assert b.num_cameras == 3, name
        torch.testing.assert_close(b.running_mean, a.running_mean)
        torch.testing.assert_close(b.running_var, a.running_var)
        assert torch.equal(b.num_batches_tracked, a.num_batches_tracked)
    # validate(ckpt_path) outside fit (Lightning restores no callback state there): the camera map still comes back,
    # so camera 4, adapted into slot 2 during training, is evaluated with its statistics even with adapt=False
    task4, callback4 = _CameraTask(), CameraBN(num_cameras=2, adapt=False)
    _trainer(callbacks=[callback4]).validate(task4, loader, ckpt_path=path)
    assert callback4.camera_map == callback.camera_map and callback4.trained_cameras == {0, 1}
    # without the callback: the task rebuilds its camera BN layers from the checkpoint (on_load_checkpoint)
    task3 = _CameraTask.load_from_checkpoint(path)  # strict loading
    for (name, a), (_, b) in zip(camera_bn_layers(task.model), camera_bn_layers(task3.model)):
        assert b.num_cameras == 3, name
        torch.testing.assert_close(b.running_mean, a.running_mean)


def test_callback_errors_name_the_fix():
    images, ids = _camera_data([0, 1], [4, 4])
    loader = DataLoader(_CameraImages(images, ids), batch_size=4)
    with pytest.raises(ValueError, match=r"side_information\(batch\) returned no 'camera_ids'"):
        _trainer(callbacks=[CameraBN(num_cameras=2)], max_steps=1).fit(_CameraTask(with_cameras=False), loader)
    with pytest.raises(ValueError, match=r"camera id\(s\) \[1\] in a validation batch have no CamBN slot.*adapt=True"):
        _trainer(callbacks=[CameraBN(num_cameras=1, adapt=False)]).validate(_CameraTask(), loader)
    with pytest.raises(ValueError, match=r"reads the number of cameras from the datamodule.*num_cameras=\.\.\."):
        _trainer(callbacks=[CameraBN()], max_steps=1).fit(_CameraTask(), loader)
    with pytest.raises(ValueError, match="adapt_batch_size"):
        CameraBN(adapt_batch_size=1)


def test_recipe_runs_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ["--data.init_args.num_train_ids=6", "--data.init_args.num_val_ids=3", "--data.init_args.num_test_ids=3",
            "--data.init_args.num_cameras=4", "--data.init_args.held_out_cameras=2",
            "--data.init_args.train_images_per_camera=2", "--data.init_args.eval_images_per_camera=2",
            "--data.init_args.p=3", "--data.init_args.k=2", "--data.init_args.image_size=[32, 16]",
            "--model.init_args.image_size=[32, 16]", "--model.init_args.num_classes=6"]
    cli = main(["fit", "--config", "reid/cambn", "--trainer.fast_dev_run=true", "--trainer.logger=false",
                '--trainer.callbacks=[{"class_path": "lightning_effnets.callbacks.CameraBN"}]', *tiny])
    assert cli.trainer.global_step == 1 and cli.trainer.state.finished
    layers = camera_bn_layers(cli.model.model)
    assert layers and all(layer.num_cameras == 4 for _, layer in layers)
    assert "val/mAP" in cli.trainer.callback_metrics
