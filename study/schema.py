"""The names a study writes to MLflow and the study folder, declared once: tags, roles, statuses.
analysis/ imports this module too, so writer and reader never disagree on a name."""

from __future__ import annotations

NO_SPACE = ("No space left on device", "database or disk is full")


DENSE_MODEL_TAG = "tpp.dense_model_id"  # on the parent run: the dense model's MLflow LoggedModel


# a member's (or the study's) status -> its MLflow run's status
RUN_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

# Tags of the study run (role "study") and of each member run (role "trial", nested under it)
TAG_STUDY = "tpp.study"  # the study's name, on every run of it
TAG_ROLE = "tpp.role"  # "study" | "trial" | "group"
ROLE_STUDY, ROLE_MEMBER = "study", "trial"
ROLE_GROUP = "group"  # a group summary run (tpp-analyze): one per method x PR x growth x recipe, per-LR means
TAG_GROUP = "tpp.group"  # a group summary run's group label, what a new report replaces it by
TAG_GROUP_DIGEST = "tpp.group_digest"  # a digest of its content: an unchanged group is not rewritten
GROUP_CURVE = "mean_acc"  # on a group run: the seed-mean accuracy at each LR (step: its ladder index)...
GROUP_X = "log10_lr"  # ...against log10 of that LR, logged at the same steps (the line chart's x axis)
GROUP_MEASURES = ("lr_regret", "window_decades", "stable_range", "best_acc", "diverged_members_share")
TAG_MEMBER = "tpp.member_id"  # a member's id: a digest of its settings (what resume finds it again by)
TAG_STATUS = "tpp.status"  # a member's status: completed | diverged | failed | interrupted | running
TAG_REUSE = "tpp.reuse"  # computed | reused | none: who carries the prune stage's curves
TAG_DIVERGED_STAGE = "tpp.diverged_stage"  # prune | finetune
TAG_TRIAL = "tpp.trial_id"
TAG_PRUNE_KEY = "tpp.prune_key"
TAG_METHOD = "tpp.method"  # the method's label
TAG_DENSE_DIGEST = "tpp.dense_digest"
TAG_NODE = "tpp.node"
TAG_ERROR = "tpp.error"
TAG_BEST_RUN = "tpp.best_run_id"  # on the study run
TAG_OUTCOME = "tpp.outcome"  # on the study run, at its end: JSON of its counts, prune reuse and best run
TAG_RERUN = "tpp.rerun"  # on a member run: the `tpp run` command that reruns it alone
TAG_EXTENSION = "tpp.extension."  # + its number, on the study run: JSON of one `tpp-study extend`
TAG_SEQUENTIAL = "tpp.sequential"  # on the study run: JSON of a seeds-until-decided run (analysis.sequential)
TAG_PLANNED = "tpp.num_trials"  # on the study run: the planned member runs, once an extension changed them
PARENT_TAG = "mlflow.parentRunId"
FINISHED = ("completed", "diverged")  # member statuses that are results (diverged ones count as divergence)
