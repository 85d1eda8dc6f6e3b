"""Find a study from its folder: ``STORAGE/STUDY/study.json`` (written by tpp-study) names the tracking URI,
so ``tpp-analyze STUDY --storage DIR`` needs nothing else. The folder layout is study.store's (the one
declaration of it), and study.store reads study.json, resolving a study's own store to where the folder
is now."""

from __future__ import annotations

from pathlib import Path

from study.store import META, StudyFolder


class LocateError(ValueError):
    """One line naming the field (--storage) and what was expected."""


def study_folder(storage: str | Path, study: str) -> Path:
    return StudyFolder(Path(storage).expanduser() / study).path


def tracking_uri_from_storage(storage: str | Path, study: str) -> str:
    """The tracking URI recorded in ``storage/study/study.json``.

    A SQLite URI whose file is not where it says (a relative path, or a moved study folder) falls back to
    the ``mlflow.db`` inside the study folder when that file exists."""
    folder = study_folder(storage, study)
    meta = folder / META
    if not meta.is_file():
        found = sorted(p.parent.name for p in Path(storage).expanduser().glob(f"*/{META}"))
        listing = ", ".join(found) if found else "none"
        raise LocateError(f"--storage: no {META} at {meta} (studies under {storage}: {listing})")
    try:
        uri = StudyFolder(folder).read_meta().tracking_uri  # its own store, wherever the folder is now
    except (OSError, ValueError) as exc:
        raise LocateError(f"--storage: {str(exc).splitlines()[0]}") from None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        local = StudyFolder(folder).mlflow_db
        if not path.is_file() and local.is_file():
            return f"sqlite:///{local.resolve()}"
    return uri
