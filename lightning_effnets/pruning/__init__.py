"""Structural channel pruning: importance criteria, dependency-aware surgery, schedules."""

from lightning_effnets.pruning.graph import (GROUP_NORM_MODES, ChannelItem, PrunableGroup, build_graph,
                                             prunable_groups)
from lightning_effnets.pruning.importance import (BNScaleCriterion, Criterion, MagnitudeCriterion, TaylorCriterion,
                                                  available_criteria, build_criterion, register_criterion)
from lightning_effnets.pruning.layers import (GroupNormPruner, channel_rows, layer_kind, register_layer,
                                              registered_layers)
from lightning_effnets.pruning.optim import remap_optimizer
from lightning_effnets.pruning.pruner import StructuredPruner, prune
from lightning_effnets.pruning.record import (PruningRecord, attach_record, get_record, load_pruned, replay,
                                              restore_on_load, restore_structure)
from lightning_effnets.pruning.schedule import PruningSchedule
from lightning_effnets.pruning.sketch import FilterSketchCriterion, frequent_directions
from lightning_effnets.pruning.surgery import ParamChange, Surgery, apply_decisions

__all__: list[str] = [
    "BNScaleCriterion", "ChannelItem", "Criterion", "FilterSketchCriterion", "GROUP_NORM_MODES", "GroupNormPruner",
    "MagnitudeCriterion", "ParamChange",
    "PrunableGroup", "PruningRecord", "PruningSchedule", "StructuredPruner", "Surgery", "TaylorCriterion",
    "apply_decisions", "attach_record", "available_criteria", "build_criterion", "build_graph", "channel_rows",
    "frequent_directions", "get_record", "layer_kind", "load_pruned", "prunable_groups", "prune",
    "register_criterion", "register_layer", "registered_layers", "remap_optimizer", "replay", "restore_on_load",
    "restore_structure",
]
