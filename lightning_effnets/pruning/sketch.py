"""FilterSketch (Lin et al., arXiv:2001.08514): pruned filters that keep the second-order information of the originals.

Pruning ``n`` filters down to ``l`` is posed as matrix sketching: find ``B`` (``l`` rows) whose covariance
``B^T B`` approximates the covariance ``A^T A`` of the original filter matrix ``A`` (one row per filter), and use
the rows of ``B`` as the pruned layer's filters, then fine-tune. The sketch is computed with Frequent Directions
(Liberty, KDD 2013; Ghashami et al., SIAM J. Comput. 2016), which needs no data and a handful of SVDs per layer.

:func:`frequent_directions` is the functional core. :class:`FilterSketchCriterion` plugs it into the criterion
interface: ``score`` ranks channels by filter norm (that decides which batch-norm entries and which input columns
of the consumer layers survive) and remembers the original filters of each group's root layer; ``on_pruned``
overwrites the root's surviving filters with the sketch. Only groups whose output channels belong to one
conv/linear layer are sketched (the paper's setting: the inner convs of residual blocks). In a group of several
layers tied by a residual addition or concatenation, every layer would have to be rewritten with the *same*
change of basis for the branches to stay aligned, which a per-layer sketch does not give; such groups are pruned
by the same filter-norm ranking without rewriting.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_effnets.pruning.graph import PrunableGroup
from lightning_effnets.pruning.importance import Criterion, register_criterion
from lightning_effnets.pruning.layers import channel_rows, layer_kind
from lightning_effnets.pruning.surgery import ParamChange

__all__ = ["frequent_directions", "FilterSketchCriterion"]


def _shrink(buffer: Tensor, rows: int) -> Tensor:
    """SVD ``buffer = U S V^T``, subtract the ``(rows+1)``-th largest squared singular value from every squared
    singular value (clamped at 0) and return ``sqrt(S^2 - delta) V^T``: at most ``rows`` non-zero rows remain."""
    _, s, vh = torch.linalg.svd(buffer, full_matrices=False)
    delta = s[rows] ** 2 if s.numel() > rows else s.new_zeros(())
    shrunk = (s**2 - delta).clamp(min=0).sqrt()
    return shrunk[:, None] * vh


@torch.no_grad()
def frequent_directions(matrix: Tensor, rows: int) -> Tensor:
    """Frequent Directions sketch ``B`` (``rows`` x ``d``) of ``matrix`` ``A`` (``n`` x ``d``), buffered variant.

    Rows of ``A`` stream into a buffer of ``2 * rows`` rows; whenever it is full (and once at the end) it is
    rotated onto its singular directions and shrunk by its ``(rows+1)``-th squared singular value. Guarantees
    (Ghashami et al. 2016): ``A^T A - B^T B`` is positive semi-definite and its spectral norm is at most
    ``||A||_F^2 / (rows + 1)``; the sketch is exact when ``rank(A) <= rows``. Computed in float64. When ``A`` has
    more than ``rows`` rows, the rows of ``B`` are its principal directions scaled, by decreasing norm.
    """
    if matrix.ndim != 2:
        raise ValueError(f"frequent_directions sketches a matrix, got a tensor of shape {tuple(matrix.shape)}")
    n, d = matrix.shape
    if not 0 < rows:
        raise ValueError(f"the sketch needs at least one row, got rows={rows}")
    a = matrix.detach().to(torch.float64)
    sketch = a.new_zeros(0, d)
    for start in range(0, n, rows):
        sketch = torch.cat([sketch, a[start:start + rows]])
        if sketch.shape[0] >= 2 * rows:
            sketch = _shrink(sketch, rows)[:rows]
    result = _shrink(sketch, rows)[:rows] if sketch.shape[0] > rows else sketch
    if result.shape[0] < rows:  # fewer input rows than sketch rows: nothing to compress
        result = torch.cat([result, result.new_zeros(rows - result.shape[0], d)])
    return result.to(matrix.dtype)


class FilterSketchCriterion(Criterion):
    """FilterSketch (arXiv:2001.08514): keep ``l`` filters whose covariance sketches the original ``n`` filters'.

    Ranking (which channel indices survive in batch norms, residual partners and consumer layers) is the L2 norm
    of the root layer's filters; after the cut, the root's ``l`` surviving filters are replaced by the Frequent
    Directions sketch of its original ``n`` filters, restricted to the input channels that survived the same
    step (see module docstring for which groups are sketched). The optimizer state of a rewritten layer is kept
    as sliced; fine-tuning follows, as in the paper.
    """

    needs_changes = True

    def __init__(self) -> None:
        self._roots: set[str] = set()  # sketchable root layers scored in the current step

    @staticmethod
    def sketchable(group: PrunableGroup) -> bool:
        """Whether exactly one ungrouped conv/linear layer (the root) loses output channels in ``group``."""
        producers = [i for i in group.items if i.is_out and layer_kind(i.module) in ("conv", "linear")]
        if len(producers) != 1 or producers[0].name != group.root or group.channel_groups != 1:
            return False
        module = producers[0].module
        return int(getattr(module, "groups", 1)) == 1 and not getattr(module, "transposed", False)

    @torch.no_grad()
    def score(self, group: PrunableGroup) -> Tensor | None:
        root = next((i for i in group.items if i.is_out and i.name == group.root
                     and layer_kind(i.module) in ("conv", "linear")), None)
        if root is None:
            return None
        rows = channel_rows(root.module, True, root.module.weight)
        if rows is None or rows.shape[0] != group.channels:
            return None
        if self.sketchable(group):
            self._roots.add(group.root)
        return torch.linalg.vector_norm(rows.float(), dim=1).cpu()

    @torch.no_grad()
    def on_pruned(self, model: nn.Module, changes: Mapping[nn.Parameter, ParamChange] | None = None) -> None:
        if changes is None:
            raise ValueError("FilterSketchCriterion.on_pruned needs the surgery's parameter changes "
                             "(StructuredPruner.apply passes them because needs_changes is True)")
        by_name = {c.name: c for c in changes.values()}
        for root in sorted(self._roots):
            change = by_name.get(f"{root}.weight")
            if change is None:
                continue
            old, new = change.old, change.new
            n, kept = old.shape[0], new.shape[0]
            if kept >= n:
                continue  # the group was not narrowed in this step
            per_row = old[0].numel()
            inputs = old.shape[1]
            spatial = per_row // inputs
            columns = torch.unique((change.index.cpu() % per_row) // spatial)  # input channels that survived
            original = old.detach().reshape(n, inputs, spatial)[:, columns.to(old.device)].reshape(n, -1)
            new.copy_(frequent_directions(original, kept).view_as(new).to(new.dtype))
        self._roots.clear()


register_criterion("filter_sketch", FilterSketchCriterion)
register_criterion("filtersketch", FilterSketchCriterion)
