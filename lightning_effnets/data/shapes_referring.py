"""Procedural referring-expression scenes: coloured shapes and unambiguous expressions (no download).

Every scene holds a few non-overlapping objects, each a ``shape`` (circle, square, triangle) with a
``colour`` (red, green, blue, yellow) and a ``size`` (small, large), on a noisy grey background. One
object is the target; its expression comes from a small grammar::

    expression := ["the"] object [relation ["the"] object]
    object     := [size] [colour] shape           (e.g. "small red circle")
    relation   := "left of" | "to the left of" | "right of" | "to the right of" | "above" | "below" | "under"

and is *unambiguous by construction*: exactly one object matches it. Relations compare box centres
with a margin (the target is at least ``margin`` pixels left of the anchor; every other object that
fits the description is not left of it at all), and the anchor object is itself uniquely described.
With probability ``duplicate_prob`` a scene contains two identical objects and one of them is the
target, so only a relation can tell them apart: the model must reason about other regions, which is
what RealGIN's global attentive reasoning (arXiv:1912.03478) is for.

Scenes are generated from ``numpy.random.default_rng([seed, split, index])``: the same seed gives the
same data on every machine, rank and run, and a split's scenes do not depend on the other splits' sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_effnets.data.referring import ReferringDataModuleBase, _SampleList

__all__ = ["ShapesReferringDataModule", "ShapeObject", "ReferringScene", "generate_scene", "describe", "COLOURS",
           "SHAPES", "SIZES"]

COLOURS: dict[str, tuple[int, int, int]] = {"red": (215, 45, 40), "green": (50, 165, 60), "blue": (45, 85, 215),
                                            "yellow": (230, 200, 35)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.18), "large": (0.26, 0.33)}  # side / image side
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_RELATION_WORDS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                   "above": ("above",), "below": ("below", "under")}
# attribute subsets that describe an object; the shape is always the head noun
_DESCRIPTIONS: tuple[tuple[str, ...], ...] = (("shape",), ("colour", "shape"), ("size", "shape"),
                                              ("size", "colour", "shape"))
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``box`` is (x0, y0, x1, y1) in pixels, pixel centres at +0.5."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def attribute(self, name: str) -> str:
        return getattr(self, name)


@dataclass
class ReferringScene:
    """A rendered scene (HWC uint8), its objects, the target index, the expression and whether the
    expression needs its relation to be unambiguous."""

    image: np.ndarray
    objects: list[ShapeObject]
    target: int
    expression: str
    needs_relation: bool


def _matches(obj: ShapeObject, reference: ShapeObject, description: tuple[str, ...]) -> bool:
    return all(obj.attribute(a) == reference.attribute(a) for a in description)


def _offset(obj: ShapeObject, anchor: ShapeObject, relation: str) -> float:
    """How far ``obj`` is in ``relation`` of ``anchor`` (positive: it is), in pixels between centres."""
    (ox, oy), (ax, ay) = obj.center, anchor.center
    return {"left": ax - ox, "right": ox - ax, "above": ay - oy, "below": oy - ay}[relation]


def _unique_descriptions(objects: list[ShapeObject], index: int) -> list[tuple[str, ...]]:
    target = objects[index]
    return [d for d in _DESCRIPTIONS
            if not any(_matches(o, target, d) for i, o in enumerate(objects) if i != index)]


def _phrase(obj: ShapeObject, description: tuple[str, ...], rng: np.random.Generator) -> str:
    words = []
    if "size" in description:
        words.append(str(rng.choice(_SIZE_WORDS[obj.size])))
    if "colour" in description:
        words.append(obj.colour)
    words.append(obj.shape)
    return " ".join(words)


def _article(rng: np.random.Generator) -> str:
    return "the " if rng.random() < 0.85 else ""


def describe(objects: list[ShapeObject], target: int, rng: np.random.Generator, relation_prob: float,
             margin: float) -> tuple[str, bool] | None:
    """An unambiguous expression for ``objects[target]`` and whether it needs its relation (None if the
    grammar cannot single the target out)."""
    t = objects[target]
    unique = _unique_descriptions(objects, target)
    necessary, optional = [], []  # relational candidates: (target description, relation, anchor, anchor description)
    for a, anchor in enumerate(objects):
        if a == target:
            continue
        anchor_descriptions = _unique_descriptions(objects, a)
        if not anchor_descriptions:
            continue
        for relation in _RELATION_WORDS:
            if _offset(t, anchor, relation) <= margin:
                continue
            for d in _DESCRIPTIONS:
                rivals = [o for i, o in enumerate(objects) if i not in (target, a) and _matches(o, t, d)]
                if any(_offset(o, anchor, relation) > 0 for o in rivals):
                    continue
                candidate = (d, relation, a, anchor_descriptions)
                (optional if d in unique else necessary).append(candidate)
    relational = necessary if necessary and (not optional or rng.random() < 0.7) else optional
    if unique and (not relational or rng.random() >= relation_prob):
        return _article(rng) + _phrase(t, unique[rng.integers(len(unique))], rng), False
    if not relational:
        return None
    d, relation, a, anchor_descriptions = relational[rng.integers(len(relational))]
    anchor_d = anchor_descriptions[rng.integers(len(anchor_descriptions))]
    words = _RELATION_WORDS[relation]
    expression = (f"{_article(rng)}{_phrase(t, d, rng)} {words[rng.integers(len(words))]} "
                  f"{_article(rng)}{_phrase(objects[a], anchor_d, rng)}")
    return expression, d not in unique


def _render(objects: list[ShapeObject], size: int, rng: np.random.Generator) -> np.ndarray:
    background = rng.uniform(95, 165)
    image = background + rng.normal(0.0, 6.0, (size, size, 1)) + rng.normal(0.0, 3.0, (size, size, 3))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
        if obj.shape == "circle":
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= (side / 2) ** 2
        elif obj.shape == "square":
            mask = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        else:  # triangle pointing up, apex at the top centre, base on the bottom edge
            mask = (ys >= y0) & (ys <= y1) & (np.abs(xs - cx) <= (ys - y0) / 2)
        colour = np.array(COLOURS[obj.colour], dtype=np.float64) + rng.uniform(-15, 15, 3)
        image[mask] = colour + rng.normal(0.0, 4.0, (int(mask.sum()), 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_scene(rng: np.random.Generator, image_size: int = 64, min_objects: int = 3, max_objects: int = 5,
                   duplicate_prob: float = 0.35, relation_prob: float = 0.5, gap: int = 2) -> ReferringScene:
    """Sample objects, a target and its expression until the grammar can describe the target uniquely."""
    margin = 0.08 * image_size
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        kinds = [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))))
                 for _ in range(n)]
        twins = rng.random() < duplicate_prob
        if twins:
            kinds[1] = kinds[0]
        objects: list[ShapeObject] = []
        for shape, colour, size_name in kinds:
            lo, hi = SIZES[size_name]
            side = int(round(rng.uniform(lo, hi) * image_size))
            for _ in range(100):
                x0, y0 = (int(v) for v in rng.integers(1, image_size - side, 2))
                box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
                if all(box[0] >= o.box[2] + gap or o.box[0] >= box[2] + gap or box[1] >= o.box[3] + gap
                       or o.box[1] >= box[3] + gap for o in objects):
                    objects.append(ShapeObject(shape, colour, size_name, box))
                    break
            else:
                break
        if len(objects) != n:
            continue  # crowded: start over
        order = rng.permutation(n)  # the twins are not always the first two objects
        objects = [objects[i] for i in order]
        for _ in range(4):
            target = int(np.flatnonzero(order == int(rng.integers(2)))[0]) if twins else int(rng.integers(n))
            described = describe(objects, target, rng, relation_prob, margin)
            if described is not None:
                expression, needs_relation = described
                return ReferringScene(_render(objects, image_size, rng), objects, target, expression, needs_relation)


class ShapesReferringDataModule(ReferringDataModuleBase):
    """Procedural referring-expression comprehension: coloured shapes + grammar expressions (module docstring).

    Scenes are generated once in ``setup`` (about 0.3 ms each at 64 px) and kept in memory.

    Args:
        train_size / val_size / test_size: scenes per split (one expression each).
        image_size: side of the square images in pixels.
        min_objects / max_objects: objects per scene.
        duplicate_prob: probability of a scene with two identical objects, one of them the target.
        relation_prob: probability of a relational expression when attributes alone would do.
        seed: seed of the generator.
        batch_size: samples per batch.
        max_length: expressions are truncated to this many words (the grammar's longest has 12).
        num_workers: DataLoader workers (data is in memory; 0 is usually fastest).
    """

    def __init__(self, train_size: int = 6000, val_size: int = 500, test_size: int = 1000, image_size: int = 64,
                 min_objects: int = 3, max_objects: int = 5, duplicate_prob: float = 0.35, relation_prob: float = 0.5,
                 seed: int = 0, batch_size: int = 64, max_length: int = 16, num_workers: int = 0) -> None:
        super().__init__(batch_size, image_size, max_length, min_word_freq=1, num_workers=num_workers)
        if min(train_size, val_size, test_size) < 1:
            raise ValueError(f"split sizes must be >= 1, got train={train_size}, val={val_size}, test={test_size}")
        if not 2 <= min_objects <= max_objects:
            raise ValueError(f"need 2 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if image_size < 32 or max_objects > (image_size // 16) ** 2:
            raise ValueError(f"image_size={image_size} is too small for {max_objects} objects "
                             f"(need image_size >= 32 and max_objects <= (image_size // 16) ** 2)")
        for name, p in (("duplicate_prob", duplicate_prob), ("relation_prob", relation_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.save_hyperparameters()
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.scenes: dict[str, list[ReferringScene]] = {}

    def scene(self, split: str, index: int) -> ReferringScene:
        """Scene ``index`` of ``split``, generated from its own seed (same result on every call)."""
        hp = self.hparams
        rng = np.random.default_rng([hp.seed, _SPLIT_CODES[split], index])
        return generate_scene(rng, hp.image_size, hp.min_objects, hp.max_objects, hp.duplicate_prob,
                              hp.relation_prob)

    def _scenes(self, split: str) -> list[ReferringScene]:
        if split not in self.scenes:
            self.scenes[split] = [self.scene(split, i) for i in range(self.sizes[split])]
        return self.scenes[split]

    def _expressions(self) -> list[str]:
        return [s.expression for s in self._scenes("train")]

    def _build_split(self, name: str) -> Dataset:
        samples: list[dict[str, Any]] = []
        for scene in self._scenes(name):
            samples.append({"image": scene.image, "tokens": self.encode(scene.expression),
                            "box": torch.tensor(scene.objects[scene.target].box, dtype=torch.float32),
                            "expression": scene.expression})
        return _SampleList(samples)
