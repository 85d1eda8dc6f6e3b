"""Data sets: batched augmentation against a per-sample reference, determinism, the real on-disk
formats (written small into tmp_path), subsets, and the errors a user sees for missing data."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tpp.data import (
    DataBundle,
    DataError,
    FolderLoaderData,
    TensorData,
    balanced_subset,
    crop_flip,
    list_data,
    load_data,
    loader_kwargs,
    register_data,
)
from tpp.data.vision import CIFAR10_MEAN, CIFAR10_STD

CPU = torch.device("cpu")


def ref_crop_flip(x: torch.Tensor, idx, dy, dx, flip, pad: int) -> torch.Tensor:
    """Per-sample reference: zero-pad, slice the crop, mirror if flipped (what torchvision does)."""
    h, w = x.shape[-2:]
    out = []
    for i, a, b, f in zip(idx.tolist(), dy.tolist(), dx.tolist(), flip.tolist(), strict=True):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, a:a + h, b:b + w]
        out.append(torch.flip(img, dims=[-1]) if f else img)
    return torch.stack(out)


def random_images(n: int, c: int = 3, hw: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)


def small_image_data(n_train=50, n_test=20, augment=True) -> TensorData:
    x_tr, x_te = random_images(n_train, seed=1), random_images(n_test, seed=2)
    y_tr, y_te = torch.arange(n_train) % 5, torch.arange(n_test) % 5
    return TensorData("t", x_tr, y_tr, x_te, y_te, 5, mean=CIFAR10_MEAN, std=CIFAR10_STD, augment=augment)


def normalise(x_uint8: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (x_uint8.float() / 255 - m) / s


# ----------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_batched_crop_flip_equals_per_sample_reference(dtype):
    g = torch.Generator().manual_seed(3)
    x = random_images(12, c=3, hw=16).to(dtype)
    idx = torch.randint(0, 12, (20,), generator=g)
    dy, dx = torch.randint(0, 9, (2, 20), generator=g)
    flip = torch.rand(20, generator=g) < 0.5
    out = crop_flip(F.pad(x, (4, 4, 4, 4)), idx, dy, dx, flip, (16, 16))
    assert torch.equal(out, ref_crop_flip(x, idx, dy, dx, flip, 4))
    # The extremes: no shift, maximal shift, non-square images.
    x2 = random_images(3, c=2, hw=20)[..., :17]
    ones, i3 = torch.ones(3, dtype=torch.long), torch.arange(3)
    for a in (0, 8):
        got = crop_flip(F.pad(x2, (4, 4, 4, 4)), i3, ones * a, ones * (8 - a), ones.bool(), (20, 17))
        assert torch.equal(got, ref_crop_flip(x2, i3, ones * a, ones * (8 - a), ones.bool(), 4))


def test_train_batches_augment_like_torchvision_with_the_documented_draws():
    data = small_image_data()
    gen = torch.Generator().manual_seed(11)
    batches = list(data.train_batches(16, gen, CPU))
    # Replay the documented draws: perm, offsets (2, N), flips.
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(50, generator=g)
    dy, dx = torch.randint(0, 9, (2, 50), generator=g)
    flip = torch.rand(50, generator=g) < 0.5
    ref = normalise(ref_crop_flip(data._x_train, perm, dy, dx, flip, 4))
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), ref, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), data._y_train[perm])
    assert batches[0][0].dtype == torch.float32


def test_padding_is_black_before_normalisation():
    data = small_image_data(n_train=64)
    x = torch.cat([b[0] for b in data.train_batches(64, torch.Generator().manual_seed(0), CPU)])
    black = normalise(torch.zeros(3, 1, 1, dtype=torch.uint8)).view(3)
    # Some crop has a vertical offset of 0, so its first 4 rows come from the padding.
    top = x[:, :, :4, :]
    is_pad = torch.isclose(top, black.view(1, 3, 1, 1), atol=1e-5).flatten(1).all(1)
    assert is_pad.any()


def test_shuffling_is_a_permutation_and_deterministic_per_generator():
    n = 37
    x = torch.randn(n, 4)
    data = TensorData("s", x, torch.arange(n), x[:5], torch.arange(5), n)

    def epoch(seed, bs=8, **kw):
        gen = torch.Generator().manual_seed(seed)
        return [(a.clone(), b.clone()) for a, b in data.train_batches(bs, gen, CPU, **kw)]

    e1, e2, e3 = epoch(5), epoch(5), epoch(6)
    labels = torch.cat([b for _, b in e1])
    assert sorted(labels.tolist()) == list(range(n))  # every sample exactly once
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, e2, strict=True))
    assert not torch.equal(labels, torch.cat([b for _, b in e3]))
    torch.testing.assert_close(torch.cat([a for a, _ in e1]), x[labels])  # inputs follow their labels
    assert [len(b) for _, b in epoch(5, drop_last=True)] == [8] * 4


def test_test_batches_and_eval_inputs_are_fixed_and_unaugmented():
    data = small_image_data()
    xs = torch.cat([x for x, _ in data.test_batches(7, CPU)])
    torch.testing.assert_close(xs, normalise(data._x_test), rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in data.test_batches(7, "cpu")]), data._y_test)
    ev = data.eval_inputs(8, CPU)
    assert torch.equal(ev, data.eval_inputs(8, "cpu")) and ev.shape == (8, 3, 32, 32)
    torch.testing.assert_close(ev, xs[data.eval_indices(8)])
    assert data.eval_indices(5).tolist() == [0, 4, 8, 12, 16]  # spread over the (often class-sorted) set
    assert len(data.eval_inputs(1000, CPU)) == 20


def test_augment_refuses_tiny_images_and_pickles_without_device_copies():
    with pytest.raises(ValueError, match="at least 16"):
        TensorData("t", random_images(4, hw=8), torch.zeros(4), random_images(2, hw=8), torch.zeros(2), 2,
                   augment=True)
    data = small_image_data()
    data.on(CPU)
    assert data._cache
    clone = pickle.loads(pickle.dumps(data))
    assert clone._cache == {} and clone.num_train == 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    data = small_image_data()
    cpu = list(data.train_batches(16, torch.Generator().manual_seed(1), CPU))
    gpu = list(data.train_batches(16, torch.Generator().manual_seed(1), torch.device("cuda")))
    for (a, b), (c, d) in zip(cpu, gpu, strict=True):
        assert c.is_cuda
        torch.testing.assert_close(a, c.cpu())
        assert torch.equal(b, d.cpu())


# ----------------------------------------------------------------------------------------- bundled sets
def test_digits_split_is_fixed_stratified_and_standardised():
    a, b = load_data("digits"), load_data("digits")
    assert isinstance(a, DataBundle)
    assert (a.num_train, a.num_test, a.num_classes, a.input_shape) == (1437, 360, 10, (1, 8, 8))
    xa, ya = a.train_tensors()
    xb, yb = b.train_tensors()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert abs(xa.mean().item()) < 1e-4 and abs(xa.std().item() - 1) < 1e-3
    counts = torch.bincount(torch.cat([y for _, y in a.test_batches(1000, CPU)]), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20% of ~180 per class
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float() / 16
    # Each standardised test image is a digits image: undo the standardisation and find it.
    t0 = a.eval_inputs(1, CPU)[0, 0]
    mean, std = -a._shift.item() / a._scale.item(), 1 / a._scale.item()
    assert ((raw - (t0 * std + mean)).abs().flatten(1).max(1).values < 1e-5).any()
    assert load_data("digits", split_seed=1).train_tensors()[1].tolist() != ya.tolist()


def test_synthetic_is_deterministic_and_learnable_shape():
    a = load_data("synthetic", n_train=40, n_test=12, num_classes=3, input_shape=[2, 4], seed=3)
    b = load_data("synthetic", n_train=40, n_test=12, num_classes=3, input_shape=(2, 4), seed=3)
    assert a.input_shape == (2, 4) and a.num_train == 40 and a.num_test == 12
    assert torch.equal(a.train_tensors()[0], b.train_tensors()[0])
    assert torch.bincount(a.train_tensors()[1]).tolist() == [14, 13, 13]
    other = load_data("synthetic", n_train=40, seed=4)
    assert not torch.equal(a.train_tensors()[0], other.train_tensors()[0])


# ----------------------------------------------------------------------------------------- subsets
def test_balanced_subset_is_balanced_seeded_and_copes_with_small_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    idx = balanced_subset(labels, 20, seed=1)
    assert torch.bincount(labels[idx]).tolist() == [9, 8, 3]  # class 2 runs out, the others share the rest
    assert torch.equal(idx, balanced_subset(labels, 20, seed=1)) and len(set(idx.tolist())) == 20
    assert not torch.equal(idx, balanced_subset(labels, 20, seed=2))
    assert torch.equal(balanced_subset(labels, 1000), torch.arange(83))
    counts = torch.bincount(labels[balanced_subset(labels, 31)]).tolist()
    assert counts == [14, 14, 3]


def test_subset_kwargs_apply_to_loaders():
    d = load_data("digits", subset=100, test_subset=30)
    assert d.num_train == 100 and d.num_test == 30
    assert torch.bincount(d.train_tensors()[1]).tolist() == [10] * 10
    assert torch.bincount(torch.cat([y for _, y in d.test_batches(64, CPU)])).tolist() == [3] * 10


# ----------------------------------------------------------------------------------------- on-disk formats
def write_cifar_batches(folder, n_per_batch=6, n_test=8, label_key="labels", files=None, seed=0):
    """CIFAR in torchvision's python format: pickled dicts with 'data' [N, 3072] uint8 (CHW) and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for name in files or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if "test" in name else n_per_batch
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        out[name] = entry
    return out


