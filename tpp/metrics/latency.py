"""Measured inference latency: what a pruned model really gains, next to what its FLOPs promise.

FLOPs overstate speed-ups of structured pruning (small layers are launch- and memory-bound: ResNet56 at
PR 0.9 has 11.6x fewer FLOPs but ran 1.6x faster on this CPU), so a run also times both models on its
own device: eval mode, no autograd, a few warm-up calls, then the median of timed repeats.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def latency(model: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device,
            repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one forward pass of a batch of `batch` zero inputs of `input_shape` on `device`."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(batch, *input_shape, device=device, dtype=param.dtype)
    times = []
    try:
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times)


def latency_metrics(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], batch: int,
                    device: torch.device) -> dict[str, float]:
    """Dense and pruned latency (ms) at batch 1 and at `batch`, and the measured speed-ups."""
    out: dict[str, float] = {}
    for name, b in (("b1", 1), ("batch", batch)):
        d, p = latency(dense, input_shape, b, device), latency(pruned, input_shape, b, device)
        out.update({f"latency_dense_{name}_ms": 1e3 * d, f"latency_pruned_{name}_ms": 1e3 * p,
                    f"speedup_measured_{name}": d / max(p, 1e-12)})
    return out
