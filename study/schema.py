"""The names a study writes to MLflow and the study folder, declared once: tags, roles, statuses.
analysis/ imports this module too, so writer and reader never disagree on a name."""

from __future__ import annotations

NO_SPACE = ("No space left on device", "database or disk is full")


DENSE_MODEL_TAG = "tpp.dense_model_id"  # on the parent run: the dense model's MLflow LoggedModel


# a member's (or the study's) status -> its MLflow run's status
RUN_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
