"""Grow a study: more seeds, LR ladder points, PR or growth levels, methods or recipe levels, run into the
same study (same folder, parent run and tracking store), reusing the dense model, every cached prune stage
and every finished member.

An extension is allowed when the new design holds every member of the old one -- members are identified
by a digest of all their settings (`design.member_id`), so "a superset on the searched axes with every fixed
setting unchanged" is checked exactly, whatever the axis -- and the settings that are not part of a member
(sampler, objective, early stopping) are unchanged. Anything else would make old and new members
incomparable and is refused, naming the keys that differ.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from study.config import Range, StudyConfig
from study.design import member_ids, points
from study.driver import (
    _absolute_paths,
    _lock,
    changed_keys,
    check_record,
    config_digest,
    configure_mlflow_env,
    run_locked,
)
from study.errors import StudyError
from study.loading import load_config
from study.outbox import Outbox
from study.record import StudyResult
from study.schema import TAG_EXTENSION, TAG_PLANNED
from study.store import StudyFolder, find_study

# Settings that are not part of a member's id but change what a study means.
MUST_MATCH = ("sampler", "sampler_seed", "num_trials", "objective", "early_stopping")


@dataclass
class Extension:
    """What an extension adds to a study."""

    study: str
    runs_before: int
    runs_after: int
    stages_before: int
    stages_after: int
    changed: list[str]  # the config keys that differ

    @property
    def added_runs(self) -> int:
        return self.runs_after - self.runs_before

    def summary(self) -> str:
        return (f"extend {self.study}: +{self.added_runs} runs ({self.runs_after} in all; the "
                f"{self.runs_before} of the study are kept), +{self.stages_after - self.stages_before} prune "
                f"points ({self.stages_after} in all); changed: {', '.join(self.changed)}")


def plan_extension(old: StudyConfig, new: StudyConfig) -> Extension:
    """What `new` adds to a study run with `old`; StudyError (one line) when it is not an extension."""
    if not (old.is_design and new.is_design):
        raise StudyError("sampler: only a fixed design (grid, qmc) can be extended; an adaptive sampler's "
                         "study is extended with more num_trials by a new study")
    changed = changed_keys(old, new)
    fixed = [k for k in changed if k.split(".")[0] in MUST_MATCH]
    if fixed:
        raise StudyError(f"{fixed[0]}: an extension keeps {', '.join(MUST_MATCH)} as the study has them "
                         f"({', '.join(fixed)} differ)")
    before, after = member_ids(old), member_ids(new)
    lost = before - after
    if lost:
        raise StudyError(f"the new config drops or changes {len(lost)} of the study's {len(before)} members "
                         f"({', '.join(changed[:6]) or 'no key'} differ): an extension may only add levels "
                         "(seeds, LR ladder points, PR or growth levels, methods, recipe levels) and keep "
                         "every other setting, or old and new runs would not be comparable"
                         + _ladder_hint(old.finetune.lr, new.finetune.lr))
    if before == after:
        raise StudyError(f"the new config adds no run to study {old.name!r} (it has all {len(before)})")
    return Extension(old.name, len(before), len(after), len(points(old)), len(points(new)), changed)


def _ladder_hint(old: Any, new: Any) -> str:
    """For a ladder whose new ends are not whole steps of the old one: the ends that keep its points."""
    if not (isinstance(old, Range) and isinstance(new, Range) and old.per_decade and
            old.per_decade == new.per_decade) or set(old.ladder()) <= set(new.ladder()):
        return ""

    def snap(anchor: float, end: float) -> float:
        return anchor * 10 ** (round(math.log10(end / anchor) * old.per_decade) / old.per_decade)

    return (f"; finetune.lr: a ladder keeps its points when its ends move by whole steps: low "
            f"{snap(old.low, new.low)!r}, high {snap(old.high, new.high)!r} (nearest to the ones given)")


def extend(name_or_path: str, config: str | os.PathLike | dict[str, Any] | None = None, *,
           set: dict[str, Any] | None = None, storage: str | None = None, address: str | None = None,
           callbacks: list[Any] | None = None, dry_run: bool = False) -> StudyResult | Extension:
    """Add to a study what `config` (default: the study's own config) with the `set` overrides adds, and
    run only that. `dry_run`: return the Extension without changing anything."""
    configure_mlflow_env()
    folder = find_study(name_or_path, storage or "./studies")
    old = load_config(folder.config_path)
    source = config if config is not None else old
    new = _absolute_paths(load_config(source, name=old.name, storage=old.storage, set=set or {}))
    ext = plan_extension(old, new)
    if dry_run:
        return ext
    _lock(folder)  # one writer: refused while the study runs
    try:
        meta = folder.read_meta()
        if meta.config_digest and config_digest(old) != meta.config_digest:
            raise StudyError(f"{folder.config_path} was edited after the study started; restore it first")
        check_record(meta.tracking_uri, meta)
        print(ext.summary(), flush=True)
        number = len(meta.extensions) + 1
        record = {"number": number, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "runs_before": ext.runs_before,
                  "runs_after": ext.runs_after, "changed": ext.changed}
        # The new config is recorded in study.json before it replaces study_config.yaml, so a stop between
        # the two is finished by `resume` (driver._finish_extension), never half-applied.
        folder.extension_config_path.write_text(new.to_yaml())
        meta = folder.update_meta(config_digest=config_digest(new), num_runs=ext.runs_after,
                                  extensions=[*meta.extensions, record])
        previous = folder.config_path.read_text()
        os.replace(folder.extension_config_path, folder.config_path)
        _record_on_study_run(folder, meta.tracking_uri, meta.parent_run_id, record, previous, new.to_yaml())
        # the new design's units differ from the saved Tune state's: a new Tuner, finished members skipped
        return run_locked(new, folder, address or meta.ray_address, restore=False, callbacks=callbacks)
    finally:
        folder.unlock()


def _record_on_study_run(folder: StudyFolder, uri: str, parent_run_id: str, record: dict[str, Any],
                         previous: str, current: str) -> None:
    """The extension on the study's MLflow run: a tag per extension, the planned count, the config it
    replaced (extensions/N/) and the config now in force (study_config.yaml, which the report shows).
    Writes the store cannot take now are kept in the folder, for the run (or a resume) to deliver."""
    box = Outbox(uri, {"parent": parent_run_id})
    box.load_pending(folder.pending_log)  # what an earlier session could not deliver goes first
    box.batch("parent", tags={f"{TAG_EXTENSION}{record['number']}": json.dumps(record),
                              TAG_PLANNED: str(record["runs_after"])})
    box.text("parent", previous, f"extensions/{record['number']}/replaced_study_config.yaml")
    box.text("parent", current, "study_config.yaml")
    if box.drain(30):
        folder.pending_log.unlink(missing_ok=True)
    else:
        box.save_pending(folder.pending_log)
