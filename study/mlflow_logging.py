"""MLflow: one parent run per study, one nested child run per member -- written by the driver only.

Only the driver writes (a Ray Tune callback), so a SQLite store has a single writer and trials on
other nodes need no route to the tracking server. Every write goes through an outbox: batched
(`log_batch`), in order, and kept when the store is unreachable or full -- retried with back-off
while the study goes on, and saved to the study folder if it never comes back, to be replayed by the
next `run`/`resume`. MLflow is the record of what finished: a member's run is found again by its tag
`tpp.member_id`, so a resumed study continues unfinished runs and never re-runs a FINISHED one.

Schema (read by analysis/): experiment tags mlflow.experimentKind, mlflow.sharedViewState.tpp-<study>
(the study's saved view), mlflow.note.content, tpp.auto_note; parent tags tpp.study, tpp.role=study,
tpp.best_run_id, tpp.dense_model_id, mlflow.note.content (description and best-run link); child tags
mlflow.parentRunId, tpp.study, tpp.role=trial, tpp.member_id, tpp.trial_id, tpp.prune_key,
tpp.dense_digest, tpp.method, tpp.status, tpp.reuse; per-epoch metrics `{stage}/{name}` with step =
epoch; final metrics without a slash (6 significant digits).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ray import tune

log = logging.getLogger("study.mlflow")

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's per-log_batch limits
FLUSH_EVERY_S = 5.0  # run starts and epoch curves reach MLflow within this; ends and checkpoints at once
PARAM_MAX_CHARS = 6000
NO_SPACE = ("No space left on device", "database or disk is full")
# Store errors that go away by themselves: keep the write and retry (a full disk included).
TRANSIENT = ("database is locked", "connection", "timed out", "max retries", "temporarily unavailable", "503",
             "502", "database or disk is full", "disk i/o error", "no space left")


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached."""


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_healthy(uri: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_tracking(uri: str, wait_s: float = 0.0) -> None:
    """Fail early and clearly when an MLflow server URI does not answer (before anything is trained)."""
    if not is_http(uri):
        if not uri.startswith(("sqlite:///", "file:", "postgresql", "mysql", "mssql", "databricks")):
            raise TrackingUnavailable(f"tracking URI {uri!r}: use sqlite:///ABS/PATH.db or http://HOST:PORT")
        return
    deadline = time.monotonic() + wait_s
    while not server_healthy(uri):
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"the MLflow tracking server {uri} does not answer {uri.rstrip('/')}/health; start it first, "
                "e.g. `mlflow server --backend-store-uri sqlite:///ABS/mlflow.db --host 127.0.0.1 "
                "--port 5000`, "
                "or leave --tracking-uri out to use a SQLite file in the study folder")
        time.sleep(0.5)


def configure_mlflow_env() -> None:
    """Keep one MLflow HTTP call short (the outbox retries), the console to one line per run, and send
    MLflow no usage telemetry (a user opts in by setting MLFLOW_DISABLE_TELEMETRY=false)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per run
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Creating initial MLflow database tables"
    _sqlite_write_ahead_log()


def _sqlite_write_ahead_log() -> None:
    """Every SQLite database this process opens (MLflow's store, Optuna's) in WAL mode, synced at
    checkpoints only (`synchronous=NORMAL`).

    MLflow commits each `log_batch` in three transactions, and in SQLite's default rollback-journal
    mode each commit waits on an fsync: ~0.1 s of the driver per member run, during which the Tune
    loop does not hand results back to the trials waiting on it. In WAL mode a commit is an append;
    a killed process loses nothing that was committed (only a power cut can lose the last commits,
    never consistency), and readers -- `mlflow ui`, `tpp-analyze` -- no longer block the writer.
    MLflow has no setting for this, hence SQLAlchemy's documented connect hook.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _wal_on_connect):
        event.listen(Engine, "connect", _wal_on_connect)


def _wal_on_connect(dbapi_connection: Any, _record: Any) -> None:
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def sqlite_checkpoint(uri: str) -> None:
    """Move a SQLite store's write-ahead log into its main file (a study's `mlflow.db` then holds
    everything, to be copied alone). Best effort: a reader in mid-query leaves the rest for later."""
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(uri[len("sqlite:///"):],
                                                                                timeout=5)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dot keys with string values (lists and empty dicts as JSON, None left out)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(v)
        elif v is not None:
            out[key] = str(v)
    return out