def test_cifar10_python_format(tmp_path):
    batches = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        data = load_data("cifar10", root=str(root), augment=False)
        assert (data.num_train, data.num_test, data.input_shape) == (30, 8, (3, 32, 32))
        assert data.classes[3] == "c3" and data.augment is False
        x, y = data.train_tensors()
        raw = batches["data_batch_2"]["data"][1]  # train sample 7 = batch 2, row 1
        img = torch.from_numpy(raw[:1024].reshape(32, 32))  # red plane, row-major
        torch.testing.assert_close(x[7, 0], (img.float() / 255 - CIFAR10_MEAN[0]) / CIFAR10_STD[0])
        assert y[7].item() == batches["data_batch_2"]["labels"][1]
    assert load_data("cifar10", root=str(tmp_path)).augment is True


def test_cifar100_python_format(tmp_path):
    write_cifar_batches(tmp_path / "cifar-100-python", n_per_batch=12, n_test=4, label_key="fine_labels",
                        files=["train", "test"])
    data = load_data("cifar100", root=str(tmp_path), augment=False)
    assert (data.num_train, data.num_test, data.num_classes) == (12, 4, 100)


def write_image_folders(root, classes, n_train=2, n_test=1, size=32, ext="png", split="test", seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for sp, n in (("train", n_train), (split, n_test)):
        for cls in classes:
            (root / sp / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / sp / cls / f"{i:04d}.{ext}")
                arrays[(sp, cls, i)] = arr
    return arrays


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_image_folders_decode_exactly_and_cache(tmp_path):
    arrays = write_image_folders(tmp_path, CIFAR_CLASSES)
    data = load_data("cifar10", root=str(tmp_path), augment=False)
    assert (data.num_train, data.num_test, data.classes) == (20, 10, CIFAR_CLASSES)
    x, y = data.train_tensors()
    expected = torch.from_numpy(arrays[("train", "cat", 1)]).permute(2, 0, 1)  # sorted: index 3*2 + 1
    torch.testing.assert_close(x[7], normalise(expected), rtol=0, atol=1e-5)
    assert y.tolist() == [i // 2 for i in range(20)]
    caches = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".pt"))
    assert caches == [".test.tpp-cache.pt", ".train.tpp-cache.pt"]
    cached = torch.load(tmp_path / ".train.tpp-cache.pt", weights_only=True)
    assert torch.equal(cached["x"][7], expected)
    # A second load comes from the cache; adding an image invalidates it.
    assert torch.equal(load_data("cifar10", root=str(tmp_path), augment=False).train_tensors()[0], x)
    Image.fromarray(arrays[("train", "cat", 0)]).save(tmp_path / "train" / "cat" / "0009.png")
    assert load_data("cifar10", root=str(tmp_path)).num_train == 21


