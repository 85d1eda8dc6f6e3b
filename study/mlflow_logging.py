"""MLflow: one parent run per study, one nested child run per trial -- written by the driver only.

Only the driver writes (a Ray Tune callback), so a SQLite store has a single writer and trials on
other nodes need no route to the tracking server. Every write goes through an outbox: batched
(`log_batch`), in order, and kept when the server is unreachable -- retried with back-off while the
study goes on, and saved to the study folder if it never comes back, to be replayed by the next
`run`/`resume`. Nothing is lost and Tune's event loop never blocks on a dead server.

Schema (read by analysis/): parent tags tpp.study, tpp.role=study; child tags mlflow.parentRunId,
tpp.study, tpp.role=trial, tpp.trial_id, tpp.method, tpp.status, tpp.reuse; per-epoch metrics
`{stage}/{name}` with step = epoch; final metrics without a slash.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ray import tune

from study.store import StudyFolder

log = logging.getLogger("study.mlflow")

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's per-log_batch limits
FLUSH_EVERY_S = 2.0  # epoch curves reach MLflow within this; run starts, ends and checkpoints at once
PARAM_MAX_CHARS = 6000


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
    while True:
        if server_healthy(uri):
            return
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"the MLflow tracking server {uri} does not answer {uri.rstrip('/')}/health; start it first, "
                "e.g. `mlflow server --backend-store-uri sqlite:///ABS/mlflow.db --host 127.0.0.1 "
                "--port 5000`, "
                "or leave --tracking-uri out to use a SQLite file in the study folder")
        time.sleep(0.5)


def configure_http_retries() -> None:
    """Keep one MLflow HTTP call short: the outbox retries, so MLflow's own minutes-long back-off is off."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dot keys with string values (lists and empty dicts as JSON)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = "none" if v is None else str(v)
    return out


