"""Structured filter pruning: layer selection, L1 masks, the TPP/GReg penalty, zeroing and removal."""

from tpp.pruning.graph import Followers, Link, find_followers
from tpp.pruning.layers import PRUNABLE, expand_preset, prunable_modules, resolve_layers
from tpp.pruning.orthp import orthp_reinit
from tpp.pruning.regularizer import PruneRegularizer
from tpp.pruning.select import kept_indices, num_pruned, select_l1
from tpp.pruning.surgery import rebuild_pruned, remove_pruned, zero_pruned

__all__ = [
    "PRUNABLE", "Followers", "Link", "PruneRegularizer", "expand_preset", "find_followers", "kept_indices",
    "num_pruned", "orthp_reinit", "prunable_modules", "rebuild_pruned", "remove_pruned", "resolve_layers",
    "select_l1", "zero_pruned",
]