# ---------------------------------------------------------------------------------------------- outbox
class Outbox:
    """Ordered MLflow writes with retry. Ops refer to runs by a local key (member id or "parent")."""

    def __init__(self, uri: str, run_ids: dict[str, str] | None = None):
        self.uri = uri
        self.ops: collections.deque[list[Any]] = collections.deque()  # [kind, key, payload]
        self.run_ids: dict[str, str] = dict(run_ids or {})
        self._client: Any = None
        self._next_try = 0.0
        self._backoff = 1.0
        self.problem: str | None = None  # why the last delivery stopped (None once delivered)
        self.delivered = 0  # MLflow calls made (merging keeps this far below the ops queued)

    @property
    def mlflow(self) -> Any:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def create_run(self, key: str, experiment_id: str, name: str, tags: dict[str, str]) -> None:
        self.ops.append(["create", key, {"experiment_id": experiment_id, "name": name, "tags": tags}])

    def batch(self, key: str, metrics: list | tuple = (), params: dict[str, str] | None = None,
              tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        ms = [[k, float(v), now, int(step)] for k, v, step in metrics
              if isinstance(v, (int, float)) and not math.isnan(float(v))]
        ps = sorted([k, v] for k, v in (params or {}).items())
        ts = sorted([k, v] for k, v in (tags or {}).items())
        while ms or ps or ts:
            self.ops.append(["batch", key, {"metrics": ms[:MAX_METRICS], "params": ps[:MAX_PARAMS],
                                            "tags": ts[:MAX_TAGS]}])
            ms, ps, ts = ms[MAX_METRICS:], ps[MAX_PARAMS:], ts[MAX_TAGS:]

    def status(self, key: str, status: str) -> None:
        """Set the run's lifecycle status: RUNNING (reopen) or FINISHED | FAILED | KILLED (end)."""
        self.ops.append(["status", key, {"status": status}])

    def text(self, key: str, text: str, artifact_file: str) -> None:
        self.ops.append(["text", key, {"text": text, "file": artifact_file}])

    def _apply(self, kind: str, key: str, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c = self.mlflow
        if kind == "create":
            run = c.create_run(op["experiment_id"], tags=op["tags"], run_name=op["name"])
            self.run_ids[key] = run.info.run_id
            return
        run_id = self.run_ids[key]
        if kind == "batch":
            c.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in op["metrics"]],
                        params=[Param(k, v[:PARAM_MAX_CHARS]) for k, v in op["params"]],
                        tags=[RunTag(k, v[:5000]) for k, v in op["tags"]], synchronous=True)
        elif kind == "status":
            if op["status"] == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, status=op["status"])
        elif kind == "text":
            c.log_text(run_id, op["text"], op["file"])

    def _coalesce(self) -> None:
        """Merge each run's queued batches into as few `log_batch` calls as MLflow's limits allow.

        Runs are independent, so only the order within a run is kept: a batch joins the run's previous
        one unless another write to that run (create, status, text) came between them, a limit would be
        passed, or a param/tag key repeats (the later value must land later).
        """
        merged: list[list[Any]] = []
        open_batch: dict[str, dict[str, Any]] = {}
        for kind, key, op in self.ops:
            if kind != "batch":
                open_batch.pop(key, None)
                merged.append([kind, key, op])
                continue
            into = open_batch.get(key)
            if into is not None and _fits(into, op):
                for part in ("metrics", "params", "tags"):
                    into[part] = into[part] + op[part]
                continue
            op = dict(op)
            open_batch[key] = op
            merged.append([kind, key, op])
        self.ops = collections.deque(merged)

    def flush(self, force: bool = False) -> bool:
        """Deliver queued writes in order; True when the queue is empty. Stops at an outage."""
        if not self.ops:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        self._coalesce()
        if is_http(self.uri) and not server_healthy(self.uri, timeout=2.0):
            self._defer("the tracking server does not answer")
            return False
        while self.ops:
            kind, key, op = self.ops[0]
            if kind != "create" and key not in self.run_ids:
                log.warning("MLflow: dropping a %s for %s whose run was never created", kind, key)
                self.ops.popleft()
                continue
            try:
                self._apply(kind, key, op)
            except Exception as e:  # noqa: BLE001 - decide between "outage" and "bad write"
                if (is_http(self.uri) and not server_healthy(self.uri, timeout=2.0)) or _transient(e):
                    self._defer(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    return False
                log.warning("MLflow: dropping a %s for %s that the store refused: %s", kind, key,
                            str(e)[:300])
            self.ops.popleft()
            self.delivered += 1
        self._backoff, self._next_try, self.problem = 1.0, 0.0, None
        return True

    def _defer(self, why: str) -> None:
        if self.problem is None:
            print(f"[tpp-study] MLflow unreachable ({why}); keeping {len(self.ops)} write(s), retrying",
                  flush=True)
        self.problem = why
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)

    def drain(self, timeout_s: float) -> bool:
        """Flush, waiting up to `timeout_s` for an unreachable store to come back."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self._backoff, max(deadline - time.monotonic(), 0.1)))
        return True

    def save_pending(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"ops": list(self.ops), "run_ids": self.run_ids}))
        os.replace(tmp, path)

    def load_pending(self, path: Path) -> None:
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        self.ops.extendleft(reversed(saved["ops"]))
        for k, v in saved["run_ids"].items():
            self.run_ids.setdefault(k, v)


def _fits(into: dict[str, Any], op: dict[str, Any]) -> bool:
    """Whether batch `op` can join batch `into` in one log_batch call."""
    for part, limit in (("metrics", MAX_METRICS), ("params", MAX_PARAMS), ("tags", MAX_TAGS)):
        if len(into[part]) + len(op[part]) > limit:
            return False
    return not ({k for k, _ in into["params"]} & {k for k, _ in op["params"]}
                or {k for k, _ in into["tags"]} & {k for k, _ in op["tags"]})


def _transient(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in TRANSIENT)


# ---------------------------------------------------------------------------------------------- parent
# What MLflow 3.17's UI reads (checked in its JS bundle, mlflow/server/js/build/static/js):
# * The GenAI-or-training switch is `workflowType`: the URL parameter `?workflowType=machine_learning`,
#   else the browser's localStorage key `mlflow.workflowType_v1` (set by the sidebar's GenAI / Model
#   training switch), else "genai". An experiment opened without a tab lands on Runs only in the
#   machine_learning workflow. 3.17 derives the experiment kind from that switch and ignores the
#   experiment tag `mlflow.experimentKind` (its feature flag is hard-wired on); earlier 3.x releases read
#   the tag, so it is still set. Nothing on the tracking side changes the home page.
# * Saved views: an experiment tag `mlflow.sharedViewState.<key>` holding {name, createdAt, updatedAt,
#   state} (state: the runs page's filter, sort, columns, widths and charts as JSON), listed under
#   "Views" and opened by `#/experiments/<id>/runs?viewStateShareKey=<key>`. Default columns otherwise
#   live only in the browser's localStorage.
# * Markdown in `mlflow.note.content`, on runs and on experiments (shown above the runs table).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
NOTE_TAG = "mlflow.note.content"
AUTO_NOTE_TAG = "tpp.auto_note"  # the experiment note as tpp last wrote it: a note edited since is kept
DENSE_MODEL_TAG = "tpp.dense_model_id"  # on the parent run: the dense model's MLflow LoggedModel
VIEW_METRICS = ("test_acc_at_best_val", "last_acc", "acc_after_removal", "param_ratio", "speedup")
MAX_VIEW_CHARS = 20000  # MLflow's limit on an experiment tag's value


def view_key(study: str) -> str:
    """The study's saved-view key (the `viewStateShareKey` of its runs page URL)."""
    return "tpp-" + re.sub(r"[^A-Za-z0-9_-]", "-", study)