# ---------------------------------------------------------------------------------------------- outbox
class Outbox:
    """Ordered MLflow writes with retry. Ops refer to runs by a local key (trial id or "parent")."""

    def __init__(self, uri: str, run_ids: dict[str, str] | None = None):
        self.uri = uri
        self.ops: collections.deque[tuple[str, str, dict[str, Any]]] = collections.deque()
        self.run_ids: dict[str, str] = dict(run_ids or {})
        self._client: Any = None
        self._next_try = 0.0
        self._backoff = 1.0
        self.delivered = 0

    @property
    def mlflow(self) -> Any:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    # -- enqueueing
    def create_run(self, key: str, experiment_id: str, name: str, tags: dict[str, str]) -> None:
        self.ops.append(("create", key, {"experiment_id": experiment_id, "name": name, "tags": tags}))

    def batch(self, key: str, metrics: list[tuple[str, float, int]] | tuple = (),
              params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        ms = [(k, float(v), now, int(step)) for k, v, step in metrics
              if isinstance(v, (int, float)) and not math.isnan(float(v))]
        ps = sorted((params or {}).items())
        ts = sorted((tags or {}).items())
        while ms or ps or ts:
            self.ops.append(("batch", key, {"metrics": ms[:MAX_METRICS], "params": ps[:MAX_PARAMS],
                                            "tags": ts[:MAX_TAGS]}))
            ms, ps, ts = ms[MAX_METRICS:], ps[MAX_PARAMS:], ts[MAX_TAGS:]

    def status(self, key: str, status: str) -> None:
        """Set the run's lifecycle status: RUNNING (reopen) or FINISHED | FAILED | KILLED (end)."""
        self.ops.append(("status", key, {"status": status}))

    def text(self, key: str, text: str, artifact_file: str) -> None:
        self.ops.append(("text", key, {"text": text, "file": artifact_file}))

    # -- delivery
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
        merged: list[tuple[str, str, dict[str, Any]]] = []
        open_batch: dict[str, dict[str, Any]] = {}  # run key -> its latest batch that may still grow
        for kind, key, op in self.ops:
            if kind != "batch":
                open_batch.pop(key, None)
                merged.append((kind, key, op))
                continue
            into = open_batch.get(key)
            if into is not None and _fits(into, op):
                for part in ("metrics", "params", "tags"):
                    into[part] = into[part] + op[part]
                continue
            op = dict(op)
            open_batch[key] = op
            merged.append((kind, key, op))
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
                if is_http(self.uri) and not server_healthy(self.uri, timeout=2.0) or _transient(e):
                    self._defer(f"{type(e).__name__}: {str(e)[:200]}")
                    return False
                log.warning("MLflow: dropping a %s for %s that the store refused: %s", kind, key,
                            str(e)[:300])
            self.ops.popleft()
            self.delivered += 1
        self._backoff = 1.0
        self._next_try = 0.0
        return True

    def _defer(self, why: str) -> None:
        if self._backoff == 1.0:
            print(f"[tpp-study] MLflow unreachable ({why}); keeping {len(self.ops)} write(s), retrying",
                  flush=True)
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

    # -- persistence of undelivered writes
    def save_pending(self, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump({"ops": list(self.ops), "run_ids": self.run_ids}, f)

    def load_pending(self, path: Path) -> None:
        if not path.is_file():
            return
        with open(path, "rb") as f:
            saved = pickle.load(f)
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


def _point(params: dict[str, str]) -> Any:
    """The trial point a run's params describe (None if they are incomplete)."""
    from study.space import point_from_config

    try:
        return point_from_config(params)
    except (KeyError, ValueError):
        return None


def _transient(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("database is locked", "connection", "timed out", "max retries",
                                   "temporarily unavailable", "503", "502"))


# ---------------------------------------------------------------------------------------------- parent
def ensure_experiment(c: Any, name: str, study_dir: Path, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # A local store keeps artifacts in the study folder; a server decides itself (its artifact proxy).
    location = None if is_http(uri) else (study_dir / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_parent(uri: str, experiment: str, study_dir: Path, name: str, config_dump: dict[str, Any],
                 config_yaml: str, num_trials: int, extra_artifacts: dict[str, str]) -> tuple[str, str]:
    """Create the study's parent run; returns (experiment_id, run_id)."""
    c = client(uri)
    exp_id = ensure_experiment(c, experiment, study_dir, uri)
    run = c.create_run(exp_id, run_name=name, tags={"tpp.study": name, "tpp.role": "study",
                                                    "tpp.study_dir": str(study_dir)})
    box = Outbox(uri, {"parent": run.info.run_id})
    box.batch("parent", params={**flatten(config_dump), "num_trials": str(num_trials)})
    box.text("parent", config_yaml, "study_config.yaml")
    for fname, text in extra_artifacts.items():
        box.text("parent", text, fname)
    if not box.drain(60):
        raise TrackingUnavailable(f"could not write the study's parent run to {uri}")
    return exp_id, run.info.run_id


def log_dense(uri: str, parent_run_id: str, metrics: dict[str, float], history: list[dict[str, Any]]) -> None:
    """Dense model metrics on the parent run: final values and per-epoch curves."""
    box = Outbox(uri, {"parent": parent_run_id})
    finals = dict(metrics)
    if "dense_acc" in finals:
        finals["dense_test_acc"] = finals["dense_acc"]
    rows = [(k, v, 0) for k, v in finals.items()]
    for ev in history:
        rows += [(f"dense/{k}", ev[k], ev["epoch"]) for k in ("train_loss", "test_acc", "lr") if k in ev]
    box.batch("parent", metrics=rows)
    box.drain(60)


def end_parent(uri: str, parent_run_id: str, status: str, metrics: dict[str, float],
               tags: dict[str, str]) -> bool:
    box = Outbox(uri, {"parent": parent_run_id})
    box.batch("parent", metrics=[(k, v, 0) for k, v in metrics.items()], tags=tags)
    box.status("parent", status)
    return box.drain(30)


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


# ---------------------------------------------------------------------------------------------- callback
_FINISHED = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}


class StudyLogger(tune.Callback):
    """Ray Tune callback on the driver: trial runs nested under the study's parent run.

    Picklable with no live state (Tune pickles callbacks into its experiment state); everything is
    (re)built in `setup` from `study.json`, which is how a resumed study finds its parent run and the
    child runs that already exist (by tag tpp.trial_id) instead of duplicating them.

    Tune saves its own state every few seconds, so a driver killed hard can lose trials that started
    (or even finished) since: the resumed study runs their points again under new trial ids. Such an
    orphan run is found by its point and continued (or, finished, left as it is while the trial
    replays its recorded result) -- one run per trial point, whatever was lost.
    """

    def __init__(self, study_dir: str):
        self.study_dir = study_dir
        self._reset()

    def _reset(self) -> None:
        self.box: Outbox | None = None
        self.known: dict[str, dict[str, Any]] = {}  # trial id -> {"status": run status, "tags": {...}}
        self.ended: set[str] = set()
        self.reuse_tagged: set[str] = set()
        self.replayed: set[str] = set()  # finished before an interruption: already fully logged
        self.adopted: set[str] = set()  # orphan trial ids whose run a new trial took over
        # (trial, metric) -> last step logged: a trial retried from a checkpoint older than its last
        # report repeats an epoch (same seed, same values); it is logged once.
        self.last_step: dict[tuple[str, str], int] = {}
        self.counts = collections.Counter()
        self.flushed = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.study_dir = state["study_dir"]
        self._reset()

    # -- setup
    def setup(self, **info: Any) -> None:
        folder = StudyFolder(self.study_dir)
        self.meta = folder.read_meta()
        from study.config import load_config

        self.config = load_config(folder.config_path)
        self.box = Outbox(self.meta.tracking_uri, {})
        self.box.load_pending(folder.pending_log)
        folder.pending_log.unlink(missing_ok=True)
        for run in children(self.meta.tracking_uri, self.meta.experiment_id, self.meta.parent_run_id):
            tid = run.data.tags.get("tpp.trial_id")
            if tid:
                self.box.run_ids[tid] = run.info.run_id
                self.known[tid] = {"status": run.info.status, "tags": dict(run.data.tags),
                                   "point": _point(run.data.params)}
                if "tpp.reuse" in run.data.tags:
                    self.reuse_tagged.add(tid)
                if run.info.status in ("FINISHED", "FAILED"):
                    self.ended.add(tid)
                else:  # to be continued: remember how far its curves got
                    c = self.box.mlflow
                    for key in run.data.metrics:
                        if "/" in key:
                            steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
                            self.last_step[(tid, key)] = max(steps, default=-1)

    # -- trial lifecycle
    def _orphan(self, point: Any, trials: list) -> str | None:
        """The trial id of a run for `point` whose trial the resumed Tune does not know, if any."""
        live = {t.trial_id for t in trials}
        return next((old for old, info in self.known.items()
                     if old not in live and old not in self.adopted and info["point"] == point), None)

    def _adopt(self, tid: str, old: str) -> None:
        """Trial `tid` takes over the run of the lost trial `old` (same point, same seed)."""
        assert self.box is not None
        self.adopted.add(old)
        self.box.run_ids[tid] = self.box.run_ids[old]
        self.known[tid] = self.known[old]
        for (t, key), step in list(self.last_step.items()):
            if t == old:
                self.last_step[(tid, key)] = step
        if old in self.reuse_tagged:
            self.reuse_tagged.add(tid)
        if old in self.ended:
            self.ended.add(tid)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.space import logged_params, point_from_config, run_config, run_name

        assert self.box is not None
        tid = trial.trial_id
        point = point_from_config(trial.config)
        retag = {}
        if tid not in self.box.run_ids and (old := self._orphan(point, trials)) is not None:
            self._adopt(tid, old)
            if self.known[old]["status"] != "FINISHED":
                retag = {"tpp.trial_id": tid}  # later resumes find the run under its live trial
        if tid in self.ended and self.known.get(tid, {}).get("status") == "FINISHED":
            self.replayed.add(tid)  # the trial only replays its recorded result: nothing to log
            return
        if tid in self.box.run_ids:  # resumed: reopen the existing run
            self.box.status(tid, "RUNNING")
            self.box.batch(tid, tags={"tpp.status": "running", **retag})
            self.ended.discard(tid)
        else:
            tags = {"mlflow.parentRunId": self.meta.parent_run_id, "tpp.study": self.meta.name,
                    "tpp.role": "trial", "tpp.trial_id": tid, "tpp.method": point.method,
                    "tpp.status": "running"}
            self.box.create_run(tid, self.meta.experiment_id, run_name(point), tags)
            self.box.batch(tid, params=logged_params(run_config(self.config, point), point))
        self.box.flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        assert self.box is not None
        tid = trial.trial_id
        if tid in self.replayed:
            return
        step = int(result.get("epoch", 0))
        rows = []  # earlier epochs batched with this report first: steps are logged in order
        for ev in result.get("tpp_events") or []:
            rows += [(k, v, ev["step"]) for k, v in ev.items() if "/" in k]
        rows += [(k, v, step) for k, v in result.items() if "/" in k and isinstance(v, (int, float))]
        rows = self._new_steps(tid, rows)
        tags = {}
        if "tpp_reuse" in result and tid not in self.reuse_tagged:
            tags["tpp.reuse"] = str(result["tpp_reuse"])
            tags["tpp.node"] = str(result.get("tpp_node", ""))
            self.reuse_tagged.add(tid)
            self.counts[f"reuse_{result['tpp_reuse']}"] += 1
        final = result.get("tpp_final")
        if final:
            rows += [(k, v, 0) for k, v in final.items() if isinstance(v, (int, float))]
            tags["tpp.status"] = str(result.get("tpp_status", "completed"))
        self.box.batch(tid, metrics=rows, tags=tags)
        self._flush_due()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._flush_due()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """A trial resumes from its last checkpoint: every epoch before it must be in MLflow by then."""
        assert self.box is not None
        self.box.flush(force=True)

    def _flush_due(self) -> None:
        """Write at most every FLUSH_EVERY_S: one transaction per run instead of one per reported epoch."""
        assert self.box is not None
        if time.monotonic() - self.flushed >= FLUSH_EVERY_S:
            self.box.flush()
            self.flushed = time.monotonic()

    def _new_steps(self, tid: str, rows: list[tuple[str, Any, int]]) -> list[tuple[str, Any, int]]:
        """Drop per-epoch rows already logged for this trial (an epoch repeated after a retry)."""
        out = []
        for key, value, step in rows:
            if "/" in key:
                if step <= self.last_step.get((tid, key), -1):
                    continue
                self.last_step[(tid, key)] = step
            out.append((key, value, step))
        return out

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        assert self.box is not None
        tid = trial.trial_id
        if tid in self.replayed:
            return
        last = trial.last_result or {}
        from study.space import point_from_config, point_id

        StudyFolder(self.study_dir).record_finished(point_id(point_from_config(trial.config)), last)
        status = str(last.get("tpp_status", "completed"))
        if "tpp_final" not in last:  # stopped early by the scheduler: keep what it reached
            keys = [k for k in ("best_acc", "last_acc", "acc_after_removal")
                    if isinstance(last.get(k), (int, float))]
            self.box.batch(tid, metrics=[(k, last[k], 0) for k in keys],
                           tags={"tpp.status": status, "tpp.early_stopped": "true"})
        self._end(tid, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        assert self.box is not None
        tid = trial.trial_id
        if tid not in self.box.run_ids and not any(op[1] == tid for op in self.box.ops):
            self.on_trial_start(iteration, trials, trial)  # failed before it ever started
        error = ""
        if getattr(trial, "error_file", None) and os.path.isfile(trial.error_file):
            error = Path(trial.error_file).read_text()[-4000:]
        self.box.batch(tid, tags={"tpp.status": "failed", "tpp.error": error or "see the Tune trial folder"})
        self._end(tid, "failed")

    def _end(self, tid: str, status: str) -> None:
        assert self.box is not None
        self.counts[status] += 1
        self.box.status(tid, _FINISHED.get(status, "FINISHED"))
        self.ended.add(tid)
        self.box.flush(force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close(trials)

    def close(self, trials: list | None = None) -> None:
        """End every still-open trial run as KILLED (interrupted), then deliver or save what is queued."""
        if self.box is None:
            return
        for t in trials or []:
            has_run = t.trial_id in self.box.run_ids or any(op[1] == t.trial_id for op in self.box.ops)
            if has_run and t.trial_id not in self.ended:
                self.box.batch(t.trial_id, tags={"tpp.status": "interrupted"})
                self.box.status(t.trial_id, "KILLED")
                self.ended.add(t.trial_id)
        if trials is not None:  # lost trials no new trial took over (yet): not left RUNNING
            keep = {t.trial_id for t in trials} | self.adopted
            for old, info in self.known.items():
                if old not in keep and info["status"] == "RUNNING":
                    self.box.batch(old, tags={"tpp.status": "interrupted"})
                    self.box.status(old, "KILLED")
        if not self.box.drain(60):
            folder = StudyFolder(self.study_dir)
            self.box.save_pending(folder.pending_log)
            print(f"[tpp-study] MLflow still unreachable: {len(self.box.ops)} write(s) saved to "
                  f"{folder.pending_log}; `tpp-study resume {self.meta.name}` delivers them", flush=True)
