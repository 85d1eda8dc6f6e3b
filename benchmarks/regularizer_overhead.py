"""What the TPP penalty costs per training step, against a plain step and the authors' original code.

The prune stage runs 10^5 penalised steps on CIFAR, so the penalty must be nearly free next to the
forward/backward (goal: a TPP step <= 1.05x a plain SGD step, ResNet56, batch 128, CPU). The
comparison point is a re-implementation of how the authors' code does it (github.com/MingSun-Tse/TPP,
`pruner/opp_pruner.py`, `orth_regularization_v5`): every step it walks all modules, rebuilds each
layer's gram target with a Python loop over the pruned filter indices, and applies the L2 term with a
dense per-layer [N, C] coefficient tensor. The script first checks that both give the same loss and
the same gradients, then times them.

Not included on the authors' side (so their cost is a lower bound): their penalty-factor update every
`update_reg_interval` steps, which also recomputes filter norms and magnitude ratios in Python.

    python -m benchmarks.regularizer_overhead [--quick]
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.nets import Pruned, pruned
from benchmarks.timing import interleaved, machine, parser, table
from tpp.pruning import PruneRegularizer
from tpp.train import sgd, train_epoch

PR = 0.9
FACTOR = 0.5  # a penalty factor in the middle of the growth (it only scales values, not the cost)
LW = 1000.0  # the authors' lw_opp
LR, MOMENTUM, WD = 1e-3, 0.9, 5e-4  # the regularisation stage's SGD


class AuthorsPenalty:
    """The authors' per-step penalty, restated: module walk, Python index loops, dense [N, C] coefficients."""

    def __init__(self, model: nn.Module, p: Pruned):
        self.model = model
        modules = dict(model.named_modules())
        self.pruned_wg = {n: torch.nonzero(m).flatten().tolist() for n, m in p.masks.items()}
        self.next_bn = {n: modules[f.bn] if f.bn else None for n, f in p.followers.items()}
        self.reg: dict[str, torch.Tensor] = {}
        for name in p.masks:
            shape = modules[name].weight.shape
            self.reg[name] = torch.zeros(shape[0], shape[1])

    def update_reg(self, factor: float) -> None:
        """`self.reg[name][pruned, :] = reg` (done every update_reg_interval steps; not timed)."""
        for name, _m in self.model.named_modules():
            if name in self.reg:
                self.reg[name][self.pruned_wg[name], :] = factor

    def loss(self, factor: float) -> torch.Tensor:
        """lw_opp * reg * sum of `orth_regularization_v5` over the pruned layers."""
        loss_opp: torch.Tensor | float = 0.0
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Conv2d | nn.Linear) and name in self.pruned_wg:
                w_ = module.weight.view(module.weight.size(0), -1)
                target_gram = torch.matmul(w_, w_.t()).detach()
                for x in self.pruned_wg[name]:
                    target_gram[x, :] = 0
                    target_gram[:, x] = 0
                loss_opp = loss_opp + F.mse_loss(torch.matmul(w_, w_.t()), target_gram, reduction="mean")
        return LW * factor * loss_opp

    @torch.no_grad()
    def apply_reg(self) -> None:
        """`_apply_reg`: grad += reg * w for weight, bias and the next BatchNorm's gamma/beta."""
        for name, m in self.model.named_modules():
            if name in self.reg:
                reg = self.reg[name]
                if reg.shape != m.weight.shape:
                    reg = reg.unsqueeze(2).unsqueeze(3)
                m.weight.grad += reg * m.weight
                col = reg[:, 0, 0, 0] if reg.dim() == 4 else reg[:, 0]
                if m.bias is not None:
                    m.bias.grad += col * m.bias
                bn = self.next_bn[name]
                if bn is not None:
                    bn.weight.grad += col * bn.weight
                    bn.bias.grad += col * bn.bias

    @torch.no_grad()
    def zero_out(self) -> None:
        """`_layerwise_zero_out` once every layer's turn has come (the stabilize phase)."""
        for name, module in self.model.named_modules():
            if name in self.pruned_wg:
                pruned_wg = self.pruned_wg[name]
                w = module.weight
                mask = torch.ones_like(w)
                mask[pruned_wg, ...] = 0
                w.data = w.data * mask
                bn = self.next_bn[name]
                if bn is not None:
                    bn.weight.data[pruned_wg] = 0
                    bn.bias.data[pruned_wg] = 0


def _ours(model: nn.Module, p: Pruned) -> PruneRegularizer:
    return PruneRegularizer(model, p.masks, p.followers, gram=True, bn=True, target="gram", lw=LW)


def check_same(p: Pruned) -> float:
    """Both penalties on the same weights: same loss, same gradients. Returns the max |grad diff|."""
    a, b = copy.deepcopy(p.model), copy.deepcopy(p.model)
    ours, theirs = _ours(a, p), AuthorsPenalty(b, p)
    theirs.update_reg(FACTOR)
    for m in (a, b):
        for q in m.parameters():
            q.grad = torch.zeros_like(q)
    la, lb = ours.loss(FACTOR), theirs.loss(FACTOR)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0.0)
    la.backward()
    lb.backward()
    ours.add_l2_grads(FACTOR)
    theirs.apply_reg()
    worst = 0.0
    for (name, qa), qb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, float((qa.grad - qb.grad).abs().max()))
    return worst


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            extra: Callable[[], torch.Tensor] | None = None, after_backward: Callable[[], None] | None = None,
            after_step: Callable[[], None] | None = None) -> Callable[[], None]:
    """One SGD step through the library's own training loop (tpp.train.train_epoch on one batch)."""
    opt = sgd(model, LR, MOMENTUM, WD)
    batch = ((x, y),)

    def step() -> None:
        train_epoch(model, batch, opt, x.device, None, extra, after_backward, after_step)

    return step


