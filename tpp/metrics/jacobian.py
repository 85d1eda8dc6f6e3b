"""The trainability metric: singular values of the input-output Jacobian (JSV), per sample.

Isometry (all singular values ~1) is what TPP tries to keep through pruning. The Jacobians are built
with torch.func in one vectorised pass (vmap over samples of jacrev over the logits) instead of one
backward per class, in eval mode so BatchNorm uses its running statistics (a per-sample function).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

# Largest Jacobian block (samples x classes x input size) built at once; larger batches are chunked.
MAX_JACOBIAN_ELEMENTS = 2**27


def jacobian_singular_values(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """[N, min(C, D)] singular values (descending) of d logits / d input for each of the N samples.

    Computed in float32 on the model's device; the model's train/eval flags are restored afterwards.
    """
    param = next(model.parameters())
    x = inputs.detach().to(device=param.device, dtype=torch.float32)
    params = {k: v.detach().float() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    buffers = {k: v.float() if v.is_floating_point() else v for k, v in buffers.items()}

    def logits(sample: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, buffers), (sample.unsqueeze(0),)).squeeze(0)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            classes = int(functional_call(model, (params, buffers), (x[:1],)).shape[-1])
        size = x[0].numel()
        chunk = max(1, min(x.shape[0], MAX_JACOBIAN_ELEMENTS // max(classes * size, 1)))
        jac = vmap(jacrev(logits))
        svs = []
        for start in range(0, x.shape[0], chunk):
            j = jac(x[start:start + chunk]).reshape(-1, classes, size)
            svs.append(torch.linalg.svdvals(j))
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
