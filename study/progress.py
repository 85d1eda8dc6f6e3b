"""Progress while a study runs: one line per finished member, and study.json kept current.

Ray's own table output is turned off (verbose=0); this line says what a user waiting on a study wants
to know: how many runs are done / failed, the best so far, and when it will end.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def rank(value: float, lr: float, name: str, mode: str) -> tuple:
    """Sort key of the best run, the one definition every output uses: the better objective; ties go
    to the lower finetuning LR, then to the run name that sorts first."""
    return (-value if mode == "max" else value, lr, name)


class Progress(tune.Callback):
    """Prints `[study] 37/270 runs done (0 failed) | <run>: best_acc 91.20 | best ... | ETA 2m10s`."""

    def __init__(self, study_dir: str, stream: Any = None):
        self.study_dir, self.stream = study_dir, stream
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.monotonic()
        self.done = self.failed = self.finished_here = 0
        self.best: tuple | None = None
        self.names: dict[str, tuple[str, float]] = {}  # member id -> (run name, lr)
        self.members: dict[str, list[str]] = {}
        self.notices: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def setup(self, **info: Any) -> None:
        from study.config import load_config
        from study.store import StudyFolder

        self._reset()
        folder = StudyFolder(self.study_dir)
        self.meta, self.config = folder.read_meta(), load_config(folder.config_path)
        self.done, self.failed = self.meta.done, self.meta.failed
        if self.meta.best:
            b = self.meta.best
            self.best = (rank(b["value"], b.get("lr", 0.0), b["run_name"], self.config.objective.mode), b)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.design import run_name, varying
        from study.trainable import resolve

        if trial.config.get("kind") == "prune":
            return
        runs = resolve(self.config, trial.config, trial.trial_id)
        self.members[trial.trial_id] = runs.ids
        for rc, mid in zip(runs.configs, runs.ids, strict=True):
            self.names[mid] = (run_name(runs.point, rc, varying(self.config)), rc.lr)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for notice in result.get("tpp_notices") or []:
            if notice not in self.notices:  # once per study, however many trials say it
                self.notices.add(notice)
                print(f"[{self.meta.name}] {notice}", file=self.stream or sys.stdout, flush=True)
        metric, mode = self.config.objective.metric, self.config.objective.mode
        for mid, rec in (result.get("tpp_done") or {}).items():
            if mid not in self.names:
                continue
            name, lr = self.names.pop(mid)
            value = rec["metrics"].get(metric, math.nan)
            if math.isfinite(value):
                key = rank(value, lr, name, mode)
                if self.best is None or key < self.best[0]:
                    self.best = (key, {"metric": metric, "value": value, "run_name": name, "lr": lr})
            self._line(f"{name}: {metric} {value:.2f} ({rec['status']})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for mid in self.members.get(trial.trial_id, []):
            if mid in self.names:
                name, _ = self.names.pop(mid)
                self._line(f"{name}: FAILED: {last_error_line(trial)} (tag tpp.error has the traceback)",
                           failed=True)

    def _line(self, outcome: str, failed: bool = False) -> None:
        from study.store import StudyFolder

        self.finished_here += 1
        self.done += not failed
        self.failed += failed
        total = self.meta.num_runs
        left = max(total - self.done - self.failed, 0)
        elapsed = time.monotonic() - self.t0
        eta = fmt_duration(elapsed / self.finished_here * left) if left else "0s"
        best = self.best[1] if self.best else None
        shown = f"{best['metric']} {best['value']:.2f} ({best['run_name']})" if best else "-"
        print(f"[{self.meta.name}] {self.done + self.failed}/{total} runs done ({self.failed} failed) | "
              f"{outcome} | best {shown} | elapsed {fmt_duration(elapsed)}, ETA {eta}",
              file=self.stream or sys.stdout, flush=True)
        StudyFolder(self.study_dir).update_meta(done=self.done, failed=self.failed, best=best)


def last_error_line(trial: Any) -> str:
    """The exception line of a failed trial's traceback (Tune writes it to the trial's error file)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1].strip()[:200] if lines else "unknown error"
