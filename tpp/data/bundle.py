"""The interface the training loop relies on, whatever holds the samples (tensors or image files).

tpp/train.py and tpp/run.py only call what is declared here, so a user-registered set works as soon
as it returns one of these (usually a `TensorData`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from tpp.data.subsets import balanced_subset

Batch = tuple[torch.Tensor, torch.Tensor]


class DataBundle(ABC):
    """A train/test pair of one classification data set.

    Attributes every bundle sets: `name`, `num_classes`, `classes` (names), `input_shape` (per sample).
    """

    name: str
    num_classes: int
    classes: list[str]
    input_shape: tuple[int, ...]

    # ---------------------------------------------------------------------------------- to implement
    @property
    @abstractmethod
    def num_train(self) -> int: ...

    @property
    @abstractmethod
    def num_test(self) -> int: ...

    @property
    @abstractmethod
    def augment(self) -> bool:
        """Whether `train_batches` augments (the test side never does)."""

    @abstractmethod
    def train_batches(self, batch_size: int, generator: torch.Generator | None, device,
                      drop_last: bool = False) -> Iterator[Batch]:
        """One epoch of (x, y) on `device`, shuffled (and augmented) from `generator` alone."""

    @abstractmethod
    def test_batches(self, batch_size: int, device) -> Iterator[Batch]:
        """The test set in its fixed order, normalised, never augmented."""

    @abstractmethod
    def train_tensors(self) -> Batch:
        """The whole training set, normalised and unaugmented, on the CPU, in its stored order."""

    @abstractmethod
    def train_labels(self) -> torch.Tensor: ...

    @abstractmethod
    def test_labels(self) -> torch.Tensor: ...

    @abstractmethod
    def _inputs_at(self, indices: torch.Tensor, device) -> torch.Tensor:
        """Normalised, unaugmented test inputs at `indices`."""

    @abstractmethod
    def _take(self, train_idx: torch.Tensor | None, test_idx: torch.Tensor | None) -> DataBundle:
        """A bundle of the same kind restricted to these samples (None: keep the split whole)."""

    @abstractmethod
    def _hold_out(self, keep_idx: torch.Tensor, val_idx: torch.Tensor) -> DataBundle:
        """A bundle training on training samples `keep_idx` whose test split is training samples
        `val_idx` (with the evaluation transform)."""

    # --------------------------------------------------------------------------------------- shared
    def eval_indices(self, n: int) -> torch.Tensor:
        """`n` test indices spread evenly over the set: test sets are often sorted by class, and the
        Jacobian metric should see every class rather than the first one."""
        total = self.num_test
        n = max(0, min(int(n), total))
        return torch.arange(n) * total // max(n, 1)

    def eval_inputs(self, n: int, device) -> torch.Tensor:
        """A fixed, unaugmented batch of (at most) `n` test inputs, for the Jacobian metric."""
        return self._inputs_at(self.eval_indices(n), device)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> DataBundle:
        """A class-balanced, seeded subset of the training and/or test split (None keeps it whole)."""
        tr = None if n_train is None else balanced_subset(self.train_labels(), n_train, seed)
        te = None if n_test is None else balanced_subset(self.test_labels(), n_test, seed)
        return self._take(tr, te)

    def split_validation(self, fraction: float, seed: int = 0) -> tuple[DataBundle, DataBundle]:
        """(train, val): `fraction` of the training samples held out, class-balanced and drawn with
        `seed`. `train` trains on the rest and keeps the real test split; `val.test_batches` iterates
        the held-out samples, so choosing an epoch on it never looks at the test set."""
        labels = self.train_labels()
        n_val = round(fraction * len(labels))
        if not 0 < n_val < len(labels):
            raise ValueError(f"val_fraction: {fraction} of {len(labels)} training samples leaves no "
                             "validation or no training sample; accepted: a fraction in (0, 1)")
        val = balanced_subset(labels, n_val, seed)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[val] = False
        keep_idx = torch.nonzero(keep).flatten()
        return self._take(keep_idx, None), self._hold_out(keep_idx, val)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, train={self.num_train}, test={self.num_test}, "
                f"classes={self.num_classes}, input_shape={self.input_shape}, augment={self.augment})")


def canonical_device(device) -> torch.device:
    """'cuda' and 'cuda:0' are the same device; key per-device caches by the explicit form."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
