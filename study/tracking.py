"""The MLflow tracking store as the study sees it: which URI, is it reachable, the SQLite settings, the
reads of a study's child runs. Every MLflow client the study opens comes from here."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from typing import Any

from study.schema import PARENT_TAG, TAG_MEMBER, TAG_STATUS


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


def check_tracking(uri: str) -> None:
    """Fail early and clearly when a tracking URI is malformed or its MLflow server does not answer
    (before anything is trained)."""
    if not is_http(uri):
        if not uri.startswith(("sqlite:///", "file:", "postgresql", "mysql", "mssql", "databricks")):
            raise TrackingUnavailable(f"tracking URI {uri!r}: use sqlite:///ABS/PATH.db or http://HOST:PORT")
        return
    if not server_healthy(uri):
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} does not answer {uri.rstrip('/')}/health; start it first, "
            "e.g. `mlflow server --backend-store-uri sqlite:///ABS/mlflow.db --host 127.0.0.1 --port 5000`, "
            "or leave --tracking-uri out to use a SQLite file in the study folder")


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


def sqlite_path(uri: str) -> str | None:
    """The file of a `sqlite:///` URI (None for any other store)."""
    return uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else None


def absolute_uri(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute (a study must find its store from any directory)."""
    path = sqlite_path(uri)
    if not path or path == ":memory:" or os.path.isabs(path):
        return uri
    rest = uri[len("sqlite:///") + len(path):]
    return f"sqlite:///{os.path.abspath(os.path.expanduser(path))}{rest}"


def client(uri: str, create: bool = False) -> Any:
    """An MlflowClient of `uri`. A SQLite file that does not exist is an error unless `create` (only a new
    study creates its store): MLflow would silently create an empty one, which then hides the real store
    from every later command."""
    path = sqlite_path(uri)
    if not create and path and path != ":memory:" and not os.path.isfile(path):
        raise TrackingUnavailable(f"no MLflow database at {path} ({uri}): the study's record was moved or "
                                  "deleted; give the store's new place with --tracking-uri")
    return _client(uri)


def _client(uri: str) -> Any:
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


def children(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of the parent (all pages)."""
    c = client(uri)
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                             max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def finished_members(runs: list[Any]) -> dict[str, dict[str, Any]]:
    """{member id: {"status", "metrics"}} of the FINISHED member runs: what a resumed study never re-runs."""
    return {r.data.tags[TAG_MEMBER]: {
        "status": r.data.tags.get(TAG_STATUS, "completed"),
        "metrics": {k: v for k, v in r.data.metrics.items() if "/" not in k}}
        for r in runs if r.info.status == "FINISHED" and TAG_MEMBER in r.data.tags}
