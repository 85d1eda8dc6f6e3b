"""Many runs' queued writes in one transaction on a SQL tracking store (SQLite, PostgreSQL, MySQL).

MLflow writes one run at a time: every `create_run`, `log_batch`, `log_inputs` and `set_terminated` opens
its own transactions and re-reads the run, ~40 ms of driver CPU per member of a study (BENCHMARKS.md §9),
and MLflow has no multi-run write. Here the outbox's queue -- creations, batches, inputs and ends of
hundreds of runs -- goes in as a few multi-row INSERTs into MLflow's own tables (its ORM models, so the
schema is the installed MLflow's), with MLflow's own validation and value sanitising, all or nothing.

It does exactly what MLflow's store does for these writes or nothing at all: whatever it cannot reproduce
here (a run missing or deleted, a param changed, a metric row already stored, a data set not yet in the
experiment, a run renamed through its tag) raises `Unsupported` before anything is written, and the
outbox then delivers that slice through MlflowClient one write at a time, with MLflow's own answer.
`tests/test_sql_writes.py` proves both paths leave the same store.
"""

from __future__ import annotations

import uuid
from typing import Any

# deliver() takes ops of these kinds; anything else (artifacts) goes through MlflowClient
KINDS = frozenset({"create", "batch", "inputs", "status"})


class Unsupported(Exception):
    """A write this path does not reproduce exactly: deliver it through MlflowClient instead."""


def sql_store(mlflow_client: Any) -> Any | None:
    """The client's SqlAlchemyStore, or None for any other store (HTTP, file)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = getattr(getattr(mlflow_client, "_tracking_client", None), "store", None)
    return store if isinstance(store, SqlAlchemyStore) else None


def deliver(store: Any, ops: list[list[Any]], run_ids: dict[str, str]) -> dict[str, str]:
    """Write `ops` ([kind, key, payload] as the outbox queues them, in order) in one transaction.

    `run_ids` maps the ops' keys to existing runs. Returns the keys and run ids of the runs created.
    Raises `Unsupported` (nothing written) or the store's own error (rolled back)."""
    from mlflow.utils.time import get_current_time_millis

    plan = _Plan(store, dict(run_ids), get_current_time_millis())
    for kind, key, op in ops:
        if kind not in KINDS:
            raise Unsupported(f"a {kind} write")
        getattr(plan, kind)(key, op)
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            plan.write(session)
    except Exception as e:  # MLflow's session wraps every error in its own; ours is the cause
        if isinstance(e.__cause__, Unsupported):
            raise e.__cause__ from None
        raise
    return plan.created


