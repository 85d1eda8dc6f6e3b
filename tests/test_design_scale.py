"""A 100,000-member design on one driver: its prune points, plan and searcher are built and walked in
well under a second each (nothing quadratic in members or prune points), and the fast paths equal the plain
ones they replaced."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest
import yaml
from ray.tune.search import Searcher

from study import design
from study.loading import load_config
from study.searcher import design_searcher

QUICK = Path(__file__).resolve().parents[1] / "study" / "configs" / "quick.yaml"


def _quick(seeds: int, prs: int, growth: list[float]) -> object:
    d = yaml.safe_load(QUICK.read_text())
    d["space"].update(seeds=list(range(seeds)), pr=[round(0.05 + 0.9 * i / prs, 4) for i in range(prs)],
                      growth=growth)
    return load_config(d)


def _plain_balance(items, work, slots, cap):
    """The packing as first written: scan every open batch for the lightest (the reference)."""
    if not items:
        return []
    n = max(slots, math.ceil(len(items) / cap))
    batches = [[] for _ in range(min(n, len(items)))]
    load = [0] * len(batches)
    for i in sorted(items, key=lambda i: -work[i]):
        open_ = [b for b in range(len(batches)) if len(batches[b]) < cap]
        b = min(open_, key=lambda b: load[b])
        batches[b].append(i)
        load[b] += work[i]
    return [tuple(b) for b in sorted(batches, key=lambda b: -max(work[i] for i in b)) if b]


@pytest.mark.parametrize("seed", range(20))
def test_the_heap_packing_equals_the_plain_scan(seed):
    rng = random.Random(seed)
    items = list(range(rng.randint(0, 60)))
    work = {i: rng.choice([0, 100, 200, 200, 400, rng.randint(1, 1000)]) for i in items}  # ties included
    slots, cap = rng.randint(1, 6), rng.randint(1, 9)
    assert design._balance(items, work, slots, cap) == _plain_balance(items, work, slots, cap)


def test_a_100k_member_design_is_planned_and_searched_in_well_under_a_second_each(tmp_path):
    cfg = _quick(seeds=100, prs=34, growth=[1e-3, 1e-2])  # (34 L1 + 68 TPP levels) x 100 seeds x 10 LRs
    design._DESIGNS.clear()
    took = {}
    t = time.perf_counter()
    pts = design.points(cfg)
    took["points"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = design.plan(cfg, slots=2, train_samples=1437)
    took["plan"] = time.perf_counter() - t
    assert len(pts) == 10_200 and plan.num_runs == 102_000

    keys = {i: f"stage-{i}" for i in range(len(pts))}
    searcher = design_searcher(plan.units, keys, plan, tmp_path)
    t = time.perf_counter()
    handed, running, done = [], [], set()
    while True:
        unit = searcher.suggest(f"t{len(handed)}")
        if unit is Searcher.FINISHED:
            break
        if unit is None:  # every unit left waits for a prune stage: let the oldest trial end
            trial = running.pop(0)
            searcher.on_trial_complete(trial)
            done.add(trial)
            continue
        i = searcher.by_trial[f"t{len(handed)}"]
        if unit["kind"] == "finetune" and i in searcher.waits_for:  # only after its stage's unit ended
            assert f"t{searcher.handed.index(searcher.waits_for[i][1])}" in done
        handed.append(i)
        running.append(f"t{len(handed) - 1}")
        if len(running) > 4:
            trial = running.pop(0)
            searcher.on_trial_complete(trial)
            done.add(trial)
    took["searcher"] = time.perf_counter() - t
    assert sorted(handed) == list(range(len(plan.units)))  # every unit once
    # measured here: 0.01 / 0.04-0.06 / 0.02-0.22 s (BENCHMARKS.md §8); a quadratic step would take minutes
    assert all(s < 2.0 for s in took.values()), took


def test_resolving_a_trial_again_gives_what_a_fresh_resolve_gives():
    """The driver resolves each trial twice in a row (logger, progress): the second is the first's result,
    for that trial and config only; another trial, a changed config or another study resolves afresh."""
    cfg = _quick(seeds=3, prs=2, growth=[1e-2])
    plan = design.plan(cfg, slots=2)
    configs = [u.config(plan) for u in plan.units if u.kind == "finetune"][:2]

    def fresh(c, config, trial_id):
        design._last_resolved[0] = None
        return design.resolve(c, config, trial_id)

    a = design.resolve(cfg, configs[0], "t0")
    assert design.resolve(cfg, configs[0], "t0") is a  # the same call again: the same object
    assert design.resolve(cfg, dict(configs[0]), "t0") is a  # an equal config
    b = design.resolve(cfg, configs[1], "t0")  # the same trial id, another unit: resolved afresh
    assert b.ids == fresh(cfg, configs[1], "t0").ids != a.ids
    other = _quick(seeds=3, prs=2, growth=[1e-1])  # another study's config
    assert design.resolve(other, configs[0], "t0").ids == fresh(other, configs[0], "t0").ids != a.ids
