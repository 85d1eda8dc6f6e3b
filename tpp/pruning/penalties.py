"""The penalties as pure functions of weight tensors: the TPP gram term, kernel orthogonality, orthogonal
convolution, and the approximate-isometry objective.

Pure functions (a weight in, a scalar out, no module state) so the same math serves the per-model
regulariser here and a trainer that stacks K models' weights on a leading dim (`torch.func.vmap`
over the first dim, or the batched gram term directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GRAM_TARGETS = ("gram", "identity")


def gram_target(keep: torch.Tensor, target: str) -> torch.Tensor:
    """[..., N, N] target mask of the gram term from the float keep mask [..., N] (1 = kept filter).

    "gram" (TPP): keep ⊗ keep, the kept-kept block of the detached gram is the target (pruned rows and
    columns are pushed to 0); "identity" (kernel orthogonality for pruning): diag(keep).
    """
    if target == "gram":
        return keep[..., :, None] * keep[..., None, :]
    if target == "identity":
        return torch.diag_embed(keep)
    raise ValueError(f"target: got {target!r}; accepted: {', '.join(GRAM_TARGETS)}")


def gram_penalty(rows: torch.Tensor, target_mask: torch.Tensor, target: str = "gram") -> torch.Tensor:
    """mean((W Wᵀ − T)²) over the N x N entries, for W = `rows` [..., N, D] (a layer's filters as rows).

    T is `target_mask` times the detached gram (target "gram") or `target_mask` itself ("identity");
    leading dims (layers of one shape, or K stacked models) are kept: the result has shape [...].
    """
    gram = rows @ rows.transpose(-1, -2)
    t = gram.detach() * target_mask if target == "gram" else target_mask
    return (gram - t).pow(2).mean(dim=(-2, -1))


def kernel_orthogonality(weight: torch.Tensor) -> torch.Tensor:
    """‖W Wᵀ − I‖_F of the flattened kernel W [N, D], taken on its smaller side (W Wᵀ when N <= D,
    else Wᵀ W): the CVPR17 kernel orthogonality (Xie et al.) as the TPP authors' `orth_dist` has it.
    The Frobenius norm, not its square."""
    w = weight.reshape(weight.shape[0], -1)
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return (gram - eye).pow(2).sum().sqrt()


def orth_conv(weight: torch.Tensor, stride: int | tuple[int, int] = 1) -> torch.Tensor:
    """‖Conv(K, K) − I_δ‖_F: orthogonality of a convolution (Wang et al. CVPR20, "OCNN") for kernel K
    [O, I, kh, kw] at the layer's `stride`.

    Conv(K, K) correlates every pair of filters at every shift where they overlap on the strided
    grid (padding ⌊(k−1)/s⌋·s, the paper's); the target is the identity at zero shift and 0 elsewhere.
    """
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    kh, kw = weight.shape[-2:]
    out = F.conv2d(weight, weight, stride=(sh, sw), padding=((kh - 1) // sh * sh, (kw - 1) // sw * sw))
    o, _, h, w = out.shape
    delta = torch.zeros(h, w, device=out.device, dtype=out.dtype)
    delta[h // 2, w // 2] = 1.0
    eye = torch.eye(o, device=out.device, dtype=out.dtype)
    return (out - eye[:, :, None, None] * delta).pow(2).sum().sqrt()


def _orthogonality_layers(model: nn.Module) -> list[nn.Module]:
    """Conv/Linear layers in registration order; grouped convolutions are skipped (their flattened
    kernel mixes filters that never see the same inputs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)
            or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and not m.transposed)]


def kernorth_loss(model: nn.Module) -> torch.Tensor:
    """Σ kernel_orthogonality over every Conv/Linear layer (the authors' "CVPR17": all layers)."""
    return sum((kernel_orthogonality(m.weight) for m in _orthogonality_layers(model)),
               torch.zeros((), device=next(model.parameters()).device))


def orthconv_loss(model: nn.Module) -> torch.Tensor:
    """Σ over every Conv/Linear layer but the first (as the OCNN paper and the authors' "CVPR20"):
    `orth_conv` for k x k convolutions (k > 1), `kernel_orthogonality` for 1 x 1 ones and Linear."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for m in _orthogonality_layers(model)[1:]:
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
            total = total + orth_conv(m.weight, m.stride)
        else:
            total = total + kernel_orthogonality(m.weight)
    return total


def isometry_gap(weight: torch.Tensor) -> torch.Tensor:
    """mean((G − I)²) for the gram G of the flattened kernel on its smaller side: the objective of
    approximate isometry (Lee et al. ICLR20), 0 exactly when the smaller side is orthonormal."""
    w = weight.reshape(weight.shape[0], -1)
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    return (gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)).pow(2).mean()


def approximate_isometry(weight: torch.Tensor, iters: int, lr: float) -> torch.Tensor:
    """`weight` moved towards isometry by `iters` Adam steps (learning rate `lr`) on `isometry_gap`,
    starting from the weight itself; returns a new tensor of the same shape and dtype."""
    w = weight.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            isometry_gap(w).backward()
            opt.step()
    return w.detach()