def test_cifar10_folder_with_wrong_contents_is_rejected(tmp_path):
    write_image_folders(tmp_path, ["a", "b"], size=32)
    with pytest.raises(DataError, match="2 classes"):
        load_data("cifar10", root=str(tmp_path))


def test_imagefolder_small_images_in_memory(tmp_path):
    write_image_folders(tmp_path, ["x", "y", "z"], n_train=3, n_test=2, size=20, split="val")
    data = load_data("imagefolder", root=str(tmp_path))
    assert isinstance(data, TensorData)
    assert (data.num_train, data.num_test, data.num_classes, data.input_shape) == (9, 6, 3, (3, 20, 20))
    assert data.augment  # >= 16 px
    x, _ = data.train_tensors()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)  # own statistics
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    xb, yb = next(data.train_batches(4, torch.Generator().manual_seed(0), CPU))
    assert xb.shape == (4, 3, 20, 20)
    resized = load_data("imagefolder", root=str(tmp_path), image_size=12, cache_dir=str(tmp_path / "c"))
    assert resized.input_shape == (3, 12, 12) and not resized.augment


def test_imagefolder_streaming_mode(tmp_path):
    write_image_folders(tmp_path, ["x", "y"], n_train=3, n_test=2, size=40, ext="jpg", split="val")
    data = load_data("imagefolder", root=str(tmp_path), in_memory=False, image_size=32, workers=0)
    assert isinstance(data, FolderLoaderData) and isinstance(data, DataBundle)
    assert (data.num_train, data.num_test, data.input_shape) == (6, 4, (3, 32, 32))
    batches = list(data.train_batches(4, torch.Generator().manual_seed(0), CPU))
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 0, 0, 1, 1, 1]
    first = [b[1].tolist() for b in data.train_batches(6, torch.Generator().manual_seed(0), CPU)]
    again = [b[1].tolist() for b in data.train_batches(6, torch.Generator().manual_seed(0), CPU)]
    assert first == again
    test = list(data.test_batches(3, CPU))
    assert torch.cat([y for _, y in test]).tolist() == [0, 0, 1, 1]
    ev = data.eval_inputs(2, CPU)
    torch.testing.assert_close(ev, torch.cat([x for x, _ in test])[[0, 2]])


