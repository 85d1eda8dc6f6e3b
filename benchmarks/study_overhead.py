"""What the study machinery costs and saves: prune-stage reuse, and Ray/MLflow orchestration overhead.

(a) Prune-stage reuse. The regularisation stage does not depend on the finetuning LR, so trials that
    share (method, pr, growth, seed) can share one pruned model. The shipped quick study is run with
    `prune_reuse` on and off: wall time, regularisation stages actually run (MLflow tag
    `tpp.reuse` = computed, via `StudyResult.reuse`) vs the distinct (method, pr, growth, seed)
    combinations among regularising trials, and the wall-time ratio those counts predict.
(b) Orchestration overhead. The same trials run back to back in this process with the bare library
    (study.space.design / run_config, tpp.run.train_dense / prune_stage / finetune_stage, prune
    stages reused by tpp.run.prune_key): dense time + trial time / max_concurrent is what a perfect
    scheduler with no Ray, Tune, Optuna or MLflow would take. Goal: study wall time <= 1.25x that.
    Each in-process trial runs with 1 torch thread, as a study trial with `resources.cpus: 1` does
    (Ray sets OMP_NUM_THREADS to the trial's CPUs); the dense model with all of them, as in a study.
    The fixed cost per trial (MLflow run duration minus the trial's own compute time) is reported too.

    python -m benchmarks.study_overhead [--quick] [--config study/configs/quick.yaml] [--keep]

`--quick` (smoke test): 4 trials, 1 epoch, large growth, and only the reuse-on study.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import machine, parser, table

CONFIG = "study/configs/quick.yaml"
QUICK = {"num_trials": 4, "set": {"finetune.epochs": 1, "dense.epochs": 1, "space.growth": [0.1, 0.2],
                                  "fixed.stabilize_reg_interval": 10}}


def prune_combos(cfg: Any) -> tuple[int, int]:
    """(regularising trials, distinct (method, pr, growth, seed) among them) of the study's design."""
    from study.space import design
    from tpp.methods import get_method

    points = [p for p in design(cfg) if get_method(p.method).regularize]
    return len(points), len({(p.method, p.pr, p.growth, p.seed) for p in points})


def serial(cfg: Any) -> dict[str, Any]:
    """The study's trials back to back in this process, no Ray/MLflow; stage times per trial."""
    from study.space import TrialPoint, design, run_config
    from tpp.methods import get_method
    from tpp.run import finetune_stage, load_run_data, prune_key, prune_stage, train_dense

    threads = torch.get_num_threads()
    first = run_config(cfg, TrialPoint(cfg.methods[0], 0.5, 0.01, None, cfg.dense.seed))
    data = load_run_data(first)
    t0 = time.perf_counter()
    dense = train_dense(first, data)
    dense_s = time.perf_counter() - t0
    torch.set_num_threads(int(cfg.resources.cpus))
    cache: dict[str, tuple[Any, float]] = {}
    prune_all = prune_done = finetune = 0.0
    try:
        for point in design(cfg):
            rc = run_config(cfg, point)
            t0 = time.perf_counter()
            if get_method(rc.method).regularize:
                key = prune_key(rc, dense)
                if key not in cache:
                    pruned = prune_stage(rc, dense, data)
                    cache[key] = (pruned, time.perf_counter() - t0)
                    prune_done += cache[key][1]
                pruned, cost = cache[key]
                prune_all += cost  # what this trial would cost without reuse
            else:
                pruned = prune_stage(rc, dense, data)
                cost = time.perf_counter() - t0
                prune_all += cost
                prune_done += cost
            t0 = time.perf_counter()
            finetune_stage(rc, pruned, data, checkpoint_every=0)
            finetune += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"dense_s": dense_s, "prune_reused_s": prune_done, "prune_all_s": prune_all,
            "finetune_s": finetune}


def trial_fixed_costs(res: Any) -> list[float]:
    """Per trial: MLflow run duration minus the trial's own compute (prune stage if it ran it, finetune)."""
    from study.mlflow_logging import children

    out = []
    for run in children(res.tracking_uri, res.experiment_id, res.parent_run_id):
        m, tags = run.data.metrics, run.data.tags
        if run.info.end_time is None or "time_finetune_s" not in m:
            continue
        ran_prune = tags.get("tpp.reuse") != "reused"
        compute = m["time_finetune_s"] + (m.get("time_prune_s", 0.0) if ran_prune else 0.0)
        out.append((run.info.end_time - run.info.start_time) / 1000 - compute)
    return out


