"""The study's record in MLflow: the experiment and parent run, the data set and dense-model inputs, each
member run's name and params, and the study's outcome read back (collect)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.config import OBJECTIVE_TEXT, ObjectiveCfg, StudyConfig
from study.dashboard import EXPERIMENT_TAGS, _dashboard, run_route, runs_page_url
from study.design import PrunePoint
from study.errors import StudyError
from study.loading import read_yaml
from study.outbox import Outbox
from study.schema import (
    DENSE_MODEL_TAG,
    TAG_DENSE_DIGEST,
    TAG_MEMBER,
    TAG_OUTCOME,
    TAG_REUSE,
    TAG_ROLE,
    TAG_STATUS,
    TAG_STUDY,
)
from study.store import StudyFolder, disk_usage, human_bytes
from study.text import fmt_duration
from study.tracking import TrackingUnavailable, client, each_child, flatten, is_http, sqlite_path

if TYPE_CHECKING:
    from tpp.config import RunConfig


def ensure_experiment(c: Any, name: str, study_dir: Path, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # A local store keeps artifacts in the study folder; a server decides itself (its artifact proxy).
    location = None if is_http(uri) else StudyFolder(study_dir).artifacts.as_uri()
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def adopt_artifact_root(folder: StudyFolder, meta: Any) -> None:
    """Keep a moved or copied study's artifacts in itself: point its experiment's artifact root (and its
    runs') at the folder it is in now, when the store is a SQLite file that still names the old place.

    MLflow has no call that moves an experiment's artifact root, so the two columns holding it
    (`experiments.artifact_location`, `runs.artifact_uri`, MLflow's schema) are updated in place, in one
    transaction, and only in a SQLite store (the study's own, or a file the user named)."""
    import sqlite3

    path = sqlite_path(meta.tracking_uri)
    if not path or not meta.experiment_id or not os.path.isfile(path):
        return
    new, exp = folder.artifacts.as_uri(), int(meta.experiment_id)
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as con, con:
        row = con.execute("SELECT artifact_location FROM experiments WHERE experiment_id = ?",
                          (exp,)).fetchone()
        old = row[0] if row else None
        if not old or old == new or not old.startswith("file:"):
            return
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp))
        con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                    "AND substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, exp, len(old), old))
        con.execute("UPDATE tags SET value = ? WHERE key = 'tpp.study_dir' AND run_uuid = ?",
                    (str(folder.path), meta.parent_run_id))
    print(f"[{meta.name}] the study folder moved: its artifacts are kept under {folder.artifacts}",
          flush=True)


def start_parent(uri: str, experiment: str, study_dir: Path, name: str, params: dict[str, str],
                 tags: dict[str, str], artifacts: dict[str, str]) -> tuple[str, str]:
    """Create the study's parent run (and the experiment's dashboard tags); returns (experiment_id,
    run_id)."""
    c = client(uri, create=True)  # the one place a study's store is created
    exp_id = ensure_experiment(c, experiment, study_dir, uri)
    _dashboard(c, exp_id, study_dir)
    run = c.create_run(exp_id, run_name=name, tags={TAG_STUDY: name, TAG_ROLE: "study",
                                                    "tpp.study_dir": str(study_dir), **tags})
    box = Outbox(uri, {"parent": run.info.run_id})
    box.batch("parent", params=params)
    for fname, text in artifacts.items():
        box.text("parent", text, fname)
    if not box.drain(60):
        raise TrackingUnavailable(f"could not write the study's parent run to {uri}")
    return exp_id, run.info.run_id


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
        tags = {TAG_STUDY: meta.name, TAG_DENSE_DIGEST: meta.dense_digest or dense.digest(),
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


@dataclass
class StudyResult:
    """What a finished (or interrupted) study produced and where it is."""

    name: str
    path: str
    status: str  # completed | interrupted | failed (every run finished, some failed)
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    num_runs: int
    counts: dict[str, int] = field(default_factory=dict)  # member status -> count (MLflow tags)
    reuse: dict[str, int] = field(default_factory=dict)  # tpp.reuse -> count
    best: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    stopped_because: str | None = None  # a clean stop the study made itself (a full disk)
    wall_s: float = 0.0
    disk_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def mlflow_ui_command(self) -> str:
        """How to open this study's runs in the MLflow UI: the study's own server, or one to start on
        its SQLite file (loopback only, no usage telemetry)."""
        if not self.tracking_uri.startswith("sqlite:"):
            return f"open the study's MLflow server {self.tracking_uri}"
        mlflow = Path(sys.executable).with_name("mlflow")
        exe = str(mlflow) if mlflow.exists() else "mlflow"
        return (f"MLFLOW_DISABLE_TELEMETRY=true {shlex.quote(exe)} server --backend-store-uri "
                f"{shlex.quote(self.tracking_uri)} "
                "--host 127.0.0.1 --port 5000")

    def ui_lines(self) -> list[str]:
        """How to open the study in the MLflow UI: the server command and the runs page's URL."""
        lines = [f"MLflow UI: {self.mlflow_ui_command}"]
        if self.experiment_id:  # the runs page in the training workflow, on the study's saved view
            base = "http://127.0.0.1:5000" if self.tracking_uri.startswith("sqlite:") else self.tracking_uri
            lines.append(f"           then open {runs_page_url(base, self.experiment_id, self.name)}")
            lines.append(f"Groups:    {runs_page_url(base, self.experiment_id, self.name, groups=True)} "
                         "(every group's LR curve, after tpp-analyze)")
            if self.parent_run_id:  # the study run: its description, counts, config and the report
                lines.append(f"Study run: {base}/{run_route(self.experiment_id, self.parent_run_id)}")
        return lines

    def summary(self) -> str:
        c = self.counts
        finished = sum(c.get(k, 0) for k in ("completed", "diverged", "failed"))
        lines = [
            f"Study {self.name}: {self.status} in {fmt_duration(self.wall_s)} -- {c.get('completed', 0)} "
            f"completed, {c.get('diverged', 0)} diverged, {c.get('failed', 0)} failed, "
            f"{self.num_runs - finished} not finished, of {self.num_runs} runs",
            f"Prune stages: {self.reuse.get('computed', 0)} computed and shared by "
            f"{self.reuse.get('computed', 0) + self.reuse.get('reused', 0)} runs, "
            f"{self.reuse.get('none', 0)} runs of methods without a penalty stage",
        ]
        if self.best:
            lines.append(f"Best: {self.best['metric']} {self.best['value']:.2f}  ({self.best['run_name']}; "
                         f"{OBJECTIVE_TEXT.get(self.best['metric'], '')})")
        lines += [f"Results:   {self.path}  ({human_bytes(self.disk_bytes)} on disk)",
                  f"MLflow:    {self.tracking_uri}  experiment {self.experiment!r}, "
                  f"parent run {self.parent_run_id}",
                  *self.ui_lines()]
        storage = str(Path(self.path).parent)
        lines.append(f"Report:    tpp-analyze {self.name} --storage {shlex.quote(storage)}")
        if self.status != "completed":
            lines.append(f"Resume:    tpp-study resume {self.name} --storage {shlex.quote(storage)}")
        return "\n".join(lines)


def end_parent(box: Outbox, cfg: StudyConfig, experiment_id: str, status: str, result: StudyResult | None,
               wait_s: float) -> None:
    """The study run's last writes: its counts and best run (metrics, tag, the note linking the best run)
    and its MLflow status, which is the study's status as `tpp-study status` reads it."""
    from study.dashboard import study_note
    from study.schema import RUN_STATUS, TAG_BEST_RUN

    metrics = {}
    if result is not None:
        metrics = {f"runs_{k}": float(v) for k, v in result.counts.items()}
        if result.best:
            metrics[f"best_{result.best['metric']}"] = result.best["value"]
    best = result.best if result else None
    tags = {"mlflow.note.content": study_note(cfg.description, experiment_id, cfg.name, best)}
    if best:
        tags[TAG_BEST_RUN] = best["run_id"]
    if result is not None:  # what `collect` found, so status and resume read one run instead of them all
        tags[TAG_OUTCOME] = json.dumps({"num_runs": result.num_runs, "counts": result.counts,
                                        "reuse": result.reuse, "best": result.best})
    box.batch("parent", metrics=[(k, v, 0) for k, v in metrics.items()], tags=tags)
    box.status("parent", RUN_STATUS[status])
    box.drain(wait_s)


def study_status(folder: StudyFolder, result: StudyResult | None = None) -> str:
    """The study's status, derived: "running" while a process holds its lock; else from its MLflow record
    (`collect`, or the `result` already collected): completed, failed (every run finished, some failed) or
    interrupted; "created" before it has a study run; "unknown" while its tracking store cannot be read."""
    if folder.holder() is not None:
        return "running"
    if not folder.read_meta().parent_run_id:
        return "created"
    if result is None:
        try:
            result = collect(folder, recorded=True)
        except Exception:  # noqa: BLE001 - a store that cannot be read says so, it does not stop `list`
            return "unknown"
    return result.status


def collect(folder: StudyFolder, *, recorded: bool = False, runs: list[Any] | None = None) -> StudyResult:
    """The study's outcome as recorded in MLflow (the truth, whatever process wrote it), from every
    member run. `recorded`: from the outcome its study run recorded at its end (one read, whatever the
    study's size; without the member list) when that is still the study's state -- the study run ended,
    nothing is waiting for delivery, the planned run count unchanged -- else from every member run.
    `runs`: the member runs, read by the caller just now (with the objective's metric), else read here."""
    meta = folder.read_meta()
    if recorded and (out := _recorded(folder, meta)) is not None:
        return out
    # Only the objective is needed: read without validating the whole config, whose methods may have
    # been registered by the script that ran the study (unknown to `tpp-study status`).
    saved = read_yaml(folder.config_path).get("objective") or {}
    objective = ObjectiveCfg.model_validate(saved)
    metric, mode = objective.metric, objective.mode
    counts: dict[str, int] = {}
    reuse: dict[str, int] = {}
    if runs is None:  # one chunk of runs alive at a time: the rows kept are ~4x smaller (a 10k study's end)
        runs = each_child(meta.tracking_uri, meta.experiment_id, meta.parent_run_id, metrics=[metric],
                          params=["lr"], tags=[TAG_STATUS, TAG_REUSE, TAG_MEMBER])
    rows, best = [], None
    for r in runs:
        tags = r.data.tags
        status = tags.get(TAG_STATUS, "running")
        counts[status] = counts.get(status, 0) + 1
        if TAG_REUSE in tags:
            reuse[tags[TAG_REUSE]] = reuse.get(tags[TAG_REUSE], 0) + 1
        value = r.data.metrics.get(metric)
        lr = float(r.data.params.get("lr", "nan"))
        rows.append({"member_id": tags.get(TAG_MEMBER), "run_id": r.info.run_id, metric: value,
                     "run_name": r.info.run_name, "status": status, "run_status": r.info.status})
        if status in ("completed", "diverged") and value is not None and value == value:
            key = rank(value, lr, r.info.run_name, mode)
            if best is None or key < best[0]:
                best = (key, {"metric": metric, "value": value, "run_name": r.info.run_name, "lr": lr,
                              "run_id": r.info.run_id})
    return StudyResult(meta.name, str(folder.path), _status_of(counts, meta.num_runs), meta.tracking_uri,
                       meta.experiment, meta.experiment_id, meta.parent_run_id, meta.num_runs, counts, reuse,
                       best[1] if best else None, sorted(rows, key=lambda t: t["run_name"] or ""),
                       disk_bytes=disk_usage(folder.path))


def _status_of(counts: dict[str, int], num_runs: int) -> str:
    finished = sum(counts.get(k, 0) for k in ("completed", "diverged", "failed"))
    return "interrupted" if finished < num_runs else "failed" if counts.get("failed") else "completed"


def _recorded(folder: StudyFolder, meta: Any) -> StudyResult | None:
    if folder.pending_log.is_file() or not meta.parent_run_id:
        return None
    parent = client(meta.tracking_uri).get_run(meta.parent_run_id)
    try:
        out = json.loads(parent.data.tags[TAG_OUTCOME])
    except (KeyError, ValueError):
        return None
    if parent.info.status == "RUNNING" or out.get("num_runs") != meta.num_runs:
        return None
    counts = {k: int(v) for k, v in out["counts"].items()}
    return StudyResult(meta.name, str(folder.path), _status_of(counts, meta.num_runs), meta.tracking_uri,
                       meta.experiment, meta.experiment_id, meta.parent_run_id, meta.num_runs, counts,
                       out["reuse"], out["best"], disk_bytes=disk_usage(folder.path))


def _start_parent(cfg: StudyConfig, folder: StudyFolder, uri: str, num_runs: int) -> None:
    from study.design import points

    artifacts = {"study_config.yaml": cfg.to_yaml()}
    if cfg.is_design:
        artifacts["design.json"] = json.dumps([p.as_dict() for p in points(cfg)], indent=1)
    params = {**flatten(cfg.model_dump(mode="json", exclude={"description"})), "num_trials": str(num_runs)}
    tags = {"mlflow.note.content": cfg.description} if cfg.description else {}
    try:
        exp_id, parent = start_parent(uri, cfg.experiment(), folder.path, cfg.name, params, tags, artifacts)
    except Exception as e:  # noqa: BLE001
        raise StudyError(f"mlflow: cannot create the study's runs at {uri}: {e}") from None
    folder.update_meta(experiment_id=exp_id, parent_run_id=parent)


def short(x: float) -> str:
    """3.2e-3 style: compact, readable in run names."""
    mant, exp = f"{x:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


SHORT_NAMES = {"epochs": "ep", "weight_decay": "wd", "warmup_epochs": "wu", "batch_size": "bs"}


def run_name(point: PrunePoint, run_cfg: RunConfig, shown: list[str] = ()) -> str:
    """e.g. `lr=3.2e-3 tpp pr=0.9 g=1e-3 s0` -- the LR first (the UI truncates names), then the
    prune point, then the other finetune settings that vary in the study (`shown`)."""
    parts = [f"lr={short(run_cfg.lr)}", point.method, f"pr={point.pr:.3g}"]
    if point.growth is not None:
        parts.append(f"g={short(point.growth)}")
    parts.append(f"s{point.seed}")
    for key in shown:
        value = getattr(run_cfg, key)
        text = value if isinstance(value, str) else short(value) if isinstance(value, float) else str(value)
        parts.append(text if key == "schedule" else f"{SHORT_NAMES.get(key, key)}={text}")
    return " ".join(parts)


def logged_params(point: PrunePoint, run_cfg: RunConfig,
                  keys: frozenset[str] | None = None) -> dict[str, str]:
    """A member's MLflow params: the RunConfig fields in `keys` (those that vary in the study, see
    design.member_param_keys; all when None) with None-valued settings left out and growth only where the
    method has a penalty, numbers as numbers; plus `method_label`, `has_penalty`, `log10_lr`, and the
    full resolved config as one JSON param `run_config` (one row instead of ~45: params are most of what
    a member's run costs the driver to create)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    config = run_cfg.to_dict()
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    if len(text) > MAX_PARAM_VAL_LENGTH:  # too long for one MLflow param: every field on its own
        keys = None
    out = {}
    for k, v in config.items():
        if v is None or (k == "growth" and point.growth is None) or (keys is not None and k not in keys):
            continue
        out[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else str(v)
    out.update(method_label=point.method, has_penalty="1" if point.growth is not None else "0",
               log10_lr=f"{math.log10(run_cfg.lr):.4f}")
    if keys is not None:
        out["run_config"] = text
    return out


def rank(value: float, lr: float, name: str, mode: str) -> tuple:
    """Sort key of the best run, the one definition every output uses: the better objective; ties go
    to the lower finetuning LR, then to the run name that sorts first."""
    return (-value if mode == "max" else value, lr, name)


EXIT_CODES = {"completed": 0, "interrupted": 1, "failed": 3}  # 2: bad config or cannot start
