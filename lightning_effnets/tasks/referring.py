"""One-stage referring-expression comprehension in the spirit of RealGIN (Zhou et al., arXiv:1912.03478).

Given an image and an expression ("the small red circle left of the blue square") the network outputs
the box of the object it refers to, in one pass and without region proposals:

1. a timm backbone (``features_only``) gives several feature levels;
2. a text encoder (word embeddings + bidirectional GRU, attention-pooled) gives a sentence vector;
3. **adaptive feature selection** (AFS) brings every level to one resolution and mixes them with
   weights predicted from the sentence, because "the big square" and "the circle left of ..." need
   different semantic levels;
4. the sentence vector and a coordinate map are fused with the selected features;
5. the **global attentive reasoning unit** (GARAN) uses the sentence as a pivot: it *collects* the
   expression-related information from all regions (softmax attention over positions) and *diffuses*
   it back to every region (sigmoid gate), so each position knows about e.g. the anchor object of a
   relation;
6. a YOLO-style head predicts, for every cell and anchor shape, a score and a box. Training is a
   softmax over all cells x anchors (the one cell holding the target centre, best-shaped anchor, is
   the positive, as in the authors' ``use_softmax`` setting) plus box regression; prediction is the box
   of the best-scoring cell.

Differences from the paper (deliberate, for small CPU budgets): one output scale instead of three
AFS/GARAN branches + FPN, a GRU instead of an LSTM, AFS weights per level *and channel*, no auxiliary
attention-map loss. Each is a parameter or a small module to swap.

``self.model`` (:class:`GroundingNet`) is written so that Torch-Pruning's dependency graph can trace it
(no concatenation of tensors that no layer produced, no packed sequences); structural pruning must keep
the GARAN width divisible by ``garan_heads`` (``round_to=garan_heads``) and leave the text encoder and
:meth:`ReferringExpressionGrounder.output_modules` alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision.ops import box_iou, clip_boxes_to_image, generalized_box_iou_loss
from torchvision.utils import draw_bounding_boxes

from lightning_effnets.data.referring import Vocabulary
from lightning_effnets.tasks.base import EffnetsTaskMixin, OptimizerFactory, SchedulerFactory
from lightning_effnets.tasks.classification import create_backbone

__all__ = ["ReferringExpressionGrounder", "GroundingNet", "TextEncoder", "AdaptiveFeatureSelection",
           "GlobalAttentiveReasoning", "collect_diffuse", "GroundingMetrics", "decode_boxes", "encode_targets"]


# ============================================================================ layers
class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> LeakyReLU(0.1), the authors' building block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1, inplace=True))


class TextEncoder(nn.Module):
    """Word embeddings + a bidirectional GRU over the non-padding words, pooled by learned word attention.

    The two directions are separate GRUs whose outputs are *summed*; the backward one reads every
    expression reversed within its own length. That makes the result independent of padding without
    ``pack_padded_sequence`` (whose concatenations dependency-graph pruning cannot trace), and the sum
    (rather than a concatenation) keeps the channels traceable too.
    Returns ``(sentence [B, D], words [B, L, D], mask [B, L])``; token id 0 is padding.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_dim: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.pad_id)
        self.forward_gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.backward_gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.attention = nn.Linear(hidden_dim, 1)
        self.out_dim = hidden_dim

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = tokens != Vocabulary.pad_id
        lengths = mask.sum(1, keepdim=True)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        mask = mask | (positions == 0)  # an all-padding row keeps word 0 (the task rejects such batches)
        # reverse each expression within its length; padding stays in place (the permutation is its own inverse)
        reverse = torch.where(positions < lengths, lengths - 1 - positions, positions)
        embedded = self.embedding(tokens)
        forward_words, _ = self.forward_gru(embedded)
        backward_words, _ = self.backward_gru(embedded.gather(1, reverse[..., None].expand_as(embedded)))
        words = forward_words + backward_words.gather(1, reverse[..., None].expand_as(backward_words))
        scores = self.attention(words).squeeze(-1).masked_fill(~mask, float("-inf"))
        sentence = (scores.softmax(dim=1).unsqueeze(-1) * words).sum(dim=1)
        return sentence, words, mask


