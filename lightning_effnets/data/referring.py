"""Referring-expression comprehension data: a word vocabulary, batches, and a RefCOCO-style reader.

A sample is one (image, expression, box) triple. Batches are dicts::

    {"images": FloatTensor[B, C, S, S] in [0, 1],
     "tokens": LongTensor[B, L]  (word ids, 0 = padding, right-padded to the longest expression),
     "boxes": FloatTensor[B, 4]  (target box, x0 y0 x1 y1 in pixels of the S x S network input),
     "expressions": list[str]}

The vocabulary is built from the *training* expressions only (as the referring-expression literature
does); words never seen in training map to ``<unk>``, and an expression made only of such words is an
error that names it, because the model could only guess.

The on-disk format read by :class:`RefCOCOStyleDataModule` is the refer toolkit's
(github.com/lichengunc/refer) ``instances.json`` + ``refs(unc).p`` merged into one JSON file (no pickle)::

    root/
      images/<file_name>            every image referenced below (``image_dir``)
      refs.json                     (``annotation_file``)
        {"images":      [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", ...}, ...],
         "annotations": [{"id": 7, "image_id": 1, "bbox": [x, y, w, h], ...}, ...],
         "refs":        [{"ref_id": 3, "ann_id": 7, "split": "train",
                          "sentences": [{"sent": "man in red on the left"}, ...]}, ...]}

``bbox`` is COCO's ``[x, y, width, height]`` in pixels of the original image; a sentence may also be a
plain string; extra keys (``category_id``, ``tokens``, ``raw``, ``width``/``height``...) are ignored.
``split`` is any name (RefCOCO uses ``train``/``val``/``testA``/``testB``; RefCOCOg-umd ``train``/
``val``/``test``), chosen per stage with ``train_split``/``val_split``/``test_split``. Each sentence of
a ref is one sample.
"""

from __future__ import annotations

import abc

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

__all__ = ["Vocabulary", "tokenize", "collate_referring", "letterbox", "ReferringDataModuleBase",
           "RefCOCOStyleDataModule"]

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(expression: str) -> list[str]:
    """Lower-case alphanumeric words: ``"The man's LEFT arm."`` -> ``["the", "man", "s", "left", "arm"]``."""
    return _WORD.findall(expression.lower())


class Vocabulary:
    """Word <-> id map with ``<pad>`` = 0 and ``<unk>`` = 1, built from training expressions.

    Args:
        words: the words (without the two special tokens), in id order starting at 2.
    """

    PAD, UNK = "<pad>", "<unk>"
    pad_id, unk_id = 0, 1

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("Vocabulary words must be unique")
        if self.PAD in words or self.UNK in words:
            raise ValueError(f"{self.PAD} and {self.UNK} are added by Vocabulary; do not pass them")
        self.itos: list[str] = [self.PAD, self.UNK, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, expressions: Iterable[str], min_freq: int = 1) -> Vocabulary:
        """Every word seen at least ``min_freq`` times, sorted alphabetically (so the ids do not depend
        on the order of the data)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(word for expression in expressions for word in tokenize(expression))
        if not counts:
            raise ValueError("cannot build a vocabulary: the training expressions contain no words")
        return cls(sorted(w for w, c in counts.items() if c >= min_freq))

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @property
    def words(self) -> list[str]:
        """The words without the special tokens (what :meth:`__init__` takes back)."""
        return self.itos[2:]

    def encode(self, expression: str, max_length: int | None = None) -> list[int]:
        """Word ids of ``expression`` (unknown words -> ``<unk>``), truncated to ``max_length`` words.

        Raises ``ValueError`` naming the expression when it has no words, or only unknown ones.
        """
        words = tokenize(expression)
        if not words:
            raise ValueError(f"expression {expression!r} contains no words")
        if max_length is not None:
            words = words[:max_length]
        ids = [self.stoi.get(w, self.unk_id) for w in words]
        if all(i == self.unk_id for i in ids):
            shown = ", ".join(sorted(set(words))[:10])
            raise ValueError(
                f"expression {expression!r} has only words outside the vocabulary ({shown}); the "
                f"{len(self) - 2} known words come from the training expressions, e.g. "
                f"{', '.join(self.words[:12])}. Rephrase it with known words or retrain with data that uses them.")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces, padding dropped."""
        return " ".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"


