"""What the study machinery costs: Ray, Tune and MLflow orchestration overhead on a real study.

The study's work is run twice: as a study (Ray Tune trials, MLflow logging, the prune cache), and back
to back in this process with the bare library (study.design's points and members, tpp.run.train_dense
/ prune_stage / run_pipeline with the pruned model given), each prune stage once. dense time +
(prune stages + finetuning) / max_concurrent is what a perfect scheduler with no Ray, Tune or MLflow
would take. Goal (issue "study v2"): study wall time <= 1.15x that, median of three runs. Each
in-process stage runs with 1 torch thread, as a study trial with `resources.cpus: 1` does (Ray sets
OMP_NUM_THREADS to the trial's CPUs); the dense model with all of them, as in an embedded study.
To say where the rest goes: the CPU seconds of the driver, the Ray workers and Ray's own processes,
and a probe without Ray of what this machine gives two trials running at once.

    python -m benchmarks.study_overhead [--quick] [--config study/configs/quick.yaml] [--keep]
                                        [--repeats 3] [--set KEY=VALUE ...]

`--quick` (smoke test): 1 seed, 1 PR, 2 LRs, 1 epoch, large growth, one study run, no probe.
"""

from __future__ import annotations

import json
import math
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
QUICK = {"set": {"finetune.epochs": 1, "finetune.lr": [1e-3, 1e-2], "dense.epochs": 1, "space.pr": [0.5],
                 "space.seeds": [0], "space.growth": [0.2], "fixed.stabilize_reg_interval": 10}}


def _copy(overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy whose nested dicts are fresh too (load_config may consume them)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in overrides.items()}


def serial(cfg: Any) -> dict[str, Any]:
    """The study's work back to back in this process, no Ray/MLflow: each prune stage once, then its
    members one after another (what the study's trials do)."""
    from study.design import dense_run_config, members, plan, points, run_config
    from tpp.run import load_run_data, prune_stages, run_pipeline, train_dense

    threads = torch.get_num_threads()
    first = dense_run_config(cfg)
    data = load_run_data(first)
    t0 = time.perf_counter()
    dense = train_dense(first, data)
    dense_s = time.perf_counter() - t0
    torch.set_num_threads(int(cfg.resources.cpus))
    cpu0 = time.process_time()
    try:
        pts, first_member = points(cfg), members(cfg)[0]
        pruned: dict[int, Any] = {}
        t0 = time.perf_counter()
        for unit in plan(cfg, cfg.max_concurrent or 1).units:  # the study's prune units, as it runs them
            if unit.kind == "prune":
                cfgs = [run_config(cfg, pts[i], first_member) for i in unit.points]
                pruned.update(zip(unit.points, prune_stages(cfgs, dense, data, cfg.lockstep), strict=True))
        prune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, point in enumerate(pts):  # then every point's members; methods without a penalty prune here
            configs = [run_config(cfg, point, m) for m in members(cfg)]
            run_pipeline(configs, dense=dense, pruned=pruned.get(i), data=data, checkpoint_every=0,
                         lockstep=cfg.lockstep)
        finetune_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"trials_cpu_s": time.process_time() - cpu0, "dense_s": dense_s, "prune_s": prune_s,
            "finetune_s": finetune_s, "dense": dense}


def _probe_job(cfg_dict: dict[str, Any], dense: Any, barrier: Any, out: Any, reps: int) -> None:
    """One member's work (prune stage + finetuning) in a fresh process with 1 thread: once to warm up,
    then `reps` times, each started together with the other processes at the barrier."""
    from tpp.config import RunConfig
    from tpp.run import load_run_data, run_pipeline

    torch.set_num_threads(1)
    rc = RunConfig.from_dict(cfg_dict)
    data = load_run_data(rc)

    def job() -> None:
        run_pipeline(rc, dense=dense, data=data, checkpoint_every=0)

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

    from study.design import members, points, run_config

    pts = points(cfg)
    reg = [p for p in pts if p.growth is not None]
    point = max(reg, key=lambda p: p.growth or 0.0) if reg else pts[0]  # the cheapest prune stage
    cfg_dict = run_config(cfg, point, members(cfg)[0]).to_dict()
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
            elif cmd.startswith("ray::") or self.seen.get(proc.pid, ("",))[0] == "workers":
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