def runs_route(experiment_id: str, study: str | None = None) -> str:
    """The hash route of the runs page in MLflow's training workflow, on the study's saved view."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view_key(study)}" if study else "")
    return f"#/experiments/{experiment_id}/runs?{query}"


def runs_page_url(base: str, experiment_id: str, study: str | None = None) -> str:
    """e.g. http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=tpp-x"""
    return f"{base.rstrip('/')}/{runs_route(experiment_id, study)}"


def study_view(cfg: Any) -> dict[str, Any]:
    """The runs page state of a study's saved view: its member runs, best first, with the searched
    values and the main results as columns, a parallel-coordinates chart (method, PR, log10 LR and the
    finetune axes that vary against the objective: every run plottable) and the objective over log10 LR.
    """
    from study.design import has_penalty, varying

    metric = cfg.objective.metric
    penalty = any(has_penalty(cfg, m.shown) for m in cfg.methods)
    params = ["method_label", "pr", *(["growth"] if penalty else []), "log10_lr", "lr", "seed", *varying(cfg)]
    metrics = [metric, *(m for m in VIEW_METRICS if m != metric)]
    columns = ([f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
               + ["tags.`tpp.status`", "attributes.`Dataset`"])
    section = "tpp-study"
    charts = [
        {"uuid": "tpp-parallel", "type": "PARALLEL", "metricSectionId": section, "isGenerated": False,
         "deleted": False, "selectedParams": ["method_label", "pr", "log10_lr", *varying(cfg)],
         "selectedMetrics": [metric], "showAllRuns": True},
        {"uuid": "tpp-lr", "type": "SCATTER", "metricSectionId": section, "isGenerated": False,
         "deleted": False, "xaxis": {"key": "log10_lr", "type": "PARAM"},
         "yaxis": {"key": metric, "type": "METRIC"}, "runsCountToCompare": 1000},
    ]
    return {
        "searchFilter": f"tags.`tpp.study` = '{cfg.name}' and tags.`tpp.role` = 'trial'",
        "orderByKey": f"metrics.`{metric}`", "orderByAsc": cfg.objective.mode == "min",
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs", "selectedColumns": columns,
        # MLflow applies widths only to the columns listed in columnOrder (ids as its table names them)
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", "attributes.`Dataset`", "duration",
                        *columns[:-1]],
        "columnWidths": {"attributes.`Run Name`": 240, "runDateAndNestInfo": 125, "attributes.`Dataset`": 190,
                         "duration": 70, **{c: 85 if c.startswith("params.") else 95 for c in columns[:-1]}},
        "runsHiddenMode": "SHOW_ALL",  # charts show every run, not MLflow's default first 10
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": f"Study {cfg.name}", "display": True,
                                "isReordered": False, "deleted": False, "isGenerated": False}],
        "isAccordionReordered": True,  # the study's section first; MLflow adds its per-metric charts after
    }


def write_study_view(c: Any, experiment_id: str, cfg: Any) -> str:
    """Save the study's runs view on its experiment (MLflow's "Views" menu); returns its key."""
    now = int(time.time() * 1000)
    key = view_key(cfg.name)
    value = json.dumps({"name": f"tpp study {cfg.name}", "createdAt": now, "updatedAt": now,
                        "state": json.dumps(study_view(cfg), separators=(",", ":"))})
    if len(value) > MAX_VIEW_CHARS:
        raise ValueError(f"the saved view of study {cfg.name} has {len(value)} characters; "
                         f"MLflow keeps at most {MAX_VIEW_CHARS}")
    c.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, value)
    return key


def experiment_note(experiment_id: str, studies: list[str]) -> str:
    """The experiment's description (markdown, one line above its runs table): a link per tpp study."""
    links = " · ".join(f"[{s}]({runs_route(experiment_id, s)})" for s in sorted(studies))
    return (f"**tpp studies**, their runs best first: {links} (saved views, also in the *Views* menu; a "
            "study's description is on its parent run)")