def collate_referring(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and boxes, right-pad token ids with 0 (``<pad>``) to the longest expression."""
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "tokens": pad_sequence([s["tokens"] for s in samples], batch_first=True, padding_value=Vocabulary.pad_id),
        "boxes": torch.stack([s["box"] for s in samples]),
        "expressions": [s["expression"] for s in samples],
    }


def letterbox(image: Image.Image, size: int, fill: float = 0.5) -> tuple[Tensor, tuple[float, float]]:
    """Resize so the longer side is ``size`` (aspect kept), paste top-left on a ``size`` x ``size`` canvas.

    Returns the CHW float image in [0, 1] and the (x, y) scale factors. Padding bottom/right (no shift)
    maps a box by a pure scaling, so IoUs in the network input equal those in the original image.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
    canvas = torch.full((3, size, size), fill)
    canvas[:, :new_h, :new_w] = torch.from_numpy(resized).permute(2, 0, 1)
    return canvas, (new_w / width, new_h / height)


class _SampleList(Dataset):
    """Samples held in memory as dicts; ``image`` may be a uint8 HWC array (procedural data)."""

    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.samples[index])
        image = sample["image"]
        if isinstance(image, np.ndarray):
            sample["image"] = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        return sample


class ReferringDataModuleBase(pl.LightningDataModule, abc.ABC):
    """What every referring datamodule shares: vocabulary from the training split, loaders, collation.

    Subclasses implement :meth:`_expressions` (the training expressions) and :meth:`_build_split`.
    The task reads ``vocab_size``, ``vocabulary`` and ``image_size`` to check that it matches the data.
    """

    in_chans = 3

    def __init__(self, batch_size: int, image_size: int, max_length: int, min_word_freq: int,
                 num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.batch_size, self.image_size, self.max_length = batch_size, image_size, max_length
        self.min_word_freq, self.num_workers = min_word_freq, num_workers
        self.splits: dict[str, Dataset] = {}
        self._vocabulary: Vocabulary | None = None

    # ---------------------------------------------------------------- to implement
    @abc.abstractmethod
    def _expressions(self) -> list[str]:
        """Every training expression (the vocabulary is built from them)."""

    @abc.abstractmethod
    def _build_split(self, name: str) -> Dataset:
        """The dataset of split ``name`` (``train``, ``val`` or ``test``)."""

    # ---------------------------------------------------------------- shared
    @property
    def vocabulary(self) -> Vocabulary:
        """Built once from the training expressions (available before ``setup``)."""
        if self._vocabulary is None:
            self._vocabulary = Vocabulary.build(self._expressions(), min_freq=self.min_word_freq)
        return self._vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, expression: str) -> Tensor:
        """Token ids of one expression (raises a ``ValueError`` naming it if no word is known)."""
        return torch.tensor(self.vocabulary.encode(expression, self.max_length), dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        for name in ("train", "val", "test"):
            if name not in self.splits:
                self.splits[name] = self._build_split(name)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.splits:
            self.setup()
        return DataLoader(self.splits[name], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_referring)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class _RefImageDataset(Dataset):
    """Loads and letterboxes images lazily (``num_workers`` parallelise it); expressions pre-encoded."""

    def __init__(self, items: list[tuple[Path, list[float], str, Tensor]], image_size: int) -> None:
        self.items, self.image_size = items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, (x, y, w, h), expression, tokens = self.items[index]
        with Image.open(path) as image:
            tensor, (sx, sy) = letterbox(image, self.image_size)
        box = torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy], dtype=torch.float32)
        return {"image": tensor, "tokens": tokens, "box": box, "expression": expression}


