"""Load a study from MLflow into tidy tables: one row per member run, one row per (member, stage, epoch).

The study driver writes one parent run per study (tags ``tpp.study``, ``tpp.role=study``) and one child
run per finetune *member* = one (prune group, finetune config) (tag ``mlflow.parentRunId``; ``tpp.member_id``,
``tpp.prune_key``, ``tpp.trial_id`` for the Ray Tune trial that ran it). Everything here is read-only:
nothing is re-run and no store is created (a missing SQLite file is an error, not a new empty database).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import study as studies  # the study package's public API: its member runs, read in bulk on a SQL store
from analysis.sequential import sequential_note
from study.schema import (
    ROLE_STUDY,
    TAG_DIVERGED_STAGE,
    TAG_EXTENSION,
    TAG_MEMBER,
    TAG_METHOD,
    TAG_PRUNE_KEY,
    TAG_REUSE,
    TAG_ROLE,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TRIAL,
)

FINISHED = ("completed", "diverged")  # members that are results (diverged ones are measured as divergence)
PLANNED_KEYS = ("num_trials", "num_samples", "n_trials", "planned_trials")  # parent param/tag names
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_EPOCH_RENAME = {"lr": "epoch_lr"}  # the per-epoch LR must not shadow the member's configured LR
_TAG_COLUMNS = {"trial_id": TAG_TRIAL, "member_id": TAG_MEMBER, "prune_key": TAG_PRUNE_KEY,
                "reuse": TAG_REUSE, "diverged_stage": TAG_DIVERGED_STAGE}


class StudyNotFoundError(LookupError):
    """The named study is not in the store; ``available`` lists the study names that are."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


@dataclass
class Progress:
    """How far a study got: counts of member runs by status, and the planned count when the parent run
    records it (``num_trials`` = planned member runs)."""

    planned: int | None
    total: int
    completed: int
    diverged: int
    failed: int
    running: int
    interrupted: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.diverged

    @property
    def not_started(self) -> int | None:
        return None if self.planned is None else max(self.planned - self.total, 0)


