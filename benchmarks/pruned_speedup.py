"""How much faster a physically pruned network really is: FLOPs ratio vs measured CPU latency ratio.

Studies report the FLOPs speed-up (`speedup` metric); this shows what it buys in wall time on a CPU,
at a throughput batch (128) and a latency batch (1), for the paper's settings: ResNet56 / CIFAR-10
(only each block's conv1 is pruned) and VGG19 / CIFAR-100 (every conv but the first). Models are
pruned exactly as a run prunes them (select_l1 + find_followers + remove_pruned) and timed in eval
mode under torch.inference_mode, dense and pruned interleaved.

Correctness anchor: the paper's ResNet56 FLOPs speed-ups and sparsities (TPP.md); the script
asserts ours are within 3 % of them. (Our FLOPs are convolutions + matmuls only, torch's
flop_counter; the paper's count evidently includes a little more: the gap grows with PR the way a
constant extra 0.16 % of the dense FLOPs makes it, which reproduces both 11.41x and 19.31x.)

    python -m benchmarks.pruned_speedup [--quick]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.nets import pruned
from benchmarks.timing import interleaved, machine, parser, table
from tpp.metrics import count_flops, count_params

# The paper's ResNet56 numbers: PR -> (FLOPs speed-up, sparsity %).
PAPER_RESNET56 = {0.5: (1.99, 49.82), 0.7: (3.59, 70.57), 0.9: (11.41, 90.39), 0.95: (19.31, 95.19)}
SETTINGS = {"resnet56": (10, (0.5, 0.7, 0.9, 0.95)), "vgg19": (100, (0.5, 0.9))}
SHAPE = (3, 32, 32)


def forward(model: nn.Module, x: torch.Tensor, inner: int) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            for _ in range(inner):
                model(x)

    return run


def measure(name: str, prs: tuple[float, ...], classes: int,
            batches: dict[int, tuple[int, int]]) -> list[dict]:
    """One row per PR; `batches` maps batch size -> (repeats, calls per timing)."""
    models: dict[str, nn.Module] = {}
    for pr in prs:
        p = pruned(name, SHAPE, classes, pr)
        models.setdefault("dense", p.model)
        models[f"{pr:g}"] = p.removed()
    params = {k: count_params(m) for k, m in models.items()}
    flops = {k: count_flops(m, SHAPE) for k, m in models.items()}
    latency: dict[int, dict[str, float]] = {}
    for batch, (repeats, inner) in batches.items():
        x = torch.randn(batch, *SHAPE)
        med = interleaved({k: forward(m, x, inner) for k, m in models.items()}, repeats)
        latency[batch] = {k: v / inner for k, v in med.items()}
    rows = []
    for pr in prs:
        k = f"{pr:g}"
        row: dict[str, object] = {
            "model": name, "PR": k, "params (M)": params[k] / 1e6, "param ratio": params["dense"] / params[k],
            "sparsity %": 100 * (1 - params[k] / params["dense"]), "FLOPs (M)": flops[k] / 1e6,
            "FLOPs ratio": flops["dense"] / flops[k]}
        for batch in batches:
            row[f"b{batch} dense ms"] = latency[batch]["dense"] * 1e3
            row[f"b{batch} pruned ms"] = latency[batch][k] * 1e3
            row[f"b{batch} latency ratio"] = latency[batch]["dense"] / latency[batch][k]
        if name == "resnet56" and pr in PAPER_RESNET56:
            speed, sparsity = PAPER_RESNET56[pr]
            row["paper FLOPs ratio / sparsity"] = f"{speed} / {sparsity}"
            assert abs(row["FLOPs ratio"] / speed - 1) < 0.03, (pr, row["FLOPs ratio"], speed)
            assert abs(row["sparsity %"] / sparsity - 1) < 0.03, (pr, row["sparsity %"], sparsity)
        else:
            row["paper FLOPs ratio / sparsity"] = "-"
        rows.append(row)
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    batches = {128: (2, 1), 1: (3, 2)} if args.quick else {128: (9, 1), 1: (15, 20)}
    settings = {"resnet56": (10, (0.5, 0.9))} if args.quick else SETTINGS
    rows = []
    for name, (classes, prs) in settings.items():
        rows += measure(name, prs, classes, batches)
    print(table(rows))
    print(f"\nmachine: {machine()}")
    print("latency ratio = dense time / pruned time (eval, torch.inference_mode, median of interleaved runs)")


if __name__ == "__main__":
    main()