class RefCOCOStyleDataModule(ReferringDataModuleBase):
    """RefCOCO / RefCOCO+ / RefCOCOg / ReferIt converted to one JSON file (layout in the module docstring).

    Images are letterboxed to ``image_size`` (longer side scaled, padded bottom/right with grey) and boxes
    are scaled with them; no augmentation (a horizontal flip would have to swap "left"/"right" in the text).

    Args:
        root: dataset folder.
        annotation_file: the JSON file, relative to ``root``.
        image_dir: image folder, relative to ``root``.
        train_split / val_split / test_split: values of the refs' ``split`` field used for each stage.
        batch_size: samples per batch.
        image_size: side of the square network input.
        max_length: expressions are truncated to this many words (RealGIN uses 15).
        min_word_freq: training words seen fewer times become ``<unk>``.
        num_workers: DataLoader workers (images are decoded on the fly).
    """

    def __init__(self, root: str | Path, annotation_file: str = "refs.json", image_dir: str = "images",
                 train_split: str = "train", val_split: str = "val", test_split: str = "test",
                 batch_size: int = 32, image_size: int = 256, max_length: int = 15, min_word_freq: int = 1,
                 num_workers: int = 2) -> None:
        super().__init__(batch_size, image_size, max_length, min_word_freq, num_workers)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.annotation_path = self.root / annotation_file
        self.image_dir = self.root / image_dir
        if not self.annotation_path.is_file():
            raise FileNotFoundError(f"RefCOCOStyleDataModule: annotation file {str(self.annotation_path)!r} does "
                                    "not exist (expected root/refs.json with 'images', 'annotations' and 'refs'; "
                                    "see lightning_effnets.data.referring for the layout)")
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self._refs: dict[str, list[tuple[Path, list[float], str]]] | None = None

    def _load(self) -> dict[str, list[tuple[Path, list[float], str]]]:
        """Parse the JSON once: split name -> [(image path, xywh box, sentence)]."""
        if self._refs is not None:
            return self._refs
        where = str(self.annotation_path)
        with open(self.annotation_path, encoding="utf-8") as f:
            data = json.load(f)
        missing = [k for k in ("images", "annotations", "refs") if k not in data]
        if not isinstance(data, dict) or missing:
            raise ValueError(f"{where}: missing top-level key(s) {missing}; expected 'images', 'annotations', 'refs'")
        try:
            files = {img["id"]: img["file_name"] for img in data["images"]}
            anns = {ann["id"]: (ann["image_id"], [float(v) for v in ann["bbox"]]) for ann in data["annotations"]}
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: every image needs 'id' and 'file_name', every annotation 'id', 'image_id' "
                             f"and 'bbox' [x, y, w, h] ({err!r})") from err
        refs: dict[str, list[tuple[Path, list[float], str]]] = {}
        for ref in data["refs"]:
            ref_id = ref.get("ref_id", "?")
            if ref.get("ann_id") not in anns:
                raise ValueError(f"{where}: ref {ref_id} points to ann_id {ref.get('ann_id')!r}, "
                                 "which is not in 'annotations'")
            image_id, box = anns[ref["ann_id"]]
            if image_id not in files:
                raise ValueError(f"{where}: annotation {ref['ann_id']} points to image_id {image_id!r}, "
                                 "which is not in 'images'")
            if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"{where}: annotation {ref['ann_id']} has bbox {box}; expected [x, y, w, h] with "
                                 "positive width and height")
            if "split" not in ref or "sentences" not in ref:
                raise ValueError(f"{where}: ref {ref_id} needs 'split' and 'sentences'")
            for sentence in ref["sentences"]:
                text = sentence if isinstance(sentence, str) else sentence.get("sent", sentence.get("raw"))
                if not isinstance(text, str):
                    raise ValueError(f"{where}: ref {ref_id} has a sentence without 'sent': {sentence!r}")
                refs.setdefault(str(ref["split"]), []).append((self.image_dir / files[image_id], box, text))
        self._refs = refs
        return refs

    def _split(self, name: str) -> list[tuple[Path, list[float], str]]:
        refs = self._load()
        split = self.split_names[name]
        if split not in refs:
            raise ValueError(f"{self.annotation_path}: no ref has split {split!r} (needed for {name}); splits "
                             f"present: {sorted(refs)}. Set {name}_split to one of them.")
        return refs[split]

    def _expressions(self) -> list[str]:
        return [text for _, _, text in self._split("train")]

    def _build_split(self, name: str) -> Dataset:
        items = []
        for path, box, text in self._split(name):
            if not path.is_file():
                raise FileNotFoundError(f"RefCOCOStyleDataModule: image {str(path)!r} listed in "
                                        f"{self.annotation_path.name} does not exist")
            items.append((path, box, text, self.encode(text)))
        return _RefImageDataset(items, self.image_size)
