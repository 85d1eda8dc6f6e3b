"""The Optuna sampler of fixed designs (grid, qmc): it hands Optuna the point the design prescribes.

Designs are not enqueued in Optuna: its queue lives in `optuna.db`, while which trials Tune knows
lives in Tune's own saved state, and after a hard kill the two disagree (a trial that started after
Tune's last save is consumed from the queue yet unknown to the resumed Tune, which then draws an
extra random point instead of re-running the lost one). `study.space.DefineByRun` keeps the
position in the design inside Tune's searcher state, so it always matches Tune's trials, and sets
`point` before it suggests each parameter.
"""

from __future__ import annotations

from typing import Any

import optuna


class DesignSampler(optuna.samplers.BaseSampler):
    """Returns `point[name]` for every parameter Optuna asks for."""

    def __init__(self) -> None:
        self.point: dict[str, Any] = {}

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
        return self.point[name]
