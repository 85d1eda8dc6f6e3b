"""The cost of the trainability metric: vectorised Jacobian singular values vs explicit backward loops.

Every trial measures the JSV at least three times (dense, after removal, end of finetuning), so its
cost is paid across a whole study. `tpp.metrics.jacobian_singular_values` has two exact strategies:
`vmap` (torch.func: vmap over samples of jacrev over the logits) and `per_class` (one batched backward
per class); `auto` picks per_class for conv nets on CPU, vmap otherwise. Both are timed, and two loops
are the comparison points, all in eval mode (BatchNorm on running statistics, so samples are
independent):

* per sample, per class: `torch.autograd.grad(logits[c], x)` for each of the N x C pairs;
* per class, batched: one backward per class over the whole batch (how the authors' code does it:
  `compute_jacobian` in their smilelogging utilities).

The script asserts all four give the same singular values (rtol 1e-4) before timing them.

    python -m benchmarks.jsv_cost [--quick]
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.nets import build
from benchmarks.timing import interleaved, machine, parser, table
from tpp.metrics import jacobian as jacobian_module
from tpp.metrics import jacobian_singular_values


def per_sample_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, min(C, D)] singular values, one autograd.grad per (sample, class)."""
    model.eval()
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = model(xi)[0]
        rows = [torch.autograd.grad(logits[c], xi, retain_graph=True)[0].flatten()
                for c in range(logits.shape[0])]
        out.append(torch.linalg.svdvals(torch.stack(rows)))
    return torch.stack(out)


def per_class_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, min(C, D)] singular values, one backward per class over the whole batch."""
    model.eval()
    xb = x.clone().requires_grad_(True)
    logits = model(xb)
    rows = [torch.autograd.grad(logits[:, c].sum(), xb, retain_graph=True)[0].flatten(1)
            for c in range(logits.shape[1])]
    return torch.linalg.svdvals(torch.stack(rows, dim=1))


def measure(name: str, shape: tuple[int, ...], n: int, repeats: int) -> dict[str, object]:
    _, model = build(name, shape, 10)
    torch.manual_seed(1)
    x = torch.randn(n, *shape)
    ref = jacobian_singular_values(model, x, strategy="vmap")
    for other in (jacobian_singular_values(model, x, strategy="per_class"), per_sample_loop(model, x),
                  per_class_loop(model, x)):
        torch.testing.assert_close(other, ref, rtol=1e-4, atol=1e-4 * float(ref.max()))
    t = interleaved({"vmap": lambda: jacobian_singular_values(model, x, strategy="vmap"),
                     "per_class": lambda: jacobian_singular_values(model, x, strategy="per_class"),
                     "per-sample loop": lambda: per_sample_loop(model, x),
                     "per-class loop": lambda: per_class_loop(model, x)}, repeats)
    auto = jacobian_module.choose_strategy(model, x.device, "auto")
    return {"model": name, "input": "x".join(map(str, shape)), "samples": n, "classes": 10,
            "tpp vmap ms": t["vmap"] * 1e3, "tpp per_class ms": t["per_class"] * 1e3, "auto picks": auto,
            "per-sample×class loop ms": t["per-sample loop"] * 1e3,
            "authors' per-class loop ms": t["per-class loop"] * 1e3,
            "auto: speed-up vs per-sample loop": t["per-sample loop"] / t[auto],
            "auto: speed-up vs authors' loop": t["per-class loop"] / t[auto],
            "equal (rtol 1e-4)": "yes"}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cases = [("resnet20", (3, 32, 32), 4 if args.quick else 16),
             ("mlp7_linear", (1, 8, 8), 16 if args.quick else 64)]
    repeats = 2 if args.quick else 9
    rows = [measure(name, shape, n, repeats) for name, shape, n in cases]
    print(table(rows))
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