class AdaptiveFeatureSelection(nn.Module):
    """RealGIN's AFS: every level is brought to the resolution of the ``target`` level and the levels are
    mixed with weights predicted from the sentence ``s``, ``w_l = softmax_l(W_l s)``.

    The weights are per level *and channel* (the paper uses one weight per level): each ``W_l`` is a
    ``Linear(text_dim, out_channels)`` and the softmax over levels is written with element-wise ops, so
    every tensor keeps the channel layout of the features and dependency-graph pruning can follow it.
    Finer levels are average-pooled *before* their 3x3 conv, coarser ones upsampled (bilinear) *after* it,
    so every conv runs at the lower of the two resolutions.
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], target: int, out_channels: int,
                 text_dim: int) -> None:
        super().__init__()
        if len(in_channels) != len(reductions) or not 0 <= target < len(in_channels):
            raise ValueError(f"AFS needs one reduction per level and 0 <= target < {len(in_channels)}, "
                             f"got target={target}, reductions={list(reductions)}")
        self.reductions, self.target = list(reductions), target
        self.levels = nn.ModuleList(nn.Sequential(ConvBNAct(c, out_channels, 3), ConvBNAct(out_channels, out_channels))
                                    for c in in_channels)
        self.level_weights = nn.ModuleList(nn.Linear(text_dim, out_channels) for _ in in_channels)

    def forward(self, features: Sequence[Tensor], text: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the fused map [B, C, H, W] and the level weights [B, levels, C] (they sum to 1 over levels)."""
        if len(features) != len(self.levels):
            raise ValueError(f"AFS was built for {len(self.levels)} feature levels, got {len(features)}")
        size = features[self.target].shape[-2:]
        resampled = []
        for feature, level, reduction in zip(features, self.levels, self.reductions):
            ratio = self.reductions[self.target] // reduction
            if ratio > 1:
                resampled.append(level(F.avg_pool2d(feature, ratio)))
            elif feature.shape[-2:] != size:
                resampled.append(F.interpolate(level(feature), size=size, mode="bilinear", align_corners=False))
            else:
                resampled.append(level(feature))
        logits = [linear(text) for linear in self.level_weights]
        peak = functools.reduce(torch.maximum, logits).detach()  # softmax is shift-invariant: only for stability
        exps = [(logit - peak).exp() for logit in logits]
        total = functools.reduce(torch.add, exps)
        weights = [e / total for e in exps]
        fused = functools.reduce(torch.add, [w[:, :, None, None] * r for w, r in zip(weights, resampled)])
        return fused, torch.stack(weights, dim=1)


def collect_diffuse(query: Tensor, key_collect: Tensor, key_diffuse: Tensor, value: Tensor, num_heads: int) -> Tensor:
    """GARAN's functional core. ``query`` [B, C] (the sentence), the others [B, C, N] (N regions).

    Per head h with d = C / num_heads channels: collect ``g = sum_n softmax_n(q.kc_n / sqrt d) v_n`` (what the
    expression is about, gathered from all regions), then diffuse ``out_n = sigmoid(q.kd_n / sqrt d) * g``
    back to every region. Returns [B, C, N].
    """
    b, c, n = value.shape
    if c % num_heads:
        raise ValueError(f"channels ({c}) must be divisible by num_heads ({num_heads})")
    d = c // num_heads
    q = query.reshape(b, num_heads, d)
    kc, kd, v = (t.reshape(b, num_heads, d, n) for t in (key_collect, key_diffuse, value))
    scale = 1.0 / math.sqrt(d)
    collect = (torch.einsum("bhd,bhdn->bhn", q, kc) * scale).softmax(dim=-1)
    gathered = torch.einsum("bhn,bhdn->bhd", collect, v)
    diffuse = torch.sigmoid(torch.einsum("bhd,bhdn->bhn", q, kd) * scale)
    return torch.einsum("bhn,bhd->bhdn", diffuse, gathered).reshape(b, c, n)


class GlobalAttentiveReasoning(nn.Module):
    """RealGIN's GARAN unit: :func:`collect_diffuse` with learned projections, a residual, BN and LeakyReLU,
    followed by a 3x3 conv for local context."""

    def __init__(self, channels: int, text_dim: int, num_heads: int = 2) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.query = nn.Linear(text_dim, channels)
        self.key_collect = nn.Conv2d(channels, channels, 1)
        self.key_diffuse = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.local = ConvBNAct(channels, channels, 3)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = collect_diffuse(self.query(text), self.key_collect(x).flatten(2), self.key_diffuse(x).flatten(2),
                              self.value(x).flatten(2), self.num_heads)
        return self.local(self.act(self.norm(out.reshape(b, c, h, w) + x)))


