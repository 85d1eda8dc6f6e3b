"""tpp: structured filter pruning with Trainability Preserving Pruning (TPP) and its baselines.

Pure PyTorch. One run = dense model -> prune stage (selection, optional growing penalty, removal)
-> finetuning; see `tpp.run`.
"""

from tpp.config import RunConfig
from tpp.methods import METHODS, get_method, list_methods, uses_growth
from tpp.results import DenseModel, PrunedModel, RunResult

__all__ = [
    "METHODS", "DenseModel", "PrunedModel", "RunConfig", "RunResult", "get_method", "list_methods",
    "uses_growth",
]
