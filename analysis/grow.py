"""Seeds until decided, run: extend a study's seeds in waves (`tpp-study extend`) and look at the primary
verdicts after each, by the planned-looks rule of `analysis.sequential`; the outcome goes on the study run
(tag `tpp.sequential`), which the report states."""

from __future__ import annotations

from typing import Any

import study as studies  # the study's public API: analysis drives a study only through it
from analysis.sequential import Looks, SequentialOutcome, decided
from analysis.stats import ALPHA, p_floor
from study.schema import TAG_SEQUENTIAL
from study.store import find_study


def seeds_until_decided(study: str, storage: str, max_seeds: int, step: int = 2, *, alpha: float = ALPHA,
                        baseline: str | None = None, sensitivity: str = "regret",
                        address: str | None = None, progress: Any = print) -> SequentialOutcome:
    """Extend the study's seeds by `step` until every primary comparison with the baseline is decided
    at its look's alpha, or `max_seeds` is reached; records the outcome on the study run (tag
    `tpp.sequential`), which the report states. Bad input: ValueError naming the field; a wave that
    does not complete: RuntimeError (resume the study, then run again)."""
    from analysis.load import load_study
    from analysis.locate import tracking_uri_from_storage
    from analysis.report import analyze

    folder = find_study(study, storage)
    seeds = list(studies.load_config(folder.config_path).space.seeds)
    looks = Looks.plan(len(seeds), max_seeds, step, alpha)
    if looks.first_decisive is None:
        raise ValueError(f"max_seeds: {max_seeds} seeds cannot decide anything at alpha {alpha:g} over "
                         f"{len(looks.seeds)} looks (the smallest p with {max_seeds} seeds is "
                         f"{p_floor(max_seeds):.3g}); raise it or take bigger steps")
    runs_per_seed = folder.read_meta().num_runs // len(seeds)
    uri = tracking_uri_from_storage(folder.path.parent, folder.name)
    for k, n in enumerate(looks.seeds, start=1):
        if n > len(seeds):
            new = list(range(max(seeds) + 1, max(seeds) + 1 + n - len(seeds)))
            seeds = seeds + new
            progress(f"look {k}/{len(looks.seeds)}: adding seeds {new[0]}..{new[-1]} ({n} in all)")
            try:
                res = studies.extend(study, set={"space.seeds": seeds}, storage=storage, address=address)
            except (studies.StudyError, studies.StudyConfigError) as e:
                raise ValueError(str(e)) from None
            if res.status != "completed":
                raise RuntimeError(f"the extension to {n} seeds ended {res.status}; resume it, run again")
        table = analyze(load_study(folder.name, uri), baseline=baseline, sensitivity=sensitivity).comparison
        ok = decided(table, looks.per_look)
        primary = table[table["primary"].astype(bool)]
        open_ = [str(g) for g, d in zip(primary["group"], ok, strict=True) if not d]
        progress(f"look {k}/{len(looks.seeds)} at {n} seeds: {int(ok.sum())} of {len(ok)} primary verdicts "
                 f"decided at alpha {looks.per_look:.4g}")
        if not open_ or k == len(looks.seeds):
            out = SequentialOutcome(list(looks.seeds), alpha, looks.per_look, k, n, not open_, open_,
                                    runs=runs_per_seed * n, runs_at_max=runs_per_seed * looks.seeds[-1])
            _record(uri, folder.read_meta().parent_run_id, out)
            progress(out.sentence())
            return out
    raise AssertionError("unreachable: the last look returns")


def _record(uri: str, parent_run_id: str, out: SequentialOutcome) -> None:
    from analysis.load import client_for

    client, _ = client_for(uri)
    client.set_tag(parent_run_id, TAG_SEQUENTIAL, out.to_json())