def run_study(raw: dict[str, Any], storage: str, name: str,
              overrides: dict[str, Any]) -> tuple[Any, float, dict[str, Any]]:
    import study

    cpu_file = os.path.join(storage, f"{name}.cpu.json")
    t0 = time.perf_counter()
    res = study.run(raw, storage=storage, if_exists="replace", name=name, callbacks=[CpuTimes(cpu_file)],
                    **_copy(overrides))
    total = time.perf_counter() - t0
    return res, total, {"cpu": json.loads(Path(cpu_file).read_text())}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--repeats", type=int, default=3, help="study runs (the overhead is their median)")
    p.add_argument("--keep", action="store_true", help="keep the studies' folder (printed) for inspection")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the studies and the in-process run, e.g. lockstep=false")
    args = p.parse_args()
    import yaml

    from study.design import plan
    from study.loading import load_config

    # Read once: every study and the in-process run use the same config even if the file changes meanwhile.
    raw = yaml.safe_load(Path(args.config).read_text())
    overrides = _copy(QUICK if args.quick else {})
    for item in args.set:
        key, _, value = item.partition("=")
        overrides.setdefault("set", {})[key] = yaml.safe_load(value)
    cfg = load_config(raw, **_copy(overrides))
    storage = tempfile.mkdtemp(prefix="tpp-study-bench-")
    repeats = 1 if args.quick else args.repeats
    try:
        studies, serials = [], []
        for i in range(repeats):  # interleaved: study, in-process, study, in-process, ...
            studies.append(run_study(raw, storage, f"bench-{i}", overrides))
            serials.append(serial(cfg))
        alone, paired = (math.nan, math.nan) if args.quick else pair_efficiency(cfg, serials[0]["dense"])
    finally:
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    par = cfg.max_concurrent or 1
    rows, ratios = [], []
    for (res, total, st), t in zip(studies, serials, strict=True):
        ideal = t["dense_s"] + (t["prune_s"] + t["finetune_s"]) / par
        machine_ideal = t["dense_s"] + (ideal - t["dense_s"]) * paired / alone
        ratios.append(res.wall_s / ideal)
        rows.append({
            "runs": res.num_runs, "status": dict(res.counts), "in-process dense s": t["dense_s"],
            "in-process prune s": t["prune_s"], "in-process finetune s": t["finetune_s"],
            f"ideal s (dense + rest / {par})": ideal, "study wall s": res.wall_s, "study.run() s": total,
            "overhead (goal <= 1.15)": res.wall_s / ideal, "study.run() / ideal": total / ideal,
            "CPU s: workers / driver / Ray": f"{st['cpu']['workers']:.3g} / {st['cpu']['driver']:.3g} / "
                                             f"{st['cpu']['ray_system']:.3g}",
            "CPU s in-process": t["trials_cpu_s"],
            "overhead vs this machine's 2-at-once": res.wall_s / machine_ideal,
        })
    print(table(rows))
    print(f"\noverhead, median of {len(ratios)}: {statistics.median(ratios):.3g}x "
          f"(each: {', '.join(f'{r:.3g}' for r in ratios)})")
    print(f"no Ray: one member alone {alone:.3g} s, per member with two at once {paired:.3g} s"
          + (" (not run in quick mode)" if args.quick else ""))
    where = storage if args.keep else "deleted"
    p = plan(cfg, par)
    print(f"config: {args.config} overrides {overrides or 'none'}: {len(p.points)} prune points x "
          f"{len(p.members)} members = {p.num_runs} runs in {len(p.units)} trials, max_concurrent {par}; "
          f"study folders {where}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
