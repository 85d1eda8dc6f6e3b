"""Input pipeline cost on CPU: tpp's device-side CIFAR path vs a standard torchvision DataLoader.

Small image sets are held as uint8 tensors on the training device and augmented a whole batch at a
time (`tpp.data`), instead of decoding and transforming every sample in Python per epoch. This
checks that this never costs throughput, and shows what it saves where loading is the bottleneck.
Compared, on the same ResNet20, optimizer (tpp.train.sgd) and loop (tpp.train.train_epoch):

* device-side: `load_data("cifar10", root=...)` tensors, `train_batches` (batched crop + flip);
* torchvision: `ImageFolder(root/train)` with RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize, in a `DataLoader` with 0 and with 2 worker processes.

Each measurement starts a fresh epoch iterator and takes a few untimed warm-up batches (worker
start-up is a per-epoch cost, not a per-batch one), then times a fixed number of batches of 128;
variants are interleaved. The data-only rows iterate the same batches with no model. The one-time
start-up costs (decoding or reading the tensor cache; scanning the image folder) are listed apart.

    python -m benchmarks.data_path [--quick] [--root DIR]   # DIR: train/<class>/*.jpg + test/<class>/
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.timing import interleaved_setup, machine, parser, table
from tpp.data import default_root, load_data
from tpp.models import ModelSpec, build_model
from tpp.train import epoch_generator, sgd, train_epoch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CPU = torch.device("cpu")


def torchvision_loader(root: str, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ds = datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)


def variants(root: str, batch: int, warm: int) -> dict[str, Callable[[], Iterator]]:
    """name -> a factory of a fresh epoch iterator, already past `warm` batches."""
    data = load_data("cifar10", root=root)
    loaders = {w: torchvision_loader(root, batch, w) for w in (0, 2)}
    epoch = itertools.count()

    def device_side() -> Iterator:
        return data.train_batches(batch, epoch_generator(0, "finetune", next(epoch)), CPU)

    out: dict[str, Callable[[], Iterator]] = {"device-side (tpp.data)": device_side}
    for w, loader in loaders.items():
        out[f"torchvision DataLoader, {w} workers"] = lambda loader=loader: iter(loader)

    def warmed(make: Callable[[], Iterator]) -> Callable[[], Iterator]:
        def fresh() -> Iterator:
            it = make()
            for _ in range(warm):
                next(it)
            return it
        return fresh

    return {name: warmed(make) for name, make in out.items()}


def measure(root: str, batch: int, n: int, warm: int, repeats: int) -> list[dict[str, object]]:
    its = variants(root, batch, warm)
    torch.manual_seed(0)
    model0 = build_model(ModelSpec("resnet20", 10, (3, 32, 32)))
    models = {name: copy.deepcopy(model0) for name in its}
    opts = {name: sgd(m, 0.01, 0.9, 5e-4) for name, m in models.items()}

    def training(name: str) -> Callable[[], Callable[[], object]]:
        def factory() -> Callable[[], object]:
            it = its[name]()
            return lambda: train_epoch(models[name], itertools.islice(it, n), opts[name], CPU)
        return factory

    def data_only(name: str) -> Callable[[], Callable[[], object]]:
        def factory() -> Callable[[], object]:
            it = its[name]()
            return lambda: [None for _ in itertools.islice(it, n)]
        return factory

    train_t = interleaved_setup({name: training(name) for name in its}, repeats)
    data_t = interleaved_setup({name: data_only(name) for name in its}, repeats)
    dev = "device-side (tpp.data)"
    rows = []
    for name in its:
        rows.append({"data path": name, "train images/s": n * batch / train_t[name],
                     "device-side speed-up (train)": train_t[name] / train_t[dev],
                     "data-only images/s": n * batch / data_t[name],
                     "device-side speed-up (data only)": data_t[name] / data_t[dev]})
    return rows


def startup(root: str) -> list[dict[str, object]]:
    """One-time costs: load_data (decode + write the cache if absent, then read from the cache)
    and the ImageFolder scan."""
    t0 = time.perf_counter()
    load_data("cifar10", root=root)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_data("cifar10", root=root)
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    torchvision_loader(root, 128, 0)
    scan = time.perf_counter() - t0
    return [{"one-time cost": "load_data, first call in this run (decodes if no cache)", "s": first},
            {"one-time cost": "load_data from the tensor cache", "s": cached},
            {"one-time cost": "ImageFolder scan of train/", "s": scan}]


def tiny_folder(root: str, per_class: int) -> None:
    """A CIFAR-shaped image folder of random JPEGs (smoke mode: no data set needed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, k in (("train", per_class), ("test", 2)):
        for c in range(10):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder)
            for i in range(k):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    os.path.join(folder, f"{i:04d}.jpg"))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--root", default=None,
                   help="CIFAR-10 image folders (default $TPP_DATA_ROOT, then ./data)")
    args = p.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="tpp-data-bench-") as root:
            tiny_folder(root, per_class=20)
            start, rows = startup(root), measure(root, batch=32, n=3, warm=1, repeats=2)
            where = "random JPEGs, 10 classes x 20 (quick mode: sizes reduced, numbers not meaningful)"
    else:
        root = default_root(args.root)
        start, rows = startup(root), measure(root, batch=128, n=30, warm=2, repeats=5)
        where = root
    print(table(rows))
    print()
    print(table(start))
    print(f"\ndata: {where}; ResNet20, SGD; torch threads in the main process: {torch.get_num_threads()}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