def study_note(description: str | None, experiment_id: str, study: str,
               best: dict[str, Any] | None = None) -> str:
    """The parent run's description (markdown): the config's description, a link to the best run with
    its value rounded, and a link to the study's runs, best first."""
    parts = [description.strip()] if description else []
    if best:
        link = f"#/experiments/{experiment_id}/runs/{best['run_id']}"
        parts.append(f"**Best run:** [{best['run_name']}]({link}) -- {best['metric']} {best['value']:.4g}")
    parts.append(f"[All runs of this study, best first]({runs_route(experiment_id, study)})")
    return "\n\n".join(parts)


def _view_studies(tags: dict[str, str]) -> list[str]:
    """The studies with a tpp saved view among an experiment's tags."""
    out = []
    for k, v in tags.items():
        if k.startswith(VIEW_TAG_PREFIX + "tpp-"):
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                out.append(json.loads(v)["name"].removeprefix("tpp study "))
    return out


def _dashboard(c: Any, experiment_id: str, study_dir: Path) -> None:
    """Experiment tags, the study's saved view and the experiment's note: what makes the UI open on the
    study's runs. Best effort: a failure is logged, never stops the study."""
    from study.config import load_config
    from study.store import StudyFolder

    try:
        cfg = load_config(StudyFolder(study_dir).config_path)
        exp = c.get_experiment(experiment_id)
        for k, v in EXPERIMENT_TAGS.items():
            if exp.tags.get(k) != v:
                c.set_experiment_tag(experiment_id, k, v)
        write_study_view(c, experiment_id, cfg)
        note = exp.tags.get(NOTE_TAG)
        if note is None or note == exp.tags.get(AUTO_NOTE_TAG):  # never overwrite a user's description
            note = experiment_note(experiment_id, sorted(set(_view_studies(exp.tags)) | {cfg.name}))
            c.set_experiment_tag(experiment_id, NOTE_TAG, note)
            c.set_experiment_tag(experiment_id, AUTO_NOTE_TAG, note)
    except Exception as e:  # noqa: BLE001 - the dashboard is a convenience, the study goes on
        log.warning("MLflow: could not write the study's saved view or experiment tags: %s", str(e)[:300])


