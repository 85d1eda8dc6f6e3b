"""What a large fixed design costs the driver before any trial runs: its prune points, its plan (the
lockstep packing of prune stages into units) and a walk of the design searcher that hands the units to
Tune, at growing sizes up to ~100,000 members. The packing is timed side by side with the plain scan it
replaced (every open batch scanned per stage: quadratic in prune points).

    python -m benchmarks.design_scale            # 1k, 10k, 100k members
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import yaml
from ray.tune.search import Searcher

from benchmarks.timing import interleaved, machine, parser, table
from study import design
from study.loading import load_config
from study.searcher import design_searcher

QUICK = Path(__file__).resolve().parents[1] / "study" / "configs" / "quick.yaml"


def _config(seeds: int, prs: int):
    d = yaml.safe_load(QUICK.read_text())
    d["space"].update(seeds=list(range(seeds)), pr=[round(0.05 + 0.9 * i / prs, 4) for i in range(prs)])
    return load_config(d)


def _plain_balance(items, work, slots, cap):
    """The packing as first written (the reference the heap is tested equal to)."""
    n = max(slots, math.ceil(len(items) / cap))
    batches = [[] for _ in range(min(n, len(items)))]
    load = [0] * len(batches)
    for i in sorted(items, key=lambda i: -work[i]):
        b = min((b for b in range(len(batches)) if len(batches[b]) < cap), key=lambda b: load[b])
        batches[b].append(i)
        load[b] += work[i]
    return [tuple(b) for b in sorted(batches, key=lambda b: -max(work[i] for i in b)) if b]


def _walk(plan) -> int:
    """Hand out every unit as Tune would: a few trials running, the oldest ending when none is ready."""
    s = design_searcher(plan.units, {i: f"k{i}" for i in range(len(plan.points))}, plan,
                        Path(tempfile.mkdtemp()))
    running, n = [], 0
    while (unit := s.suggest(f"t{n}")) is not Searcher.FINISHED:
        if unit is None:
            s.on_trial_complete(running.pop(0))
            continue
        running.append(f"t{n}")
        n += 1
        if len(running) > 4:
            s.on_trial_complete(running.pop(0))
    return n


def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    sizes = [(2, 5)] if args.quick else [(5, 10), (15, 34), (100, 34)]  # (seeds, PRs) -> members below
    rows = []
    for seeds, prs in sizes:
        cfg = _config(seeds, prs)
        design._DESIGNS.clear()
        t0 = time.perf_counter()
        pts = design.points(cfg)
        t_points = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = design.plan(cfg, slots=2, train_samples=1437)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        units = _walk(plan)
        t_walk = time.perf_counter() - t0
        items = [i for i, p in enumerate(pts) if p.growth is not None]
        work = {i: 1000 + (i * 37) % 500 for i in items}
        pack = interleaved({"heap": lambda i=items, w=work: design._balance(i, w, 2, 16),
                            "plain": lambda i=items, w=work: _plain_balance(i, w, 2, 16)}, repeats=3)
        rows.append({"members": plan.num_runs, "prune points": len(pts), "units": units,
                     "points s": t_points, "plan s": t_plan, "searcher walk s": t_walk,
                     "packing heap s": pack["heap"], "packing plain s": pack["plain"],
                     "plain / heap": pack["plain"] / pack["heap"]})
    print(table(rows))
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
