"""tpp: structured filter pruning with Trainability Preserving Pruning (TPP) and its baselines.

Pure PyTorch. One run = dense model -> prune stage (selection, optional growing penalty, removal)
-> finetuning; see `tpp.run`.
"""

import os

# Before torch loads (OpenMP reads it once): idle OpenMP threads sleep instead of spinning. With the
# default spinning, anything else busy on a small machine (a second trial, the study driver, a
# DataLoader worker) makes a multi-threaded torch step many times slower (7-300x measured on 2 cores,
# BENCHMARKS.md). Set OMP_WAIT_POLICY yourself, or import torch first, to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tpp.config import RunConfig  # noqa: E402 - after the environment above
from tpp.methods import METHODS, get_method, list_methods
from tpp.results import DenseModel, PrunedModel, RunResult

__all__ = [
    "METHODS", "DenseModel", "PrunedModel", "RunConfig", "RunResult", "get_method", "list_methods",
]
