"""Person re-identification retrieval metrics: mAP and CMC under the standard query/gallery protocol.

The protocol is Market-1501's (Zheng et al., ICCV 2015): every query is ranked against the gallery, and
for that query the gallery images of the *same identity seen by the same camera* are removed, as are
"junk" gallery images (person id ``-1``). The remaining gallery images of the query's identity are the
relevant ones. Distractor identities (Market-1501's ``0000``) stay in the gallery as ordinary negatives.
Queries without any relevant gallery image are skipped, as in the benchmark's code.

* CMC rank-k: fraction of (valid) queries whose first relevant image is within the top ``k``.
* AP: non-interpolated average precision, the mean over relevant images of precision at their rank (as
  torchreid / fast-reid / the BNNeck paper report it; the original Market-1501 MATLAB script uses a
  trapezoidal variant that reads slightly higher). mAP averages AP over valid queries.

Camera groups (for cross-camera generalisation, and camera-based BN, arXiv:2001.08680) evaluate a sub-benchmark
whose queries *and* gallery come only from the group's cameras, e.g. ``{"seen": [0, 1, 2], "held_out": [3, 4]}``:
a group behaves like a new deployment made of those cameras only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["ReIDMetric", "ReIDScores", "pairwise_distance", "reid_retrieval_scores"]

Distance = Literal["cosine", "euclidean"]


class ReIDScores(NamedTuple):
    """Result of :func:`reid_retrieval_scores`."""

    mAP: Tensor  # noqa: N815 (the benchmark's name)
    cmc: Tensor  # cmc[k - 1] = rank-k accuracy
    num_valid_queries: int


def pairwise_distance(query: Tensor, gallery: Tensor, distance: Distance = "cosine") -> Tensor:
    """``[Q, G]`` distances: ``1 - cos`` (BNNeck features, arXiv:1903.07071) or Euclidean."""
    if distance == "cosine":
        return 1.0 - F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    if distance == "euclidean":
        return torch.cdist(query.float(), gallery.float())
    raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")


def reid_retrieval_scores(
    distances: Tensor,
    query_ids: Tensor,
    gallery_ids: Tensor,
    query_cameras: Tensor,
    gallery_cameras: Tensor,
    max_rank: int = 10,
    junk_id: int | None = -1,
    chunk_size: int = 512,
) -> ReIDScores:
    """mAP and CMC from a ``[Q, G]`` distance matrix (smaller is more similar); see the module docstring.

    Vectorised over chunks of ``chunk_size`` queries (a Market-1501-sized ``3368 x 19732`` problem never holds
    more than ``chunk_size x G`` sort indices). Gallery images at equal distance keep their gallery order.

    Raises:
        ValueError: empty query set or gallery, mismatched shapes, or no query with a relevant gallery image.
    """
    num_query, num_gallery = distances.shape if distances.ndim == 2 else (-1, -1)
    if distances.ndim != 2:
        raise ValueError(f"distances must be a [num_query, num_gallery] matrix, got shape {tuple(distances.shape)}")
    if num_query == 0:
        raise ValueError("ReID evaluation got no query images: mark some samples with is_query=True")
    if num_gallery == 0:
        raise ValueError("ReID evaluation got an empty gallery: no samples with is_query=False were given, so "
                         "there is nothing to retrieve. Pass gallery images (is_query=False) as well as queries.")
    for name, tensor, n in (("query_ids", query_ids, num_query), ("query_cameras", query_cameras, num_query),
                            ("gallery_ids", gallery_ids, num_gallery), ("gallery_cameras", gallery_cameras, num_gallery)):
        if tensor.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match distances {tuple(distances.shape)}, "
                             f"got {tuple(tensor.shape)}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")

    ap_sum = distances.new_zeros((), dtype=torch.float64)
    cmc_sum = distances.new_zeros(max_rank, dtype=torch.float64)
    num_valid = 0
    ranks = torch.arange(1, max_rank + 1, device=distances.device)
    for start in range(0, num_query, chunk_size):
        dist = distances[start:start + chunk_size]
        q_ids = query_ids[start:start + chunk_size, None]
        q_cams = query_cameras[start:start + chunk_size, None]
        order = torch.sort(dist, dim=1, stable=True).indices
        g_ids, g_cams = gallery_ids[order], gallery_cameras[order]
        match = g_ids == q_ids
        junk = match & (g_cams == q_cams)
        if junk_id is not None:
            junk |= g_ids == junk_id
        keep = ~junk
        good = match & keep
        num_relevant = good.sum(dim=1)
        valid = num_relevant > 0
        if junk_id is not None:
            valid &= q_ids[:, 0] != junk_id
        if not bool(valid.any()):
            continue
        rank_in_kept = keep.cumsum(dim=1)  # 1-based rank of each kept gallery image after junk removal
        precision = good.cumsum(dim=1).double() / rank_in_kept.clamp(min=1).double()
        ap = (precision * good).sum(dim=1) / num_relevant.clamp(min=1)
        first_hit = torch.where(good, rank_in_kept, torch.full_like(rank_in_kept, num_gallery + 1)).min(dim=1).values
        ap_sum += ap[valid].sum()
        cmc_sum += (first_hit[valid, None] <= ranks).double().sum(dim=0)
        num_valid += int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"none of the {num_query} queries has a relevant gallery image (same person id, another camera, not "
            f"junk id {junk_id}); query and gallery must share identities across cameras")
    return ReIDScores(mAP=(ap_sum / num_valid).float(), cmc=(cmc_sum / num_valid).float(), num_valid_queries=num_valid)


class ReIDMetric(Metric):
    """Query/gallery re-identification metric (mAP, CMC rank-k) with optional per-camera-group results.

    ``update(features, person_ids, camera_ids, is_query, indices=None)`` accumulates embeddings of query and
    gallery images; ``compute()`` returns ``{"mAP", "rank1", "rank5", "rank10", "num_queries"}`` plus
    ``"<group>/mAP"``... for every camera group that has queries in the data (groups without any query, such
    as held-out cameras in a validation set of seen cameras, are left out).

    Under DDP the states are gathered (``dist_reduce_fx="cat"``) before ``compute``; give ``indices`` (dataset
    indices) so images that a padding ``DistributedSampler`` evaluated twice count once.

    Args:
        ranks: CMC ranks to report.
        distance: ``"cosine"`` or ``"euclidean"`` between embeddings.
        camera_groups: name -> camera ids; each group is evaluated as its own benchmark (queries and gallery
            restricted to those cameras).
        junk_id: person id of junk images (ignored in the gallery, queries skipped); ``None`` disables.
        chunk_size: queries ranked at once (memory ``chunk_size x gallery``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    features: list[Tensor]
    person_ids: list[Tensor]
    camera_ids: list[Tensor]
    is_query: list[Tensor]
    indices: list[Tensor]

    def __init__(self, ranks: Sequence[int] = (1, 5, 10), distance: Distance = "cosine",
                 camera_groups: Mapping[str, Sequence[int]] | None = None, junk_id: int | None = -1,
                 chunk_size: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not ranks or min(ranks) < 1:
            raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
        self.ranks = tuple(int(r) for r in ranks)
        self.distance: Distance = distance
        self.camera_groups = camera_groups
        self.junk_id = junk_id
        self.chunk_size = chunk_size
        for name in ("features", "person_ids", "camera_ids", "is_query", "indices"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def camera_groups(self) -> dict[str, list[int]]:
        return self._camera_groups

    @camera_groups.setter
    def camera_groups(self, groups: Mapping[str, Sequence[int]] | None) -> None:
        groups = {str(k): [int(c) for c in v] for k, v in (groups or {}).items()}
        for name, cameras in groups.items():
            if not cameras:
                raise ValueError(f"camera group {name!r} has no cameras")
            if "/" in name:
                raise ValueError(f"camera group name {name!r} must not contain '/' (it becomes a metric key)")
        self._camera_groups = groups

    def update(self, features: Tensor, person_ids: Tensor, camera_ids: Tensor, is_query: Tensor,
               indices: Tensor | None = None) -> None:
        """Add a batch of embeddings ``[B, D]`` with their person ids, camera ids and query flags ``[B]``."""
        n = features.shape[0]
        if features.ndim != 2:
            raise ValueError(f"features must be [batch, dim], got shape {tuple(features.shape)}")
        for name, tensor in (("person_ids", person_ids), ("camera_ids", camera_ids), ("is_query", is_query)):
            if tensor.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match features, got {tuple(tensor.shape)}")
        if (indices is None) != (len(self.indices) == 0) and len(self.features) > 0:
            raise ValueError("give indices to every update() call or to none of them")
        self.features.append(features.detach().float())
        self.person_ids.append(person_ids.long())
        self.camera_ids.append(camera_ids.long())
        self.is_query.append(is_query.bool())
        if indices is not None:
            if indices.shape != (n,):
                raise ValueError(f"indices must have shape ({n},), got {tuple(indices.shape)}")
            self.indices.append(indices.long())

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        feats = _cat_state(self.features)
        if feats is None or feats.numel() == 0:
            raise ValueError("ReIDMetric.compute() called before any update(): no query or gallery images")
        pids, cams = _cat_state(self.person_ids), _cat_state(self.camera_ids)
        query, idx = _cat_state(self.is_query), _cat_state(self.indices)
        if idx is not None and idx.numel() == feats.shape[0]:
            # keep the first occurrence of every dataset index (padding samplers repeat some)
            unique, inverse = torch.unique(idx, return_inverse=True)
            first = torch.full_like(unique, idx.numel()).scatter_reduce(
                0, inverse, torch.arange(idx.numel(), device=idx.device), reduce="amin")
            feats, pids, cams, query = feats[first], pids[first], cams[first], query[first]
        return feats, pids, cams, query

    def _scores(self, feats: Tensor, pids: Tensor, cams: Tensor, query: Tensor, prefix: str) -> dict[str, Tensor]:
        q, g = query, ~query
        dist = pairwise_distance(feats[q], feats[g], self.distance)
        scores = reid_retrieval_scores(dist, pids[q], pids[g], cams[q], cams[g], max_rank=max(self.ranks),
                                       junk_id=self.junk_id, chunk_size=self.chunk_size)
        out = {f"{prefix}mAP": scores.mAP}
        out.update({f"{prefix}rank{r}": scores.cmc[r - 1] for r in self.ranks})
        out[f"{prefix}num_queries"] = torch.tensor(float(scores.num_valid_queries), device=feats.device)
        return out

    def compute(self) -> dict[str, Tensor]:
        feats, pids, cams, query = self._gathered()
        results = self._scores(feats, pids, cams, query, "")
        for name, cameras in self.camera_groups.items():
            in_group = torch.isin(cams, torch.tensor(cameras, device=cams.device))
            if not bool((in_group & query).any()):
                continue  # these cameras are not part of this evaluation set
            try:
                results.update(self._scores(feats[in_group], pids[in_group], cams[in_group], query[in_group],
                                            f"{name}/"))
            except ValueError as err:
                raise ValueError(f"camera group {name!r} (cameras {cameras}): {err}. A group is evaluated on its "
                                 "own cameras only, so it needs at least two cameras that share identities.") from err
        return results


def _cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one tensor: a list of batches locally, already one tensor after a DDP sync."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else None
