"""The MLflow tracking store as the study sees it: which URI, is it reachable, the SQLite settings, the
reads of a study's child runs. Every MLflow client the study opens comes from here."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
import weakref
from collections.abc import Collection, Iterator
from typing import Any

from study.errors import StudyError
from study.schema import TAG_MEMBER, TAG_STATUS, TAG_STUDY


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached."""


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_healthy(uri: str, timeout: float = 3.0) -> bool:
    return _health(uri, timeout) == "OK"


def _health(uri: str, timeout: float = 3.0) -> str | None:
    """What `uri`/health answers (MLflow's server: "OK"), or None when nothing answers."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.read(200).decode("utf-8", "replace").strip() if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError):
        return None


def check_tracking(uri: str) -> None:
    """Fail early and clearly when a tracking URI is malformed or its MLflow server does not answer
    (before anything is trained)."""
    if uri.startswith("file:"):
        _check_file_store(uri)
    if not is_http(uri):
        if not uri.startswith(("sqlite:///", "file:", "postgresql", "mysql", "mssql", "databricks")):
            raise TrackingUnavailable(f"tracking URI {uri!r}: use sqlite:///ABS/PATH.db or http://HOST:PORT")
        return
    said = _health(uri)
    if said is not None and said != "OK":
        said = " ".join(said.split())[:60]
        raise TrackingUnavailable(f"{uri} answers, but not as an MLflow tracking server ({uri.rstrip('/')}"
                                  f"/health said {said!r}, MLflow says 'OK'); check the port")
    if said is None:
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} does not answer {uri.rstrip('/')}/health; start it first, "
            "e.g. `mlflow server --backend-store-uri sqlite:///ABS/mlflow.db --host 127.0.0.1 --port 5000`, "
            "or leave --tracking-uri out to use a SQLite file in the study folder")


def _check_file_store(uri: str) -> None:
    """MLflow's file store (`file:` URIs) refuses writes unless MLFLOW_ALLOW_FILE_STORE=true; then its
    folder must be writable. Said in one line, before MLflow's paragraph about maintenance mode."""
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise TrackingUnavailable(f"tracking URI {uri!r}: MLflow's file store is in maintenance mode and "
                                  "takes no new runs; use sqlite:///ABS/PATH.db (or set "
                                  "MLFLOW_ALLOW_FILE_STORE=true)")
    from urllib.parse import urlparse

    path = os.path.abspath(urlparse(uri).path or ".")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        why = "is not a folder" if not os.path.isdir(existing) else "is not writable"
        raise TrackingUnavailable(f"tracking URI {uri!r}: {existing} {why}; the file store needs a writable "
                                  "folder")


def end_wait_s() -> float:
    """How long a study's end waits for an unreachable tracking server before it saves the writes still
    queued to the study folder (`resume` delivers them): TPP_STUDY_MLFLOW_WAIT_S, default 60 s."""
    raw = os.environ.get("TPP_STUDY_MLFLOW_WAIT_S", "60")
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise StudyError(f"TPP_STUDY_MLFLOW_WAIT_S: got {raw!r}; accepted: seconds (e.g. 60)") from None


