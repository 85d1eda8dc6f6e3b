"""The standard vision sets in the formats torchvision leaves on disk, and any image-folder set.

CIFAR-10/100 (torchvision's python pickles, or image folders), MNIST (torchvision's raw idx files) and
`imagefolder` (small images in memory, large ones streamed). Nothing is ever downloaded: a missing set
is a DataError that says where it looked and which layout it expects.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tpp.data.errors import DataError
from tpp.data.folders import decoded, describe, find_splits, image_size_of
from tpp.data.registry import register_data
from tpp.data.streaming import IMAGENET_MEAN, IMAGENET_STD, FolderLoaderData
from tpp.data.tensors import MIN_AUGMENT_SIZE, TensorData

# Per-channel statistics of the training sets (std: over all pixels, not the mean of per-image stds).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# imagefolder without in_memory: keep the decoded set in memory when it is this small.
IN_MEMORY_MAX_SIDE = 64
IN_MEMORY_MAX_BYTES = 4 << 30


# -------------------------------------------------------------------------------------------- CIFAR
@dataclass(frozen=True)
class _Cifar:
    name: str
    folder: str  # torchvision's folder name
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    files_text: str
    label_key: str
    meta_file: str
    meta_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = _Cifar("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                 ("test_batch",), "{data_batch_1..5, test_batch}", "labels", "batches.meta", "label_names",
                 10, CIFAR10_MEAN, CIFAR10_STD)
CIFAR100 = _Cifar("cifar100", "cifar-100-python", ("train",), ("test",), "{train, test}", "fine_labels",
                  "meta", "fine_label_names", 100, CIFAR100_MEAN, CIFAR100_STD)


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR pickles hold dicts of numpy arrays, lists and strings; refuse anything else, so a data
    file can never run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{what}: {path} is not a CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what}: {path} is not a CIFAR python batch (holds a {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(spec: _Cifar, folder: str, files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        path = os.path.join(folder, name)
        batch = _unpickle(path, spec.name)
        if "data" not in batch or spec.label_key not in batch:
            raise DataError(f"{spec.name}: {path} lacks 'data' or {spec.label_key!r} "
                            f"(keys: {sorted(batch)})")
        data, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[spec.label_key])
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{spec.name}: {path}: 'data' must be [N, 3072] with N labels, got "
                            f"{data.shape} and {len(labels)} labels")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    return torch.cat(xs), torch.cat(ys)


def _cifar_classes(spec: _Cifar, folder: str) -> list[str]:
    path = os.path.join(folder, spec.meta_file)
    if os.path.isfile(path):
        names = _unpickle(path, spec.name).get(spec.meta_key)
        if names is not None and len(names) == spec.num_classes:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return list(CIFAR10_CLASSES) if spec is CIFAR10 else [str(i) for i in range(spec.num_classes)]


def _cifar_folders(spec: _Cifar, root: str, augment: bool, cache_dir: str | None) -> TensorData:
    train, test = find_splits(root, spec.name)
    if len(train.classes) != spec.num_classes:
        shown = ", ".join(train.classes[:12]) + (", ..." if len(train.classes) > 12 else "")
        raise DataError(f"{spec.name}: {root}/train has {len(train.classes)} classes ({shown}), expected "
                        f"{spec.num_classes}; for other image sets use data 'imagefolder'")
    hint = f"{spec.name} images are all 32x32; for other sizes use data 'imagefolder' with image_size=N"
    cache_dir = root if cache_dir is None else cache_dir
    tr = decoded(train.with_stamps(), None, cache_dir, spec.name, hint)
    te = decoded(test.with_stamps(), None, cache_dir, spec.name, hint)
    if tuple(tr["x"].shape[1:]) != (3, 32, 32):
        h, w = tr["x"].shape[2:]
        raise DataError(f"{spec.name}: images in {root}/train are {w}x{h}; {hint}")
    return TensorData(spec.name, tr["x"], tr["y"], te["x"], te["y"], spec.num_classes, mean=spec.mean,
                      std=spec.std, augment=augment, classes=train.classes)


def _load_cifar(spec: _Cifar, root: str, augment: bool, cache_dir: str | None) -> TensorData:
    for folder in (os.path.join(root, spec.folder), root):
        present = [f for f in spec.train_files + spec.test_files if os.path.isfile(os.path.join(folder, f))]
        if len(present) == len(spec.train_files + spec.test_files):
            x_tr, y_tr = _cifar_split(spec, folder, spec.train_files)
            x_te, y_te = _cifar_split(spec, folder, spec.test_files)
            return TensorData(spec.name, x_tr, y_tr, x_te, y_te, spec.num_classes, mean=spec.mean,
                              std=spec.std, augment=augment, classes=_cifar_classes(spec, folder))
        if present:
            missing = [f for f in spec.train_files + spec.test_files if f not in present]
            raise DataError(f"{spec.name}: {folder} lacks {', '.join(missing)} (torchvision's python format "
                            f"has {spec.files_text})")
    if os.path.isdir(os.path.join(root, "train")):
        return _cifar_folders(spec, root, augment, cache_dir)
    raise DataError(f"{spec.name}: no data in {root} ({describe(root)}); expected {root}/{spec.folder}/"
                    f"{spec.files_text} (torchvision's python format) or image folders {root}/train/<class>/"
                    f"*.png|jpg and {root}/test/<class>/ ({spec.num_classes} classes, 32x32); nothing is "
                    "downloaded")


@register_data("cifar10")
def cifar10(root: str, augment: bool = True, cache_dir: str | None = None) -> TensorData:
    """CIFAR-10 from `cifar-10-batches-py/` or image folders (decoded once, cached in `cache_dir`,
    default `root`). `augment`: random crop (pad 4) + horizontal flip on the device."""
    return _load_cifar(CIFAR10, root, augment, cache_dir)


@register_data("cifar100")
def cifar100(root: str, augment: bool = True, cache_dir: str | None = None) -> TensorData:
    """CIFAR-100 (fine labels) from `cifar-100-python/` or image folders; as `cifar10`."""
    return _load_cifar(CIFAR100, root, augment, cache_dir)


# -------------------------------------------------------------------------------------------- MNIST
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_path(folder: str, name: str) -> str | None:
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format): big-endian magic (0, 0, type 0x08 = uint8, ndim), dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"mnist: {path} is not an idx file of uint8 (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"mnist: {path} holds {len(raw) - offset} bytes of data, its header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


@register_data("mnist")
def mnist(root: str, pad: int = 0) -> TensorData:
    """MNIST from torchvision's `MNIST/raw/` idx files (root may also be the MNIST or raw folder).
    `pad`: black border on every side (pad=2 gives the 32x32 of LeNet-5). No augmentation: flipping
    changes digits."""
    names = [n for pair in MNIST_FILES.values() for n in pair]
    for folder in (os.path.join(root, "MNIST", "raw"), os.path.join(root, "raw"), root):
        paths = {n: _idx_path(folder, n) for n in names}
        if all(paths.values()):
            break
    else:
        raise DataError(f"mnist: no data in {root} ({describe(root)}); expected {root}/MNIST/raw/"
                        "{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte (torchvision's "
                        "raw format, .gz accepted); nothing is downloaded")
    split = {}
    for key, (images, labels) in MNIST_FILES.items():
        x, y = read_idx(paths[images]), read_idx(paths[labels])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"mnist: {paths[images]} ({x.shape}) and {paths[labels]} ({y.shape}) do not "
                            "match")
        xt = torch.from_numpy(x.copy()).unsqueeze(1)
        split[key] = (F.pad(xt, (pad,) * 4) if pad else xt, torch.from_numpy(y.astype(np.int64)))
    return TensorData("mnist", *split["train"], *split["test"], 10, mean=MNIST_MEAN, std=MNIST_STD)


# -------------------------------------------------------------------------------------- imagefolder
@register_data("imagefolder")
def imagefolder(root: str, image_size: int | None = None, in_memory: bool | None = None,
                augment: bool | None = None, workers: int | None = None, cache_dir: str | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """Any `<root>/train/<class>/*` + `<root>/val|test/<class>/*` set.

    In memory (default for images up to 64 px, when the set fits 4 GiB): decoded once, cached in
    `cache_dir` (default `root`), `image_size` resizes (shorter side) and centre-crops, normalised by
    the training set's own statistics, crop/flip augmentation when at least 16 px. Streaming
    (`in_memory=False`, the default for larger images): DataLoader with `workers` processes,
    `image_size` (default 224) random-resized crops + flips, ImageNet statistics.
    """
    train, test = find_splits(root, "imagefolder")
    if in_memory is None:
        w, h = image_size_of(train.path(0))
        side = image_size or max(w, h)
        size = (len(train) + len(test)) * 3 * side**2
        in_memory = side <= IN_MEMORY_MAX_SIDE and size <= IN_MEMORY_MAX_BYTES
    if not in_memory:
        return FolderLoaderData("imagefolder", train, test, image_size or 224,
                                True if augment is None else augment, workers,
                                IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std)
    hint = ("pass image_size=N to resize every image (shorter side to N, then the centred N x N crop), or "
            "in_memory=False to stream them")
    cache_dir = root if cache_dir is None else cache_dir
    tr = decoded(train.with_stamps(), image_size, cache_dir, "imagefolder", hint)
    te = decoded(test.with_stamps(), image_size, cache_dir, "imagefolder", hint)
    if tr["x"].shape[1:] != te["x"].shape[1:]:
        raise DataError(f"imagefolder: train images are {tr['x'].shape[3]}x{tr['x'].shape[2]} but "
                        f"{test.split} images are {te['x'].shape[3]}x{te['x'].shape[2]}; {hint}")
    if augment is None:
        augment = min(tr["x"].shape[2:]) >= MIN_AUGMENT_SIZE
    return TensorData("imagefolder", tr["x"], tr["y"], te["x"], te["y"], len(train.classes),
                      mean=tr["mean"] if mean is None else mean, std=tr["std"] if std is None else std,
                      augment=augment, classes=train.classes)
