"""The study folder: where everything of one study lives, its metadata file `study.json`, and its lock.

    <storage>/<name>/
        study.json          name, tracking URI, parent run id, planned runs, config digest (identity only)
        study_config.yaml   the resolved config (what `resume` runs again)
        .lock               held (fcntl) by the one process running the study; says who
        dense.pt            the dense model, trained once per study (weights only)
        prune_cache/        pruned models by prune key, verified on load (study.prune_cache)
        tune/               Ray Tune's experiment folder (trial checkpoints; what `resume` restores)
        optuna.db           the Optuna study of the adaptive samplers (optuna-dashboard sqlite:///...)
        mlflow.db           the default MLflow store (when no tracking URI is given)
        mlflow_pending.json MLflow writes a lost server never took, delivered by the next run/resume

MLflow is the record of what finished, and the lock says whether a process runs the study; `study.json`
holds only the study's identity (written atomically), so nothing kept here can disagree with MLflow.

A study folder is self-contained: it names its own store relatively (an empty `tracking_uri` in
`study.json` is its `mlflow.db`), and objects Tune saved with the paths of the place they were made at
use the folder the study runs from now (`where_now`), so a copied, moved or renamed folder resumes into
itself. Its `id` travels with every copy: a second writer is refused even through a copy of a live study.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

META = "study.json"


class StudyBusy(RuntimeError):
    """Another live process holds the study's lock."""


@dataclass
class StudyMeta:
    """The study's identity: what it is and where its record is. Its status, counts and best run are not
    kept here: they are read from MLflow and the lock (record.study_status), the one record of them."""

    name: str
    tracking_uri: str = ""  # "" (in study.json): the study folder's own mlflow.db, wherever it is now
    experiment: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    num_runs: int = 0  # planned member runs
    config_digest: str = ""
    dense_digest: str = ""  # the dense weights' identity (prune keys hash it)
    train_samples: int = 0  # samples a member trains on per epoch (the progress ETA's unit of work)
    created: float = field(default_factory=time.time)
    ray_address: str | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))  # shared by every copy of the folder
    extensions: list[dict[str, Any]] = field(default_factory=list)  # each `tpp-study extend`: when, what

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyMeta:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StudyFolder:
    """Paths of one study, its metadata and its lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()
        self._lock_file: Any = None

    name = property(lambda self: self.path.name)
    meta_path = property(lambda self: self.path / META)
    config_path = property(lambda self: self.path / "study_config.yaml")
    dense_path = property(lambda self: self.path / "dense.pt")
    prune_cache = property(lambda self: self.path / "prune_cache")
    tune_path = property(lambda self: self.path / "tune")
    optuna_db = property(lambda self: self.path / "optuna.db")
    pending_log = property(lambda self: self.path / "mlflow_pending.json")
    extension_config_path = property(lambda self: self.path / "study_config.extend.yaml")
    lock_path = property(lambda self: self.path / ".lock")
    mlflow_db = property(lambda self: self.path / "mlflow.db")  # the default tracking store
    artifacts = property(lambda self: self.path / "mlartifacts")  # a local store's artifacts
    report_dir = property(lambda self: self.path / "report")  # where `tpp-analyze --storage` writes

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> StudyMeta:
        """The study's identity, its own store's URI resolved to where the folder is now. A damaged
        `study.json` is a one-line ValueError naming it."""
        try:
            saved = json.loads(self.meta_path.read_text())
            if not isinstance(saved, dict) or "name" not in saved:
                raise ValueError("not a study record")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.meta_path} is damaged ({str(e).splitlines()[0][:120]}); it is the "
                             "study's identity: restore it from a copy, or start the study again") from None
        meta = StudyMeta.from_dict(saved)
        if not meta.tracking_uri:
            meta.tracking_uri = self.default_tracking_uri
        return meta

    def write_meta(self, meta: StudyMeta) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        saved = asdict(meta)
        if saved["tracking_uri"] == self.default_tracking_uri:
            saved["tracking_uri"] = ""  # its own store: found relative to the folder, wherever it moves
        if self._lock_file is not None:  # a new study's writer: its id is locked from the first write on
            self._lock_id(meta.id)
        _write_atomic(self.meta_path, json.dumps(saved, indent=2, default=str))

    def update_meta(self, **changes: Any) -> StudyMeta:
        meta = self.read_meta()
        for k, v in changes.items():
            setattr(meta, k, v)
        self.write_meta(meta)
        return meta

    # ------------------------------------------------------------------------------------ the lock
    def holder(self) -> str | None:
        """Who holds the lock ("pid 123 on host since ..."), or None when nobody does."""
        if not self.lock_path.is_file():
            return None
        with open(self.lock_path) as f:  # read-only: status works on read-only media
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _who(f)
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def lock(self) -> None:
        """Hold the study's lock for this process's lifetime (the kernel drops it when the process dies,
        so a crashed driver leaves no stale lock). Raises StudyBusy naming the live holder.

        Two locks: the folder's `.lock`, and one per study id on this machine, so that a copy of a live
        study (`cp -a`, same id) cannot be resumed beside it."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = _flock(self.lock_path, f"study {self.name!r}")
        if self.exists():
            try:
                self._lock_id(self.read_meta().id)
            except BaseException:
                self.unlock()
                raise

    def _lock_id(self, ident: str) -> None:
        if getattr(self, "_id_lock", None) is None:
            self._id_lock = _flock(_id_lock_path(ident), f"study {self.name!r} (id {ident}, also in a copy "
                                   "of this folder)", where=str(self.path))

    def unlock(self) -> None:
        for attr in ("_id_lock", "_lock_file"):
            f = getattr(self, attr, None)
            if f is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
                setattr(self, attr, None)


