"""The epoch loop shared by dense training, the regularisation stage and finetuning.

Hooks (`extra_loss`, `after_backward`, `after_step`) let the pruning methods add their penalty without
a second copy of the loop. A non-finite loss is not an exception: the epoch reports it and the caller
ends the run as "diverged".
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches (model init, numpy, Python)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def epoch_generator(seed: int, stage: str, epoch: int) -> torch.Generator:
    """A generator for one epoch's shuffling/augmentation, derived from (seed, stage, epoch).

    Deriving it instead of carrying one generator through the run makes resuming at an epoch boundary
    reproduce the uninterrupted run with no generator state in the checkpoint.
    """
    stage_id = {"dense": 1, "prune": 2, "finetune": 3}.get(stage, 0)
    return torch.Generator().manual_seed((seed * 1_000_003 + stage_id * 10_007 + epoch) % 2**63)


@dataclass
class Precision:
    """Mixed-precision and memory-format options (both only take effect on CUDA)."""

    bf16: bool = False
    channels_last: bool = False

    def autocast(self, device: torch.device):
        if self.bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_input(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.channels_last and device.type == "cuda" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = model.to(device)
        if self.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model


@dataclass
class EpochStats:
    loss: float  # mean training loss (cross-entropy + penalty) over the epoch
    iterations: int
    finite: bool  # False once the loss was NaN/inf: the run diverged
    accuracy: float = float("nan")  # training accuracy (%) over the epoch's batches, when tracked


def train_epoch(
    model: nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    max_iterations: int | None = None,
    track_accuracy: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """One pass over `batches` (or `max_iterations` of it); with `track_accuracy` also the training
    accuracy of the batches as they were trained on (the prune stage's overfit check).

    The loss is summed on the device and read once at the end: a per-step `.item()` would force a
    GPU sync every iteration.
    """
    precision = precision or Precision()
    model.train()
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    n = 0
    for x, y in batches:
        if max_iterations is not None and n >= max_iterations:
            break
        x = precision.prepare_input(x, device)
        with precision.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        if track_accuracy:
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.detach().float()
        n += 1
        if should_stop is not None and should_stop():
            break
    mean = (total / max(n, 1)).item()
    acc = 100.0 * correct.item() / seen if seen else float("nan")
    return EpochStats(loss=mean, iterations=n, finite=bool(np.isfinite(mean)), accuracy=acc)


@torch.no_grad()
def evaluate_metrics(model: nn.Module, batches, device: torch.device,
                     precision: Precision | None = None) -> tuple[float, float]:
    """(top-1 accuracy in percent, mean cross-entropy) in eval mode; the train/eval flag is restored."""
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for x, y in batches:
        with precision.autocast(device):
            logits = model(precision.prepare_input(x, device))
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        count += y.numel()
    model.train(was_training)
    return 100.0 * correct.item() / max(count, 1), float(loss.item() / max(count, 1))


def evaluate(model: nn.Module, batches, device: torch.device, precision: Precision | None = None) -> float:
    """Top-1 accuracy in percent."""
    return evaluate_metrics(model, batches, device, precision)[0]


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
