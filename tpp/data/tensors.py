"""Data sets that fit in memory: tensors moved to the device once, batched and augmented there.

Small sets (digits, CIFAR, MNIST) are so cheap per sample that a DataLoader with per-sample Python
transforms would dominate the step time; slicing device tensors and one batched crop/flip does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tpp.data.augment import PAD, crop_flip
from tpp.data.bundle import Batch, DataBundle, canonical_device

MIN_AUGMENT_SIZE = 16  # a 4 px shift is a large part of anything smaller


class _OnDevice(NamedTuple):
    x_train: torch.Tensor  # zero-padded by PAD when augmenting
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None


class TensorData(DataBundle):
    """Train/test tensors plus the normalisation applied on the fly: `x * scale + shift`.

    `x` is stored raw (uint8 images stay uint8: 4x less memory and transfer). `mean`/`std` are per
    channel (dim 1) in the units of `x / 255` for uint8 and of `x` otherwise; None leaves float data
    as it is and only rescales uint8 to [0, 1]. `augment` = random crop with 4 px zero padding and a
    horizontal flip, for images [N, C, H, W] of at least 16x16. `shift` = S: instead, a seeded random
    translation by up to S pixels each way (zero padding, no flip: digits are not mirror-symmetric),
    which makes a small training set that a model would fit exactly non-separable.
    """

    def __init__(self, name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, num_classes: int, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: bool = False,
                 classes: Sequence[str] | None = None, shift: int = 0):
        x_train, x_test = _stored(x_train), _stored(x_test)
        y_train, y_test = torch.as_tensor(y_train).long().flatten(), torch.as_tensor(y_test).long().flatten()
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ValueError(f"{name}: inputs and labels differ in length (train {len(x_train)} vs "
                             f"{len(y_train)}, test {len(x_test)} vs {len(y_test)})")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(f"{name}: train samples are {tuple(x_train.shape[1:])} but test samples are "
                             f"{tuple(x_test.shape[1:])}")
        for y in (y_train, y_test):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got {int(y.min())}.."
                                 f"{int(y.max())}")
        if augment and (x_train.dim() != 4 or min(x_train.shape[-2:]) < MIN_AUGMENT_SIZE):
            raise ValueError(f"{name}: augment (random crop, {PAD} px padding, + flip) needs images "
                             f"[N, C, H, W] of at least {MIN_AUGMENT_SIZE}x{MIN_AUGMENT_SIZE} px, got "
                             f"samples of shape {tuple(x_train.shape[1:])}")
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"{name}: shift must be an integer >= 0 (pixels), got {shift!r}")
        if shift and (augment or x_train.dim() != 4):
            raise ValueError(f"{name}: shift (random translations) needs images [N, C, H, W] and no "
                             f"augment, got samples of shape {tuple(x_train.shape[1:])}, augment={augment}")
        self._shift_px = int(shift)
        self.name = name
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        self.input_shape = tuple(int(s) for s in x_train.shape[1:])
        self._x_train, self._y_train, self._x_test, self._y_test = x_train, y_train, x_test, y_test
        self._mean = None if mean is None else tuple(float(m) for m in mean)
        self._std = None if std is None else tuple(float(s) for s in std)
        self._scale, self._shift = _affine(self._mean, self._std, x_train)
        self._augment = bool(augment)
        self._cache: dict[torch.device, _OnDevice] = {}

    # ------------------------------------------------------------------------------------- properties
    @property
    def num_train(self) -> int:
        return len(self._y_train)

    @property
    def num_test(self) -> int:
        return len(self._y_test)

    @property
    def augment(self) -> bool:
        return self._augment

    # --------------------------------------------------------------------------------------- device
    def on(self, device) -> _OnDevice:
        """The device copies (made once per device, then reused every epoch)."""
        device = canonical_device(device)
        entry = self._cache.get(device)
        if entry is None:
            x_train = self._x_train.to(device)
            pad = PAD if self._augment else self._shift_px
            if pad:
                x_train = F.pad(x_train, (pad, pad, pad, pad))  # zeros: black before normalisation
            entry = _OnDevice(
                x_train, self._y_train.to(device), self._x_test.to(device), self._y_test.to(device),
                None if self._scale is None else self._scale.to(device),
                None if self._shift is None else self._shift.to(device))
            self._cache[device] = entry
        return entry

    def __getstate__(self) -> dict:
        """Pickles (e.g. to Ray workers) carry the CPU tensors only; device copies are rebuilt there."""
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    @staticmethod
    def _normalise(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.float32)
        return x if scale is None else x * scale + shift

    # -------------------------------------------------------------------------------------- batches
    def train_batches(self, batch_size: int, generator: torch.Generator | None, device,
                      drop_last: bool = False) -> Iterator[Batch]:
        """One shuffled (and augmented) epoch on `device`.

        The draws, all from `generator` on the CPU and in this order: `perm = randperm(N)`; when
        augmenting, offsets `dy, dx = randint(0, 9, (2, N))` and flips `rand(N) < 0.5` (with `shift` S:
        offsets `randint(0, 2S + 1, (2, N))` and no flips), where draw k applies to sample `perm[k]`.
        They go to the device once per epoch, so an epoch is the same on every device.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bs, n = int(batch_size), self.num_train
        d = self.on(device)
        perm = torch.randperm(n, generator=generator)
        moves = self._augment or self._shift_px
        if moves:
            reach = PAD if self._augment else self._shift_px
            dy, dx = torch.randint(0, 2 * reach + 1, (2, n), generator=generator)
            flip = (torch.rand(n, generator=generator) < 0.5 if self._augment
                    else torch.zeros(n, dtype=torch.bool))
            draws = torch.stack([perm, dy, dx, flip.long()]).to(d.x_train.device)
        else:
            draws = perm.to(d.x_train.device).view(1, -1)
        hw = tuple(self.input_shape[-2:])
        stop = n - n % bs if drop_last else n
        for start in range(0, stop, bs):
            chunk = draws[:, start:start + bs]
            idx = chunk[0]
            if moves:
                x = crop_flip(d.x_train, idx, chunk[1], chunk[2], chunk[3].bool(), hw)
            else:
                x = d.x_train[idx]
            yield self._normalise(x, d.scale, d.shift), d.y_train[idx]

    def test_batches(self, batch_size: int, device) -> Iterator[Batch]:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        d = self.on(device)
        for start in range(0, self.num_test, int(batch_size)):
            x = d.x_test[start:start + int(batch_size)]
            yield self._normalise(x, d.scale, d.shift), d.y_test[start:start + int(batch_size)]

    def _inputs_at(self, indices: torch.Tensor, device) -> torch.Tensor:
        d = self.on(device)
        return self._normalise(d.x_test[indices.to(d.x_test.device)], d.scale, d.shift)

    def train_tensors(self) -> Batch:
        return self._normalise(self._x_train, self._scale, self._shift), self._y_train

    def train_labels(self) -> torch.Tensor:
        return self._y_train

    def test_labels(self) -> torch.Tensor:
        return self._y_test

    def _take(self, train_idx: torch.Tensor | None, test_idx: torch.Tensor | None) -> TensorData:
        def pick(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            return x if idx is None else x[idx]

        return TensorData(self.name, pick(self._x_train, train_idx), pick(self._y_train, train_idx),
                          pick(self._x_test, test_idx), pick(self._y_test, test_idx), self.num_classes,
                          mean=self._mean, std=self._std, augment=self._augment, classes=self.classes,
                          shift=self._shift_px)

    def _hold_out(self, keep_idx: torch.Tensor, val_idx: torch.Tensor) -> TensorData:
        return TensorData(self.name, self._x_train[keep_idx], self._y_train[keep_idx],
                          self._x_train[val_idx], self._y_train[val_idx], self.num_classes,
                          mean=self._mean, std=self._std, augment=self._augment, classes=self.classes,
                          shift=self._shift_px)


def _stored(x) -> torch.Tensor:
    """uint8 stays uint8; any other dtype is kept as float32."""
    x = torch.as_tensor(x)
    if x.dim() < 2:
        raise ValueError(f"inputs must be [N, ...] with at least one feature dimension, got {tuple(x.shape)}")
    return x if x.dtype == torch.uint8 else x.to(torch.float32)


def _affine(mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
            x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(scale, shift) with `x * scale + shift == (x / unit - mean) / std`, broadcast over channels."""
    unit = 255.0 if x.dtype == torch.uint8 else 1.0
    if mean is None and std is None:
        if unit == 1.0:
            return None, None
        mean, std = (0.0,), (1.0,)
    m = torch.tensor(mean if mean is not None else (0.0,), dtype=torch.float64)
    s = torch.tensor(std if std is not None else (1.0,), dtype=torch.float64)
    if (s <= 0).any():
        raise ValueError(f"std must be > 0, got {tuple(s.tolist())}")
    shape = (-1,) + (1,) * (x.dim() - 2)
    return (1 / (unit * s)).float().view(shape), (-m / s).float().view(shape)
