"""Progress while a study runs: one line per finished trial, and study.json kept current.

Ray's own table output is turned off (verbose=0); this line says what a user waiting on a study wants
to know: how many trials are done / running / pending, the best so far, and when it will end.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from study.store import StudyFolder


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress(tune.Callback):
    """Prints `[study] 5/16 done, 2 running, 9 pending | last ... | best ... | ETA 2m10s`."""

    def __init__(self, study_dir: str, metric: str, mode: str, stream: Any = None):
        self.study_dir, self.metric, self.mode = study_dir, metric, mode
        self.stream = stream
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.monotonic()
        self.finished_here = 0
        self.total = 0
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir, "metric": self.metric, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def setup(self, total_num_samples: int | None = None, **info: Any) -> None:
        self._reset()
        self.meta = StudyFolder(self.study_dir).read_meta()
        self.total = self.meta.num_trials or int(total_num_samples or 0)

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best[0] if self.mode == "max" else value < self.best[0]

    def _line(self, trials: list, trial: Any, outcome: str, failed_now: bool = False) -> None:
        from study.space import point_from_config, run_name

        self.finished_here += 1
        # The reported trial may not carry its final status yet when callbacks run.
        status = {t.trial_id: t.status for t in trials}
        status[trial.trial_id] = "ERROR" if failed_now else "TERMINATED"
        done = sum(s in ("TERMINATED", "ERROR") for s in status.values())
        failed = sum(s == "ERROR" for s in status.values())
        running = sum(s == "RUNNING" for s in status.values())
        pending = max(self.total - done - running, 0)
        for t in trials:  # the best over every finished trial (also those finished before a resume)
            value = (t.last_result or {}).get(self.metric)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if status[t.trial_id] == "TERMINATED" and finite and self._better(value):
                self.best = (float(value), run_name(point_from_config(t.config)))
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.finished_here * (self.total - done) if self.finished_here else math.nan
        name = run_name(point_from_config(trial.config))
        best = f"{self.metric} {self.best[0]:.2f} ({self.best[1]})" if self.best else "-"
        line = (f"[{self.meta.name}] {done}/{self.total} done ({failed} failed), {running} running, "
                f"{pending} pending | {name}: {outcome} | best {best} | "
                f"elapsed {fmt_duration(elapsed)}, ETA {fmt_duration(eta) if done < self.total else '0s'}")
        print(line, file=self.stream or sys.stdout, flush=True)
        folder = StudyFolder(self.study_dir)
        folder.update_meta(done=done - failed, failed=failed,
                           best={"value": self.best[0], "trial": self.best[1]} if self.best else None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        value = last.get(self.metric)
        status = last.get("tpp_status", "completed")
        reuse = last.get("tpp_reuse", "none")
        shown = f"{value:.2f}" if isinstance(value, (int, float)) else "?"
        self._line(trials, trial, f"{self.metric} {shown} ({status}, prune {reuse})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, trial, f"FAILED: {last_error_line(trial)} (tag tpp.error has the traceback)",
                   failed_now=True)


def last_error_line(trial: Any) -> str:
    """The exception line of a failed trial's traceback (Tune writes it to the trial's error file)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1].strip()[:200] if lines else "unknown error"
