"""Structured filter pruning: layer selection, channel groups, the TPP/GReg penalty and
other penalties, zeroing and removal."""

from tpp.pruning.graph import COUPLINGS, Followers, Link, channel_groups, declared_groups, find_followers
from tpp.pruning.layers import PRUNABLE, expand_preset, prunable_modules, resolve_layers
from tpp.pruning.orthp import orthp_reinit
from tpp.pruning.regularizer import PruneRegularizer
from tpp.pruning.select import SCOPES, kept_indices, masks_from_scores, num_pruned, select_l1
from tpp.pruning.surgery import (
    Slot,
    pruned_slots,
    rebuild_pruned,
    removal_error,
    remove_pruned,
    verify_removal,
    zero_pruned,
)

__all__ = [
    "COUPLINGS", "PRUNABLE", "SCOPES", "Followers", "Link", "PruneRegularizer",
    "Slot", "channel_groups", "declared_groups", "expand_preset", "find_followers",
    "kept_indices", "masks_from_scores", "num_pruned", "orthp_reinit", "prunable_modules", "pruned_slots",
    "rebuild_pruned", "removal_error", "remove_pruned", "resolve_layers",
    "select_l1", "verify_removal", "zero_pruned",
]