def flops(fn: Callable[[], object]) -> int:
    """FLOPs (matmuls/convolutions, forward and backward) that one call of `fn` performs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def repeat(fn: Callable[[], object], k: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(k):
            fn()

    return run


def measure(label: str, p: Pruned, batch: int, repeats: int, inner: int) -> list[dict[str, object]]:
    """Whole steps (growth and stabilize phase) and the penalty alone, ours vs the authors'."""
    torch.manual_seed(0)
    x = torch.randn(batch, *p.spec.input_shape)
    y = torch.randint(0, p.spec.num_classes, (batch,))
    worst = check_same(p)

    models = {k: copy.deepcopy(p.model) for k in ("plain", "ours", "theirs", "ours_z", "theirs_z")}
    ours, ours_z = _ours(models["ours"], p), _ours(models["ours_z"], p)
    ours_z.zero_all()
    theirs, theirs_z = AuthorsPenalty(models["theirs"], p), AuthorsPenalty(models["theirs_z"], p)
    for t in (theirs, theirs_z):
        t.update_reg(FACTOR)
    theirs_z.zero_out()
    steps = {
        "plain": step_fn(models["plain"], x, y),
        "ours": step_fn(models["ours"], x, y, lambda: ours.loss(FACTOR), lambda: ours.add_l2_grads(FACTOR),
                        ours.reapply_zeros),
        "theirs": step_fn(models["theirs"], x, y, lambda: theirs.loss(FACTOR), theirs.apply_reg),
        "ours_z": step_fn(models["ours_z"], x, y, lambda: ours_z.loss(FACTOR),
                          lambda: ours_z.add_l2_grads(FACTOR), ours_z.reapply_zeros),
        "theirs_z": step_fn(models["theirs_z"], x, y, lambda: theirs_z.loss(FACTOR), theirs_z.apply_reg,
                            theirs_z.zero_out),
    }
    med = interleaved({k: repeat(f, inner) for k, f in steps.items()}, repeats)
    t = {k: v / inner for k, v in med.items()}

    # The penalty alone: its loss, that loss's backward, the L2 gradients (grads kept allocated).
    pa, pb = copy.deepcopy(p.model), copy.deepcopy(p.model)
    for m in (pa, pb):
        for q in m.parameters():
            q.grad = torch.zeros_like(q)
    oa, ob = _ours(pa, p), AuthorsPenalty(pb, p)
    ob.update_reg(FACTOR)

    def pen_ours() -> None:
        oa.loss(FACTOR).backward()
        oa.add_l2_grads(FACTOR)

    def pen_theirs() -> None:
        ob.loss(FACTOR).backward()
        ob.apply_reg()

    pen = interleaved({"ours": repeat(pen_ours, inner * 4), "theirs": repeat(pen_theirs, inner * 4)}, repeats)
    pen = {k: v / (inner * 4) for k, v in pen.items()}
    # Machine-independent context: how much arithmetic the penalty adds to a step.
    flop_ratio = flops(pen_ours) / flops(step_fn(copy.deepcopy(p.model), x, y))
    base = {"model": label, "layers": len(p.masks), "max |Δgrad|": f"{worst:.1e}",
            "penalty FLOPs / step FLOPs": flop_ratio}
    ms = 1e3
    return [
        {**base, "phase": "growth", "plain step ms": t["plain"] * ms, "TPP step ms": t["ours"] * ms,
         "TPP / plain": t["ours"] / t["plain"], "authors step ms": t["theirs"] * ms,
         "step speed-up vs authors": t["theirs"] / t["ours"], "penalty ms (ours)": pen["ours"] * ms,
         "penalty ms (authors)": pen["theirs"] * ms, "penalty speed-up": pen["theirs"] / pen["ours"]},
        {**base, "phase": "stabilize (all zeroed)", "plain step ms": t["plain"] * ms,
         "TPP step ms": t["ours_z"] * ms, "TPP / plain": t["ours_z"] / t["plain"],
         "authors step ms": t["theirs_z"] * ms, "step speed-up vs authors": t["theirs_z"] / t["ours_z"],
         "penalty ms (ours)": "", "penalty ms (authors)": "", "penalty speed-up": ""},
    ]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if args.quick:
        cases = [("resnet56", (3, 32, 32), 8, 2, 1), ("mlp7_linear", (1, 8, 8), 64, 3, 5)]
    else:
        cases = [("resnet56", (3, 32, 32), 128, 15, 1), ("mlp7_linear", (1, 8, 8), 64, 31, 50)]
    rows = []
    for name, shape, batch, repeats, inner in cases:
        p = pruned(name, shape, 10, PR)
        rows += measure(f"{name} b{batch} PR {PR}", p, batch, repeats, inner)
    print(table(rows))
    print(f"\nmachine: {machine()}")
    print("goal: TPP / plain <= 1.05 for ResNet56 batch 128 (growth phase); equality checked: loss rtol 1e-5,"
          " grads rtol 1e-4" + (" (quick mode: sizes reduced, numbers not meaningful)" if args.quick else ""))


if __name__ == "__main__":
    main()
