"""tpp-study: hyperparameter studies of pruning methods on Ray Tune + Optuna, logged to MLflow.

    import study
    result = study.run("study/configs/quick.yaml", num_trials=8, storage="/tmp/studies")
    print(result.summary())
    study.resume("quick", storage="/tmp/studies")
    study.extend("quick", set={"space.seeds": [0, 1, 2, 3, 4, 5]}, storage="/tmp/studies")

`run`/`resume`/`extend` are imported lazily so `import study` (and config validation) stays fast and Ray-free.
"""

from __future__ import annotations

from typing import Any

from study.config import StudyConfig, StudyConfigError
from study.loading import load_config

__all__ = ["StudyConfig", "StudyConfigError", "StudyError", "StudyResult", "extend", "load_config",
           "member_runs", "resume", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "resume", "StudyResult", "StudyError", "collect"):
        from study import driver

        return getattr(driver, name)
    if name == "member_runs":
        from study.sql_reads import member_runs

        return member_runs
    if name == "extend":
        from study.extension import extend

        return extend
    raise AttributeError(f"module 'study' has no attribute {name!r}")
