"""The outbox: every MLflow write of a study, in order, batched, retried while the store is away, and
saved to the study folder when it never comes back (replayed by the next run or resume)."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from study import sql_writes
from study.tracking import client, is_http, server_healthy

log = logging.getLogger("study.mlflow")

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's per-log_batch limits
BULK_OPS = 2000  # queued writes one transaction takes on a SQL store (study.sql_writes)

TAG_MAX_CHARS = 5000  # a tag value is cut here (MLflow takes 8,000; an error text is the long one)


# Store errors that go away by themselves: keep the write and retry (a full disk included).
TRANSIENT = ("database is locked", "connection", "timed out", "max retries", "temporarily unavailable",
             "database or disk is full", "disk i/o error", "no space left")
# HTTP 502/503 as a number of its own: a run id (hex) may hold "503" and must not make a refusal an outage
TRANSIENT_STATUS = re.compile(r"\b50[23]\b")


class Outbox:
    """Ordered MLflow writes with retry. Ops refer to runs by a local key (member id or "parent").

    One thread may queue writes while another delivers them (study.writer): a delivery takes the queue
    as it is and leaves new writes to queue behind it; what it could not deliver goes back in front.
    """

    def __init__(self, uri: str, run_ids: dict[str, str] | None = None, bulk: bool = True):
        self.uri = uri
        self.bulk = bulk  # many runs' writes in one transaction on a SQL store (False: one call per write)
        self.ops: collections.deque[list[Any]] = collections.deque()  # [kind, key, payload]
        self._sending: collections.deque[list[Any]] = collections.deque()  # taken by the running flush
        self._lock = threading.Lock()  # guards swapping `ops` against a write queued meanwhile
        self._one_flush = threading.Lock()  # one delivery at a time, whichever thread asks
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

    def _put(self, op: list[Any]) -> None:
        with self._lock:
            self.ops.append(op)

    def create_run(self, key: str, experiment_id: str, name: str, tags: dict[str, str]) -> None:
        self._put(["create", key, {"experiment_id": experiment_id, "name": name, "tags": tags}])

    def batch(self, key: str, metrics: list | tuple = (), params: dict[str, str] | None = None,
              tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        ms = [[k, float(v), now, int(step)] for k, v, step in metrics
              if isinstance(v, (int, float)) and not math.isnan(float(v))]
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        ps = sorted([k, v[:MAX_PARAM_VAL_LENGTH]] for k, v in (params or {}).items())
        ts = sorted([k, v[:TAG_MAX_CHARS]] for k, v in (tags or {}).items())
        while ms or ps or ts:
            self._put(["batch", key, {"metrics": ms[:MAX_METRICS], "params": ps[:MAX_PARAMS],
                                      "tags": ts[:MAX_TAGS]}])
            ms, ps, ts = ms[MAX_METRICS:], ps[MAX_PARAMS:], ts[MAX_TAGS:]

    def status(self, key: str, status: str) -> None:
        """Set the run's lifecycle status: RUNNING (reopen) or FINISHED | FAILED | KILLED (end)."""
        self._put(["status", key, {"status": status}])

    def inputs(self, key: str, data: Any, model_id: str | None) -> None:
        """Link the run to its data set (an MLflow DatasetInput) and the model it starts from."""
        ds = data.dataset
        self._put(["inputs", key, {"datasets": [{
            "name": ds.name, "digest": ds.digest, "source_type": ds.source_type, "source": ds.source,
            "schema": ds.schema, "profile": ds.profile, "tags": [[t.key, t.value] for t in data.tags]}],
            "model_id": model_id}])

    def text(self, key: str, text: str, artifact_file: str) -> None:
        self._put(["text", key, {"text": text, "file": artifact_file}])

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
                        params=[Param(k, v) for k, v in op["params"]],
                        tags=[RunTag(k, v) for k, v in op["tags"]], synchronous=True)
        elif kind == "status":
            if op["status"] == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, status=op["status"])
        elif kind == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

            datasets = [DatasetInput(Dataset(**{k: v for k, v in d.items() if k != "tags"}),
                                     [InputTag(k, v) for k, v in d["tags"]]) for d in op["datasets"]]
            models = [LoggedModelInput(op["model_id"])] if op["model_id"] else None
            c.log_inputs(run_id, datasets=datasets, models=models)
        elif kind == "text":
            c.log_text(run_id, op["text"], op["file"])

    def _coalesce(self) -> None:
        """Merge each run's batches being sent into as few `log_batch` calls as MLflow's limits allow.

        Runs are independent, so only the order within a run is kept: a batch joins the run's previous
        one unless another write to that run (create, status, text) came between them, a limit would be
        passed, or a param/tag key repeats (the later value must land later).
        """
        merged: list[list[Any]] = []
        open_batch: dict[str, dict[str, Any]] = {}
        for kind, key, op in self._sending:
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
        self._sending = collections.deque(merged)

    def flush(self, force: bool = False) -> bool:
        """Deliver the writes queued so far, in order; True when they all went. Stops at an outage."""
        if not self.ops:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        with self._one_flush:
            with self._lock:
                self._sending, self.ops = self.ops, collections.deque()
            try:
                return self._send()
            finally:  # what did not go stays ahead of what was queued meanwhile
                with self._lock:
                    self._sending.extend(self.ops)
                    self.ops, self._sending = self._sending, collections.deque()

    def _send(self) -> bool:
        self._coalesce()
        if is_http(self.uri) and not server_healthy(self.uri, timeout=2.0):
            self._defer("the tracking server does not answer")
            return False
        store = sql_writes.sql_store(self.mlflow) if self.bulk else None
        while self._sending:
            n = self._bulk_slice() if store is not None else 0
            done = self._deliver_bulk(store, n) if n else False
            if done is None:
                return False
            if done:
                continue
            for _ in range(max(n, 1)):  # one write at a time: MLflow's own answer to each
                if not self._deliver_first():
                    return False
        self._backoff, self._next_try, self.problem = 1.0, 0.0, None
        return True

    def _bulk_slice(self, most: int = BULK_OPS) -> int:
        """How many ops from the front of the queue one bulk transaction takes (0: the first is not one)."""
        n = 0
        for kind, _, _ in self._sending:
            if kind not in sql_writes.KINDS or n == most:
                break
            n += 1
        return n

    def _deliver_bulk(self, store: Any, n: int) -> bool | None:
        """The first `n` ops in one transaction. Nothing is written unless it returns True: None, the store
        is away (deferred); False, something in them is left to the one-at-a-time path."""
        try:
            created = sql_writes.deliver(store, [self._sending[i] for i in range(n)], self.run_ids)
        except sql_writes.Unsupported:
            return False
        except Exception as e:  # noqa: BLE001 - rolled back; the one-at-a-time path decides
            if _transient(e):
                self._defer(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                return None
            log.debug("MLflow: bulk write refused (%s); one write at a time", str(e)[:300])
            return False
        self.run_ids.update(created)
        for _ in range(n):
            self._sending.popleft()
        self.delivered += 1
        return True

    def _deliver_first(self) -> bool:
        """The first op through MlflowClient. False: the store is away (deferred, the op kept)."""
        kind, key, op = self._sending[0]
        if kind != "create" and key not in self.run_ids:
            log.warning("MLflow: dropping a %s for %s whose run was never created", kind, key)
            self._sending.popleft()
            return True
        try:
            self._apply(kind, key, op)
        except Exception as e:  # noqa: BLE001 - decide between "outage" and "bad write"
            if (is_http(self.uri) and not server_healthy(self.uri, timeout=2.0)) or _transient(e):
                self._defer(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                return False
            log.warning("MLflow: dropping a %s for %s that the store refused: %s", kind, key, str(e)[:300])
        self._sending.popleft()
        self.delivered += 1
        return True

    def _defer(self, why: str) -> None:
        if self.problem is None:
            kept = len(self._sending) + len(self.ops)
            print(f"[tpp-study] MLflow unreachable ({why}); keeping {kept} write(s), retrying",
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
        with self._lock:
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
    return any(s in text for s in TRANSIENT) or TRANSIENT_STATUS.search(text) is not None
