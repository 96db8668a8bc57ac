"""``CameraBN``: camera-based batch normalisation (Zhuang et al., arXiv:2001.08680) as a Lightning callback.

What it does, hook by hook:

* ``setup``: converts every BN layer of ``pl_module.model`` with :func:`~lightning_effnets.convert.to_camera_bn`
  (before the optimizer exists). ``num_cameras=None`` reads ``trainer.datamodule.num_cameras`` (the re-id
  datamodules define it: every camera of the data, held-out ones included). Dataset camera id ``c`` starts in
  slot ``c``; the camera map (dataset camera id -> slot) grows when adaptation meets a camera without a slot.
* ``on_train_batch_start``: reads ``pl_module.side_information(batch)["camera_ids"]`` (the task contract) and
  opens the camera context, so every camera's samples are normalised with that camera's batch statistics in one
  forward. Cameras with a single image in the batch are dropped from the batch first, as the authors do
  (``CameraClsTrainer`` keeps only cameras with more than one image: one image gives a BatchNorm1d neck no
  statistics); the removal filters every per-sample tensor of a dict/list batch in place.
* ``on_{validation,test,predict}_start`` (``adapt=True``): re-estimates the statistics of every camera in the
  evaluation data, seen or unseen, from its unlabeled images, before the loop evaluates them. The images are
  regrouped by camera and forwarded through the task's ``predict_step`` in per-camera mini-batches (the
  authors' procedure) while the layers collect exact per-camera sums; a camera's new running mean / variance
  are the mean / unbiased variance over all of its images (the sample-weighted cumulative average of
  ``momentum=None``, independent of batching). Under DDP every rank adapts from its shard and the sums are
  all-reduced, so every rank ends with the statistics of the union of the shards. A camera with a single
  image in total keeps its previous statistics (the authors require two per camera); a new camera without
  images gets the camera-agnostic mixture of the other slots.
* ``on_{validation,test,predict}_batch_start``: opens the camera context so each image is normalised with its
  camera's statistics; unknown cameras are an error when ``adapt=False``.

The per-camera statistics live in the model's buffers (checkpointed with it, and reloaded into the right
number of slots); the camera map and the cameras seen in training are the callback's state.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_effnets.convert.camera_bn import to_camera_bn
from lightning_effnets.layers.camera_bn import (CameraStatistics, camera_bn_layers, collect_camera_statistics,
                                                set_camera, use_camera)

__all__ = ["CameraBN"]


class _Samples:
    """Marks the per-sample tensors of a (partial) batch while images are regrouped by camera."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _select(batch: Any, index: Tensor, size: int, mark: bool = False) -> Any:
    """``batch`` with every per-sample tensor (leading dimension ``size``) indexed by ``index``."""

    def pick(t: Tensor) -> Any:
        if t.ndim == 0 or t.shape[0] != size:
            return t
        chosen = t[index.to(t.device)]
        return _Samples(chosen) if mark else chosen

    return apply_to_collection(batch, Tensor, pick)


def _merge(parts: Sequence[Any]) -> Any:
    """Concatenate the per-sample tensors of batches with the same structure (others: the first's)."""
    first = parts[0]
    if isinstance(first, _Samples):
        return _Samples(torch.cat([p.tensor for p in parts]))
    if isinstance(first, Mapping):
        return type(first)({k: _merge([p[k] for p in parts]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_merge(items) for items in zip(*parts)))
    if isinstance(first, (list, tuple)):
        return type(first)(_merge(items) for items in zip(*parts))
    return first


def _slice(batch: Any, start: int, stop: int | None) -> Any:
    return apply_to_collection(batch, _Samples, lambda s: _Samples(s.tensor[start:stop]))


def _unwrap(batch: Any) -> Any:
    return apply_to_collection(batch, _Samples, lambda s: s.tensor)


def _flatten_loaders(iterables: Any) -> list[Any]:
    if iterables is None:
        return []
    if isinstance(iterables, Mapping):
        return [x for v in iterables.values() for x in _flatten_loaders(v)]
    if isinstance(iterables, (list, tuple)):
        return [x for v in iterables for x in _flatten_loaders(v)]
    return [iterables]


def _fresh_loader(loader: Any) -> Any:
    """A separate DataLoader over the same data, order and sharding, so the adaptation pass does not touch the
    iterator the evaluation loop already created (persistent workers would share it)."""
    if not isinstance(loader, DataLoader):
        return loader
    common = dict(collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                  multiprocessing_context=loader.multiprocessing_context, generator=loader.generator)
    if loader.num_workers > 0:
        common["prefetch_factor"] = loader.prefetch_factor
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)


