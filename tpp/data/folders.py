"""Image folders: `<root>/train/<class>/*.jpg` plus `<root>/val/<class>/` (or `test/`).

This module finds and checks the layout, decodes images, and caches the decoded tensors of small-image
sets (CIFAR as JPEGs: decoding 60,000 files takes longer than the whole first epoch). A cache file is
keyed by the folder's contents (file names, sizes, modification times), so an edited folder is decoded
again instead of served stale, and it is written atomically, so concurrent runs never read half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tpp.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "<root>/train/<class>/*.jpg (or .png, ...) and <root>/val/<class>/ (or test/<class>/)"
EVAL_SPLITS = ("val", "test")
CACHE_VERSION = 1  # bump when the cached content changes meaning


@dataclass
class FolderSplit:
    """One split's files and labels. Paths are one numpy bytes array rather than a list of str: forked
    DataLoader workers then share it instead of copying every page that Python refcounts touch."""

    folder: str  # absolute path of the split folder, e.g. <root>/train
    split: str  # "train", "val" or "test"
    classes: list[str]
    files: np.ndarray  # "<class>/<file name>" relative to `folder`, as bytes
    labels: np.ndarray  # int64 class indices into `classes`
    stamps: np.ndarray | None = None  # [N, 2] int64 (size, mtime_ns), set by `with_stamps`

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.folder, os.fsdecode(bytes(self.files[i])))

    def take(self, idx) -> FolderSplit:
        idx = np.asarray(idx, dtype=np.int64)
        return FolderSplit(self.folder, self.split, self.classes, self.files[idx], self.labels[idx],
                           None if self.stamps is None else self.stamps[idx])

    def with_stamps(self) -> FolderSplit:
        """This split with each file's (size, mtime_ns): what a cache key needs (one stat per file)."""
        stats = (os.stat(self.path(i)) for i in range(len(self)))
        stamps = np.array([(st.st_size, st.st_mtime_ns) for st in stats], dtype=np.int64).reshape(-1, 2)
        return FolderSplit(self.folder, self.split, self.classes, self.files, self.labels, stamps)

    def fingerprint(self, *extra: object) -> str:
        """A key of everything the decoded tensors depend on: names, sizes and times of the files."""
        if self.stamps is None:
            raise ValueError("fingerprint needs the file stamps: call with_stamps() first")
        h = hashlib.sha256(f"v{CACHE_VERSION}|{extra!r}|".encode())
        h.update("\0".join(self.classes).encode())
        for arr in (self.files, self.labels, self.stamps):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------ layout
def describe(folder: str) -> str:
    """'it does not exist' or 'it contains [...]' (first entries), for messages about a wrong root."""
    if not os.path.isdir(folder):
        return "it does not exist"
    names = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    return f"it contains {names[:12]}" + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def find_splits(root: str, what: str) -> tuple[FolderSplit, FolderSplit]:
    """The train split and the evaluation split (val/, else test/) of `root`, checked."""
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"{what}: no train/ folder in {root} ({describe(root)}); expected the layout "
                        f"{LAYOUT}")
    eval_split = next((s for s in EVAL_SPLITS if os.path.isdir(os.path.join(root, s))), None)
    if eval_split is None:
        raise DataError(f"{what}: no val/ or test/ in {root} ({describe(root)}); expected the layout "
                        f"{LAYOUT}")
    train = scan_split(root, "train", what)
    return train, scan_split(root, eval_split, what, classes=train.classes)


def scan_split(root: str, split: str, what: str, classes: list[str] | None = None) -> FolderSplit:
    """List `<root>/<split>/<class>/<image>` sorted by class then file name. An evaluation split is
    labelled with the training split's `classes` (it may lack some, but must not add any)."""
    folder = os.path.join(root, split)
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{what}: {folder} has class folders that train/ lacks: {extra[:5]}")
    classes = list(classes if classes is not None else found)
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for cls in found:
        entries = sorted((e for e in os.scandir(os.path.join(folder, cls))
                          if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
                          and e.is_file()), key=lambda e: e.name)
        for e in entries:
            files.append(os.fsencode(os.path.join(cls, e.name)))
            labels.append(index[cls])
    if not files:
        raise DataError(f"{what}: no images in {folder}/<class>/ ({len(found)} class folders; looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); expected the layout {LAYOUT}")
    return FolderSplit(folder, split, classes, np.array(files, dtype=bytes), np.array(labels, dtype=np.int64))


# ---------------------------------------------------------------------------------------- decoding
def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with Image.open(path) as img:
        return img.size


def open_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


def resize_centre_crop(img: Image.Image, size: int, shorter: int | None = None) -> Image.Image:
    """Shorter side to `shorter` (default `size`), then the centred `size` x `size` crop."""
    shorter = shorter or size
    w, h = img.size
    if min(w, h) != shorter:
        scale = shorter / min(w, h)
        img = img.resize((max(shorter, round(w * scale)), max(shorter, round(h * scale))),
                         Image.Resampling.BILINEAR)
        w, h = img.size
    if (w, h) != (size, size):
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def decode_rgb(path: str, image_size: int | None = None) -> np.ndarray:
    """[H, W, 3] uint8; resized and centre-cropped to `image_size` when given."""
    img = open_rgb(path)
    if image_size is not None:
        img = resize_centre_crop(img, image_size)
    return np.asarray(img)


