"""The study folder: where everything of one study lives, and its metadata file `study.json`.

    <storage>/<name>/
        study.json          name, status, tracking URI, parent run id, Tune path, trial counts
        study_config.yaml   the resolved config (what `resume` runs again)
        dense.pt            the dense model, trained once per study (weights only)
        prune_cache/        pruned models by prune key (reused across trials and on resume)
        finished/           the final result of every finished trial point (a resumed study never re-runs it)
        tune/               Ray Tune's experiment folder (trial checkpoints; what `resume` restores)
        optuna.db           the persistent Optuna study (optuna-dashboard sqlite:///.../optuna.db)
        mlflow.db           the default MLflow store (when no tracking URI is given)

`study.json` is small and rewritten atomically after every finished trial, so `tpp-study list` can
show progress without touching Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

META = "study.json"


@dataclass
class StudyMeta:
    name: str
    status: str = "created"  # created | running | completed | interrupted | failed
    tracking_uri: str = ""
    experiment: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    tune_path: str = ""
    num_trials: int = 0
    done: int = 0  # finished trials (completed + diverged)
    failed: int = 0
    best: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    pid: int = 0
    host: str = ""
    ray_address: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyMeta:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class StudyFolder:
    """Paths of one study and its metadata."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta_path(self) -> Path:
        return self.path / META

    @property
    def config_path(self) -> Path:
        return self.path / "study_config.yaml"

    @property
    def dense_path(self) -> Path:
        return self.path / "dense.pt"

    @property
    def prune_cache(self) -> Path:
        return self.path / "prune_cache"

    @property
    def tune_path(self) -> Path:
        return self.path / "tune"

    @property
    def optuna_db(self) -> Path:
        return self.path / "optuna.db"

    @property
    def pending_log(self) -> Path:
        """MLflow writes that could not be delivered (server gone); replayed by the next run/resume."""
        return self.path / "mlflow_pending.pkl"

    @property
    def finished_dir(self) -> Path:
        return self.path / "finished"

    def finished_path(self, point_id: str) -> Path:
        return self.finished_dir / f"{point_id}.json"

    def record_finished(self, point_id: str, result: dict[str, Any]) -> None:
        """Keep a finished trial's final result (JSON scalars only), by its point (`study.space.point_id`):
        a restored Tune run that lost track of it (the driver was killed before Tune saved its state)
        replays it instead of re-running, under the same or a new trial id."""
        keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or k == "tpp_final"}
        self.finished_dir.mkdir(parents=True, exist_ok=True)
        path = self.finished_path(point_id)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(keep, default=str))
        os.replace(tmp, path)

    def read_finished(self, point_id: str) -> dict[str, Any] | None:
        path = self.finished_path(point_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> StudyMeta:
        return StudyMeta.from_dict(json.loads(self.meta_path.read_text()))

    def write_meta(self, meta: StudyMeta) -> None:
        meta.updated = time.time()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(meta), indent=2, default=str))
        os.replace(tmp, self.meta_path)

    def update_meta(self, **changes: Any) -> StudyMeta:
        meta = self.read_meta()
        for k, v in changes.items():
            setattr(meta, k, v)
        self.write_meta(meta)
        return meta

    def claim(self) -> None:
        """Record this process as the one running the study (for `status` to tell live from dead)."""
        self.update_meta(pid=os.getpid(), host=socket.gethostname(), status="running")


def live_status(meta: StudyMeta) -> str:
    """The recorded status, but 'interrupted' for a 'running' study whose process is gone."""
    if meta.status == "running" and meta.host == socket.gethostname() and meta.pid:
        try:
            os.kill(meta.pid, 0)
        except ProcessLookupError:
            return "interrupted"
        except PermissionError:
            pass
    return meta.status


def find_study(name_or_path: str, storage: str | os.PathLike = "./studies") -> StudyFolder:
    """A study by folder path, or by name under `storage`. Raises FileNotFoundError listing what exists."""
    candidates = [Path(name_or_path), Path(storage) / name_or_path]
    for c in candidates:
        if (c / META).is_file():
            return StudyFolder(c)
        if c.name == META and c.is_file():
            return StudyFolder(c.parent)
    names = [m.name for m in list_studies(storage)]
    raise FileNotFoundError(f"no study {name_or_path!r} (looked in {Path(name_or_path).absolute()} and "
                            f"{(Path(storage) / name_or_path).absolute()}); studies under "
                            f"{Path(storage).absolute()}: {', '.join(names) or 'none'}")


def list_studies(storage: str | os.PathLike = "./studies") -> list[StudyMeta]:
    root = Path(storage)
    if not root.is_dir():
        return []
    out = []
    for meta_path in sorted(root.glob(f"*/{META}")):
        try:
            out.append(StudyFolder(meta_path.parent).read_meta())
        except (OSError, ValueError):
            continue
    return out


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


def as_dict(meta: StudyMeta) -> dict[str, Any]:
    return asdict(meta)