class CameraBN(pl.Callback):
    """Camera-based BN for any task that reports per-sample camera ids (see the module docstring).

    Args:
        num_cameras: camera slots created at conversion; ``None`` reads ``trainer.datamodule.num_cameras``.
        adapt: re-estimate every evaluated camera's statistics from its images before validation / test /
            predict. ``False`` evaluates with the statistics gathered in training, and a camera without a slot
            is an error.
        adapt_batch_size: images per camera mini-batch during adaptation; default: the loader's batch size.
        drop_single_image_cameras: drop training samples whose camera has only one image in the batch (the
            authors' rule). ``False`` keeps them (fine for models without BatchNorm1d layers).
        include / exclude: which BN layers convert (names with shell patterns, or a predicate); default all.

    Logs ``effnets/cambn/{cameras_per_batch,dropped_images}`` in training and
    ``effnets/cambn/<stage>/{adapted_cameras,adapted_images,new_cameras,camera_slots}`` at each adaptation.
    """

    def __init__(self, num_cameras: int | None = None, adapt: bool = True, adapt_batch_size: int | None = None,
                 drop_single_image_cameras: bool = True, include: Any = None, exclude: Any = None) -> None:
        if num_cameras is not None and int(num_cameras) < 1:
            raise ValueError(f"CameraBN(num_cameras=...) must be >= 1 or None (read from the datamodule), "
                             f"got {num_cameras}")
        if adapt_batch_size is not None and int(adapt_batch_size) < 2:
            raise ValueError(f"CameraBN(adapt_batch_size=...) must be >= 2 (batch statistics need two images), "
                             f"got {adapt_batch_size}")
        self.num_cameras = None if num_cameras is None else int(num_cameras)
        self.adapt = adapt
        self.adapt_batch_size = None if adapt_batch_size is None else int(adapt_batch_size)
        self.drop_single_image_cameras = drop_single_image_cameras
        self.include, self.exclude = include, exclude
        self.camera_map: dict[int, int] = {}
        self.converted: list[str] = []
        self.trained_cameras: set[int] = set()
        self.last_adaptation: dict[str, Any] = {}
        self._warned: set[int] = set()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model(pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"CameraBN acts on the task's network in `{type(pl_module).__name__}.model`, which is "
                             "missing; task modules keep their network there (EffnetsTaskMixin contract)")
        return model

    def _resolve_num_cameras(self, trainer: pl.Trainer) -> int:
        if self.num_cameras is not None:
            return self.num_cameras
        datamodule = getattr(trainer, "datamodule", None)
        value = getattr(datamodule, "num_cameras", None)
        if not isinstance(value, int) or value < 1:
            where = type(datamodule).__name__ if datamodule is not None else "the trainer (no datamodule)"
            raise ValueError(f"CameraBN(num_cameras=None) reads the number of cameras from the datamodule's "
                             f"`num_cameras` attribute, but {where} has none; pass CameraBN(num_cameras=...)")
        return value

    @staticmethod
    def _camera_ids(pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The batch's per-sample dataset camera ids (CPU), from the task's ``side_information``."""
        side = getattr(pl_module, "side_information", None)
        info = side(batch) if callable(side) else {}
        ids = info.get("camera_ids") if isinstance(info, Mapping) else None
        if ids is None:
            raise ValueError(
                f"CameraBN needs the camera of every image, but {type(pl_module).__name__}.side_information(batch) "
                "returned no 'camera_ids'. Tasks with camera-aware data return {'camera_ids': LongTensor[B]} "
                "there (PersonReID does; its datasets must provide 'camera_ids' with every image)")
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"side_information(batch)['camera_ids'] must be a 1-D integer tensor, got dtype "
                             f"{ids.dtype} and shape {tuple(ids.shape)}")
        ids = ids.detach().cpu().long()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"camera ids must be >= 0, got {int(ids.min())}")
        return ids

    def _slots(self, ids: Tensor, stage: str) -> Tensor:
        unknown = sorted(set(ids.tolist()) - self.camera_map.keys())
        if unknown:
            known = sorted(self.camera_map)
            fix = ("cover every training camera with CameraBN(num_cameras=...)" if stage == "train" else
                   "use CameraBN(adapt=True) to add a slot estimated from the camera's images, or a larger "
                   "num_cameras")
            raise ValueError(f"camera id(s) {unknown} in a {stage} batch have no CamBN slot (cameras with slots: "
                             f"{known[:3]}...{known[-1:]} ({len(known)})): {fix}")
        lookup = torch.full((max(self.camera_map) + 1,), -1, dtype=torch.long)
        lookup[list(self.camera_map)] = torch.tensor(list(self.camera_map.values()))
        return lookup[ids]

    def _ensure_slots(self, model: nn.Module) -> None:
        needed = max(self.camera_map.values(), default=-1) + 1
        for _, layer in camera_bn_layers(model):
            if layer.num_cameras < needed:
                layer.add_cameras(needed - layer.num_cameras)

    # ------------------------------------------------------------------ conversion
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self._model(pl_module)
        layers = camera_bn_layers(model)
        if layers:  # already converted (a second setup, or a model converted by hand)
            self.converted = self.converted or [name for name, _ in layers]
            num = layers[0][1].num_cameras
        else:
            num = self._resolve_num_cameras(trainer)
            report = to_camera_bn(model, num, include=self.include, exclude=self.exclude)
            self.converted = list(report.converted)
            rank_zero_info(f"CameraBN: {len(self.converted)} BN layer(s) now keep statistics for {num} camera(s)")
        if not self.camera_map:
            self.camera_map = {c: c for c in range(num)}
        self._ensure_slots(model)

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        ids = self._camera_ids(pl_module, batch)
        dropped = 0
        if self.drop_single_image_cameras:
            cameras, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
            keep = counts[inverse] > 1
            dropped = int((~keep).sum())
            if dropped:
                if not bool(keep.any()):
                    raise ValueError(
                        f"every camera of this training batch has a single image (cameras {cameras.tolist()}), so "
                        "CamBN has no camera statistics to train with; use larger batches or a sampler that draws "
                        "several images per camera")
                if not isinstance(batch, (MutableMapping, list)):
                    raise TypeError(
                        f"CameraBN drops cameras with a single image from the batch in place, which needs a dict or "
                        f"list batch, got {type(batch).__name__}; use CameraBN(drop_single_image_cameras=False) "
                        "if the model has no BatchNorm1d layer")
                index = keep.nonzero().flatten()
                size = ids.numel()
                if isinstance(batch, MutableMapping):
                    for key in list(batch):
                        batch[key] = _select(batch[key], index, size)
                else:
                    batch[:] = [_select(item, index, size) for item in batch]
                ids = ids[index]
        self.trained_cameras.update(ids.unique().tolist())
        set_camera(self._model(pl_module), self._slots(ids, "train"))
        pl_module.log("effnets/cambn/cameras_per_batch", float(ids.unique().numel()), on_step=False, on_epoch=True,
                      batch_size=ids.numel())
        pl_module.log("effnets/cambn/dropped_images", float(dropped), on_step=False, on_epoch=True,
                      reduce_fx="sum", batch_size=ids.numel())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        set_camera(self._model(pl_module), None)

    # ------------------------------------------------------------------ evaluation
    def _eval_batch_start(self, pl_module: pl.LightningModule, batch: Any, stage: str) -> None:
        ids = self._camera_ids(pl_module, batch)
        if not self.adapt:
            for camera in set(ids.tolist()) - self.trained_cameras - self._warned:
                if camera in self.camera_map and self.trained_cameras:
                    self._warned.add(camera)
                    rank_zero_warn(f"CameraBN(adapt=False): camera {camera} was not seen in training; its slot holds "
                                   "the statistics it was created with. Use adapt=True to estimate them from its "
                                   "images")
        set_camera(self._model(pl_module), self._slots(ids, stage))

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(pl_module, batch, "validation")

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_batch_start(pl_module, batch, "test")

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(pl_module, batch, "predict")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        set_camera(self._model(pl_module), None)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        set_camera(self._model(pl_module), None)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        set_camera(self._model(pl_module), None)

    # ------------------------------------------------------------------ adaptation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapt:
            limits = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
            self._adapt_and_log(trainer, pl_module, trainer.val_dataloaders, limits, "val", log=True)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapt:
            self._adapt_and_log(trainer, pl_module, trainer.test_dataloaders, trainer.num_test_batches, "test",
                                log=True)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapt:  # Lightning allows no self.log in predict hooks
            self._adapt_and_log(trainer, pl_module, trainer.predict_dataloaders, trainer.num_predict_batches,
                                "predict", log=False)

    def _adapt_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, iterables: Any,
                       limits: Sequence[int | float], stage: str, log: bool) -> None:
        summary = self.adapt_statistics(trainer, pl_module, _flatten_loaders(iterables), limits)
        self.last_adaptation = {"stage": stage, **summary}
        figures = {"adapted_cameras": len(summary["adapted"]), "adapted_images": sum(summary["images"].values()),
                   "new_cameras": len(summary["new"]), "camera_slots": len(self.camera_map)}
        if log and not trainer.sanity_checking:
            for name, value in figures.items():
                pl_module.log(f"effnets/cambn/{stage}/{name}", float(value), on_step=False, on_epoch=True,
                              sync_dist=False, rank_zero_only=True)
        if not trainer.sanity_checking:
            rank_zero_info(f"CameraBN: adapted {figures['adapted_cameras']} camera(s) from "
                           f"{figures['adapted_images']} {stage} image(s) ({figures['new_cameras']} new)")

    @torch.no_grad()
    def adapt_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Sequence[Any],
                         limits: Sequence[int | float] | None = None) -> dict[str, Any]:
        """Re-estimate the statistics of every camera in ``loaders`` (see the module docstring).

        Returns ``{"adapted": [camera ids], "new": [camera ids given a slot], "skipped": [...],
        "images": {camera: images}}``, identical on every rank.
        """
        if not is_overridden("predict_step", pl_module):
            raise ValueError(f"CameraBN(adapt=True) forwards each camera's images through the task's "
                             f"predict_step(batch), which {type(pl_module).__name__} does not define")
        model = self._model(pl_module)
        limits = list(limits) if limits is not None else [float("inf")] * len(loaders)
        was_training = pl_module.training
        pl_module.eval()
        images: dict[int, int] = {}
        buffers: dict[int, list[Any]] = {}
        sizes: dict[int, int] = {}
        # new buffers must be normal tensors even though evaluation loops run under inference_mode
        with torch.inference_mode(False), collect_camera_statistics(model) as stats:
            for loader_idx, (loader, limit) in enumerate(zip(loaders, limits)):
                if limit == 0:
                    continue
                batch_size = self.adapt_batch_size or getattr(loader, "batch_size", None) or 64
                batches = _fresh_loader(loader)
                if limit != float("inf"):
                    batches = islice(batches, int(limit))
                for batch in batches:
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=loader_idx)
                    ids = self._camera_ids(pl_module, batch)
                    for camera in ids.unique().tolist():
                        index = (ids == camera).nonzero().flatten()
                        images[camera] = images.get(camera, 0) + index.numel()
                        buffers.setdefault(camera, []).append(_select(batch, index, ids.numel(), mark=True))
                        sizes[camera] = sizes.get(camera, 0) + index.numel()
                        if sizes[camera] >= batch_size + 2:  # forward B, keep >= 2 so no 1-image batch is left
                            merged = _merge(buffers[camera])
                            self._forward(pl_module, model, _unwrap(_slice(merged, 0, batch_size)), camera)
                            buffers[camera] = [_slice(merged, batch_size, None)]
                            sizes[camera] -= batch_size
            for camera, parts in buffers.items():
                if sizes[camera] >= 2:
                    self._forward(pl_module, model, _unwrap(_merge(parts)), camera)
            buffers.clear()
            summary = self._combine(trainer, pl_module, stats, images)
            self._ensure_slots(model)
        pl_module.train(was_training)
        return summary

    @staticmethod
    def _forward(pl_module: pl.LightningModule, model: nn.Module, batch: Any, camera: int) -> None:
        with use_camera(model, camera):
            pl_module.predict_step(batch, 0)

    def _combine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: CameraStatistics,
                 images: dict[int, int]) -> dict[str, Any]:
        """All-reduce the per-camera sums and image counts, give new cameras slots, write the statistics."""
        distributed = trainer.world_size > 1
        device = pl_module.device
        if distributed:
            top = torch.tensor([float(max(images, default=-1))], device=device)
            top = int(trainer.strategy.reduce(top, reduce_op="max").item())
        else:
            top = max(images, default=-1)
        counts = torch.zeros(top + 1, dtype=torch.float64, device=device)
        for camera, n in images.items():
            counts[camera] = n
        if distributed:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        counts = counts.cpu()
        cameras = counts.nonzero().flatten().tolist()
        flat = stats.to_tensor(cameras).to(device)
        if distributed:
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        stats.from_tensor(cameras, flat)
        new = [c for c in cameras if c not in self.camera_map]
        next_slot = max(self.camera_map.values(), default=-1) + 1
        for offset, camera in enumerate(new):
            self.camera_map[camera] = next_slot + offset
        self._ensure_slots(self._model(pl_module))
        adapted = [c for c in stats.cameras() if c in set(cameras)]
        stats.apply(self.camera_map, adapted)
        skipped = [c for c in cameras if c not in set(adapted)]
        unestimated = {self.camera_map[c] for c in skipped if c in new}
        if unestimated:  # new cameras without statistics: the mixture of every other camera, after adaptation
            others = [s for s in range(max(self.camera_map.values()) + 1) if s not in unestimated]
            with torch.inference_mode(False):
                for _, layer in camera_bn_layers(self._model(pl_module)):
                    mean, var = layer.pooled_statistics(others)
                    for slot in unestimated:
                        layer.set_camera_statistics(slot, mean, var, 0)
        if skipped:
            rank_zero_warn(f"CameraBN: camera(s) {skipped} have a single image in the evaluation data; CamBN needs at "
                           "least two per camera, so they keep their previous statistics (a new camera gets the "
                           "mixture of all cameras)")
        return {"adapted": adapted, "new": new, "skipped": skipped,
                "images": {c: int(counts[c]) for c in cameras}}

    # ------------------------------------------------------------------ state
    @staticmethod
    def restore_structure(model: nn.Module, state: dict[str, Any]) -> bool:
        """Give ``model`` the camera BN layers this callback's saved ``state`` records, unless it has them; returns
        whether it converted (used by ``EffnetsTaskMixin.on_load_checkpoint``). Slot counts follow the camera map;
        the layers' own ``load_state_dict`` resizes them to the checkpoint's statistics."""
        names = set(state.get("converted", []) if state else [])
        if not names or camera_bn_layers(model):
            return False
        slots = max((int(v) for v in state.get("camera_map", {}).values()), default=0) + 1
        to_camera_bn(model, slots, include=lambda name, module: name in names)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"camera_map": dict(self.camera_map), "converted": list(self.converted),
                "trained_cameras": sorted(self.trained_cameras)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        converted = list(state_dict.get("converted", []))
        if self.converted and converted and converted != self.converted:
            raise ValueError(f"this checkpoint's CameraBN converted {len(converted)} layer(s), this run converted "
                             f"{len(self.converted)}: use the same include/exclude as the run that saved it")
        self.converted = converted or self.converted
        self.camera_map = {int(k): int(v) for k, v in state_dict.get("camera_map", {}).items()}
        self.trained_cameras = {int(c) for c in state_dict.get("trained_cameras", [])}
