"""What the study driver's MLflow writes cost on SQLite: the default rollback journal vs WAL.

Each repetition is a fresh process (the WAL hook is process-wide) that writes N member runs through the
study's own outbox the way the driver does (create, params, a few epoch batches, final metrics and
tags, end status) into a new SQLite store; the variants alternate (A B A B ...) and medians are
reported. Wall time is what the Tune loop waits; CPU time is what competes with the trials.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.timing import machine, parser, table

VARIANTS = ("rollback journal (MLflow's default)", "WAL, synchronous=NORMAL (the driver's)")


def write_runs(uri: str, n_runs: int, epochs: int) -> None:
    """N member runs through `study.outbox.Outbox`, delivered as the driver delivers them."""
    from study.outbox import Outbox
    from study.tracking import client

    experiment = client(uri).create_experiment("bench")
    box = Outbox(uri)
    params = {f"p{i}": str(i) for i in range(30)}
    for r in range(n_runs):
        mid = f"m{r}"
        box.create_run(mid, experiment, mid, {"tpp.member_id": mid, "tpp.status": "running"})
        box.batch(mid, params=params)
        box.flush(force=True)
        for e in range(epochs):
            box.batch(mid, metrics=[("finetune/test_acc", 50.0 + e, e),
                                    ("finetune/train_loss", 1.0 / (e + 1), e)])
            box.flush(force=True)
        box.batch(mid, metrics=[("best_acc", 60.0, 0), ("acc_after_removal", 30.0, 0)],
                  tags={"tpp.status": "completed"})
        box.status(mid, "FINISHED")
        box.flush(force=True)


def child(variant: int, n_runs: int, epochs: int) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if variant == 1:
        from study.tracking import configure_mlflow_env

        configure_mlflow_env()  # what the driver does: installs the WAL hook
    folder = tempfile.mkdtemp(prefix="bench-mlflow-", dir=os.getcwd())  # on the disk studies go to
    uri = f"sqlite:///{folder}/mlflow.db"
    from study.tracking import client

    client(uri, create=True).search_experiments()  # create the tables outside the timed part
    wall, cpu = time.perf_counter(), time.process_time()
    write_runs(uri, n_runs, epochs)
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
    shutil.rmtree(folder)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100, help="member runs per repetition")
    p.add_argument("--epochs", type=int, default=3, help="epoch batches per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        child(a.child, a.runs, a.epochs)
        return
    if a.quick:
        a.runs, a.repeats = 5, 1
    times: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    for _ in range(a.repeats):
        for v in (0, 1):
            out = subprocess.run([sys.executable, "-m", "benchmarks.mlflow_store", "--child", str(v),
                                  "--runs", str(a.runs), "--epochs", str(a.epochs)],
                                 capture_output=True, text=True, check=True)
            times[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for v, name in enumerate(VARIANTS):
        wall = statistics.median(t["wall"] for t in times[v])
        cpu = statistics.median(t["cpu"] for t in times[v])
        rows.append({"SQLite mode": name, "runs": a.runs, "wall s": wall,
                     "wall ms per run": 1e3 * wall / a.runs,
                     "CPU s": cpu, "CPU ms per run": 1e3 * cpu / a.runs})
    print(table(rows))
    wall_x, cpu_x = rows[0]["wall s"] / rows[1]["wall s"], rows[0]["CPU s"] / rows[1]["CPU s"]
    print(f"\nWAL vs default, median of {a.repeats}: wall {wall_x:.2f}x faster, CPU {cpu_x:.2f}x less")
    print("machine: " + machine())


if __name__ == "__main__":
    main()