@dataclass
class StudyData:
    """A study as read from MLflow.

    ``trials``: one row per member run -- ids (``run_id``, ``trial_id``, ``member_id``, ``prune_key``),
    ``method``, ``status`` (completed | diverged | failed | interrupted | running), the run's parameters
    typed back to numbers (``growth`` is NaN for methods without a penalty, whether absent or "none") and
    its final metrics. ``param_names``: which columns are run parameters. ``epochs``: one row per
    (member, stage, epoch) with the per-epoch metrics as columns (``test_acc``, ``val_acc``,
    ``train_loss``, ``epoch_lr`` = the LR in effect that epoch, ``reg``...) plus the member's
    method/pr/growth/lr/seed.
    """

    name: str
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent_run_id: str
    parent_status: str
    parent_params: dict[str, Any]
    parent_metrics: dict[str, float]
    parent_tags: dict[str, str]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    config_text: str | None = None  # the parent's study_config.yaml artifact, when present
    notes: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)

    @property
    def progress(self) -> Progress:
        status = self.trials["status"] if len(self.trials) else pd.Series([], dtype=str)
        return Progress(
            planned=planned_count(self.parent_params, self.parent_tags),
            total=len(self.trials),
            completed=int((status == "completed").sum()),
            diverged=int((status == "diverged").sum()),
            failed=int((status == "failed").sum()),
            running=int((status == "running").sum()),
            interrupted=int((status == "interrupted").sum()),
        )

    @property
    def is_complete(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        """Plain-language lines on what this study does not hold yet (empty when it is complete)."""
        p = self.progress
        lines = []
        if self.parent_status in ("RUNNING", "SCHEDULED"):
            lines.append(f"the study run is still {self.parent_status} (results may change)")
        if p.running:
            running = self.trials[self.trials["status"] == "running"]
            names = ", ".join(str(n) for n in running["run_name"].head(5))
            more = f" and {p.running - 5} more" if p.running > 5 else ""
            lines.append(f"{p.running} member run(s) still running: {names}{more}")
        if p.planned is not None:
            if p.not_started:
                lines.append(f"{p.not_started} of {p.planned} planned member runs not started yet")
            if p.finished < p.planned:
                lines.append(f"{p.finished} of {p.planned} planned member runs finished")
        if p.failed:
            lines.append(f"{p.failed} member run(s) failed (excluded from the measures)")
        if p.interrupted:
            lines.append(f"{p.interrupted} member run(s) interrupted (excluded; `tpp-study resume` "
                         "finishes them)")
        if p.planned is None and lines:
            lines.append(f"{p.finished} member runs finished (the planned count is not recorded)")
        return lines


def client_for(tracking_uri: str | None):
    """An MlflowClient for `tracking_uri` (or $MLFLOW_TRACKING_URI) without touching the global URI."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri), uri


def tracking_uri_problem(uri: str | None) -> str | None:
    """What is wrong with `uri` for reading, or None. A SQLite path that does not exist is an error:
    MLflow would silently create a new, empty store there."""
    if not uri:
        return ("none given and MLFLOW_TRACKING_URI is unset; pass one, e.g. sqlite:////abs/path/mlflow.db "
                "or http://127.0.0.1:5000")
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).is_file():
            return f"no MLflow database at {path!r} ({uri})"
    return None


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """`tracking_uri` or $MLFLOW_TRACKING_URI, checked by tracking_uri_problem."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    problem = tracking_uri_problem(uri)
    if problem:
        raise ValueError(f"tracking_uri: {problem}")
    return uri


def list_studies(tracking_uri: str | None = None) -> pd.DataFrame:
    """Every study in the store: parent runs tagged ``tpp.role=study``, across all active experiments."""
    client, _ = client_for(tracking_uri)
    return _studies_frame(client, _study_runs(client))


def load_study(study: str, tracking_uri: str | None = None, *,
               histories: list[str] | tuple[str, ...] | str | None = "all",
               max_workers: int | None = None) -> StudyData:
    """Load `study` (a study name or the parent run id) with its trials and per-epoch histories.

    `histories`: "all" (every ``stage/metric`` key a trial logged), a list of keys such as
    ``["finetune/test_acc"]``, or None to skip the per-epoch table (it is the slow part over HTTP).
    """
    client, uri = client_for(tracking_uri)
    parent, notes = _find_parent(client, study, uri)
    exp = client.get_experiment(parent.info.experiment_id)
    children = studies.member_runs(client, parent.info.experiment_id, parent.info.run_id)
    trials, param_names = _trials_frame(children)
    epochs = _epochs_frame(client, children, trials, histories, max_workers or _default_workers(uri))
    params = {k: _typed(v) for k, v in parent.data.params.items()}
    notes += extension_notes(parent.data.tags, len(children)) + sequential_note(parent.data.tags)
    return StudyData(
        name=parent.data.tags.get(TAG_STUDY) or parent.info.run_name or parent.info.run_id,
        tracking_uri=uri,
        experiment_id=parent.info.experiment_id,
        experiment_name=exp.name,
        parent_run_id=parent.info.run_id,
        parent_status=parent.info.status,
        parent_params=params,
        parent_metrics=dict(parent.data.metrics),
        parent_tags=dict(parent.data.tags),
        trials=trials,
        epochs=epochs,
        config_text=_config_text(client, parent.info.run_id, notes),
        notes=notes,
        param_names=param_names,
    )


def extension_notes(tags: dict[str, str], runs: int) -> list[str]:
    """One line per `tpp-study extend` of the study (its study-run tags): when, how many runs it grew by,
    which settings -- the report joins the member runs of every session."""
    out = []
    for key in sorted((k for k in tags if k.startswith(TAG_EXTENSION)),
                      key=lambda k: int(k[len(TAG_EXTENSION):]) if k[len(TAG_EXTENSION):].isdigit() else 0):
        try:
            e = json.loads(tags[key])
            out.append(f"extended on {e['at']}: {e['runs_before']} -> {e['runs_after']} planned runs "
                       f"({', '.join(e['changed'])}); the report joins all {runs} member runs")
        except (ValueError, KeyError, TypeError):
            out.append(f"the study run's tag {key} is not an extension record this version reads")
    return out


def planned_count(params: dict[str, Any], tags: dict[str, str]) -> int | None:
    """The planned number of trials, from a parent tag or param named e.g. ``num_trials`` (any prefix)."""
    for source in (tags, params):
        for key, value in source.items():
            if key.rsplit(".", 1)[-1] in PLANNED_KEYS:
                v = _typed(value)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
                    return int(v)
    return None


# ---------------------------------------------------------------------------------------------- internals

def _default_workers(uri: str) -> int:
    """Threads help over HTTP (each call is a round trip); a local SQLite file gains nothing from them."""
    return 8 if uri.startswith(("http://", "https://", "databricks")) else 1


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _study_runs(client) -> list:
    exp_ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        exp_ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            break
    runs = []
    for i in range(0, len(exp_ids), 100):
        runs.extend(_search_all(client, exp_ids[i:i + 100], f"tags.`{TAG_ROLE}` = '{ROLE_STUDY}'"))
    return runs


def _studies_frame(client, runs: list) -> pd.DataFrame:
    exp_names: dict[str, str] = {}
    rows = []
    for r in runs:
        eid = r.info.experiment_id
        if eid not in exp_names:
            exp_names[eid] = client.get_experiment(eid).name
        rows.append({"name": r.data.tags.get(TAG_STUDY) or r.info.run_name, "run_id": r.info.run_id,
                     "experiment": exp_names[eid], "status": r.info.status,
                     "start_time": pd.to_datetime(r.info.start_time, unit="ms")})
    cols = ["name", "run_id", "experiment", "status", "start_time"]
    return pd.DataFrame(rows, columns=cols).sort_values(["name", "start_time"], ignore_index=True)


def _find_parent(client, study: str, uri: str):
    notes: list[str] = []
    runs = _study_runs(client)
    matches = [r for r in runs if r.data.tags.get(TAG_STUDY) == study]
    if not matches:
        matches = [r for r in runs if r.info.run_name == study or r.info.run_id == study]
    if not matches and _RUN_ID.match(study):
        try:
            run = client.get_run(study)
        except Exception:  # noqa: BLE001 - any lookup failure means "not a run id here"
            run = None
        if run is not None:
            notes.append(f"run {study} is not tagged tpp.role=study; reading its child runs anyway")
            matches = [run]
    if not matches:
        names = sorted({n for n in _studies_frame(client, runs)["name"]})
        listing = ", ".join(names) if names else "none (no run tagged tpp.role=study)"
        raise StudyNotFoundError(f"study: no study {study!r} in {uri}; available studies: {listing}", names)
    matches.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    if len(matches) > 1:
        notes.append(f"{len(matches)} parent runs are named {study!r}; using the newest "
                     f"({matches[0].info.run_id})")
    return matches[0], notes


def _typed(value: Any) -> Any:
    """A logged parameter string back to int / float / bool / None where it reads as one."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    if s.lower() in ("none", "null", ""):
        return None
    if s in ("True", "False", "true", "false"):
        return s.lower() == "true"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return value


def _typed_column(col: pd.Series) -> pd.Series:
    """Make a parameter column numeric when every non-missing value reads as a number."""
    values = [_typed(v) for v in col]
    present = [v for v in values if v is not None]
    if not present:
        return pd.Series(np.nan, index=col.index, dtype=float)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if all(isinstance(v, int) for v in present) and len(present) == len(values):
            return pd.Series(values, index=col.index, dtype="int64")
        return pd.Series([np.nan if v is None else float(v) for v in values], index=col.index, dtype=float)
    if all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return pd.Series(values, index=col.index, dtype=bool)
    return col


def _trial_status(run) -> str:
    tag = run.data.tags.get(TAG_STATUS)
    if tag:
        return tag
    state = run.info.status
    if state in ("RUNNING", "SCHEDULED"):
        return "running"
    if state == "KILLED":
        return "interrupted"
    if state == "FINISHED" and "best_acc" in run.data.metrics:
        return "completed"
    return "failed"


def _trials_frame(children: list) -> tuple[pd.DataFrame, list[str]]:
    base_cols = ["run_id", "run_name", "method", "status", "run_status", *_TAG_COLUMNS, "start_time",
                 "end_time"]
    if not children:
        return pd.DataFrame(columns=base_cols), []
    rows, param_keys, metric_keys = [], set(), set()
    for r in children:
        params = dict(r.data.params)
        finals = {k: v for k, v in r.data.metrics.items() if "/" not in k}
        param_keys.update(params)
        metric_keys.update(finals)
        rows.append((r, params, finals))
    param_keys.discard("method")  # already the `method` column (from the tpp.method tag, else this param)
    clash = param_keys & (metric_keys | set(base_cols))
    records = []
    for r, params, finals in rows:
        rec = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "method": r.data.tags.get(TAG_METHOD) or params.get("method"),
            "status": _trial_status(r),
            "run_status": r.info.status,
            **{col: r.data.tags.get(tag) for col, tag in _TAG_COLUMNS.items()},
            "start_time": r.info.start_time or None,
            "end_time": r.info.end_time or None,
        }
        rec.update({(f"param.{k}" if k in clash else k): v for k, v in params.items() if k != "method"})
        rec.update(finals)
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for col in ("start_time", "end_time"):  # one conversion per column, not two per run
        df[col] = pd.to_datetime(df[col].astype("Int64"), unit="ms")
    for k in param_keys:
        col = f"param.{k}" if k in clash else k
        df[col] = _typed_column(df[col])
    for k in metric_keys:
        df[k] = pd.to_numeric(df[k], errors="coerce")
    df["trial_id"] = df["trial_id"].fillna(df["run_name"])
    df["member_id"] = df["member_id"].fillna(df["run_id"])
    if "growth" not in df:  # v2 schema: growth is logged only for methods with a penalty
        df["growth"] = np.nan
    names = sorted({f"param.{k}" if k in clash else k for k in param_keys} | {"method", "growth"})
    return df.sort_values(["start_time", "run_id"], ignore_index=True), names


def _epochs_frame(client, children: list, trials: pd.DataFrame, histories, workers: int) -> pd.DataFrame:
    cols = ["run_id", "trial_id", "method", "pr", "growth", "lr", "seed", "status", "stage", "epoch"]
    if histories is None or not children:
        return pd.DataFrame(columns=cols)
    wanted = None if histories == "all" else set(histories)
    jobs = [(r.info.run_id, k) for r in children for k in r.data.metrics
            if "/" in k and (wanted is None or k in wanted)]
    if not jobs:
        return pd.DataFrame(columns=cols)
    results = _histories(client, jobs, workers)
    records = []
    for run_id, key, hist in results:
        stage, name = key.split("/", 1)
        name = _EPOCH_RENAME.get(name, name)
        for m in hist:
            records.append((run_id, stage, int(m.step), name, float(m.value)))
    long = pd.DataFrame.from_records(records, columns=["run_id", "stage", "epoch", "name", "value"])
    # A key logged twice at one step (e.g. a resumed trial) keeps its last value.
    long = long.drop_duplicates(["run_id", "stage", "epoch", "name"], keep="last")
    wide = long.pivot(index=["run_id", "stage", "epoch"], columns="name", values="value").reset_index()
    wide.columns.name = None
    info = trials[[c for c in ["run_id", "trial_id", "method", "pr", "growth", "lr", "seed", "status"]
                   if c in trials]]
    out = info.merge(wide, on="run_id", how="right")
    return out.sort_values(["run_id", "stage", "epoch"], ignore_index=True)


BULK_RUNS = 500  # run ids per bulk history query (SQLite takes 32,766 bound parameters)


def _histories(client, jobs: list[tuple[str, str]], workers: int, bulk: bool = True) -> list[tuple]:
    """[(run_id, key, [Metric])] of every (run, key) job. On a SQL store, one query per key and 500 runs
    (its `get_metric_history_bulk`, what MLflow's server answers the UI's bulk requests with; the client
    has no bulk read), not one per job: 5 keys x 1,000 runs are 10 queries instead of 5,000. Over HTTP
    (no bulk call in MLflow's client) one call per job, in `workers` threads."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if bulk and callable(getattr(store, "get_metric_history_bulk", None)):  # only SQL stores have it
        by_key: dict[str, list[str]] = {}
        for run_id, key in jobs:
            by_key.setdefault(key, []).append(run_id)
        found: dict[tuple[str, str], list] = {job: [] for job in jobs}
        for key, run_ids in by_key.items():
            for i in range(0, len(run_ids), BULK_RUNS):
                for m in store.get_metric_history_bulk(run_ids[i:i + BULK_RUNS], key, max_results=2 ** 62):
                    found[(m.run_id, key)].append(m)
        return [(run_id, key, found[(run_id, key)]) for run_id, key in jobs]

    def fetch(job):
        run_id, key = job
        return run_id, key, client.get_metric_history(run_id, key)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fetch, jobs))
    return [fetch(j) for j in jobs]


def _config_text(client, run_id: str, notes: list[str]) -> str | None:
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
        if "study_config.yaml" not in names:
            return None
        quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # no progress bar for one small file
        saved = {k: os.environ.get(k) for k in quiet}
        os.environ.update(quiet)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return Path(client.download_artifacts(run_id, "study_config.yaml", tmp)).read_text()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    except Exception as exc:  # noqa: BLE001 - the config is optional; say why it is missing
        notes.append(f"could not read study_config.yaml from the study run: {exc}")
        return None