def ensure_experiment(c: Any, name: str, study_dir: Path, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # A local store keeps artifacts in the study folder; a server decides itself (its artifact proxy).
    location = None if is_http(uri) else (study_dir / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def start_parent(uri: str, experiment: str, study_dir: Path, name: str, params: dict[str, str],
                 tags: dict[str, str], artifacts: dict[str, str]) -> tuple[str, str]:
    """Create the study's parent run (and the experiment's dashboard tags); returns (experiment_id,
    run_id)."""
    c = client(uri)
    exp_id = ensure_experiment(c, experiment, study_dir, uri)
    _dashboard(c, exp_id, study_dir)
    run = c.create_run(exp_id, run_name=name, tags={"tpp.study": name, "tpp.role": "study",
                                                    "tpp.study_dir": str(study_dir), **tags})
    box = Outbox(uri, {"parent": run.info.run_id})
    box.batch("parent", params=params)
    for fname, text in artifacts.items():
        box.text("parent", text, fname)
    if not box.drain(60):
        raise TrackingUnavailable(f"could not write the study's parent run to {uri}")
    return exp_id, run.info.run_id


# ------------------------------------------------------------------------------------- data and model
def data_digest(cfg: Any) -> str:
    """The data set's identity as the study sees it: name, root, loader kwargs and validation split."""
    d = cfg.data
    key = json.dumps({"name": d.name, "root": d.root, "kwargs": d.kwargs, "val_fraction": d.val_fraction},
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def data_input(cfg: Any, spec: Any = None) -> Any:
    """The study's data set as an MLflow dataset input (context "train"): name, digest, source (files
    under a root, else the loader in tpp.data), and, with the dense model's spec, the tensor schema."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from tpp.data.registry import _DATA, default_root

    d = cfg.data
    entry = _DATA.get(d.name)
    if entry is not None and entry.takes_root:
        source_type, source = "local", {"uri": default_root(d.root)}
    else:
        source_type, source = "code", {"tags": {"tpp.data": d.name}}
    schema = None
    if spec is not None:
        features = [{"type": "tensor", "name": "x", "tensor-spec": {"dtype": "float32",
                                                                    "shape": [-1, *spec.input_shape]}}]
        targets = [{"type": "tensor", "name": "y", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]
        schema = json.dumps({"mlflow_tensorspec": {"features": json.dumps(features),
                                                   "targets": json.dumps(targets)}})
    profile = json.dumps({"kwargs": d.kwargs, "val_fraction": d.val_fraction,
                          **({"num_classes": spec.num_classes} if spec is not None else {})}, sort_keys=True)
    ds = Dataset(name=d.name, digest=data_digest(cfg), source_type=source_type, source=json.dumps(source),
                 schema=schema, profile=profile)
    return DatasetInput(ds, [InputTag("mlflow.data.context", "train")])


def study_inputs(c: Any, meta: Any, cfg: Any, study_dir: str) -> tuple[Any, str | None]:
    """(the data set input, the dense model's LoggedModel id) of a study whose dense model is trained:
    the model is created once (found again by the parent's tag tpp.dense_model_id) with the parent run
    as its source, and both are logged on the parent run."""
    from mlflow.entities import LoggedModelOutput

    from study.store import StudyFolder
    from tpp.checkpoint import load_dense

    folder = StudyFolder(study_dir)
    dense = load_dense(folder.dense_path) if folder.dense_path.is_file() else None
    spec = dense.spec if dense is not None else None
    data = data_input(cfg, spec)
    parent = c.get_run(meta.parent_run_id)
    model_id = parent.data.tags.get(DENSE_MODEL_TAG)
    if model_id is None and dense is not None:
        dense_cfg = cfg.dense
        params = {"model": spec.name, "model_kwargs": json.dumps(spec.kwargs, sort_keys=True),
                  "num_classes": str(spec.num_classes), "input_shape": json.dumps(list(spec.input_shape)),
                  **({"checkpoint": str(dense_cfg.checkpoint)} if dense_cfg.checkpoint else
                     {"epochs": str(dense_cfg.epochs), "lr": str(dense_cfg.lr),
                      "batch_size": str(dense_cfg.batch_size)})}
        tags = {"tpp.study": meta.name, "tpp.dense_digest": meta.dense_digest or dense.digest(),
                "tpp.dense_path": str(folder.dense_path)}
        if "dense_acc" in dense.metrics:  # rounded: tags are shown as text
            tags["tpp.dense_acc"] = f"{dense.metrics['dense_acc']:.4g}"
        model = c.create_logged_model(meta.experiment_id, name=f"dense-{spec.name}",
                                      source_run_id=meta.parent_run_id, tags=tags, params=params,
                                      model_type="dense")
        c.finalize_logged_model(model.model_id, "READY")
        model_id = model.model_id
        c.log_outputs(meta.parent_run_id, [LoggedModelOutput(model_id, step=0)])
        c.set_tag(meta.parent_run_id, DENSE_MODEL_TAG, model_id)
    if not parent.inputs or not parent.inputs.dataset_inputs:
        c.log_inputs(meta.parent_run_id, datasets=[data])
    return data, model_id


def log_member_inputs(c: Any, run_id: str, data: Any, model_id: str | None) -> None:
    """A member run's inputs: the study's data set and the dense model it was pruned from."""
    from mlflow.entities import LoggedModelInput

    c.log_inputs(run_id, datasets=[data], models=[LoggedModelInput(model_id)] if model_id else None)


def children(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of the parent (all pages)."""
    c = client(uri)
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                             max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def finished_members(runs: list[Any]) -> dict[str, dict[str, Any]]:
    """{member id: {"status", "metrics"}} of the FINISHED member runs: what a resumed study never re-runs."""
    return {r.data.tags["tpp.member_id"]: {
        "status": r.data.tags.get("tpp.status", "completed"),
        "metrics": {k: v for k, v in r.data.metrics.items() if "/" not in k}}
        for r in runs if r.info.status == "FINISHED" and "tpp.member_id" in r.data.tags}


# ---------------------------------------------------------------------------------------------- callback
_RUN_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class StudyLogger(tune.Callback):
    """Ray Tune callback on the driver: one run per member, nested under the study's parent run.

    Picklable with no live state (Tune pickles callbacks into its experiment state); everything is
    (re)built in `setup` from `study.json` and the member runs MLflow already holds.
    """

    def __init__(self, study_dir: str):
        self.study_dir = study_dir
        self._reset()

    def _reset(self) -> None:
        self.box: Outbox | None = None
        self.status: dict[str, str] = {}  # member id -> MLflow run status
        self.last_step: dict[tuple[str, str], int] = {}  # (member, metric) -> last step logged
        self.members: dict[str, list[str]] = {}  # trial id -> its member ids
        self.node: dict[str, str] = {}  # member id -> the node it last reported from (tag tpp.node)
        self.inputs_due: list[str] = []  # members whose inputs are logged once their run exists
        self.flushed = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.study_dir = state["study_dir"]
        self._reset()

    def setup(self, **info: Any) -> None:
        from study.config import load_config
        from study.store import StudyFolder

        folder = StudyFolder(self.study_dir)
        self.meta = folder.read_meta()
        self.config = load_config(folder.config_path)
        self.box = Outbox(self.meta.tracking_uri, {})
        self.box.load_pending(folder.pending_log)
        folder.pending_log.unlink(missing_ok=True)
        for run in children(self.meta.tracking_uri, self.meta.experiment_id, self.meta.parent_run_id):
            mid = run.data.tags.get("tpp.member_id")
            if not mid:
                continue
            self.box.run_ids[mid] = run.info.run_id
            self.status[mid] = run.info.status
            if run.info.status != "FINISHED":  # to be continued: remember how far its curves got
                for key in run.data.metrics:
                    if "/" in key:
                        steps = [m.step for m in self.box.mlflow.get_metric_history(run.info.run_id, key)]
                        self.last_step[(mid, key)] = max(steps, default=-1)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.design import logged_params, run_name, varying
        from study.trainable import resolve

        assert self.box is not None
        if trial.config.get("kind") == "prune":
            return
        runs = resolve(self.config, trial.config, trial.trial_id)
        self.members[trial.trial_id] = runs.ids
        shown = varying(self.config)
        created = []
        for rc, mid in zip(runs.configs, runs.ids, strict=True):
            if self.status.get(mid) == "FINISHED":
                continue
            tags = {"tpp.status": "running", "tpp.trial_id": trial.trial_id}
            if mid in self.box.run_ids:  # resumed: reopen the existing run (its params again: a write
                self.box.status(mid, "RUNNING")  # lost to a full disk may have been them; same values)
                self.box.batch(mid, params=logged_params(runs.point, rc), tags=tags)
            else:
                from tpp.run import prune_key

                self.box.create_run(mid, self.meta.experiment_id, run_name(runs.point, rc, shown), {
                    **tags, "mlflow.parentRunId": self.meta.parent_run_id, "tpp.study": self.meta.name,
                    "tpp.role": "trial", "tpp.member_id": mid, "tpp.method": runs.point.method,
                    "tpp.prune_key": prune_key(rc, self.meta.dense_digest),
                    "tpp.dense_digest": self.meta.dense_digest})
                self.box.batch(mid, params=logged_params(runs.point, rc))
                created.append(mid)
            self.status[mid] = "RUNNING"
        # created with the next delivery, so that the run, its params and first epochs are one write
        self.inputs_due.extend(created)

    def _flush(self, force: bool = False) -> None:
        assert self.box is not None
        self.box.flush(force)
        self.flushed = time.monotonic()
        self._log_due_inputs()

    def _log_due_inputs(self) -> None:
        """The inputs of the runs created since the last delivery."""
        assert self.box is not None
        due = [m for m in self.inputs_due if m in self.box.run_ids]
        if due:
            self.inputs_due = [m for m in self.inputs_due if m not in self.box.run_ids]
            self._log_inputs(due)

    def _log_inputs(self, mids: list[str]) -> None:
        """The data set and dense-model inputs of runs just created (and, once, the dense model itself).

        Best effort and not through the outbox (it has no such write): skipped while the store is
        unreachable, and a failure only logged -- the dashboard loses a column, the study nothing."""
        box = self.box
        assert box is not None
        if not mids or box.problem is not None or any(m not in box.run_ids for m in mids):
            return
        try:
            inputs = getattr(self, "_inputs", None)
            if inputs is None:
                inputs = self._inputs = study_inputs(box.mlflow, self.meta, self.config, self.study_dir)
            for mid in mids:
                log_member_inputs(box.mlflow, box.run_ids[mid], *inputs)
        except Exception as e:  # noqa: BLE001 - see above
            log.warning("MLflow: could not log the data set / dense model inputs: %s", str(e)[:300])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        assert self.box is not None
        by_member: dict[str, list[tuple[str, float, int]]] = collections.defaultdict(list)
        for mid, key, value, step in result.get("tpp_rows") or []:
            if self.status.get(mid) == "RUNNING" and step > self.last_step.get((mid, key), -1):
                self.last_step[(mid, key)] = step
                by_member[mid].append((key, value, step))
        node = str(result.get("tpp_node", ""))
        for mid, rows in by_member.items():
            tags = {"tpp.node": node} if self.node.get(mid) != node else None  # a tag write costs a commit
            self.node[mid] = node
            self.box.batch(mid, metrics=rows, tags=tags)
        for mid, reuse in (result.get("tpp_reuse") or {}).items():
            if self.status.get(mid) == "RUNNING":
                self.box.batch(mid, tags={"tpp.reuse": reuse})
        for mid, rec in (result.get("tpp_done") or {}).items():
            if self.status.get(mid) == "RUNNING":
                tags = {"tpp.status": rec["status"]}
                if rec["metrics"].get("diverged_stage_prune"):
                    tags["tpp.diverged_stage"] = "prune"
                elif rec["status"] == "diverged":
                    tags["tpp.diverged_stage"] = "finetune"
                self.box.batch(mid, metrics=[(k, v, 0) for k, v in rec["metrics"].items()], tags=tags)
                self._end(mid, rec["status"], flush=False)
        if result.get("tpp_done") or time.monotonic() - self.flushed >= FLUSH_EVERY_S:
            self._flush(force=bool(result.get("tpp_done")))  # ends at once: one write per ended run

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.box is not None and time.monotonic() - self.flushed >= FLUSH_EVERY_S:
            self._flush()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """A trial resumes from its last checkpoint: every epoch before it must be in MLflow by then."""
        self._flush(force=True)

    def _end(self, mid: str, status: str, extra_tags: dict[str, str] | None = None,
             flush: bool = True) -> None:
        assert self.box is not None
        if extra_tags:
            self.box.batch(mid, tags=extra_tags)
        self.box.status(mid, _RUN_STATUS.get(status, "FINISHED"))
        self.status[mid] = _RUN_STATUS.get(status, "FINISHED")
        if flush:
            self._flush(force=True)

    def _open(self, trial_id: str) -> list[str]:
        return [m for m in self.members.get(trial_id, []) if self.status.get(m) == "RUNNING"]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        for mid in self._open(trial.trial_id):  # stopped early by the scheduler: keep what it reached
            value = last.get(self.config.objective.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.box.batch(mid, metrics=[(self.config.objective.metric, value, 0)])
            self._end(mid, "completed", {"tpp.status": "completed", "tpp.early_stopped": "true"})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.progress import last_error_line

        error = ""
        if getattr(trial, "error_file", None) and os.path.isfile(trial.error_file):
            error = Path(trial.error_file).read_text()[-4000:]
        if trial.trial_id not in self.members:
            self.on_trial_start(iteration, trials, trial)  # failed before it ever started
        # a full disk is no fault of the member: it is stopped, and runs again on resume
        status = "interrupted" if any(s in error for s in NO_SPACE) else "failed"
        for mid in self._open(trial.trial_id):
            self._end(mid, status, {"tpp.status": status, "tpp.error": error or last_error_line(trial)})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self) -> None:
        """End every still-open member run as KILLED (interrupted), then deliver or save what is queued."""
        if self.box is None:
            return
        for mid, status in list(self.status.items()):
            if status == "RUNNING":
                self._end(mid, "interrupted", {"tpp.status": "interrupted"})
        full = any(s in (self.box.problem or "") for s in NO_SPACE)
        delivered = self.box.drain(5 if full else 60)
        self._log_due_inputs()
        if not delivered:
            from study.store import StudyFolder

            folder = StudyFolder(self.study_dir)
            try:
                self.box.save_pending(folder.pending_log)
            except OSError as e:  # the disk is full: what is lost here is redone by `resume`
                print(f"[tpp-study] {len(self.box.ops)} MLflow write(s) could not be kept ({e}); the runs "
                      "they belong to are not FINISHED, so `resume` runs them again", flush=True)
                return
            print(f"[tpp-study] MLflow still unreachable: {len(self.box.ops)} write(s) saved to "
                  f"{folder.pending_log}; `tpp-study resume {self.meta.name}` delivers them", flush=True)
