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
    The fixed cost per trial (MLflow run duration minus the trial's own compute time) is reported too,
    and, to say where the rest goes, the CPU seconds of the driver, the Ray workers and Ray's own
    processes, and a probe without Ray of what this machine gives two trials running at once.

    python -m benchmarks.study_overhead [--quick] [--config study/configs/quick.yaml] [--keep]
                                        [--set KEY=VALUE ...]   # e.g. --set checkpoint_every=30

`--quick` (smoke test): 2 trials, 1 epoch, large growth, and only the reuse-on study.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from ray import tune

from benchmarks.timing import machine, parser, table

CONFIG = "study/configs/quick.yaml"
QUICK = {"num_trials": 2, "set": {"finetune.epochs": 1, "dense.epochs": 1, "space.growth": [0.1, 0.2],
                                  "fixed.stabilize_reg_interval": 10}}


def _copy(overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy whose nested dicts are fresh too (load_config may consume them)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in overrides.items()}


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
    cpu0 = time.process_time()
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
    return {"trials_cpu_s": time.process_time() - cpu0, "dense_s": dense_s, "prune_reused_s": prune_done,
            "prune_all_s": prune_all, "finetune_s": finetune, "dense": dense}


def _probe_job(cfg_dict: dict[str, Any], dense: Any, barrier: Any, out: Any, reps: int) -> None:
    """One trial's work (prune stage + finetuning) in a fresh process with 1 thread: once to warm up,
    then `reps` times, each started together with the other processes at the barrier."""
    from tpp.config import RunConfig
    from tpp.run import finetune_stage, load_run_data, prune_stage

    torch.set_num_threads(1)
    rc = RunConfig.from_dict(cfg_dict)
    data = load_run_data(rc)

    def job() -> None:
        finetune_stage(rc, prune_stage(rc, dense, data), data, checkpoint_every=0)

    job()
    for _ in range(reps):
        barrier.wait()
        t0 = time.perf_counter()
        job()
        out.put(time.perf_counter() - t0)


def pair_efficiency(cfg: Any, dense: Any, reps: int = 3) -> tuple[float, float]:
    """(seconds of one trial alone, per-trial seconds when two run at once in two processes), no Ray,
    medians over `reps` runs each, alone and paired alternating twice.

    What two concurrent trials can get out of this machine at best; their ratio bounds what
    `max_concurrent: 2` can gain whatever runs the trials.
    """
    import multiprocessing as mp

    from study.space import design, run_config
    from tpp.methods import get_method

    points = design(cfg)
    reg = [p for p in points if get_method(p.method).regularize]
    point = max(reg, key=lambda p: p.growth or 0.0) if reg else points[0]  # the cheapest prune stage
    cfg_dict = run_config(cfg, point).to_dict()
    ctx = mp.get_context("spawn")
    times: dict[int, list[float]] = {1: [], 2: []}
    for k in (1, 2, 1, 2):
        barrier, out = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_probe_job, args=(cfg_dict, dense, barrier, out, reps)) for _ in range(k)]
        for proc in procs:
            proc.start()
        times[k] += [out.get() for _ in range(reps * k)]
        for proc in procs:
            proc.join()
    return statistics.median(times[1]), statistics.median(times[2])


def trial_stats(res: Any) -> dict[str, Any]:
    """From MLflow: per trial, run duration (driver's start -> end) and the trial's own compute
    (its prune stage if it ran one, its finetuning), plus the dense task's time and the trials' span."""
    from study.mlflow_logging import children, client

    busy, compute, starts, ends = [], [], [], []
    for run in children(res.tracking_uri, res.experiment_id, res.parent_run_id):
        m, tags = run.data.metrics, run.data.tags
        if run.info.end_time is None or "time_finetune_s" not in m:
            continue
        ran_prune = tags.get("tpp.reuse") != "reused"
        compute.append(m["time_finetune_s"] + (m.get("time_prune_s", 0.0) if ran_prune else 0.0))
        busy.append((run.info.end_time - run.info.start_time) / 1000)
        starts.append(run.info.start_time / 1000)
        ends.append(run.info.end_time / 1000)
    parent = client(res.tracking_uri).get_run(res.parent_run_id).data.metrics
    return {"busy_s": sum(busy), "compute_s": sum(compute), "span_s": max(ends) - min(starts),
            "fixed": [b - c for b, c in zip(busy, compute, strict=True)], "n": len(busy),
            "dense_s": parent.get("time_dense_s", float("nan"))}


class CpuTimes(tune.Callback):
    """CPU seconds used during the study by the driver, the Ray worker processes and Ray's own processes.

    CPU seconds, unlike wall time, do not depend on what else the machine runs: they split the study's
    cost into trial workers (the trials' compute plus whatever runs around it in the worker), the
    driver (Tune's loop, the MLflow and progress callbacks, Optuna; with an embedded Ray also the
    dense training) and Ray's own processes. Processes are sampled after every trial and at the end
    (a worker that exits keeps its last sample); the result is written to `path` as JSON.
    """

    def __init__(self, path: str):
        self.path = path
        cpu = psutil.Process().cpu_times()
        self.driver_start = cpu.user + cpu.system  # the driver's CPU before this study
        self.seen: dict[int, tuple[str, float]] = {}

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                cpu = proc.cpu_times()
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if proc.pid == me.pid:
                kind = "driver"
            elif (cmd.startswith("ray::") and "PruneCacheActor" not in cmd
                  or self.seen.get(proc.pid, ("",))[0] == "workers"):  # an idle worker was a trial's
                kind = "workers"
            else:
                kind = "ray_system"
            self.seen[proc.pid] = (kind, cpu.user + cpu.system)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._sample()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._sample()
        parts = {"driver": -self.driver_start, "workers": 0.0, "ray_system": 0.0}
        for kind, used in self.seen.values():
            parts[kind] += used
        Path(self.path).write_text(json.dumps(parts))