def _id_lock_path(ident: str) -> Path:
    root = Path(tempfile.gettempdir()) / f"tpp-study-locks-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    return root / f"{ident}.lock"


def _flock(path: Path, what: str, where: str = "") -> Any:
    """An exclusive lock on `path`, held open; StudyBusy naming the holder when a live process has it."""
    f = open(path, "a+")  # noqa: SIM115 - held until unlock() or process exit
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _who(f, where)
        f.close()
        raise StudyBusy(f"{what} is being run by {holder}; wait for it, or stop it (Ctrl-C / kill) first") \
            from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                        "path": where or str(path.parent)}))
    f.flush()
    return f


def _who(f: Any, where: str = "") -> str:
    """The holder a lock file names: "pid 123 on host since ... [at PATH]" (PATH when not `where`)."""
    f.seek(0)
    try:
        who = json.loads(f.read() or "{}")
    except ValueError:
        who = {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("started", 0)))
    at = f" at {who['path']}" if where and who.get("path") and who["path"] != where else ""
    return f"pid {who.get('pid', '?')} on {who.get('host', '?')} since {since}{at}"


_running_at: str | None = None  # the study folder this process runs a study from (see `where_now`)


@contextlib.contextmanager
def running_from(folder: StudyFolder) -> Any:
    """While the driver runs (or restores) the study in `folder`: see `where_now`."""
    global _running_at
    before, _running_at = _running_at, str(folder.path)
    try:
        yield
    finally:
        _running_at = before


def where_now(saved_study_dir: str) -> str:
    """The study folder an object restored from Tune's saved state must use.

    Tune pickles the callbacks and searchers with the paths they were made with; a folder moved or copied
    since must write to itself, never to where it was, so they take the folder the driver runs from."""
    return _running_at or saved_study_dir


def find_study(name_or_path: str, storage: str | os.PathLike = "./studies") -> StudyFolder:
    """A study by folder path, or by name under `storage`. Raises FileNotFoundError listing what exists."""
    for c in (Path(name_or_path), Path(storage) / name_or_path):
        if (c / META).is_file():
            return StudyFolder(c)
        if c.name == META and c.is_file():
            return StudyFolder(c.parent)
    names = [f.name for f in list_studies(storage)]
    raise FileNotFoundError(f"no study {name_or_path!r} (looked in {Path(name_or_path).absolute()} and "
                            f"{(Path(storage) / name_or_path).absolute()}); studies under "
                            f"{Path(storage).absolute()}: {', '.join(names) or 'none'}")


def list_studies(storage: str | os.PathLike = "./studies") -> list[StudyFolder]:
    root = Path(storage)
    return [StudyFolder(p.parent) for p in sorted(root.glob(f"*/{META}"))] if root.is_dir() else []


def disk_usage(path: str | os.PathLike) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