def write_mnist(root, n_train=5, n_test=3):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        header = struct.pack(">IIII", 2051, n, 28, 28)  # idx3 magic, count, rows, cols
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + imgs.tobytes())
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return imgs


def test_mnist_torchvision_format(tmp_path):
    test_imgs = write_mnist(tmp_path)
    data = load_data("mnist", root=str(tmp_path))
    assert (data.num_train, data.num_test, data.input_shape) == (5, 3, (1, 28, 28))
    x = torch.cat([b for b, _ in data.test_batches(8, CPU)])
    torch.testing.assert_close(x[2, 0], (torch.from_numpy(test_imgs[2]).float() / 255 - 0.1307) / 0.3081)
    padded = load_data("mnist", root=str(tmp_path / "MNIST"), pad=2)
    assert padded.input_shape == (1, 32, 32)


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,expected", [
    ("cifar10", "cifar-10-batches-py/{data_batch_1"), ("cifar100", "cifar-100-python/{train, test}"),
    ("mnist", "MNIST/raw/"), ("imagefolder", "<root>/train/<class>/"),
])
def test_missing_data_names_the_folder_and_the_layout(tmp_path, name, expected):
    with pytest.raises(DataError) as e:
        load_data(name, root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value) and expected in str(e.value)
    assert isinstance(e.value, ValueError)


