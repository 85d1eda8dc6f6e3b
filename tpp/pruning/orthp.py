"""OrthP: exact isometry re-initialisation of a pruned MLP (the paper's oracle for linear MLPs).

After removal the weights of a linear MLP are far from isometric (mean JSV ~0.004 in the paper);
replacing each weight by the orthonormal factor of its QR decomposition makes every singular value
exactly `gain`, so the input-output Jacobian of a linear MLP is an isometry again.
"""

from __future__ import annotations

import torch
from torch import nn


def orthonormal_like(weight: torch.Tensor) -> torch.Tensor:
    """The Q factor of `weight`'s QR decomposition, shaped like `weight` (all singular values 1).

    Tall weights get orthonormal columns, wide ones orthonormal rows; each column of Q is multiplied
    by the sign of R's diagonal so the factor is unique (and close to the weight's own directions).
    """
    w = weight.detach().to(torch.float64)
    wide = w.shape[0] < w.shape[1]
    a = w.t() if wide else w
    q, r = torch.linalg.qr(a, mode="reduced")
    d = torch.diagonal(r)
    q = q * torch.where(d == 0, torch.ones_like(d), torch.sign(d))
    return (q.t() if wide else q).to(weight.dtype)


@torch.no_grad()
def orthp_reinit(model: nn.Module, gain: float = 1.0) -> int:
    """Replace every Linear weight by `gain` times its orthonormal QR factor; returns the layers changed.

    Biases are kept. Only Linear layers are touched: OrthP is defined for MLPs (a conv's singular
    values are not those of its flattened kernel).
    """
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(gain * orthonormal_like(m.weight))
            count += 1
    return count