# Decode in worker processes only for this many images (fewer: starting them costs more than it saves)
# and with this many cores (on two, the workers mostly compete with the caller and other processes).
PARALLEL_MIN_IMAGES, PARALLEL_MIN_CPUS = 4096, 4


class _Chunks(Dataset):
    """Item k: images [k * step, (k + 1) * step) of a split as one uint8 block, or where the first
    image of another size is. Whole chunks per item keep the per-item overhead of workers small."""

    def __init__(self, split: FolderSplit, image_size: int | None, hw: tuple[int, int], step: int):
        self.split, self.image_size, self.hw, self.step = split, image_size, hw, step

    def __len__(self) -> int:
        return -(-len(self.split) // self.step)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, tuple[int, int, int] | None]:
        lo, hi = k * self.step, min((k + 1) * self.step, len(self.split))
        out = torch.empty((hi - lo, 3, *self.hw), dtype=torch.uint8)
        view = out.numpy()
        for j, i in enumerate(range(lo, hi)):
            arr = decode_rgb(self.split.path(i), self.image_size)
            if arr.shape[:2] != self.hw:
                return lo, None, (i, arr.shape[0], arr.shape[1])
            view[j] = arr.transpose(2, 0, 1)
        return lo, out, None


def decode_all(split: FolderSplit, image_size: int | None, what: str, size_hint: str) -> torch.Tensor:
    """Every image of `split` as one [N, 3, H, W] uint8 tensor. Large splits are decoded by worker
    processes (PIL spends most of a small image's time in Python, so threads would not help).
    Images of different sizes are an error explained with `size_hint`."""
    h, w = decode_rgb(split.path(0), image_size).shape[:2]
    out = torch.empty((len(split), 3, h, w), dtype=torch.uint8)
    cpus = available_cpus()
    workers = min(16, cpus) if len(split) >= PARALLEL_MIN_IMAGES and cpus >= PARALLEL_MIN_CPUS else 0
    chunks = _Chunks(split, image_size, (h, w), step=256)
    try:
        blocks = iter(DataLoader(chunks, batch_size=None, num_workers=workers))
    except (OSError, AssertionError, RuntimeError):  # no child processes here (e.g. a daemon process)
        blocks = (chunks[k] for k in range(len(chunks)))
    for lo, block, bad in blocks:
        if bad is not None:
            i, h2, w2 = (int(v) for v in bad)
            raise DataError(f"{what}: images differ in size: {split.path(0)} is {w}x{h} but "
                            f"{split.path(i)} is {w2}x{h2}; {size_hint}")
        out[int(lo):int(lo) + len(block)] = block
    return out


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images, in units of x / 255."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        p = torch.bincount(x[:, c].flatten(), minlength=256).double()
        p /= p.sum()
        m = float((p * values).sum())
        mean.append(m)
        std.append(float((p * (values - m) ** 2).sum().sqrt()))
    return tuple(mean), tuple(std)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------- cache
def cache_path(cache_dir: str, split: FolderSplit, image_size: int | None) -> str:
    """`<cache_dir>/.<split>[.<size>px].tpp-cache.pt`; a cache folder outside the data root (shared by
    several sets) also gets a tag of the data folder, so two sets do not keep overwriting one file."""
    size = "" if image_size is None else f".{image_size}px"
    root = os.path.dirname(os.path.abspath(split.folder))
    where = "" if os.path.abspath(cache_dir) == root else "." + hashlib.sha256(root.encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f".{split.split}{size}{where}.tpp-cache.pt")


def decoded(split: FolderSplit, image_size: int | None, cache_dir: str | None, what: str,
            size_hint: str) -> dict:
    """{"x": uint8 [N, 3, H, W], "y", "classes", "mean", "std"} of `split`, from the cache in
    `cache_dir` when its key matches the folder, else decoded and cached (None: no cache)."""
    key = split.fingerprint(image_size)
    path = None if cache_dir is None else cache_path(cache_dir, split, image_size)
    if path is not None and os.path.isfile(path):
        try:
            entry = torch.load(path, weights_only=True, mmap=True)
        except Exception:  # a corrupt or foreign file: decode again and overwrite it
            entry = None
        if isinstance(entry, dict) and entry.get("key") == key:
            return entry
    x = decode_all(split, image_size, what, size_hint)
    mean, std = channel_stats(x)
    entry = {"key": key, "x": x, "y": torch.from_numpy(split.labels.copy()), "classes": list(split.classes),
             "mean": mean, "std": std}
    if path is not None:
        save_atomic(entry, path)
    return entry


def save_atomic(obj: object, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`. A failure to write
    (read-only data folder, full disk) only costs the next run a decode, so it is a warning."""
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, os.stat(folder).st_mode & 0o666)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not write the decoded-image cache {path} ({e}); the next load decodes "
                      "the images again (pass cache_dir=DIR to cache elsewhere)", stacklevel=3)