def run_study(raw: dict[str, Any], storage: str, name: str, reuse: bool,
              overrides: dict[str, Any]) -> tuple[Any, float]:
    import study

    t0 = time.perf_counter()
    res = study.run(raw, storage=storage, if_exists="replace", name=name, prune_reuse=reuse, **overrides)
    return res, time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--keep", action="store_true", help="keep the studies' folder (printed) for inspection")
    args = p.parse_args()
    import yaml

    from study.config import load_config

    # Read once: every study and the in-process run use the same config even if the file changes meanwhile.
    raw = yaml.safe_load(Path(args.config).read_text())
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    cfg = load_config(raw, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in overrides.items()})
    storage = tempfile.mkdtemp(prefix="tpp-study-bench-")
    # quick: the reuse-on study only (two studies do not fit the smoke budget); full: both
    modes = (True,) if args.quick else (True, False)
    try:
        results = {reuse: run_study(raw, storage, f"bench-reuse-{'on' if reuse else 'off'}", reuse, overrides)
                   for reuse in modes}
        t = serial(cfg)
    finally:
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    n_reg, distinct = prune_combos(cfg)
    par = cfg.max_concurrent or 1
    ideal_on = t["dense_s"] + (t["prune_reused_s"] + t["finetune_s"]) / par
    ideal_off = t["dense_s"] + (t["prune_all_s"] + t["finetune_s"]) / par

    rows_a = []
    for reuse in (True, False):
        row: dict[str, object] = {"prune_reuse": "on" if reuse else "off", "regularising trials": n_reg,
                                  "distinct (method, pr, growth, seed)": distinct}
        if reuse not in results:
            rows_a.append({**row, "trials": "not run (quick mode)"})
            continue
        res, total = results[reuse]
        rows_a.append({**row, "trials": res.num_trials, "status": dict(res.counts),
                       "stages computed (tpp.reuse)": res.reuse.get("computed", 0),
                       "stages reused": res.reuse.get("reused", 0), "study wall s": res.wall_s,
                       "study.run() s": total})
    if len(results) == 2:
        on, off = results[True][0], results[False][0]
        rows_a.append({"prune_reuse": "on / off", "stages computed (tpp.reuse)":
                       f"{on.reuse.get('computed', 0)} / {off.reuse.get('computed', 0)}",
                       "study wall s": on.wall_s / off.wall_s,
                       "study.run() s": results[True][1] / results[False][1]})
    rows_a.append({"prune_reuse": "predicted on / off (stage counts x in-process stage times)",
                   "study wall s": ideal_on / ideal_off})
    keys = list(dict.fromkeys(k for r in rows_a for k in r))
    rows_a = [{k: r.get(k, "") for k in keys} for r in rows_a]

    res, total = results[True]
    fixed = trial_fixed_costs(res)
    rows_b = [
        {"quantity": "in-process: dense training s", "value": t["dense_s"]},
        {"quantity": "in-process: prune stages s (with reuse)", "value": t["prune_reused_s"]},
        {"quantity": "in-process: finetuning s (all trials)", "value": t["finetune_s"]},
        {"quantity": f"ideal wall s = dense + trials / {par}", "value": ideal_on},
        {"quantity": "study wall s (StudyResult.wall_s: dense task + Tune)", "value": res.wall_s},
        {"quantity": "study.run() s (incl. Ray start, MLflow set-up, shutdown)", "value": total},
        {"quantity": "overhead: study wall / ideal (goal <= 1.25)", "value": res.wall_s / ideal_on},
        {"quantity": "overhead: study.run() / ideal", "value": total / ideal_on},
        {"quantity": "fixed cost per trial s, median (MLflow run time - compute)",
         "value": statistics.median(fixed) if fixed else float("nan")},
        {"quantity": "fixed cost per trial s, amortised ((wall - ideal) x concurrency / trials)",
         "value": (res.wall_s - ideal_on) * par / res.num_trials},
    ]
    print(table(rows_a))
    print()
    print(table(rows_b))
    where = storage if args.keep else "deleted"
    print(f"\nconfig: {args.config} overrides {overrides or 'none'}: {cfg.trials} trials, "
          f"methods {cfg.methods}, pr {cfg.space.pr}, growth {cfg.space.growth}, dense {cfg.dense.epochs} / "
          f"finetune {cfg.finetune.epochs} epochs, max_concurrent {par}; study folders {where}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
