"""Image folders too large for memory (ImageNet): decoded per epoch by DataLoader worker processes.

Workers do what must happen per file (decode, random-resized crop, flip) and hand over uint8 tensors;
conversion and normalisation happen on the device. All randomness of an epoch is drawn up front from
the epoch's generator (order and one seed per sample), so an epoch is reproducible whatever the number
of workers and whichever worker decodes which sample.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tpp.data.bundle import Batch, DataBundle
from tpp.data.folders import FolderSplit, available_cpus, open_rgb, resize_centre_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP = 0.875  # evaluation: shorter side to size / 0.875 (256 for 224), then the centred crop
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults


def random_resized_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """torchvision's RandomResizedCrop (area 8-100%, aspect 3/4-4/3) with draws from `rng`."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:  # fall back to a centred crop of the clamped aspect ratio
        aspect = w / h
        if aspect < RATIO[0]:
            cw, ch = w, round(w / RATIO[0])
        elif aspect > RATIO[1]:
            cw, ch = round(h * RATIO[1]), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))


class _Images(Dataset):
    """Items are (index, seed): seed None gives the evaluation transform, an int the training one."""

    def __init__(self, split: FolderSplit, size: int):
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        i, seed = item
        img = open_rgb(self.split.path(i))
        if seed is None:
            img = resize_centre_crop(img, self.size, int(self.size / EVAL_CROP))
        else:
            rng = random.Random(seed)
            img = random_resized_crop(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return x, int(self.split.labels[i])


class FolderLoaderData(DataBundle):
    """Train/eval image folders streamed through DataLoader workers, `image_size` x `image_size` RGB.

    Training: random-resized crop + flip (`augment`), else the evaluation transform; evaluation:
    shorter side to image_size / 0.875, centred crop. Normalised on the device with `mean`/`std`.
    """

    def __init__(self, name: str, train: FolderSplit, test: FolderSplit, image_size: int = 224,
                 augment: bool = True, workers: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.name = name
        self._train, self._test = train, test
        self.classes = list(train.classes)
        self.num_classes = len(self.classes)
        self.image_size = int(image_size)
        self.input_shape = (3, self.image_size, self.image_size)
        self._augment = bool(augment)
        self.workers = min(8, available_cpus()) if workers is None else int(workers)
        self._mean, self._std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._eval_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_train(self) -> int:
        return len(self._train)

    @property
    def num_test(self) -> int:
        return len(self._test)

    @property
    def augment(self) -> bool:
        return self._augment

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_eval_cache"], state["_affine"] = {}, {}
        return state

    # ------------------------------------------------------------------------------------- batches
    def _stream(self, split: FolderSplit, batches: list[list[tuple[int, int | None]]],
                device) -> Iterator[Batch]:
        device = torch.device(device)
        loader = DataLoader(_Images(split, self.image_size), batch_sampler=batches, num_workers=self.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if self.workers > 0 else None)
        for x, y in loader:
            yield self._normalise(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 `(x / 255 - mean) / std`, as one multiply-add on the device."""
        affine = self._affine.get(x.device)
        if affine is None:
            m, s = torch.tensor(self._mean, dtype=torch.float64), torch.tensor(self._std, dtype=torch.float64)
            affine = self._affine[x.device] = ((1 / (255 * s)).float().view(-1, 1, 1).to(x.device),
                                               (-m / s).float().view(-1, 1, 1).to(x.device))
        return x.float() * affine[0] + affine[1]

    def train_batches(self, batch_size: int, generator: torch.Generator | None, device,
                      drop_last: bool = False) -> Iterator[Batch]:
        """One epoch; draws from `generator`: `perm = randperm(N)`, then one seed per position
        (`randint(2**62, (N,))`) that fixes the crop and flip of sample `perm[k]`."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bs, n = int(batch_size), self.num_train
        perm = torch.randperm(n, generator=generator).tolist()
        seeds = torch.randint(2**62, (n,), generator=generator).tolist()
        if not self._augment:
            seeds = [None] * n
        stop = n - n % bs if drop_last else n
        batches = [list(zip(perm[s:s + bs], seeds[s:s + bs], strict=True)) for s in range(0, stop, bs)]
        yield from self._stream(self._train, batches, device)

    def test_batches(self, batch_size: int, device) -> Iterator[Batch]:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bs, n = int(batch_size), self.num_test
        yield from self._stream(self._test, [[(i, None) for i in range(s, min(s + bs, n))]
                                             for s in range(0, n, bs)], device)

    def _inputs_at(self, indices: torch.Tensor, device) -> torch.Tensor:
        """Decoded once per set of indices (the Jacobian metric asks for the same batch every time)."""
        key = tuple(indices.tolist())
        x = self._eval_cache.get(key)
        if x is None:
            images = _Images(self._test, self.image_size)
            x = (torch.stack([images[(i, None)][0] for i in key]) if key
                 else torch.empty((0, *self.input_shape), dtype=torch.uint8))
            self._eval_cache[key] = x
        return self._normalise(x.to(device))

    def train_tensors(self) -> Batch:
        """Every training image with the evaluation transform (this loads the whole set into memory)."""
        xs, ys = zip(*self.train_batches_eval(256), strict=True)
        return torch.cat(xs), torch.cat(ys)

    def train_batches_eval(self, batch_size: int) -> Iterator[Batch]:
        n = self.num_train
        yield from self._stream(self._train, [[(i, None) for i in range(s, min(s + batch_size, n))]
                                              for s in range(0, n, batch_size)], "cpu")

    def train_labels(self) -> torch.Tensor:
        return torch.from_numpy(self._train.labels.copy())

    def test_labels(self) -> torch.Tensor:
        return torch.from_numpy(self._test.labels.copy())

    def _take(self, train_idx: torch.Tensor | None, test_idx: torch.Tensor | None) -> FolderLoaderData:
        train = self._train if train_idx is None else self._train.take(train_idx.numpy())
        test = self._test if test_idx is None else self._test.take(test_idx.numpy())
        return FolderLoaderData(self.name, train, test, self.image_size, self._augment, self.workers,
                                self._mean, self._std)

    def _hold_out(self, keep_idx: torch.Tensor, val_idx: torch.Tensor) -> FolderLoaderData:
        train, val = self._train.take(keep_idx.numpy()), self._train.take(val_idx.numpy())
        return FolderLoaderData(self.name, train, val, self.image_size, self._augment, self.workers,
                                self._mean, self._std)