class _Plan:
    """The rows a slice of ops adds or changes, gathered in Python, then written at once."""

    def __init__(self, store: Any, run_ids: dict[str, str], now: int):
        self.store, self.run_ids, self.now = store, run_ids, now
        self.created: dict[str, str] = {}
        self.new_runs: list[dict[str, Any]] = []
        self.params: dict[str, dict[str, str]] = {}  # run id -> key -> value
        self.tags: dict[str, dict[str, str]] = {}  # run id -> key -> last value
        self.metrics: dict[tuple, dict[str, Any]] = {}  # identity (MLflow's primary key) -> row
        self.datasets: dict[str, list[tuple[Any, list[tuple[str, str]]]]] = {}  # run id -> inputs
        self.models: list[tuple[str, str]] = []  # (run id, model id)
        self.ends: dict[str, tuple[str, int | None]] = {}  # run id -> (status, end time)
        self.experiments: set[str] = set()
        self.roots: dict[str, str] = {}  # experiment id -> its artifact location

    def _run(self, key: str) -> str:
        if key not in self.run_ids:
            raise Unsupported(f"a write for {key}, whose run was never created")
        return self.run_ids[key]

    def create(self, key: str, op: dict[str, Any]) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
        from mlflow.utils.uri import append_to_uri_path

        tags = dict(op["tags"])
        if MLFLOW_RUN_NAME in tags or not op["name"]:
            raise Unsupported("a run named through its tag")
        run_id = uuid.uuid4().hex
        self.experiments.add(str(op["experiment_id"]))
        if op["experiment_id"] not in self.roots:
            self.roots[op["experiment_id"]] = self.store.get_experiment(op["experiment_id"]).artifact_location
        root = self.roots[op["experiment_id"]]
        self.new_runs.append({
            "run_uuid": run_id, "name": op["name"], "experiment_id": int(op["experiment_id"]),
            "artifact_uri": append_to_uri_path(root, run_id, SqlAlchemyStore.ARTIFACTS_FOLDER_NAME),
            "source_type": "UNKNOWN", "source_name": "", "entry_point_name": "", "source_version": "",
            "user_id": tags.get(MLFLOW_USER, "unknown"), "status": "RUNNING", "start_time": self.now,
            "end_time": None, "deleted_time": None, "lifecycle_stage": "active"})
        self.run_ids[key] = self.created[key] = run_id
        self.tags[run_id] = {**tags, MLFLOW_RUN_NAME: op["name"]}

    def batch(self, key: str, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
        from mlflow.utils.validation import (
            _validate_batch_log_data,
            _validate_batch_log_limits,
            _validate_param_keys_unique,
        )

        run_id = self._run(key)
        metrics = [Metric(k, v, t, s) for k, v, t, s in op["metrics"]]
        params = [Param(k, v) for k, v in op["params"]]
        tags = [RunTag(k, v) for k, v in op["tags"]]
        metrics, params, tags = _validate_batch_log_data(metrics, params, tags)  # MLflow's checks, as
        _validate_batch_log_limits(metrics, params, tags)                         # its log_batch makes
        _validate_param_keys_unique(params)
        mine = self.params.setdefault(run_id, {})
        for p in params:
            if mine.setdefault(p.key, p.value) != p.value:
                raise Unsupported(f"param {p.key} changed")
        for m in metrics:
            is_nan, value = self.store.sanitize_metric_value(m.value)
            ident = (run_id, m.key, m.timestamp, m.step, value, is_nan)
            self.metrics.setdefault(ident, {"run_uuid": run_id, "key": m.key, "value": value,
                                            "timestamp": m.timestamp, "step": m.step, "is_nan": is_nan})
        for t in tags:
            if t.key == MLFLOW_RUN_NAME:
                raise Unsupported("a run renamed through its tag")
            self.tags.setdefault(run_id, {})[t.key] = t.value

    def inputs(self, key: str, op: dict[str, Any]) -> None:
        run_id = self._run(key)
        for d in op["datasets"]:
            self.datasets.setdefault(run_id, []).append(((d["name"], d["digest"]), d["tags"]))
        if op.get("model_id"):
            self.models.append((run_id, op["model_id"]))

    def status(self, key: str, op: dict[str, Any]) -> None:
        run_id = self._run(key)
        end = self.ends.get(run_id, ("", None))[1] if op["status"] == "RUNNING" else self.now
        self.ends[run_id] = (op["status"], end)  # reopening keeps the end time, as MLflow does

    def write(self, session: Any) -> None:
        from mlflow.store.tracking.dbmodels.models import (
            SqlExperiment,
            SqlInput,
            SqlInputTag,
            SqlLatestMetric,
            SqlMetric,
            SqlParam,
            SqlRun,
            SqlTag,
        )
        from sqlalchemy import insert, select, update

        new = {r["run_uuid"] for r in self.new_runs}
        old = sorted({*self.params, *self.tags, *self.datasets, *self.ends,
                      *(r for r, _ in self.models), *(i[0] for i in self.metrics)} - new)
        exps = [int(e) for e in self.experiments]
        for exp_id, stage in session.execute(select(SqlExperiment.experiment_id,
                                                    SqlExperiment.lifecycle_stage)
                                             .where(SqlExperiment.experiment_id.in_(exps))):
            if stage != "active":
                raise Unsupported(f"experiment {exp_id} is deleted")
        found = _pairs(session, SqlRun.run_uuid, SqlRun.lifecycle_stage, old)
        if any(found.get(r) != "active" for r in old):
            raise Unsupported("a run that is deleted or missing")
        for run_id, k, v in _rows(session, SqlParam, old, self.params):
            if self.params[run_id].pop(k) != v:
                raise Unsupported(f"param {k} of run {run_id} changed")
        stored_tags = {(r, k) for r, k, _ in _rows(session, SqlTag, old, self.tags)}
        dataset_ids = self._dataset_ids(session)
        latest = self._latest(session, old)

        if self.new_runs:
            session.execute(insert(SqlRun), self.new_runs)
        _insert(session, SqlParam, [{"run_uuid": r, "key": k, "value": v}
                                    for r, ps in self.params.items() for k, v in ps.items()])
        tag_rows = [{"run_uuid": r, "key": k, "value": v}
                    for r, ts in self.tags.items() for k, v in ts.items()]
        _insert(session, SqlTag, [t for t in tag_rows if (t["run_uuid"], t["key"]) not in stored_tags])
        for t in tag_rows:
            if (t["run_uuid"], t["key"]) in stored_tags:
                session.execute(update(SqlTag).where(SqlTag.run_uuid == t["run_uuid"], SqlTag.key == t["key"])
                                .values(value=t["value"]))
        _insert(session, SqlMetric, list(self.metrics.values()))
        _insert(session, SqlLatestMetric, [m for m in latest.values() if m.pop("_new", False)])
        for m in latest.values():
            if m.pop("_changed", False):
                session.execute(update(SqlLatestMetric).where(SqlLatestMetric.run_uuid == m["run_uuid"],
                                                              SqlLatestMetric.key == m["key"])
                                .values(value=m["value"], timestamp=m["timestamp"], step=m["step"],
                                        is_nan=m["is_nan"]))
        edges, edge_tags = [], []
        for run_id, inputs in self.datasets.items():
            for ident, tags in inputs:
                if (dataset_ids[ident], run_id) in dataset_ids["_linked"]:
                    continue
                dataset_ids["_linked"].add((dataset_ids[ident], run_id))
                input_id = uuid.uuid4().hex
                edges.append({"input_uuid": input_id, "source_type": "DATASET",
                              "source_id": dataset_ids[ident], "destination_type": "RUN",
                              "destination_id": run_id, "step": 0})
                edge_tags += [{"input_uuid": input_id, "name": k, "value": v} for k, v in tags]
        edges += [{"input_uuid": uuid.uuid4().hex, "source_type": "RUN_INPUT", "source_id": run_id,
                   "destination_type": "MODEL_INPUT", "destination_id": model_id, "step": 0}
                  for run_id, model_id in self.models]
        _insert(session, SqlInput, edges)
        _insert(session, SqlInputTag, edge_tags)
        for run_id, (status, end) in self.ends.items():
            values: dict[str, Any] = {"status": status}
            if end is not None:
                values["end_time"] = end
            session.execute(update(SqlRun).where(SqlRun.run_uuid == run_id).values(**values))

    def _dataset_ids(self, session: Any) -> dict[Any, Any]:
        """(name, digest) -> dataset uuid of the data sets the inputs name, and "_linked": the (dataset,
        run) pairs already stored (MLflow links a data set to a run once)."""
        from mlflow.store.tracking.dbmodels.models import SqlDataset, SqlInput, SqlRun
        from sqlalchemy import select

        wanted = {ident for inputs in self.datasets.values() for ident, _ in inputs}
        out: dict[Any, Any] = {"_linked": set()}
        if not wanted:
            return out
        exp = {r["run_uuid"]: r["experiment_id"] for r in self.new_runs}
        old = [r for r in self.datasets if r not in exp]
        exp.update(_pairs(session, SqlRun.run_uuid, SqlRun.experiment_id, old))
        experiments = {exp[r] for r in self.datasets}
        if len(experiments) != 1:
            raise Unsupported("inputs across experiments")
        rows = session.execute(select(SqlDataset.name, SqlDataset.digest, SqlDataset.dataset_uuid).where(
            SqlDataset.experiment_id == experiments.pop(),
            SqlDataset.name.in_({n for n, _ in wanted}), SqlDataset.digest.in_({d for _, d in wanted})))
        out.update({(n, d): u for n, d, u in rows})
        if wanted - out.keys():
            raise Unsupported("a data set not yet in the experiment")  # MLflow creates it
        for chunk in chunks(old):
            out["_linked"].update(session.execute(
                select(SqlInput.source_id, SqlInput.destination_id).where(
                    SqlInput.source_type == "DATASET", SqlInput.destination_type == "RUN",
                    SqlInput.destination_id.in_(chunk))))
        return out

    def _latest(self, session: Any, old: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """Each (run, key)'s latest value after this slice, by MLflow's order (step, timestamp, value);
        marked `_new` (no row yet) or `_changed` (its row to update)."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric
        from sqlalchemy import select

        stored: dict[tuple[str, str], dict[str, Any]] = {}
        runs = sorted({i[0] for i in self.metrics} & set(old))
        for chunk in chunks(runs):
            rows = session.execute(select(SqlLatestMetric).where(SqlLatestMetric.run_uuid.in_(chunk)))
            for m in rows.scalars():
                stored[(m.run_uuid, m.key)] = {"run_uuid": m.run_uuid, "key": m.key, "value": m.value,
                                               "timestamp": m.timestamp, "step": m.step, "is_nan": m.is_nan}
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for m in self.metrics.values():
            k = (m["run_uuid"], m["key"])
            cur = out.get(k) or stored.get(k)
            if cur is None:
                out[k] = {**m, "_new": True}
            elif (m["step"], m["timestamp"], m["value"]) > (cur["step"], cur["timestamp"], cur["value"]):
                out[k] = {**m, "_new": True} if cur.get("_new") else {**m, "_changed": True}
        return out


def chunks(items: list[Any], n: int = 500) -> list[list[Any]]:
    """Bound an IN (...) list's parameters, as MLflow's store does (500)."""
    return [items[i:i + n] for i in range(0, len(items), n)]


def _pairs(session: Any, key: Any, value: Any, ids: list[str]) -> dict[Any, Any]:
    """{key: value} of the rows whose `key` column is one of `ids`."""
    from sqlalchemy import select

    out: dict[Any, Any] = {}
    for chunk in chunks(ids):
        out.update(session.execute(select(key, value).where(key.in_(chunk))).all())
    return out


def _rows(session: Any, model: Any, runs: list[str], wanted: dict[str, dict[str, str]]) -> list[tuple]:
    """(run id, key, value) rows of `model` stored for the runs and keys this slice writes."""
    from sqlalchemy import select

    keys = sorted({k for r in runs for k in wanted.get(r, {})})
    runs = [r for r in runs if wanted.get(r)]
    out: list[tuple] = []
    for chunk in chunks(runs):
        for key_chunk in chunks(keys):
            out += session.execute(select(model.run_uuid, model.key, model.value).where(
                model.run_uuid.in_(chunk), model.key.in_(key_chunk))).all()
    return out


def _insert(session: Any, model: Any, rows: list[dict[str, Any]]) -> None:
    """Multi-row INSERTs (executemany), 1,000 rows a statement."""
    from sqlalchemy import insert

    for i in range(0, len(rows), 1000):
        session.execute(insert(model), rows[i:i + 1000])
