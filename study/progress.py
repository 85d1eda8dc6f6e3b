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

from study.config import StudyConfig, levels
from study.design import PrunePoint, _prune_iterations, members, point_prune_key, points, run_config
from study.record import rank
from study.text import fmt_duration


class Progress(tune.Callback):
    """One line per finished run, and where the study stands while runs are under way.

    `[study] 37/270 runs done (0 failed) | <run>: best_acc 91.20 (completed) | best ... | ETA 2m10s`;
    between them, every STATUS_EVERY_S, what the running trials are doing (a prune unit's iterations,
    a trial's epoch). On a terminal the status is a tqdm bar under the lines instead. The ETA divides
    the work left -- regularisation iterations and finetuning member-epochs, in training iterations --
    by the rate measured so far in this session, so it holds across stages of very different cost.
    """

    STATUS_EVERY_S = 30.0

    def __init__(self, study_dir: str):
        self.study_dir = study_dir
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.monotonic()
        self.done = self.failed = 0
        self.best: tuple | None = None
        self.names: dict[str, tuple[str, float]] = {}  # member id -> (run name, lr), until it is counted
        self.counted: set[str] = set()  # member ids counted done or failed (a retried trial restarts)
        self.members: dict[str, list[str]] = {}
        self.notices: set[str] = set()
        self.running: dict[str, str] = {}  # trial id -> what it is doing
        self.prune_seen: dict[str, int] = {}  # trial id -> iterations it reported
        self.work_done = 0.0
        self.work_left = math.nan
        self.work_since: float | None = None  # when the first work was reported (trials started up)
        self.status_at = time.monotonic()
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from study.store import where_now

        self.__init__(where_now(state["study_dir"]))

    def setup(self, **info: Any) -> None:
        from study.loading import load_config
        from study.record import collect
        from study.store import StudyFolder
        from study.tracking import take_over

        self._reset()
        folder = StudyFolder(self.study_dir)
        self.meta, self.config = folder.read_meta(), load_config(folder.config_path)
        # where the study stands, from its MLflow record: a resumed trial reports again the members it
        # finished before the stop, and they are counted already
        before = collect(folder, runs=take_over(self.meta.parent_run_id, "progress"))
        self.counted = {r["member_id"] for r in before.runs if r["run_status"] == "FINISHED"}
        self.done = len(self.counted)
        self.per_epoch, self.work_left = work(self.config, self.meta.train_samples, folder.prune_cache,
                                              self.meta.dense_digest, self.meta.num_runs - self.done)
        if before.best:
            b = before.best
            self.best = (rank(b["value"], b.get("lr", 0.0), b["run_name"], self.config.objective.mode), b)
        out = sys.stdout
        if out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=round(self.work_left), file=out, unit="it", unit_scale=True, leave=False,
                            dynamic_ncols=True, bar_format="{desc} |{bar}| {percentage:3.0f}% {postfix}")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.design import resolve, varying
        from study.record import run_name

        if trial.config.get("kind") == "prune":
            self.running[trial.trial_id] = f"prune unit of {len(trial.config['points'])} stages"
            return
        runs = resolve(self.config, trial.config, trial.trial_id)
        self.members[trial.trial_id] = runs.ids
        for rc, mid in zip(runs.configs, runs.ids, strict=True):
            if mid not in self.counted:
                self.names[mid] = (run_name(runs.point, rc, varying(self.config)), rc.lr)
        p = runs.point
        self.running[trial.trial_id] = f"{p.method} pr={p.pr:.3g} s{p.seed}: {len(runs.ids)} members"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for notice in result.get("tpp_notices") or []:
            if notice not in self.notices:  # once per study, however many trials say it
                self.notices.add(notice)
                self._print(f"[{self.meta.name}] {notice}")
        self._account(trial, result)
        metric, mode = self.config.objective.metric, self.config.objective.mode
        for mid, rec in (result.get("tpp_done") or {}).items():
            if mid not in self.names:
                continue
            name, lr = self.names.pop(mid)
            self.counted.add(mid)
            value = rec["metrics"].get(metric, math.nan)
            if math.isfinite(value):
                key = rank(value, lr, name, mode)
                if self.best is None or key < self.best[0]:
                    self.best = (key, {"metric": metric, "value": value, "run_name": name, "lr": lr})
            self._line(f"{name}: {metric} {value:.2f} ({rec['status']})")

    def _account(self, trial: Any, result: dict) -> None:
        """Work done (training iterations) from a report, and what the trial is doing now."""
        tid, before = trial.trial_id, self.work_done
        if self.work_since is None:
            self.work_since = time.monotonic()  # the rate is work / time since then: start-up is no work
        prune = result.get("tpp_prune_progress")
        if prune:
            self.work_done += max(prune["done"] - self.prune_seen.get(tid, 0), 0)
            self.prune_seen[tid] = prune["done"]
            self.running[tid] = f"prune: {prune['done']:,}/{prune['total']:,} iterations"
        epochs = [(step, value) for mid, key, value, step in result.get("tpp_rows") or []
                  if key == "finetune/test_acc"]
        self.work_done += len(epochs) * self.per_epoch
        if epochs and tid in self.running:
            step, acc = epochs[-1]
            self.running[tid] = self.running[tid].split(" | ")[0] + f" | epoch {step + 1}, acc {acc:.1f}"
        if self.bar is not None:
            self.bar.update(round(self.work_done - before))
            self.bar.set_description_str(f"[{self.meta.name}] {self._count()} runs")
            self.bar.set_postfix_str(f"ETA {self._eta()} | " + "; ".join(self.running.values()),
                                     refresh=False)

    def _count(self) -> str:
        return f"{self.done + self.failed}/{self.meta.num_runs}"

    def _eta(self) -> str:
        if self.done + self.failed >= self.meta.num_runs:
            return "0s"
        if not self.work_done or self.work_since is None:
            return "?"
        rate = self.work_done / max(time.monotonic() - self.work_since, 1e-3)
        return fmt_duration(max(self.work_left - self.work_done, 0) / rate)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.bar is None and self.running and time.monotonic() - self.status_at >= self.STATUS_EVERY_S:
            self.status_at = time.monotonic()
            self._print(f"[{self.meta.name}] {self._count()} runs done, running: "
                        + "; ".join(self.running.values()) + f" | ETA {self._eta()}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.pop(trial.trial_id, None)
        self.members.pop(trial.trial_id, None)
        self.prune_seen.pop(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.pop(trial.trial_id, None)
        self.prune_seen.pop(trial.trial_id, None)
        for mid in self.members.pop(trial.trial_id, []):
            if mid in self.names:
                name, _ = self.names.pop(mid)
                self.counted.add(mid)
                self._line(f"{name}: FAILED: {last_error_line(trial)} (tag tpp.error has the traceback)",
                           failed=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self, outcome: str, failed: bool = False) -> None:
        self.done += not failed
        self.failed += failed
        best = self.best[1] if self.best else None
        shown = f"{best['metric']} {best['value']:.2f} ({best['run_name']})" if best else "-"
        self._print(f"[{self.meta.name}] {self._count()} runs done ({self.failed} failed) | {outcome} | "
                    f"best: {shown} | elapsed {fmt_duration(time.monotonic() - self.t0)}, ETA {self._eta()}")


def last_error_line(trial: Any) -> str:
    """The exception line of a failed trial's traceback (Tune writes it to the trial's error file)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1].strip()[:200] if lines else "unknown error"


def work(cfg: StudyConfig, train_samples: int, cache_dir: Any, dense_digest: str,
         runs_left: int) -> tuple[float, float]:
    """(training iterations of one member-epoch, iterations of the work left): `runs_left` members'
    finetuning and the prune stages not in the cache yet -- what the progress ETA divides by its rate."""
    from study.prune_cache import PruneCache

    pts = points(cfg) if cfg.is_design else []
    mems = members(cfg) if cfg.is_design else [{"lr": (levels(cfg.finetune.lr) or [cfg.finetune.lr.low])[0]}]
    first = run_config(cfg, pts[0] if pts else PrunePoint(cfg.methods[0].shown, 0.5, None, 0), mems[0])
    per_epoch = math.ceil(max(train_samples, 1) / first.batch_size)
    epochs = sum(run_config(cfg, pts[0], m).epochs for m in mems) / len(mems) if pts else first.epochs
    cache = PruneCache(cache_dir)
    prune = sum(_prune_iterations(cfg, p, train_samples) for p in pts if p.growth is not None
                and not cache.has(point_prune_key(cfg, p, dense_digest)))
    return float(per_epoch), prune + runs_left * epochs * per_epoch
