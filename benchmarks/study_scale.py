"""What one driver costs per member of a real study: members cheap enough to isolate the driver (L1 on
the quick MLP, one finetune epoch, many seeds), run by the real `study.run` on an embedded Ray with SQLite
tracking, at growing sizes. Per size: the driver process's own CPU seconds (all its threads: Tune's loop,
the MLflow writes), its peak RSS, Tune's experiment state on disk, and the wall time of `tpp-study
status`, a `resume` with nothing to do and `tpp-analyze` on the finished study. The slopes between the
two largest sizes give the per-member costs, extrapolated linearly to 100,000 members.

`--before REF` runs the same sizes on a git worktree of REF too, interleaved with this tree (size by size,
REF first), so the change is measured side by side on the same machine state. `--server` tracks to a real
`mlflow server` (127.0.0.1, SQLite behind it, one worker) instead of the study's SQLite file, and reports
the server's CPU next to the driver's.

    python -m benchmarks.study_scale                       # 300, 600, 1200 members, this tree
    python -m benchmarks.study_scale --before HEAD~3       # ... and the same on HEAD~3
    python -m benchmarks.study_scale --server              # ... over HTTP to a real mlflow server
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from benchmarks.timing import machine, parser, table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Runs in a fresh interpreter whose sys.path starts with the tree under test; prints one JSON line.
DRIVER = """
import json, resource, sys, time
from pathlib import Path
import study
cfg, storage, uri = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] or None
t = time.process_time()
res = study.run(cfg, storage=storage, tracking_uri=uri)
cpu = time.process_time() - t
state = sum(p.stat().st_size for p in (Path(res.path) / "tune").glob("experiment_state-*.json"))
print("RESULT " + json.dumps({"status": res.status, "runs": res.num_runs, "driver_cpu_s": cpu,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "state_bytes": state}))
"""


def _config(seeds: int) -> dict:
    d = yaml.safe_load((ROOT / "study" / "configs" / "quick.yaml").read_text())
    d.update(name="scale", methods=["l1"], max_concurrent=2)
    d["space"] = {"pr": [0.5, 0.8, 0.9], "seeds": list(range(seeds))}
    d["finetune"]["epochs"] = 1
    d["dense"]["epochs"] = 5
    d.pop("storage", None)
    return d


def _env(tree: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(tree),
            "RAY_AUTH_MODE": "disabled"}


def _wall(argv: list[str], tree: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t


@contextlib.contextmanager
def _server(folder: Path) -> Iterator[tuple[str, list]]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store in `folder`; yields its URI and a list that
    receives its CPU seconds (all its processes) when it stops."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/srv.db",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(folder / "artifacts")], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri, cpu = f"http://127.0.0.1:{port}", []
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)
    try:
        yield uri, cpu
    finally:
        import psutil

        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        cpu.append(sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running()))
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def measure(tree: Path, seeds: int, analyze: bool, server: bool = False) -> dict:
    storage = Path(tempfile.mkdtemp(prefix="tpp-scale-"))
    with _server(storage) if server else contextlib.nullcontext(("", None)) as (uri, server_cpu):
        out = _measure(tree, seeds, analyze, storage, uri)
    if server_cpu:
        out["server_cpu_s"] = server_cpu[0]
    shutil.rmtree(storage, ignore_errors=True)
    return out


def _measure(tree: Path, seeds: int, analyze: bool, storage: Path, uri: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(_config(seeds)), str(storage), uri],
                          cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the study failed: {proc.stdout[-1500:]}{proc.stderr[-3000:]}")
    out = json.loads(line.removeprefix("RESULT "))
    # a fresh interpreter on the tree under test, as a user would run the commands
    py = [sys.executable, "-c", "import sys; from study.cli import main; sys.exit(main(sys.argv[1:]))"]
    out["status_s"] = _wall([*py, "status", "scale", "--storage", str(storage)], tree)
    out["resume_s"] = _wall([*py, "resume", "scale", "--storage", str(storage)], tree)
    if analyze:
        an = [sys.executable, "-c", "import sys; from analysis.cli import main; sys.exit(main(sys.argv[1:]))"]
        out["analyze_s"] = _wall([*an, "scale", "--storage", str(storage), "--no-log", "--quiet"], tree)
    return out


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--before", metavar="REF", help="also run a git worktree of REF, interleaved")
    p.add_argument("--seeds", default="10,20,40", help="seed counts (30 members each; default 10,20,40)")
    p.add_argument("--server", action="store_true", help="track to a real mlflow server on 127.0.0.1")
    args = p.parse_args()
    sizes = [2] if args.quick else [int(s) for s in args.seeds.split(",")]
    trees = {"this tree": ROOT}
    if args.before:
        wt = Path(tempfile.mkdtemp(prefix="tpp-before-")) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        trees = {f"before ({args.before})": wt, **trees}
    rows = []
    try:
        for seeds in sizes:
            for name, tree in trees.items():
                r = measure(tree, seeds, analyze=not args.quick, server=args.server)
                rows.append({"code": name, "members": r["runs"], "driver CPU s": r["driver_cpu_s"],
                             "ms/member": 1000 * r["driver_cpu_s"] / r["runs"],
                             "peak RSS MB": r["peak_rss_mb"], "Tune state KB": r["state_bytes"] / 1024,
                             "state B/member": r["state_bytes"] / r["runs"], "status s": r["status_s"],
                             "resume s": r["resume_s"],
                             **({"analyze s": r["analyze_s"]} if "analyze_s" in r else {}),
                             **({"server CPU s": r["server_cpu_s"]} if "server_cpu_s" in r else {})})
                print(f"  {name}: {r['runs']} members, driver {r['driver_cpu_s']:.1f} CPU-s", file=sys.stderr,
                      flush=True)
    finally:
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(trees[f"before ({args.before})"])],
                           cwd=ROOT, check=False, capture_output=True)
    print(table(rows))
    for name in trees:
        mine = [r for r in rows if r["code"] == name]
        if len(mine) >= 2:
            a, b = mine[-2], mine[-1]
            dm = b["members"] - a["members"]
            cpu = (b["driver CPU s"] - a["driver CPU s"]) / dm
            rss = (b["peak RSS MB"] - a["peak RSS MB"]) * 1024 / dm
            state = (b["Tune state KB"] - a["Tune state KB"]) / dm
            print(f"{name}: slope {1000 * cpu:.1f} ms driver CPU, {rss:.1f} KB RSS, {state:.2f} KB Tune "
                  f"state per member -> at 100,000 members ~{cpu * 1e5 / 3600:.1f} driver CPU-hours, "
                  f"~{b['peak RSS MB'] / 1024 + rss * (1e5 - b['members']) / 1024 ** 2:.1f} GB RSS, "
                  f"~{state * 1e5 / 1024:.0f} MB Tune state (linear extrapolation)")
            if "server CPU s" in b:
                print(f"{name}: the mlflow server's CPU slope "
                      f"{1000 * (b['server CPU s'] - a['server CPU s']) / dm:.1f} ms per member")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