def configure_mlflow_env() -> None:
    """Keep one MLflow HTTP call short (the outbox retries), the console to one line per run, and send
    MLflow no usage telemetry (a user opts in by setting MLFLOW_DISABLE_TELEMETRY=false)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per run
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Creating initial MLflow database tables"
    end_wait_s()  # a bad value is said now, not when the study ends
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
        event.listen(Engine, "engine_connect", _remember_engine)


_SQLITE_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()


def _remember_engine(connection: Any) -> None:
    """Keep the SQLite engines this process opened (MLflow caches its own, unreachable from here), so
    `sqlite_checkpoint` can close their pooled connections: a journal mode changes only with none open."""
    if connection.engine.dialect.name == "sqlite":
        _SQLITE_ENGINES.add(connection.engine)


def _wal_on_connect(dbapi_connection: Any, _record: Any) -> None:
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        # a read-only store is read as it is; a damaged file fails on the first real query, with its error
        with contextlib.suppress(sqlite3.DatabaseError):
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def sqlite_checkpoint(uri: str) -> None:
    """Move a SQLite store's write-ahead log into its main file (a study's `mlflow.db` then holds
    everything, to be copied alone). Best effort: a reader in mid-query leaves the rest for later."""
    import sqlite3

    path = sqlite_path(uri)
    if not path:
        return
    for engine in list(_SQLITE_ENGINES):
        if engine.url.database and os.path.abspath(engine.url.database) == os.path.abspath(path):
            engine.dispose()  # its pool reconnects on the next query
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(path, timeout=5)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # back to a rollback journal: a finished study's store then opens on read-only media (a WAL
        # store needs its -shm file written even to be read). Fails harmlessly while others have it open.
        con.execute("PRAGMA journal_mode=DELETE")


def sqlite_path(uri: str) -> str | None:
    """The file of a `sqlite:///` URI (None for any other store)."""
    return uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else None


def one_line(e: BaseException) -> str:
    """An exception as one short line (SQLAlchemy and MLflow errors run over several)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def check_store(uri: str, parent_run_id: str, study: str) -> None:
    """The store at `uri` must exist, be readable, and hold the study's parent run; else one line
    (TrackingUnavailable) -- never a store created, a traceback, or another study's record."""
    try:
        c = client(uri)  # a SQLite store must be where the study says (never created here)
        tags = c.get_run(parent_run_id).data.tags
    except TrackingUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file (SQLAlchemy/sqlite3), a missing run (MLflow)
        raise TrackingUnavailable(f"{uri} cannot be read as the MLflow store of study {study!r} "
                                  f"({one_line(e)})") from None
    if tags.get(TAG_STUDY) != study:
        raise TrackingUnavailable(f"{uri} does not hold study {study!r} (its parent run {parent_run_id} is "
                                  f"{tags.get(TAG_STUDY)!r}'s)")


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
    if create and path and path != ":memory:":
        # MLflow creates and migrates a new SQLite store's schema on first use, unguarded: two studies
        # starting at once on one new file race ("table ... already exists"). One at a time, under a lock.
        import fcntl

        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            c = _client(uri)
            c.search_experiments(max_results=1)
            return c
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


def children(uri: str, experiment_id: str, parent_run_id: str, *, metrics: Collection[str] | None = None,
             params: Collection[str] | None = None, tags: Collection[str] | None = None) -> list[Any]:
    """Every member run of the parent (not the group summary runs of tpp-analyze); only the latest
    `metrics`, the `params` and `tags` named, where given."""
    return list(each_child(uri, experiment_id, parent_run_id, metrics=metrics, params=params, tags=tags))


def each_child(uri: str, experiment_id: str, parent_run_id: str, *, metrics: Collection[str] | None = None,
               params: Collection[str] | None = None, tags: Collection[str] | None = None) -> Iterator[Any]:
    """`children` one run at a time, a few hundred read at once: for a caller that keeps little of each."""
    from study.sql_reads import each_member_run

    yield from each_member_run(client(uri), experiment_id, parent_run_id, metrics=metrics, params=params,
                               tags=tags)


# A resume's driver reads the member runs before training (what not to run again), and the study's logger
# and progress callbacks, set up by Tune in the same process moments later, need the same runs (which run
# each member logs to; what is counted already). Tune restores callbacks from its pickled state, so no
# argument reaches them: the driver leaves the runs here, each taker takes them once, and a resume reads
# them once (issue #28). The last taker, or the driver's end, lets them go.
_handed_over: dict[str, tuple[list[Any], set[str]]] = {}
TAKERS = ("logger", "progress")


def hand_over(parent_run_id: str, runs: list[Any] | None) -> None:
    """Leave `runs` for one `take_over` by each of TAKERS in this process (None: drop what is left)."""
    if runs is None:
        _handed_over.pop(parent_run_id, None)
    else:
        _handed_over[parent_run_id] = (runs, set(TAKERS))


def take_over(parent_run_id: str, taker: str) -> list[Any] | None:
    """The member runs the driver left for this study, once per taker; None when it left none."""
    runs, left = _handed_over.get(parent_run_id, (None, set()))
    if taker not in left:
        return None
    left.discard(taker)
    if not left:
        del _handed_over[parent_run_id]
    return runs


def finished_members(runs: list[Any]) -> dict[str, dict[str, Any]]:
    """{member id: {"status", "metrics"}} of the FINISHED member runs: what a resumed study never re-runs."""
    return {r.data.tags[TAG_MEMBER]: {
        "status": r.data.tags.get(TAG_STATUS, "completed"),
        "metrics": {k: v for k, v in r.data.metrics.items() if "/" not in k}}
        for r in runs if r.info.status == "FINISHED" and TAG_MEMBER in r.data.tags}
