"""Person re-identification data: the batch format, a P x K identity sampler, and a Market-1501 reader.

Every re-identification sample carries its camera id from the dataset to the module, because camera-aware
methods (camera-based batch norm, arXiv:2001.08680) and the evaluation protocol need it. Samples (and so the
collated batches) are dicts with the keys of :data:`BATCH_KEYS`:

* ``images``: float ``[3, H, W]`` in [0, 1];
* ``person_ids``: training split: the class label in ``[0, num_classes)``; query/gallery splits: the
  identity as the dataset names it (``-1`` = junk, ``0`` = Market-1501 distractor);
* ``camera_ids``: 0-based camera index in ``[0, num_cameras)`` (Market-1501's ``c1`` is camera 0);
* ``is_query``: whether the image is a query (``False`` for the gallery and for training images);
* ``indices``: position in the dataset (lets the metric count each image once under DDP padding).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

__all__ = ["BATCH_KEYS", "Market1501DataModule", "PKSampler", "ReIDDataModule", "ReIDDataset",
           "parse_market1501_name", "reid_transform"]

BATCH_KEYS = ("images", "person_ids", "camera_ids", "is_query", "indices")


def reid_transform(image_size: tuple[int, int], augment: bool, resize: bool = True) -> v2.Transform:
    """uint8 ``[3, H, W]`` -> float in [0, 1] at ``image_size``; training adds the BNNeck paper's augmentation
    (arXiv:1903.07071): horizontal flip, 10% padding + random crop, random erasing."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if resize:
        steps.append(v2.Resize(list(image_size), antialias=True))
    if augment:
        pad = max(1, round(0.08 * image_size[1]))
        steps += [v2.RandomHorizontalFlip(), v2.Pad(pad, padding_mode="edge"), v2.RandomCrop(list(image_size))]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if augment:
        steps.append(v2.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0.5))
    return v2.Compose(steps)


class ReIDDataset(Dataset):
    """Re-identification images (an in-memory uint8 tensor or a list of files) with their ids.

    Items are dicts with the keys of :data:`BATCH_KEYS` (see the module docstring).
    """

    def __init__(self, person_ids: Sequence[int], camera_ids: Sequence[int], is_query: Sequence[bool] | None = None,
                 images: Tensor | None = None, paths: Sequence[str | Path] | None = None,
                 transform: v2.Transform | None = None) -> None:
        if (images is None) == (paths is None):
            raise ValueError("ReIDDataset needs exactly one of images (uint8 [N, 3, H, W]) or paths")
        n = len(person_ids)
        self.person_ids = torch.as_tensor(person_ids, dtype=torch.long)
        self.camera_ids = torch.as_tensor(camera_ids, dtype=torch.long)
        self.is_query = torch.zeros(n, dtype=torch.bool) if is_query is None else torch.as_tensor(is_query).bool()
        self.images, self.paths = images, [Path(p) for p in paths] if paths is not None else None
        sizes = {len(self.camera_ids), len(self.is_query), len(images) if images is not None else len(self.paths)}
        if sizes != {n}:
            raise ValueError(f"ReIDDataset: person_ids, camera_ids, is_query and images must have the same length, "
                             f"got {n} and {sorted(sizes)}")
        if n and int(self.camera_ids.min()) < 0:
            raise ValueError("camera ids must be >= 0")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.person_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.images is not None:
            image = self.images[index]
        else:
            image = decode_image(str(self.paths[index]), mode=ImageReadMode.RGB)
        if self.transform is not None:
            image = self.transform(image)
        return {"images": image, "person_ids": self.person_ids[index], "camera_ids": self.camera_ids[index],
                "is_query": self.is_query[index], "indices": torch.tensor(index)}


