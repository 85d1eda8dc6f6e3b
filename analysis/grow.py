"""Seeds until decided, run: give the prune groups of the comparisons still undecided more seeds in waves
(`tpp-study extend` with `space.extra_seeds`), looking at the primary verdicts after each by the
planned-looks rule of `analysis.sequential`; the outcome goes on the study run (tag `tpp.sequential`),
which the report states."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

import study as studies  # the study's public API: analysis drives a study only through it
from analysis.sequential import Looks, SequentialOutcome, decided
from analysis.stats import ALPHA, p_floor
from study.schema import TAG_SEQUENTIAL
from study.store import find_study


def seeds_until_decided(study: str, storage: str, max_seeds: int, step: int = 2, *, alpha: float = ALPHA,
                        baseline: str | None = None, sensitivity: str = "regret",
                        address: str | None = None, progress: Any = print) -> SequentialOutcome:
    """Give `step` more seeds to the prune groups of every primary comparison with the baseline that is
    still undecided at its look's alpha, until none is or `max_seeds` is reached; a decided comparison
    gets no further runs. Records the outcome on the study run (tag `tpp.sequential`), which the report
    states. Bad input: ValueError naming the field; a wave that does not complete: RuntimeError (resume
    the study, then run again)."""
    from analysis.load import load_study
    from analysis.locate import tracking_uri_from_storage
    from analysis.report import analyze

    folder = find_study(study, storage)
    space = studies.load_config(folder.config_path).space
    if space.extra_seeds:
        raise ValueError(f"--until-decided: study {folder.name} already gave some groups extra seeds "
                         "(space.extra_seeds, an earlier seeds-until-decided run); a second plan of looks "
                         "would spend alpha again: analyse it as it is, or extend space.seeds for every "
                         "group")
    looks = Looks.plan(len(space.seeds), max_seeds, step, alpha)
    if looks.first_decisive is None:
        raise ValueError(f"max_seeds: {max_seeds} seeds cannot decide anything at alpha {alpha:g} over "
                         f"{len(looks.seeds)} looks (the smallest p with {max_seeds} seeds is "
                         f"{p_floor(max_seeds):.3g}); raise it or take bigger steps")
    runs_per_seed = folder.read_meta().num_runs // len(space.seeds)
    uri = tracking_uri_from_storage(folder.path.parent, folder.name)
    extra: list[dict[str, Any]] = []
    next_seed = max(space.seeds) + 1
    decided_at: dict[str, int] = {}
    open_: list[pd.Series] = []
    for k, n in enumerate(looks.seeds, start=1):
        if k > 1:
            new = list(range(next_seed, next_seed + n - looks.seeds[k - 2]))
            next_seed += len(new)
            extra = wave(extra, open_, new)
            progress(f"look {k}/{len(looks.seeds)}: adding seeds {new[0]}..{new[-1]} ({n} in all) to the "
                     f"{len(open_)} undecided comparison(s)")
            try:
                res = studies.extend(study, set={"space.extra_seeds": extra}, storage=storage,
                                     address=address)
            except (studies.StudyError, studies.StudyConfigError) as e:
                raise ValueError(str(e)) from None
            if res.status != "completed":
                raise RuntimeError(f"the extension to {n} seeds ended {res.status}; resume it, run again")
        table = analyze(load_study(folder.name, uri), baseline=baseline, sensitivity=sensitivity).comparison
        primary = table[table["primary"].astype(bool)]
        ok = decided(table, looks.per_look)
        for group, d in zip(primary["group"], ok, strict=True):
            if d and str(group) not in decided_at:
                decided_at[str(group)] = n
        open_ = [row for (_, row), d in zip(primary.iterrows(), ok, strict=True) if not d]
        progress(f"look {k}/{len(looks.seeds)} at {n} seeds: {int(ok.sum())} of {len(ok)} primary verdicts "
                 f"decided at alpha {looks.per_look:.4g}")
        if not open_ or k == len(looks.seeds):
            out = SequentialOutcome(list(looks.seeds), alpha, looks.per_look, k, n, not open_,
                                    [str(r["group"]) for r in open_], runs=folder.read_meta().num_runs,
                                    runs_at_max=runs_per_seed * looks.seeds[-1], decided_at=decided_at)
            _record(uri, folder.read_meta().parent_run_id, out)
            progress(out.sentence())
            return out
    raise AssertionError("unreachable: the last look returns")


def wave(extra: list[dict[str, Any]], open_rows: list[pd.Series], seeds: list[int]) -> list[dict[str, Any]]:
    """space.extra_seeds after giving `seeds` to both sides of every comparison in `open_rows` (rows of
    the comparison table: the method's prune group, and the baseline's at the same PR). One entry per
    prune group (method, pr, growth), in a stable order; the entries of earlier waves are kept."""
    def growth(v: Any) -> float | None:
        return None if v is None or not np.isfinite(float(v)) else float(v)

    merged: dict[tuple[str, float, float | None], list[int]] = {}
    for e in extra:
        merged.setdefault((e["method"], e["pr"], e.get("growth")), []).extend(e["seeds"])
    for r in open_rows:
        for method, g in ((r["method"], r["growth"]), (r["baseline"], r["baseline_growth"])):
            have = merged.setdefault((str(method), float(r["pr"]), growth(g)), [])
            have.extend(s for s in seeds if s not in have)
    return [{"method": m, "pr": pr, **({"growth": g} if g is not None else {}), "seeds": s}
            for (m, pr, g), s in sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0.0))]


def _record(uri: str, parent_run_id: str, out: SequentialOutcome) -> None:
    from analysis.load import client_for

    client, _ = client_for(uri)
    client.set_tag(parent_run_id, TAG_SEQUENTIAL, out.to_json())