def test_imagefolder_wrong_layouts(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no val/ or test/ in .*contains \['train'\].*val/<class>"):
        load_data("imagefolder", root=str(tmp_path))
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data("imagefolder", root=str(tmp_path))
    with pytest.raises(DataError, match="cifar-10-batches-py.*or image folders"):
        load_data("cifar10", root=str(tmp_path / "train"))


def test_mixed_image_sizes_are_explained(tmp_path):
    write_image_folders(tmp_path, ["a"], n_train=1, n_test=1, size=16)
    Image.fromarray(np.zeros((18, 18, 3), np.uint8)).save(tmp_path / "train" / "a" / "0001.png")
    with pytest.raises(DataError, match="image_size=N"):
        load_data("imagefolder", root=str(tmp_path), in_memory=True)


def test_registry_names_kwargs_and_user_sets():
    assert {"digits", "synthetic", "cifar10", "cifar100", "mnist", "imagefolder"} <= set(list_data())
    with pytest.raises(ValueError, match="unknown data set 'svhn'; accepted: .*cifar10"):
        load_data("svhn")
    with pytest.raises(ValueError, match=r"'digits': unknown kwarg\(s\) batch; accepted: .*subset"):
        load_data("digits", batch=3)

    @register_data("test_user_set")
    def user_set(root=None, n=10):
        x = torch.randn(n, 3)
        return TensorData("test_user_set", x, torch.arange(n) % 2, x, torch.arange(n) % 2, 2)

    data = load_data("test_user_set", n=6)
    assert data.num_train == 6 and "test_user_set" in list_data()


def test_loader_kwargs_list_what_load_data_accepts():
    assert loader_kwargs("digits") == ["split_seed", "shift", "subset", "test_subset", "subset_seed"]
    assert loader_kwargs("synthetic")[:5] == ["n_train", "n_test", "num_classes", "input_shape", "seed"]
    assert {"image_size", "in_memory", "workers", "cache_dir", "subset"} <= set(loader_kwargs("imagefolder"))
    assert {"augment", "cache_dir", "test_subset"} <= set(loader_kwargs("cifar10"))
    assert all("root" not in loader_kwargs(name) for name in list_data())  # root is its own argument
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        loader_kwargs("nope")

    @register_data("test_kw_set")
    def kw_set(root=None, n=4, subset=None):  # a loader may take `subset` itself
        x = torch.randn(n, 2)
        return TensorData("test_kw_set", x, torch.zeros(n), x, torch.zeros(n), 1)

    assert loader_kwargs("test_kw_set") == ["n", "subset", "test_subset", "subset_seed"]
    assert load_data("test_kw_set", subset=2).num_train == 4  # passed to the loader, not applied again
    # Every listed kwarg is accepted by load_data.
    d = load_data("synthetic", **{"n_train": 20, "n_test": 10, "num_classes": 2, "input_shape": [3],
                                  "seed": 1, "subset": 10, "test_subset": 4, "subset_seed": 2})
    assert (d.num_train, d.num_test) == (10, 4)


def test_default_root_comes_from_the_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("TPP_DATA_ROOT", str(tmp_path))
    assert load_data("mnist").num_train == 5
    monkeypatch.setenv("TPP_DATA_ROOT", os.fspath(tmp_path / "none"))
    with pytest.raises(DataError, match="none"):
        load_data("mnist")


def test_shifted_digits_are_the_padded_images_cropped_at_the_drawn_offsets():
    """#25: `shift` translates each training image by up to S pixels (zero padding, no flip), drawn from
    the epoch's generator; the test images are untouched. Reference: pad with zeros and slice by hand."""
    from tpp.data import load_data
    from tpp.train import epoch_generator

    plain, moved = load_data("digits"), load_data("digits", shift=2)
    gen = epoch_generator(5, "prune", 0)
    n = plain.num_train
    perm = torch.randperm(n, generator=gen)
    dy, dx = torch.randint(0, 5, (2, n), generator=gen)
    x_raw, _ = plain.train_tensors()  # normalised, unpadded; the padding is raw zeros
    raw = plain._x_train
    padded = F.pad(raw, (2, 2, 2, 2))
    batch, labels = next(moved.train_batches(64, epoch_generator(5, "prune", 0), "cpu"))
    for k in range(64):
        i = int(perm[k])
        want = padded[i, :, int(dy[k]):int(dy[k]) + 8, int(dx[k]):int(dx[k]) + 8]
        want = (want.float() * moved._scale + moved._shift) if moved._scale is not None else want.float()
        assert torch.equal(batch[k], want)
        assert int(labels[k]) == int(plain._y_train[i])
    assert not torch.equal(batch, x_raw[perm[:64]])  # some images moved
    t_plain = torch.cat([x for x, _ in plain.test_batches(512, "cpu")])
    t_moved = torch.cat([x for x, _ in moved.test_batches(512, "cpu")])
    assert torch.equal(t_plain, t_moved)
    # the split keeps the shift, and a bad value is one clear line
    train, _ = moved.split_validation(0.1)
    assert train._shift_px == 2
    with pytest.raises(ValueError, match="shift must be an integer >= 0"):
        load_data("digits", shift=-1)
