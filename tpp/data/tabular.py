"""Small sets that need no files: scikit-learn's bundled 8x8 digits and a seeded synthetic set.

They make the demo and the tests run anywhere in seconds, without a download or a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from tpp.data.registry import register_data
from tpp.data.tensors import TensorData

DIGITS_TEST = 360  # 20% of the 1797 images; 1437 remain for training


@register_data("digits")
def digits(split_seed: int = 0, shift: int = 0) -> TensorData:
    """scikit-learn's 8x8 digits: a fixed stratified train/test split (1437/360) drawn with
    `split_seed`, pixels scaled to [0, 1] then standardised by the training set's mean and std.
    `shift`: training images randomly translated by up to that many pixels (seeded per epoch; the
    test images never), so the training set is no longer separable by a linear model."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST, stratify=labels,
                              random_state=int(split_seed))
    tr, te = np.sort(tr), np.sort(te)  # keep the bundled order within each split
    x = torch.from_numpy(images).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.from_numpy(labels)
    train = images[tr].astype(np.float64)
    return TensorData("digits", x[tr], y[tr], x[te], y[te], 10, mean=[train.mean()], std=[train.std()],
                      classes=[str(i) for i in range(10)], shift=shift)


@register_data("synthetic")
def synthetic(n_train: int = 512, n_test: int = 256, num_classes: int = 4,
              input_shape: Sequence[int] = (32,), seed: int = 0) -> TensorData:
    """Gaussian classes around seeded random centres: deterministic, learnable but not trivially so.

    Labels cycle through the classes (balanced); the centres are about 4 noise standard deviations
    apart whatever the input size, so a small MLP learns the set in a few epochs to roughly 90%.
    """
    shape = tuple(int(s) for s in input_shape)
    if min(n_train, n_test, num_classes) < 1 or not shape or min(shape) < 1:
        raise ValueError(f"synthetic: n_train, n_test, num_classes and input_shape entries must be >= 1, got "
                         f"{n_train}, {n_test}, {num_classes}, {shape}")
    dim = math.prod(shape)
    gen = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(num_classes, dim, generator=gen) * (4.0 / math.sqrt(2 * dim))

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        x = centres[y] + torch.randn(n, dim, generator=gen)
        return x.view(n, *shape), y

    x_train, y_train = draw(int(n_train))
    x_test, y_test = draw(int(n_test))
    return TensorData("synthetic", x_train, y_train, x_test, y_test, num_classes)
