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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
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
    tracking_uri: str = ""
    experiment: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    num_runs: int = 0  # planned member runs
    config_digest: str = ""
    dense_digest: str = ""  # the dense weights' identity (prune keys hash it)
    train_samples: int = 0  # samples a member trains on per epoch (the progress ETA's unit of work)
    created: float = field(default_factory=time.time)
    ray_address: str | None = None

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
        return StudyMeta.from_dict(json.loads(self.meta_path.read_text()))

    def write_meta(self, meta: StudyMeta) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.meta_path, json.dumps(asdict(meta), indent=2, default=str))

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
        with open(self.lock_path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    who = json.loads(f.read() or "{}")
                except ValueError:
                    who = {}
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("started", 0)))
                return f"pid {who.get('pid', '?')} on {who.get('host', '?')} since {since}"
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def lock(self) -> None:
        """Hold the study's lock for this process's lifetime (the kernel drops it when the process dies,
        so a crashed driver leaves no stale lock). Raises StudyBusy naming the live holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")  # noqa: SIM115 - held until unlock() or process exit
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StudyBusy(f"study {self.name!r} is being run by {self.holder() or 'another process'}; "
                            "wait for it, or stop it (Ctrl-C / kill) first") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


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