class MultimodalFusion(nn.Module):
    """A 1x1 conv over ``[visual, tiled sentence, coordinates]`` followed by BN and LeakyReLU.

    Written as the sum of three projections, which is the same function as concatenating first, but keeps
    every channel produced by a layer (dependency-graph pruning cannot follow a concatenation with tensors
    that no layer produced, such as the coordinate map).
    """

    def __init__(self, visual_dim: int, text_dim: int, out_channels: int) -> None:
        super().__init__()
        self.visual = nn.Conv2d(visual_dim, out_channels, 1, bias=False)
        self.text = nn.Linear(text_dim, out_channels, bias=False)
        self.coords = nn.Conv2d(2, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        coords = coordinate_map(x.shape[2], x.shape[3], x).expand(x.shape[0], -1, -1, -1)
        return self.act(self.norm(self.visual(x) + self.text(text)[:, :, None, None] + self.coords(coords)))


def coordinate_map(height: int, width: int, like: Tensor) -> Tensor:
    """[1, 2, H, W] cell-centre coordinates in [-1, 1] (x, y): lets the head reason about "left"/"above"."""
    ys = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy")).unsqueeze(0)


class GroundingNet(nn.Module):
    """The whole grounding network: ``forward(images [B, C, S, S], tokens [B, L]) -> [B, A * 5, H, W]``.

    Output channel ``a * 5 + k`` of cell (i, j) is, for anchor ``a``: k=0..3 the box parameters
    (tx, ty, tw, th) and k=4 the score logit (see :func:`decode_boxes`).
    """

    def __init__(self, backbone: str, vocab_size: int, num_anchors: int, in_chans: int = 3,
                 out_indices: Sequence[int] = (1, 2, 3), fusion_level: int = 1, hidden_dim: int = 128,
                 embed_dim: int = 64, text_dim: int = 128, garan_heads: int = 2, garan_layers: int = 1,
                 backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if garan_layers < 0:
            raise ValueError(f"garan_layers must be >= 0, got {garan_layers}")
        self.visual = create_backbone(backbone, features_only=True, out_indices=tuple(out_indices),
                                      in_chans=in_chans, **(backbone_kwargs or {}))
        channels, reductions = self.visual.feature_info.channels(), self.visual.feature_info.reduction()
        if not 0 <= fusion_level < len(channels):
            raise ValueError(f"fusion_level must index out_indices={list(out_indices)}, got {fusion_level}")
        self.stride = int(reductions[fusion_level])
        self.text = TextEncoder(vocab_size, embed_dim, text_dim)
        self.afs = AdaptiveFeatureSelection(channels, reductions, fusion_level, hidden_dim, text_dim)
        self.fuse = MultimodalFusion(hidden_dim, text_dim, hidden_dim)
        self.reasoning = nn.ModuleList(GlobalAttentiveReasoning(hidden_dim, text_dim, garan_heads)
                                       for _ in range(garan_layers))
        self.head = nn.Sequential(ConvBNAct(hidden_dim, hidden_dim, 3), nn.Conv2d(hidden_dim, num_anchors * 5, 1))
        nn.init.normal_(self.head[-1].weight, std=0.01)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        sentence, _, _ = self.text(tokens)
        x, _ = self.afs(self.visual(images), sentence)
        x = self.fuse(x, sentence)
        for unit in self.reasoning:
            x = unit(x, sentence)
        return self.head(x)


# ============================================================================ boxes
def decode_boxes(raw: Tensor, anchors: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Raw head output [B, A*5, H, W] -> (scores [B, H*W*A], boxes [B, H*W*A, 4] xyxy pixels).

    Candidate ``(i * W + j) * A + a``: centre ``((j + sigmoid(tx)) * stride, (i + sigmoid(ty)) * stride)``,
    size ``anchors[a] * exp(tw, th)`` (YOLOv3 parameterisation).
    """
    b, c, h, w = raw.shape
    a = anchors.shape[0]
    if c != a * 5:
        raise ValueError(f"head output has {c} channels, expected {a} anchors x 5 = {a * 5}")
    raw = raw.reshape(b, a, 5, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 5)
    ii, jj = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing="ij")
    cells = torch.stack([jj, ii], dim=-1).reshape(h * w, 1, 2).expand(h * w, a, 2).reshape(-1, 2).to(raw.dtype)
    centre = (cells + raw[..., 0:2].sigmoid()) * stride
    size = anchors.to(raw).repeat(h * w, 1) * raw[..., 2:4].clamp(max=8.0).exp()
    return raw[..., 4], torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def encode_targets(boxes: Tensor, anchors: Tensor, stride: int, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Target boxes [B, 4] xyxy -> (index of the responsible candidate [B], raw targets [B, 4]).

    The responsible cell holds the box centre; the anchor is the one whose shape overlaps the box best
    (IoU of centred boxes). Raw targets are (offset x, offset y) in [0, 1] for the sigmoid and
    ``log(size / anchor)``.
    """
    h, w = grid
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
    anchors = anchors.to(boxes)
    inter = torch.minimum(size[:, None], anchors[None]).prod(-1)
    shape_iou = inter / (size.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)
    best = shape_iou.argmax(dim=1)
    cell = (centre / stride).floor().long()
    j, i = cell[:, 0].clamp(0, w - 1), cell[:, 1].clamp(0, h - 1)
    index = (i * w + j) * anchors.shape[0] + best
    offset = (centre / stride - torch.stack([j, i], dim=1).to(boxes)).clamp(0.0, 1.0)
    return index, torch.cat([offset, (size / anchors[best]).log()], dim=1)


class GroundingMetrics(Metric):
    """Accuracy at IoU >= ``iou_threshold`` (the standard REC metric, threshold 0.5) and mean IoU.

    ``update(preds [B, 4], target [B, 4])`` with one predicted and one target box (xyxy) per sample.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.add_state("hits", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape or preds.ndim != 2 or preds.shape[1] != 4:
            raise ValueError(f"GroundingMetrics needs preds and target of shape [B, 4], got {tuple(preds.shape)} "
                             f"and {tuple(target.shape)}")
        iou = box_iou(preds.float(), target.float()).diagonal()
        self.hits += (iou >= self.iou_threshold).sum()
        self.iou_sum += iou.sum()
        self.total += iou.numel()

    def compute(self) -> dict[str, Tensor]:
        total = self.total.clamp(min=1)
        return {"acc": (self.hits / total).float(), "miou": (self.iou_sum / total).float()}


# ============================================================================ task
class ReferringExpressionGrounder(EffnetsTaskMixin, pl.LightningModule):
    """Find the box an expression refers to (one-stage, RealGIN-style; see the module docstring).

    Args:
        backbone: timm model name, created with ``features_only=True`` and ``pretrained=False``.
        vocab_size: rows of the word embedding; must be >= the datamodule's ``vocab_size`` (checked in
            ``setup``). The vocabulary itself is taken from the datamodule and stored in checkpoints.
        image_size: side of the square input (for ``example_input_array`` and the anchors).
        in_chans: input channels.
        anchors: anchor (width, height) pairs as fractions of ``image_size``.
        out_indices: backbone levels fed to adaptive feature selection.
        fusion_level: index into ``out_indices`` of the level whose resolution is the output grid.
        hidden_dim / embed_dim / text_dim: widths of the fused features, word embeddings and sentence vector.
        garan_heads / garan_layers: heads per GARAN unit and number of stacked units (0 disables reasoning).
        box_weight / giou_weight: weights of the smooth-L1 box-parameter loss and the GIoU loss.
        iou_threshold: IoU for a correct grounding (0.5 in every REC paper).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        optimizer / scheduler / lr_schedule / warmup_steps: see :meth:`EffnetsTaskMixin.init_optimization`.
        log_samples: validation images logged per epoch with target (green) and predicted (red) boxes.
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        vocab_size: int = 64,
        image_size: int = 64,
        in_chans: int = 3,
        anchors: Sequence[Sequence[float]] = ((0.15, 0.15), (0.3, 0.3), (0.6, 0.6)),
        out_indices: Sequence[int] = (1, 2, 3),
        fusion_level: int = 1,
        hidden_dim: int = 128,
        embed_dim: int = 64,
        text_dim: int = 128,
        garan_heads: int = 2,
        garan_layers: int = 1,
        box_weight: float = 1.0,
        giou_weight: float = 1.0,
        iou_threshold: float = 0.5,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        log_samples: int = 8,
    ) -> None:
        super().__init__()
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (<pad>, <unk> and a word), got {vocab_size}")
        try:
            anchor_tensor = torch.tensor([list(a) for a in anchors], dtype=torch.float32)
        except (TypeError, ValueError):
            anchor_tensor = torch.empty(0)
        if anchor_tensor.ndim != 2 or anchor_tensor.shape[1] != 2 or (anchor_tensor <= 0).any():
            raise ValueError(f"anchors must be a non-empty list of positive (width, height) fractions, got {anchors}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = GroundingNet(backbone, vocab_size, len(anchor_tensor), in_chans, out_indices, fusion_level,
                                  hidden_dim, embed_dim, text_dim, garan_heads, garan_layers, backbone_kwargs)
        self.register_buffer("anchors", anchor_tensor * image_size, persistent=False)
        self.example_input_array = (torch.zeros(1, in_chans, image_size, image_size),
                                    torch.tensor([[2, 3, 4, 5, 6, 7]]).clamp(max=vocab_size - 1))
        self.init_optimization(optimizer, scheduler, lr_schedule, warmup_steps)
        self.metrics = nn.ModuleDict({f"{stage}_grounding": GroundingMetrics(iou_threshold)
                                     for stage in ("train", "val", "test")})
        self.vocabulary: Vocabulary | None = None

    # ---------------------------------------------------------------- network
    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        return self.model(images, tokens)

    def output_modules(self) -> list[nn.Module]:
        """The box head's last conv: its ``anchors x 5`` output channels define the task."""
        return [self.model.head[-1]]

    def predict_boxes(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(boxes [B, 4] xyxy clipped to the image, score [B]) of the best candidate per sample."""
        scores, boxes = decode_boxes(raw, self.anchors, self.model.stride)
        best = scores.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        size = self.hparams.image_size
        return clip_boxes_to_image(boxes[rows, best], (size, size)), scores.softmax(dim=1)[rows, best]

    @torch.no_grad()
    def ground(self, images: Tensor, expressions: Sequence[str]) -> Tensor:
        """Boxes [B, 4] (pixels of the ``image_size`` input) for images [B, C, S, S] and B expressions.

        Raises a ``ValueError`` naming an expression whose words are all unknown to the vocabulary.
        """
        if self.vocabulary is None:
            raise RuntimeError("ground() needs the training vocabulary: fit with a referring datamodule or load "
                               "a checkpoint saved by fit")
        if len(expressions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(expressions)} expressions")
        ids = [torch.tensor(self.vocabulary.encode(e), dtype=torch.long) for e in expressions]
        tokens = nn.utils.rnn.pad_sequence(ids, batch_first=True).to(self.device)
        was_training = self.training
        self.eval()
        try:
            return self.predict_boxes(self(images.to(self.device), tokens))[0]
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- data checks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        vocab_size = getattr(datamodule, "vocab_size", None)
        if vocab_size is not None and vocab_size > self.hparams.vocab_size:
            raise ValueError(f"{type(self).__name__}(vocab_size={self.hparams.vocab_size}) is smaller than the "
                             f"vocabulary of {type(datamodule).__name__} ({vocab_size} tokens). Set model "
                             f"vocab_size: {vocab_size} or more (YAML: model.init_args.vocab_size).")
        for attr in ("image_size", "in_chans"):
            expected = getattr(datamodule, attr, None)
            if expected is not None and expected != self.hparams[attr]:
                raise ValueError(f"{type(self).__name__}({attr}={self.hparams[attr]}) does not match the data: "
                                 f"{type(datamodule).__name__}.{attr} = {expected}. Set model {attr}: {expected} "
                                 f"(YAML: model.init_args.{attr}).")
        vocabulary = getattr(datamodule, "vocabulary", None)
        if vocabulary is not None:
            if self.vocabulary is not None and self.vocabulary.itos != vocabulary.itos:
                raise ValueError("the datamodule's vocabulary differs from the one this model was trained with "
                                 "(stored in its checkpoint); word ids would mean different words")
            self.vocabulary = vocabulary

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.vocabulary is not None:
            checkpoint["referring_vocabulary"] = self.vocabulary.words

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # rebuilds a recorded (e.g. pruned) structure
        if "referring_vocabulary" in checkpoint:
            self.vocabulary = Vocabulary(checkpoint["referring_vocabulary"])

    def _check_batch(self, batch: dict[str, Any]) -> None:
        missing = [k for k in ("images", "tokens", "boxes") if k not in batch]
        if missing:
            raise ValueError(f"a referring batch needs 'images', 'tokens' and 'boxes'; missing {missing}")
        images, tokens, boxes = batch["images"], batch["tokens"], batch["boxes"]
        if tokens.ndim != 2 or boxes.shape != (len(images), 4) or len(tokens) != len(images):
            raise ValueError(f"expected images [B, C, H, W], tokens [B, L], boxes [B, 4]; got "
                             f"{tuple(images.shape)}, {tuple(tokens.shape)}, {tuple(boxes.shape)}")
        if int(tokens.max()) >= self.hparams.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} >= vocab_size={self.hparams.vocab_size}")
        empty = (tokens == Vocabulary.pad_id).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"samples {empty[:8]} of the batch have no words (all tokens are padding)")

    # ---------------------------------------------------------------- steps
    def _loss_terms(self, raw: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss and its unweighted terms: ``cls`` (softmax over all cells x anchors, the target's
        cell and best-shaped anchor is the positive), ``box`` (smooth L1 of its box parameters) and ``giou``
        (GIoU loss of its decoded box); loss = cls + box_weight * box + giou_weight * giou."""
        boxes = batch["boxes"].float()
        scores, candidates = decode_boxes(raw, self.anchors, self.model.stride)
        index, raw_target = encode_targets(boxes, self.anchors, self.model.stride, tuple(raw.shape[-2:]))
        rows = torch.arange(len(index), device=index.device)
        b, _, h, w = raw.shape
        positive = raw.reshape(b, -1, 5, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 5)[rows, index]
        cls_loss = F.cross_entropy(scores, index)
        box_loss = F.smooth_l1_loss(torch.cat([positive[:, :2].sigmoid(), positive[:, 2:4]], dim=1), raw_target)
        giou_loss = generalized_box_iou_loss(candidates[rows, index], boxes, reduction="mean")
        loss = cls_loss + self.hparams.box_weight * box_loss + self.hparams.giou_weight * giou_loss
        return loss, {"cls": cls_loss, "box": box_loss, "giou": giou_loss}

    def task_loss(self, output: Tensor, batch: dict[str, Any]) -> Tensor:
        """The grounding loss of the raw head map ``output`` for the batch's target boxes (see
        :meth:`_loss_terms`)."""
        return self._loss_terms(output, batch)[0]

    def _shared_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        self._check_batch(batch)
        raw = self(batch["images"], batch["tokens"])
        loss, terms = self._loss_terms(raw, batch)
        preds, _ = self.predict_boxes(raw)
        self.metrics[f"{stage}_grounding"].update(preds.detach(), batch["boxes"].float())
        on_step = stage == "train"
        self.log_dict({f"{stage}/loss": loss, **{f"{stage}/loss_{name}": value for name, value in terms.items()}},
                      on_step=on_step, on_epoch=True, batch_size=raw.shape[0])
        return loss, preds, raw

    def _log_metrics(self, stage: str) -> None:
        metric = self.metrics[f"{stage}_grounding"]
        if metric.update_count == 0:
            return
        values = metric.compute()
        self.log(f"{stage}/acc", values["acc"], prog_bar=True)
        self.log(f"{stage}/miou", values["miou"])
        metric.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _, _ = self._shared_step(batch, "train")
        return loss + self.pop_auxiliary_loss(loss)

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, preds, _ = self._shared_step(batch, "val")
        if batch_idx == 0 and self.hparams.log_samples > 0:
            self._log_samples(batch, preds)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        boxes, scores = self.predict_boxes(self(batch["images"], batch["tokens"]))
        return {"boxes": boxes, "scores": scores}

    def _log_samples(self, batch: dict[str, Any], preds: Tensor) -> None:
        n = self.hparams.log_samples
        images, boxes = batch["images"][:n], batch["boxes"][:n]
        ious = box_iou(preds[:n].float(), boxes.float()).diagonal()
        drawn = []
        for image, target, pred in zip(images, boxes, preds[:n]):
            rgb = (image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)).clamp(0, 1)
            pixels = (rgb * 255).round().to(torch.uint8).cpu()
            pixels = draw_bounding_boxes(pixels, torch.stack([target, pred]).cpu(), colors=["#00ff00", "#ff0000"],
                                         width=1)
            drawn.append(pixels.float() / 255)
        expressions = batch.get("expressions") or [""] * len(drawn)
        captions = [f"{e} (IoU {float(iou):.2f})" for e, iou in zip(expressions, ious)]
        self.log_images("val/samples", drawn, captions)
