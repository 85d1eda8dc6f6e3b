"""The Tune searcher of fixed designs: hands out a plan's units in order, a finetune unit once the
prune stage it starts from is ready.

Tune's own generators cannot hold a trial back; Optuna would be a second record of a design that needs
no search (its saved state and Tune's disagreed after hard kills). This searcher keeps its position in
Tune's own saved searcher state, so a restored study resumes exactly where Tune's trial list is.
Readiness is read from the prune cache on disk (the truth, whatever process or session wrote it); a
prune unit that ended without writing (it failed) releases its finetune units, which then compute the
stage themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optuna.storages import RDBStorage
from ray.tune.search import Searcher

from study.config import Range, StudyConfig, levels
from study.design import PrunePoint, has_penalty
from study.prune_cache import PruneCache
from study.store import StudyFolder, where_now


class DesignSearcher(Searcher):
    """`units`: Tune configs in start order; `waits_for[i]`: (prune key, prune unit index) unit i waits on."""

    def __init__(self, units: list[dict[str, Any]], waits_for: dict[int, tuple[str, int]], cache_dir: str):
        super().__init__()
        self.units, self.waits_for, self.cache_dir = units, waits_for, cache_dir
        self.handed: list[int] = []
        self.by_trial: dict[str, int] = {}
        self.ended: list[int] = []  # prune units that completed or failed
        self._next = 0  # the first unit that may not have been handed out
        self._handed: set[int] = set()
        self._ended: set[int] = set()
        self._cached: set[str] = set()  # prune stages seen in the cache (they stay there)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restored from Tune's saved state: the prune cache of the folder the study runs from now."""
        self.__dict__.update(state)
        self.cache_dir = str(StudyFolder(where_now(str(Path(state["cache_dir"]).parent))).prune_cache)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def _ready(self, i: int, missing: set[str]) -> bool:
        """Whether unit i can start: it waits for no prune stage, or its stage's unit ended, or the stage
        is cached. `missing`: stages already looked up and absent in this call (one look per stage, not
        per waiting unit: a 100k-member design has thousands of units waiting on few stages)."""
        if i not in self.waits_for:
            return True
        key, prune_unit = self.waits_for[i]
        if prune_unit in self._ended or key in self._cached:
            return True
        if key in missing:
            return False
        if PruneCache(Path(self.cache_dir)).has(key):
            self._cached.add(key)
            return True
        missing.add(key)
        return False

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        handed = self._handed
        while self._next < len(self.units) and self._next in handed:
            self._next += 1  # units before it are all handed out: never scanned again
        if len(handed) == len(self.units):
            return Searcher.FINISHED
        missing: set[str] = set()
        ready = next((i for i in range(self._next, len(self.units))
                      if i not in handed and self._ready(i, missing)), None)
        if ready is None:
            return None  # every remaining unit waits for a prune stage still being computed
        self.handed.append(ready)
        self._handed.add(ready)
        self.by_trial[trial_id] = ready
        return dict(self.units[ready])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.by_trial.get(trial_id)
        if i is not None and self.units[i]["kind"] == "prune" and i not in self._ended:
            self.ended.append(i)
            self._ended.add(i)

    def save(self, checkpoint_path: str) -> None:
        state = {"handed": self.handed, "by_trial": self.by_trial, "ended": self.ended}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.handed, self.by_trial, self.ended = state["handed"], state["by_trial"], state["ended"]
        self._next, self._handed, self._ended, self._cached = 0, set(self.handed), set(self.ended), set()


def design_searcher(units: list[Any], keys: dict[int, str], plan: Any, cache_dir: Path) -> DesignSearcher:
    """The searcher of a plan: finetune units wait on the prune unit that computes their point's stage."""
    computed_by = {p: i for i, u in enumerate(units) if u.kind == "prune" for p in u.points}
    waits = {i: (keys[u.points[0]], computed_by[u.points[0]]) for i, u in enumerate(units)
             if u.kind == "finetune" and u.points[0] in computed_by}
    return DesignSearcher([u.config(plan) for u in units], waits, str(cache_dir))


class DefineByRun:
    """Optuna define-by-run space of the adaptive samplers: method, pr, growth (conditional), seed, lr
    and each finetune axis with several values. Picklable (Tune saves the searcher with its state)."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg

    @staticmethod
    def _suggest(trial: Any, name: str, values: Any, log: bool) -> float:
        if isinstance(values, Range) and not values.per_decade:
            return float(trial.suggest_float(name, values.low, values.high, log=log))
        return float(trial.suggest_categorical(name, levels(values)))

    def __call__(self, trial: Any) -> dict[str, Any]:
        cfg = self.cfg
        method = trial.suggest_categorical("method", [m.shown for m in cfg.methods])
        pr = self._suggest(trial, "pr", cfg.space.pr, log=False)
        growth = None
        # TPE with group=True models the conditional space (growth only for methods with a penalty)
        if cfg.space.growth is not None and has_penalty(cfg, method):
            growth = self._suggest(trial, "growth", cfg.space.growth, log=True)
        seed = int(trial.suggest_categorical("seed", list(cfg.space.seeds)))
        member = {"lr": self._suggest(trial, "lr", cfg.finetune.lr, log=True)}
        for key, values in cfg.finetune.axes().items():
            member[key] = trial.suggest_categorical(key, values) if len(values) > 1 else values[0]
        point = PrunePoint(method, pr, growth if has_penalty(cfg, method) else None, seed)
        return {"kind": "member", **point.as_dict(), "member": member}


class FolderOptunaStorage(RDBStorage):
    """Optuna's SQLite storage of a study folder (`optuna.db`). Tune pickles the Optuna searcher, its
    storage URL included; restored, the storage opens the `optuna.db` of the folder the study runs from
    now (a moved or copied study never writes to where it was)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = Path(state["url"][len("sqlite:///"):])
        state = {**state, "url": f"sqlite:///{StudyFolder(where_now(str(saved.parent))).optuna_db}"}
        super().__setstate__(state)
