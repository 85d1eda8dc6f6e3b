"""Structured filter pruning: layer selection, channel groups, criteria, the TPP/GReg penalty and
other penalties, zeroing and removal."""

from tpp.pruning.criteria import CRITERIA, ScoreInputs, get_criterion, register_criterion, score_units
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
    "COUPLINGS", "CRITERIA", "PRUNABLE", "SCOPES", "Followers", "Link", "PruneRegularizer", "ScoreInputs",
    "Slot", "channel_groups", "declared_groups", "expand_preset", "find_followers", "get_criterion",
    "kept_indices", "masks_from_scores", "num_pruned", "orthp_reinit", "prunable_modules", "pruned_slots",
    "rebuild_pruned", "register_criterion", "removal_error", "remove_pruned", "resolve_layers",
    "score_units", "select_l1", "verify_removal", "zero_pruned",
]
