"""The penalties as pure functions against plain float64 loops: kernel orthogonality (KernOrth),
orthogonal convolution (OrthConv), the approximate-isometry objective, the batched gram term; values
and gradients, and on stacked (vmapped) weights."""

import itertools

import pytest
import torch
from torch import nn
from torch.func import vmap

from tpp.pruning.penalties import (
    approximate_isometry,
    gram_penalty,
    gram_target,
    isometry_gap,
    kernel_orthogonality,
    kernorth_loss,
    orth_conv,
    orthconv_loss,
)


def kernorth_by_loops(w: torch.Tensor) -> torch.Tensor:
    """‖G − I‖_F with G the gram of the flattened kernel's smaller side, entry by entry."""
    rows = w.reshape(w.shape[0], -1)
    vecs = rows if rows.shape[0] <= rows.shape[1] else rows.t()
    total = torch.zeros((), dtype=w.dtype)
    for i, j in itertools.product(range(len(vecs)), repeat=2):
        total = total + (torch.dot(vecs[i], vecs[j]) - (1.0 if i == j else 0.0)) ** 2
    return total.sqrt()


def authors_orth_dist(mat: torch.Tensor) -> torch.Tensor:
    """The TPP authors' `orth_dist` (pruner/reinit_model.py), for comparison."""
    mat = mat.reshape(mat.shape[0], -1)
    if mat.shape[0] < mat.shape[1]:
        mat = mat.permute(1, 0)
    return torch.norm(mat.t() @ mat - torch.eye(mat.shape[1], dtype=mat.dtype))


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (20, 2, 1, 1), (5, 9)])  # wide conv, tall 1x1, linear
def test_kernel_orthogonality_equals_loops_and_the_authors_orth_dist(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours, ref = kernel_orthogonality(w), kernorth_by_loops(w)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, authors_orth_dist(w))
    torch.testing.assert_close(torch.autograd.grad(ours, w)[0], torch.autograd.grad(ref, w)[0])


def orth_conv_by_loops(k: torch.Tensor, stride: int) -> torch.Tensor:
    """‖Conv(K, K) − I_δ‖_F from the definition: every pair of filters correlated at every shift
    (a multiple of the stride, within the overlap) by explicit sums; identity at zero shift."""
    o, c, kh, kw = k.shape
    reach_h, reach_w = (kh - 1) // stride * stride, (kw - 1) // stride * stride
    total = torch.zeros((), dtype=k.dtype)
    for i, j in itertools.product(range(o), repeat=2):
        for dy in range(-reach_h, reach_h + 1, stride):
            for dx in range(-reach_w, reach_w + 1, stride):
                s = torch.zeros((), dtype=k.dtype)
                for ch, u, v in itertools.product(range(c), range(kh), range(kw)):
                    if 0 <= u + dy < kh and 0 <= v + dx < kw:
                        s = s + k[i, ch, u + dy, v + dx] * k[j, ch, u, v]
                target = 1.0 if (i == j and dy == 0 and dx == 0) else 0.0
                total = total + (s - target) ** 2
    return total.sqrt()


@pytest.mark.parametrize("stride", [1, 2])
def test_orth_conv_equals_the_definition_by_loops(stride):
    torch.manual_seed(0)
    k = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ours, ref = orth_conv(k, stride), orth_conv_by_loops(k, stride)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, k)[0], torch.autograd.grad(ref, k)[0])


@pytest.mark.parametrize("stride", [1, 2])
def test_a_delta_orthogonal_kernel_is_an_orthogonal_convolution(stride):
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    k = torch.zeros(4, 5, 3, 3, dtype=torch.float64)
    k[:, :, 1, 1] = q[:4]  # orthonormal rows at the centre, zero elsewhere
    assert orth_conv(k, stride).item() == pytest.approx(0.0, abs=1e-12)
    assert orth_conv(torch.randn_like(k), stride).item() > 1.0


def test_the_penalties_work_on_stacked_weights():
    torch.manual_seed(0)
    stacked = torch.randn(3, 4, 2, 3, 3)  # K = 3 models' weights of one layer
    torch.testing.assert_close(vmap(kernel_orthogonality)(stacked),
                               torch.stack([kernel_orthogonality(w) for w in stacked]))
    torch.testing.assert_close(vmap(lambda w: orth_conv(w, 1))(stacked),
                               torch.stack([orth_conv(w, 1) for w in stacked]))
    keep = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]])
    for target in ("gram", "identity"):
        rows = stacked.flatten(2)
        batched = gram_penalty(rows, gram_target(keep, target), target)
        single = torch.stack([gram_penalty(r, gram_target(k, target), target)
                              for r, k in zip(rows, keep, strict=True)])
        torch.testing.assert_close(batched, single)


def test_model_losses_pick_the_layers_as_the_authors_do():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 6, 1),
                          nn.Conv2d(6, 6, 3, stride=2), nn.Flatten(), nn.Linear(6, 2))
    c0, _, c2, c3, _, fc = model
    # KernOrth: every Conv/Linear (the grouped conv aside); OrthConv: all but the first, OrthConv on k x k
    kern = sum(kernel_orthogonality(m.weight) for m in (c0, c2, c3, fc))
    torch.testing.assert_close(kernorth_loss(model), kern)
    conv = kernel_orthogonality(c2.weight) + orth_conv(c3.weight, 2) + kernel_orthogonality(fc.weight)
    torch.testing.assert_close(orthconv_loss(model), conv)


def test_approximate_isometry_reaches_an_orthonormal_smaller_side():
    torch.manual_seed(0)
    for shape in [(6, 10), (12, 4, 1, 1)]:
        w = torch.randn(*shape) * 0.3
        out = approximate_isometry(w, iters=400, lr=0.02)
        assert out.shape == w.shape and isometry_gap(out).item() < 1e-3 < isometry_gap(w).item()
        rows = out.reshape(shape[0], -1)
        gram = rows @ rows.t() if rows.shape[0] <= rows.shape[1] else rows.t() @ rows
        torch.testing.assert_close(gram, torch.eye(len(gram)), atol=0.1, rtol=0)
    gap = isometry_gap(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert gap.item() == pytest.approx((3.0**2) / 4)  # (4 - 1)² over 4 entries