class PKSampler(DistributedSampler):
    """P identities x K images per batch, for the batch-hard triplet loss (Hermans et al., arXiv:1703.07737).

    Yields flat dataset indices: use it with ``DataLoader(batch_size=p * k, drop_last=True)``. An epoch has
    ``len(dataset) // (p * k)`` global batches (``batches_per_epoch`` overrides), so about every image is seen once.
    Identities come from a stream of shuffled permutations (every identity equally often, ``p`` distinct ones per
    batch); each identity's images come from its own reshuffled stream (all of them are used before any repeats;
    an identity with fewer than ``k`` images repeats some within a batch).

    DDP sharding: every rank draws the *same* global sequence of batches from ``seed + epoch`` and rank ``r``
    takes global batches ``r, r + W, r + 2W, ...`` (``W`` ranks), ``global // W`` of them, so ranks get disjoint,
    complete P x K batches, equally many of them (no rank waits on another). Triplets are mined within each rank's
    batch. It subclasses ``DistributedSampler`` so that Lightning neither wraps nor replaces it
    (``use_distributed_sampler``); Lightning calls :meth:`set_epoch` every epoch.

    Args:
        person_ids: identity of every dataset sample.
        p: identities per batch.
        k: images per identity (>= 2, a triplet needs a positive).
        num_replicas / rank: DDP world size and rank; default: from ``torch.distributed`` (1 / 0 if not initialised).
        seed: base seed; all ranks must use the same one.
        batches_per_epoch: global batches per epoch (default ``len(dataset) // (p * k)``).
    """

    def __init__(self, person_ids: Sequence[int] | Tensor, p: int, k: int, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, batches_per_epoch: int | None = None) -> None:
        pids = torch.as_tensor(person_ids).long().numpy()
        if k < 2:
            raise ValueError(f"PKSampler needs k >= 2 images per identity (a triplet needs a positive), got k={k}")
        identities, inverse = np.unique(pids, return_inverse=True)
        if p < 2 or p > len(identities):
            raise ValueError(f"PKSampler needs 2 <= p <= number of identities ({len(identities)}), got p={p}; "
                             "lower p (data.init_args.p) or use more identities")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        super().__init__(pids, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.p, self.k = p, k
        self.members = [np.flatnonzero(inverse == i) for i in range(len(identities))]
        self.global_batches = batches_per_epoch if batches_per_epoch is not None else len(pids) // (p * k)
        if self.global_batches < num_replicas:
            raise ValueError(f"PKSampler: {self.global_batches} batches of {p}x{k} per epoch cannot feed "
                             f"{num_replicas} ranks; use more data or smaller p, k")

    @property
    def batches_per_rank(self) -> int:
        return self.global_batches // self.num_replicas

    def __len__(self) -> int:
        return self.batches_per_rank * self.p * self.k

    def global_batch_indices(self) -> list[np.ndarray]:
        """All global batches of the current epoch (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        num_ids = len(self.members)
        id_stream: list[int] = []
        image_streams: list[list[int]] = [[] for _ in range(num_ids)]
        batches = []
        for _ in range(self.global_batches):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not id_stream:
                    id_stream = rng.permutation(num_ids).tolist()
                deferred = []
                while id_stream and len(chosen) < self.p:
                    identity = id_stream.pop(0)
                    (deferred if identity in chosen else chosen).append(identity)
                id_stream = deferred + id_stream
                if len(chosen) < self.p and len(id_stream) == len(deferred):
                    id_stream += rng.permutation(num_ids).tolist()
            batch = []
            for identity in chosen:
                members = self.members[identity]
                if len(members) < self.k:  # too few images: all of them plus random repeats
                    batch += members.tolist() + rng.choice(members, self.k - len(members)).tolist()
                    continue
                stream = image_streams[identity]
                while len(stream) < self.k:
                    stream += [i for i in rng.permutation(members).tolist() if i not in stream]
                batch += stream[:self.k]
                del stream[:self.k]
            batches.append(np.asarray(batch, dtype=np.int64))
        return batches

    def __iter__(self) -> Iterator[int]:
        batches = self.global_batch_indices()[self.rank::self.num_replicas][:self.batches_per_rank]
        for batch in batches:
            yield from batch.tolist()


class ReIDDataModule(pl.LightningDataModule):
    """Shared logic of re-identification datamodules: P x K training loader, query+gallery evaluation loaders.

    Subclasses fill ``self.splits`` (``train``, ``val``, ``test`` :class:`ReIDDataset`) in :meth:`setup` and
    set ``num_classes`` (training identities), ``num_cameras`` and ``held_out_cameras`` (cameras absent from
    training). The task reads ``camera_groups`` to report seen and held-out cameras separately.

    Args:
        image_size: ``(height, width)`` of the network input.
        p / k: identities per training batch / images per identity (batch size ``p * k``).
        eval_batch_size: batch size of the query/gallery loaders.
        augment: training augmentation (flip, pad-crop, random erasing).
        num_workers: DataLoader workers.
        seed: seed of the P x K sampler (and of generated data in subclasses).
    """

    num_classes: int
    num_cameras: int
    held_out_cameras: list[int]

    def __init__(self, image_size: tuple[int, int] = (64, 32), p: int = 16, k: int = 4, eval_batch_size: int = 128,
                 augment: bool = True, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        image_size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
        if len(image_size) != 2 or min(image_size) < 8:
            raise ValueError(f"image_size must be (height, width), each >= 8, got {image_size}")
        self.image_size: tuple[int, int] = image_size  # type: ignore[assignment]
        self.p, self.k, self.eval_batch_size = p, k, eval_batch_size
        self.augment, self.num_workers, self.seed = augment, num_workers, seed
        self.splits: dict[str, ReIDDataset] = {}

    @property
    def seen_cameras(self) -> list[int]:
        return [c for c in range(self.num_cameras) if c not in set(self.held_out_cameras)]

    @property
    def camera_groups(self) -> dict[str, list[int]]:
        """``{"seen": [...], "held_out": [...]}`` when some cameras are held out of training, else ``{}``."""
        if not self.held_out_cameras:
            return {}
        return {"seen": self.seen_cameras, "held_out": list(self.held_out_cameras)}

    def _check_setup(self) -> None:
        if not self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        self._check_setup()
        trainer = getattr(self, "trainer", None)
        replicas = dict(num_replicas=trainer.world_size, rank=trainer.global_rank) if trainer is not None else {}
        sampler = PKSampler(self.splits["train"].person_ids, self.p, self.k, seed=self.seed, **replicas)
        return self._loader(self.splits["train"], batch_size=self.p * self.k, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self._check_setup()
        return self._loader(self.splits["val"], batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._check_setup()
        return self._loader(self.splits["test"], batch_size=self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def parse_market1501_name(name: str) -> tuple[int, int]:
    """``"0002_c1s1_000451_03.jpg" -> (2, 0)``: person id and 0-based camera (``-1`` junk, ``0`` distractor).

    The layout ``<pid>_c<camera>...`` is shared by DukeMTMC-reID (``0001_c2_f0046182.jpg``).
    """
    match = _MARKET_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a Market-1501 file name (expected '<person id>_c<camera>s<seq>_<frame>_"
                         "<box>.jpg', e.g. 0002_c1s1_000451_03.jpg)")
    camera = int(match.group(2))
    if camera < 1:
        raise ValueError(f"{name!r}: cameras are numbered from c1")
    return int(match.group(1)), camera - 1


class Market1501DataModule(ReIDDataModule):
    """The Market-1501 folder layout (``bounding_box_train``, ``query``, ``bounding_box_test``) read from ``root``.

    As the benchmark defines it: training uses ``bounding_box_train`` with identities relabelled to
    ``[0, num_classes)`` (junk ``-1`` and distractor ``0000`` images, which name no person, are not trained on);
    evaluation ranks ``query`` against ``bounding_box_test``, where junk images (id ``-1``) are ignored and
    distractors (``0000``) stay as negatives. Market-1501 has no validation split, so validation evaluates the
    test query/gallery like the benchmark's reference code does (report the final test figures, not a
    checkpoint picked on them, if that matters to you). Evaluation samples are ordered by identity (each
    identity's queries next to its gallery images, junk and distractors last), so partial evaluation runs
    (``limit_val_batches``) still find matches. DukeMTMC-reID uses the same layout.

    Args:
        root: folder containing the three sub-folders.
        held_out_cameras: 0-based cameras whose training images are dropped; test metrics are then also
            reported separately for seen and held-out cameras.
        image_size, p, k, eval_batch_size, augment, num_workers, seed: see :class:`ReIDDataModule`.
    """

    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def __init__(self, root: str | Path, image_size: tuple[int, int] = (256, 128), held_out_cameras: list[int] | None = None,
                 p: int = 16, k: int = 4, eval_batch_size: int = 128, augment: bool = True, num_workers: int = 2,
                 seed: int = 0) -> None:
        super().__init__(image_size, p, k, eval_batch_size, augment, num_workers, seed)
        self.root = Path(root).expanduser()
        missing = [f for f in self.folders.values() if not (self.root / f).is_dir()]
        if missing:
            raise FileNotFoundError(f"Market1501DataModule: {str(self.root)!r} lacks {', '.join(missing)} (expected "
                                    "root/bounding_box_train, root/query and root/bounding_box_test)")
        self.save_hyperparameters()
        self.files = {split: self._list(folder) for split, folder in self.folders.items()}
        cameras = [c for records in self.files.values() for _, _, c in records]
        self.num_cameras = max(cameras) + 1 if cameras else 0
        self.held_out_cameras = sorted(set(held_out_cameras or []))
        if any(not 0 <= c < self.num_cameras for c in self.held_out_cameras):
            raise ValueError(f"held_out_cameras {self.held_out_cameras} must be 0-based camera ids in "
                             f"[0, {self.num_cameras}) (file c1 is camera 0)")
        train_ids = sorted({pid for _, pid, cam in self.files["train"]
                            if pid > 0 and cam not in self.held_out_cameras})
        if not train_ids:
            raise ValueError(f"{self.root / self.folders['train']} has no training image of a person (id > 0)")
        self.train_labels = {pid: label for label, pid in enumerate(train_ids)}
        self.num_classes = len(train_ids)

    def _list(self, folder: str) -> list[tuple[Path, int, int]]:
        records = []
        for path in sorted((self.root / folder).iterdir()):
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                pid, camera = parse_market1501_name(path.name)
                records.append((path, pid, camera))
        return records

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train = [(p, self.train_labels[pid], c) for p, pid, c in self.files["train"]
                 if pid > 0 and c not in self.held_out_cameras]
        evaluation = [(p, pid, c, True) for p, pid, c in self.files["query"]]
        evaluation += [(p, pid, c, False) for p, pid, c in self.files["gallery"]]
        if not any(q for *_, q in evaluation):
            raise ValueError(f"{self.root / 'query'} contains no images")
        evaluation.sort(key=lambda r: (r[1] <= 0, r[1], not r[3]))  # by identity, queries first, junk/distractors last
        self.splits["train"] = ReIDDataset([r[1] for r in train], [r[2] for r in train],
                                           paths=[r[0] for r in train],
                                           transform=reid_transform(self.image_size, self.augment))
        eval_set = ReIDDataset([r[1] for r in evaluation], [r[2] for r in evaluation], [r[3] for r in evaluation],
                               paths=[r[0] for r in evaluation], transform=reid_transform(self.image_size, False))
        self.splits["val"] = self.splits["test"] = eval_set
