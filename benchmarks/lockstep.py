"""Lockstep vs one by one: member-epochs per second for K finetune members, and K TPP prune stages.

Finetuning: for each model and K, the same K members (LRs spread over a decade) are finetuned for
`--epochs` epochs by `tpp.lockstep.finetune_lockstep` (one vectorised model) and by K calls of
`tpp.run.finetune_stage` (the plain path), interleaved, median of `--repeats`; both include the
per-epoch evaluation and the final Jacobian measurement each member gets in a study. Prune stage: K
TPP regularisation stages of one dense model (PRs and seeds differ, so masks and mini-batches do) by
`tpp.run.prune_stages` with lockstep forced on vs off (the call a study's prune unit makes). Also
printed: the achieved training GFLOP/s (3 x forward FLOPs x samples, `tpp.run.train_flops`) of each.
Models: the 7-layer linear MLP on digits, ResNet20 and ResNet56 on CIFAR-10 (the shared copy when
extracted under data/cifar10-jpeg, else synthetic images of the same shape: the cost is the same).

    python -m benchmarks.lockstep [--quick] [--ks 1,2,4,8,16] [--threads 1] [--models mlp7_linear,resnet20]
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.timing import interleaved, machine, parser, table

CIFAR = Path("data/cifar10-jpeg")
MODELS = {  # model: (data set, data kwargs, finetune batch size)
    "mlp7_linear": ("digits", {}, 64),
    "resnet20": ("cifar10", {"subset": 1000, "test_subset": 200}, 128),
    "resnet56": ("cifar10", {"subset": 500, "test_subset": 100}, 128),
}


def _data_args(name: str, kwargs: dict, quick: bool) -> dict:
    if name != "cifar10":
        return {"data": name, "data_kwargs": kwargs}
    n = 64 if quick else kwargs["subset"]
    if (CIFAR / "train").is_dir():
        return {"data": "cifar10", "data_root": str(CIFAR.absolute()),
                "data_kwargs": {"subset": n, "test_subset": max(n // 5, 10)}}
    return {"data": "synthetic", "data_kwargs": {"n_train": n, "n_test": max(n // 5, 10), "num_classes": 10,
                                                 "input_shape": [3, 32, 32]}}


def prune_case(model: str, ks: list[int], iterations: int, repeats: int,
               quick: bool) -> list[dict[str, object]]:
    from tpp.config import RunConfig
    from tpp.run import load_run_data, prune_stages, train_dense, train_flops

    data_name, kwargs, batch = MODELS[model]
    cfg = RunConfig(model=model, method="tpp", dense_epochs=0, reg_batch_size=batch, growth=1.0 / iterations,
                    update_reg_interval=1, stabilize_reg_interval=0, jsv_samples=8, device="cpu",
                    **_data_args(data_name, kwargs, quick))
    data = load_run_data(cfg)
    dense = train_dense(cfg, data)
    rows = []
    for k in ks:
        cfgs = [cfg.replace(pr=0.3 + 0.6 * i / max(k - 1, 1), seed=i % 2) for i in range(k)]

        t = interleaved({  # the study's prune units call this, forced on and off
            "lockstep": lambda cfgs=cfgs: prune_stages(cfgs, dense, data, lockstep=True),
            "one by one": lambda cfgs=cfgs: prune_stages(cfgs, dense, data, lockstep=False),
        }, repeats=repeats, warmup=1)
        rows.append(_row("prune (TPP)", model, cfg.data, k, "member-iterations/s", k * iterations, t,
                         train_flops(_flops(dense), iterations * batch) * k))
    return rows


def _row(stage: str, model: str, data: str, k: int, unit: str, work: float, t: dict[str, float],
         flops: float) -> dict[str, object]:
    """One table row: `work` (member-epochs or member-iterations) per second each way, and GFLOP/s."""
    return {"stage": stage, "model": model, "data": data, "K": k,
            f"{unit} lockstep": work / t["lockstep"], f"{unit} one by one": work / t["one by one"],
            "speed-up": t["one by one"] / t["lockstep"],
            "GFLOP/s lockstep": flops / t["lockstep"] / 1e9,
            "GFLOP/s one by one": flops / t["one by one"] / 1e9}


def _flops(dense) -> int:
    from tpp.metrics import count_flops

    return count_flops(dense.build(), dense.spec.input_shape)


def case(model: str, ks: list[int], epochs: int, repeats: int, quick: bool) -> list[dict[str, object]]:
    from tpp.config import RunConfig
    from tpp.lockstep import finetune_lockstep
    from tpp.run import finetune_stage, load_run_data, prune_stage, train_dense, train_flops

    data_name, kwargs, batch = MODELS[model]
    cfg = RunConfig(model=model, method="l1", pr=0.5, dense_epochs=0, epochs=epochs, batch_size=batch,
                    jsv_samples=8, device="cpu", **_data_args(data_name, kwargs, quick))
    data = load_run_data(cfg)
    pruned = prune_stage(cfg, train_dense(cfg, data), data)
    samples = epochs * data.num_train
    rows = []
    for k in ks:
        members = [cfg.replace(lr=10 ** (-3 + i / max(k - 1, 1))) for i in range(k)]
        t = interleaved({
            "lockstep": lambda members=members: finetune_lockstep(members, pruned, data),
            "one by one": lambda members=members: [finetune_stage(m, pruned, data) for m in members],
        }, repeats=repeats, warmup=1)
        rows.append(_row("finetune", model, cfg.data, k, "member-epochs/s", k * epochs, t,
                         train_flops(pruned.metrics["flops"], samples) * k))
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a study trial with cpus: 1 has 1)")
    p.add_argument("--prune-iterations", type=int, default=200, help="iterations of each TPP prune stage")
    p.add_argument("--stages", default="finetune,prune", help="which to measure")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ks = [1, 2] if args.quick else [int(k) for k in args.ks.split(",")]
    models = ["mlp7_linear"] if args.quick else args.models.split(",")
    epochs, repeats = (1, 1) if args.quick else (args.epochs, args.repeats)
    stages = args.stages.split(",")
    if "finetune" in stages:
        print(table([row for m in models for row in case(m, ks, epochs, repeats, args.quick)]))
    if "prune" in stages:
        iterations = 20 if args.quick else args.prune_iterations
        print(table([row for m in models for row in prune_case(m, ks, iterations, repeats, args.quick)]))
    print(f"\nepochs {epochs}, median of {repeats} interleaved repeats, cwd {os.getcwd()}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
