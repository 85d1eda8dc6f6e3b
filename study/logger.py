"""The Tune callback that writes a study to MLflow from the driver: one run per member, nested under the
study run, every write through the outbox."""

from __future__ import annotations

import collections
import logging
import math
import os
from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback

from study.outbox import Outbox
from study.record import study_inputs
from study.schema import (
    NO_SPACE,
    PARENT_TAG,
    RUN_STATUS,
    TAG_DENSE_DIGEST,
    TAG_DIVERGED_STAGE,
    TAG_ERROR,
    TAG_MEMBER,
    TAG_METHOD,
    TAG_NODE,
    TAG_PRUNE_KEY,
    TAG_RERUN,
    TAG_REUSE,
    TAG_ROLE,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TRIAL,
)
from study.tracking import children, end_wait_s, take_over
from study.writer import Writer

log = logging.getLogger("study.mlflow")


# Writes reach MLflow within this, from the writer thread, all runs' of the last second in one transaction
# (at 5k members ~2.5 trials end a second: fewer commits than one a trial); and all of them before Tune
# saves its experiment state (get_state), so a restored Tune state never runs ahead of MLflow.
FLUSH_EVERY_S = 1.0


class StudyLogger(LoggerCallback):
    """Ray Tune logger on the driver: one run per member, nested under the study's parent run.

    A thin adapter over LoggerCallback's log_trial_start / log_trial_result / log_trial_end; queueing and
    retries live in the outbox. Tune's own MLflowLoggerCallback does not fit: it makes one run per trial
    (a trial here trains many members) and a second run after a restore. Picklable with no live state
    (Tune pickles callbacks into its experiment state); everything is (re)built in `setup` from
    `study.json` and the member runs MLflow already holds.
    """

    def __init__(self, study_dir: str):
        self.study_dir = study_dir
        self._reset()

    def _reset(self) -> None:
        self.box: Outbox | None = None
        self.writer: Writer | None = None
        self.status: dict[str, str] = {}  # member id -> MLflow run status
        self.last_step: dict[str, dict[str, int]] = {}  # member -> metric -> last step logged (open runs)
        self.members: dict[str, list[str]] = {}  # trial id -> its member ids
        self.node: dict[str, str] = {}  # member id -> the node it last reported from (tag tpp.node)
        self.inputs: tuple[Any, str | None] | None = None  # the study's data set and dense model ids

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from study.store import where_now

        self.study_dir = where_now(state["study_dir"])
        self._reset()

    def setup(self, **info: Any) -> None:
        from study.loading import load_config
        from study.store import StudyFolder

        folder = StudyFolder(self.study_dir)
        self.meta = folder.read_meta()
        self.config = load_config(folder.config_path)
        self.box = Outbox(self.meta.tracking_uri, {})
        self.box.load_pending(folder.pending_log)
        folder.pending_log.unlink(missing_ok=True)
        self.inputs = self._study_inputs()
        runs = take_over(self.meta.parent_run_id, "logger")
        if runs is None:  # not set up by this study's driver (e.g. a test's own Tuner): read them
            runs = children(self.meta.tracking_uri, self.meta.experiment_id, self.meta.parent_run_id)
        for run in runs:
            mid = run.data.tags.get(TAG_MEMBER)
            if not mid:
                continue
            self.box.run_ids[mid] = run.info.run_id
            self.status[mid] = run.info.status
            if run.info.status != "FINISHED":  # to be continued: remember how far its curves got
                for key in run.data.metrics:
                    if "/" in key:
                        steps = [m.step for m in self.box.mlflow.get_metric_history(run.info.run_id, key)]
                        self.last_step.setdefault(mid, {})[key] = max(steps, default=-1)
        self.writer = Writer(self.box, FLUSH_EVERY_S)

    def _study_inputs(self) -> tuple[Any, str | None] | None:
        """The data set and dense-model inputs every member run links to (the dense model's LoggedModel
        is made here, once). Read at setup, never in Tune's loop, where a hung server would stall it.
        Best effort: without them the dashboard loses a column, the study nothing."""
        assert self.box is not None
        try:
            return study_inputs(self.box.mlflow, self.meta, self.config, self.study_dir)
        except Exception as e:  # noqa: BLE001 - see above
            log.warning("MLflow: could not log the data set / dense model inputs: %s", str(e)[:300])
            return None

    def log_trial_start(self, trial: Any) -> None:
        from study.design import member_param_keys, point_prune_key, resolve, varying
        from study.record import logged_params, run_name

        assert self.box is not None
        if trial.config.get("kind") == "prune":
            return
        runs = resolve(self.config, trial.config, trial.trial_id)
        self.members[trial.trial_id] = runs.ids
        shown = varying(self.config)
        keys = member_param_keys(self.config)
        prune_key = point_prune_key(self.config, runs.point, self.meta.dense_digest)  # the members share it
        for rc, mid in zip(runs.configs, runs.ids, strict=True):
            if self.status.get(mid) == "FINISHED":
                continue
            tags = {TAG_STATUS: "running", TAG_TRIAL: trial.trial_id}
            if self.status.get(mid) == "RUNNING":  # a retry of a trial this session started: its run
                self.box.batch(mid, tags=tags)   # exists or is queued for creation; never a second one
            elif mid in self.status:  # resumed or retried: reopen its run (its params again: a write
                self.box.status(mid, "RUNNING")  # lost to a full disk may have been them; same values)
                self.box.batch(mid, params=logged_params(runs.point, rc, keys), tags=tags)
            else:
                self.box.create_run(mid, self.meta.experiment_id, run_name(runs.point, rc, shown), {
                    **tags, PARENT_TAG: self.meta.parent_run_id, TAG_STUDY: self.meta.name,
                    TAG_ROLE: "trial", TAG_MEMBER: mid, TAG_METHOD: runs.point.method,
                    TAG_PRUNE_KEY: prune_key,
                    TAG_DENSE_DIGEST: self.meta.dense_digest, **rerun_tags(rc, self.study_dir)})
                if self.inputs is not None:  # before the params: they and the epochs merge
                    self.box.inputs(mid, *self.inputs)
                self.box.batch(mid, params=logged_params(runs.point, rc, keys))
            self.status[mid] = "RUNNING"

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        assert self.box is not None
        by_member: dict[str, list[tuple[str, float, int]]] = collections.defaultdict(list)
        for mid, key, value, step in result.get("tpp_rows") or []:
            if self.status.get(mid) != "RUNNING":
                continue
            last = self.last_step.setdefault(mid, {})
            if step > last.get(key, -1):
                last[key] = step
                by_member[mid].append((key, value, step))
        node = str(result.get("tpp_node", ""))
        for mid, rows in by_member.items():
            tags = {TAG_NODE: node} if self.node.get(mid) != node else None  # a tag write costs a commit
            self.node[mid] = node
            self.box.batch(mid, metrics=rows, tags=tags)
        for mid, reuse in (result.get("tpp_reuse") or {}).items():
            if self.status.get(mid) == "RUNNING":
                self.box.batch(mid, tags={TAG_REUSE: reuse})
        for mid, rec in (result.get("tpp_done") or {}).items():
            if self.status.get(mid) == "RUNNING":
                tags = {TAG_STATUS: rec["status"]}
                if rec["metrics"].get("diverged_stage_prune"):
                    tags[TAG_DIVERGED_STAGE] = "prune"
                elif rec["status"] == "diverged":
                    tags[TAG_DIVERGED_STAGE] = "finetune"
                self.box.batch(mid, metrics=[(k, v, 0) for k, v in rec["metrics"].items()], tags=tags)
                self._end(mid, rec["status"])

    def get_state(self) -> None:
        """Called by Tune as it saves its experiment state, before that state is copied into the study
        folder: every write queued so far (a trial's end, the epochs before its checkpoint) goes to MLflow
        first, so a restore never skips what MLflow lacks. The barrier, not a state: returns None."""
        if self.writer is not None:
            self.writer.wait()

    def _end(self, mid: str, status: str, extra_tags: dict[str, str] | None = None) -> None:
        assert self.box is not None
        if extra_tags:
            self.box.batch(mid, tags=extra_tags)
        self.box.status(mid, RUN_STATUS.get(status, "FINISHED"))
        self.status[mid] = RUN_STATUS.get(status, "FINISHED")
        if self.status[mid] == "FINISHED":  # never logged to again (a retry skips it): forget its steps
            self.last_step.pop(mid, None)
            self.node.pop(mid, None)

    def _open(self, trial_id: str) -> list[str]:
        return [m for m in self.members.get(trial_id, []) if self.status.get(m) == "RUNNING"]

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if failed:
            self._failed(trial)
        else:
            last = trial.last_result or {}
            for mid in self._open(trial.trial_id):  # stopped early by the scheduler: keep what it reached
                value = last.get(self.config.objective.metric)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.box.batch(mid, metrics=[(self.config.objective.metric, value, 0)])
                self._end(mid, "completed", {TAG_STATUS: "completed", "tpp.early_stopped": "true"})
        self.members.pop(trial.trial_id, None)  # ended: its members are all in self.status

    def _failed(self, trial: Any) -> None:
        from study.progress import last_error_line

        error = ""
        if getattr(trial, "error_file", None) and os.path.isfile(trial.error_file):
            error = Path(trial.error_file).read_text()[-4000:]
        if trial.trial_id not in self.members:
            self.log_trial_start(trial)  # failed before it ever started
        # a full disk is no fault of the member: it is stopped, and runs again on resume
        status = "interrupted" if any(s in error for s in NO_SPACE) else "failed"
        for mid in self._open(trial.trial_id):
            self._end(mid, status, {TAG_STATUS: status, TAG_ERROR: error or last_error_line(trial)})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self) -> None:
        """End every still-open member run as KILLED (interrupted), then deliver or save what is queued."""
        if self.box is None:
            return
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        for mid, status in list(self.status.items()):
            if status == "RUNNING":
                self._end(mid, "interrupted", {TAG_STATUS: "interrupted"})
        full = any(s in (self.box.problem or "") for s in NO_SPACE)
        delivered = self.box.drain(5 if full else end_wait_s())
        if not delivered:
            from study.store import StudyFolder

            folder = StudyFolder(self.study_dir)
            try:
                self.box.save_pending(folder.pending_log)
            except OSError as e:  # the disk is full: what is lost here is redone by `resume`
                print(f"[tpp-study] {len(self.box.ops)} MLflow write(s) could not be kept ({e}); the runs "
                      "they belong to are not FINISHED, so `resume` runs them again", flush=True)
                return
            print(f"[tpp-study] MLflow still unreachable: {len(self.box.ops)} write(s) saved to "
                  f"{folder.pending_log}; `tpp-study resume {self.meta.name}` delivers them", flush=True)


def rerun_tags(run_cfg: Any, study_dir: str) -> dict[str, str]:
    """The `tpp run` command that reruns one member alone on the study's dense model: a tag, and the run
    page's description (a single run equals its lockstep member up to float drift)."""
    import shlex

    from study.dashboard import NOTE_TAG
    from study.store import StudyFolder
    from tpp.cli import run_command

    command = shlex.join(run_command(run_cfg, str(StudyFolder(study_dir).dense_path)))
    return {TAG_RERUN: command, NOTE_TAG: f"Rerun this member alone:\n\n```\n{command}\n```"}
