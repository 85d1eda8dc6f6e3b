"""The trainability metric: singular values of the input-output Jacobian (JSV), per sample.

Isometry (all singular values ~1) is what TPP tries to keep through pruning. In eval mode (BatchNorm on
its running statistics) every sample's logits depend on that sample only, so the per-sample Jacobians
can be built two exact ways: torch.func's vmap over samples of jacrev over the logits (one vectorised
pass; fastest for small dense nets), or one batched backward per class (C plain backward passes;
faster for conv nets on CPU, where vmap's batched convolution and BatchNorm rules cost ~1.6x the plain
passes, BENCHMARKS.md §3). `strategy="auto"` picks the second for conv nets on CPU.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

# Largest Jacobian block (samples x classes x input size) built at once; larger batches are chunked.
MAX_JACOBIAN_ELEMENTS = 2**27
Strategy = Literal["auto", "vmap", "per_class"]


def choose_strategy(model: nn.Module, device: torch.device, strategy: Strategy = "auto") -> Strategy:
    """The strategy `jacobian_singular_values` uses for `model` on `device` (auto resolved)."""
    if strategy not in ("auto", "vmap", "per_class"):
        raise ValueError(f"strategy {strategy!r}: accepted: auto, vmap, per_class")
    if strategy != "auto":
        return strategy
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "per_class" if has_conv and device.type == "cpu" else "vmap"


def jacobian_singular_values(model: nn.Module, inputs: torch.Tensor,
                             strategy: Strategy = "auto") -> torch.Tensor:
    """[N, min(C, D)] singular values (descending) of d logits / d input for each of the N samples.

    Computed in float32 on the model's device, in eval mode; the model's train/eval flags are
    restored afterwards. `strategy`: vmap, per_class (same values), or auto (see the module doc).
    """
    param = next(model.parameters())
    x = inputs.detach().to(device=param.device, dtype=torch.float32)
    params = {k: v.detach().float() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    buffers = {k: v.float() if v.is_floating_point() else v for k, v in buffers.items()}
    strategy = choose_strategy(model, x.device, strategy)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, buffers), (batch,))

    def one_sample(sample: torch.Tensor) -> torch.Tensor:
        return logits(sample.unsqueeze(0)).squeeze(0)

    def per_class(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.clone().requires_grad_(True)
        with torch.enable_grad():
            out = logits(batch)
            rows = [torch.autograd.grad(out[:, c].sum(), batch, retain_graph=c < out.shape[1] - 1)[0]
                    for c in range(out.shape[1])]
        return torch.stack(rows, dim=1)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            classes = int(logits(x[:1]).shape[-1])
        size = x[0].numel()
        chunk = max(1, min(x.shape[0], MAX_JACOBIAN_ELEMENTS // max(classes * size, 1)))
        jac = vmap(jacrev(one_sample)) if strategy == "vmap" else per_class
        svs = []
        for start in range(0, x.shape[0], chunk):
            j = jac(x[start:start + chunk]).reshape(-1, classes, size)
            svs.append(torch.linalg.svdvals(j.detach()))
        return torch.cat(svs)
    finally:
        for m, training in modes.items():
            m.training = training


def jsv_summary(sv: torch.Tensor) -> dict[str, float]:
    """Summary of [N, K] singular values.

    mean / std / min / max over all N*K values (std is the population std); cond: mean over samples
    of max/min (inf if a sample has a zero singular value); iso: the isometry distance mean((s - 1)²)
    over all values, as reported by the paper (0 means an exact isometry).
    """
    s = sv.detach().cpu().double().reshape(sv.shape[0], -1)
    per_sample_cond = s.max(dim=1).values / s.min(dim=1).values
    return {
        "mean": float(s.mean()),
        "std": float(s.std(correction=0)),
        "min": float(s.min()),
        "max": float(s.max()),
        "cond": float(per_sample_cond.mean()),
        "iso": float((s - 1).pow(2).mean()),
    }