def run_study(raw: dict[str, Any], storage: str, name: str, reuse: bool,
              overrides: dict[str, Any]) -> tuple[Any, float, dict[str, Any]]:
    import study

    cpu_file = os.path.join(storage, f"{name}.cpu.json")
    t0 = time.perf_counter()
    res = study.run(raw, storage=storage, if_exists="replace", name=name, prune_reuse=reuse,
                    callbacks=[CpuTimes(cpu_file)], **overrides)
    total = time.perf_counter() - t0
    stats = trial_stats(res)
    stats["cpu"] = json.loads(Path(cpu_file).read_text())
    return res, total, stats


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--keep", action="store_true", help="keep the studies' folder (printed) for inspection")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both studies and the in-process run, e.g. checkpoint_every=30")
    args = p.parse_args()
    import yaml

    from study.config import load_config

    # Read once: every study and the in-process run use the same config even if the file changes meanwhile.
    raw = yaml.safe_load(Path(args.config).read_text())
    overrides = _copy(QUICK if args.quick else {})
    for item in args.set:
        key, _, value = item.partition("=")
        overrides.setdefault("set", {})[key] = yaml.safe_load(value)
    cfg = load_config(raw, **_copy(overrides))
    storage = tempfile.mkdtemp(prefix="tpp-study-bench-")
    # quick: the reuse-on study only (two studies do not fit the smoke budget); full: both
    modes = (True,) if args.quick else (True, False)
    try:
        results = {reuse: run_study(raw, storage, f"bench-reuse-{'on' if reuse else 'off'}", reuse, overrides)
                   for reuse in modes}
        t = serial(cfg)
        alone, paired = (float("nan"), float("nan")) if args.quick else pair_efficiency(cfg, t["dense"])
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
        res, total, _ = results[reuse]
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

    res, total, st = results[True]
    rows_b = [
        {"quantity": "in-process: dense training s", "value": t["dense_s"]},
        {"quantity": "in-process: prune stages s (with reuse)", "value": t["prune_reused_s"]},
        {"quantity": "in-process: finetuning s (all trials)", "value": t["finetune_s"]},
        {"quantity": f"ideal wall s = dense + trials / {par}", "value": ideal_on},
        {"quantity": "study wall s (StudyResult.wall_s: dense model + Tune)", "value": res.wall_s},
        {"quantity": "study.run() s (incl. Ray start, MLflow set-up, shutdown)", "value": total},
        {"quantity": "overhead: study wall / ideal (goal <= 1.25)", "value": res.wall_s / ideal_on},
        {"quantity": "overhead: study.run() / ideal", "value": total / ideal_on},
        {"quantity": "in study: dense training s (time_dense_s)", "value": st["dense_s"]},
        {"quantity": "in study: trials' own compute s (sum of time_prune_s run + time_finetune_s)",
         "value": st["compute_s"]},
        {"quantity": "in study / in-process compute (same work inside Ray trials)",
         "value": st["compute_s"] / (t["prune_reused_s"] + t["finetune_s"])},
        {"quantity": "in study: trial runs s (sum of MLflow run durations)", "value": st["busy_s"]},
        {"quantity": f"slot occupancy: run durations / ({par} x first start -> last end)",
         "value": st["busy_s"] / (par * st["span_s"])},
        {"quantity": "fixed cost per trial s, median (MLflow run duration - compute)",
         "value": statistics.median(st["fixed"]) if st["fixed"] else float("nan")},
        {"quantity": "fixed cost per trial s, amortised ((wall - ideal) x concurrency / trials)",
         "value": (res.wall_s - ideal_on) * par / res.num_trials},
        {"quantity": "CPU s: in-process trials (the same work, no Ray)", "value": t["trials_cpu_s"]},
        {"quantity": "CPU s: Ray worker processes (trials, worker start-up; a cluster's dense task)",
         "value": st["cpu"]["workers"]},
        {"quantity": "CPU s: driver (embedded: dense training; Tune loop, MLflow/progress callbacks, Optuna)",
         "value": st["cpu"]["driver"]},
        {"quantity": "CPU s: Ray system processes (raylet, GCS, agents, prune-cache actor)",
         "value": st["cpu"]["ray_system"]},
        {"quantity": f"CPU s available in the study wall time ({os.cpu_count()} cores)",
         "value": (os.cpu_count() or 1) * res.wall_s},
        {"quantity": "no Ray: one trial alone s / per trial with two at once in two processes s",
         "value": f"{alone:.3g} / {paired:.3g}" + (" (not run in quick mode)" if args.quick else "")},
        {"quantity": f"ideal wall s on this machine = dense + trials / {par} x (paired / alone)",
         "value": t["dense_s"] + (ideal_on - t["dense_s"]) * paired / alone},
        {"quantity": "overhead vs that: study wall / ideal on this machine",
         "value": res.wall_s / (t["dense_s"] + (ideal_on - t["dense_s"]) * paired / alone)},
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
