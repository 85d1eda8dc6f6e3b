"""One summary run per group (method x PR x growth x recipe) under the study run: what lets MLflow's charts
show the whole LR map at once. A study's member runs are hundreds to thousands and the runs page loads
100 at a time; its groups are a few dozen. Each group run carries the group's keys as params, its
measures (the seed means of the report's group table) as metrics, and its seed-mean accuracy at each LR
as the history of `GROUP_CURVE` against `GROUP_X` (log10 LR), one step per LR of the study's ladder --
the curve the study's group view draws, one line per group, in its method's colour.

Written by `tpp-analyze` (it computes the measures) and replaced when they change: a group whose
content is unchanged keeps its run; a changed or vanished group's old run is deleted, so the view never
shows two runs of one group."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import pandas as pd
from matplotlib.colors import to_hex

from analysis.labels import color
from study.schema import (
    GROUP_CURVE,
    GROUP_MEASURES,
    GROUP_X,
    PARENT_TAG,
    ROLE_GROUP,
    TAG_GROUP,
    TAG_GROUP_DIGEST,
    TAG_ROLE,
    TAG_STUDY,
)


def group_contents(groups: pd.DataFrame, lr_points: pd.DataFrame,
                   keys: list[str]) -> dict[str, dict[str, Any]]:
    """{group label: {"params", "metrics", "curve"}} of every group: params are its keys (the method as
    `method_label`, as on member runs) and its seed count; metrics its measures; curve [(step, log10 LR,
    seed-mean accuracy)] with step = the LR's index among every LR of the study, so groups align."""
    all_lrs = sorted(set(lr_points["lr"].astype(float))) if len(lr_points) else []
    step_of = {lr: i for i, lr in enumerate(all_lrs)}
    out: dict[str, dict[str, Any]] = {}
    for _, g in groups.iterrows():
        label = str(g["group"])
        params = {("method_label" if k == "method" else k): text for k in keys
                  if (text := _param(g[k])) is not None}
        params["n_seeds"] = str(int(g["n_seeds"]))
        metrics = {m: float(g[m]) for m in GROUP_MEASURES if m in g and _finite(g[m])}
        pts = lr_points[(lr_points["group"] == g["group"]) & lr_points["acc"].notna()].sort_values("lr")
        curve = [(step_of[float(lr)], math.log10(float(lr)), float(acc))
                 for lr, acc in zip(pts["lr"], pts["acc"], strict=True)]
        out[label] = {"params": params, "metrics": metrics, "curve": curve,
                      "color": to_hex(color(str(g["method"])))}
    return out

# MLflow 3.17's UI colours a run in its charts by this tag when set (its JS reads it from the searched runs'
# tags); here: the method's colour in the report's figures, so L1 and TPP are told apart at a glance.
RUN_COLOR_TAG = "mlflow.runColor"


def log_group_runs(client: Any, experiment_id: str, parent_run_id: str, study: str,
                   contents: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """Bring the study's group runs in line with `contents`; returns (written, kept unchanged)."""
    from mlflow.entities import Metric, Param

    existing: dict[str, Any] = {}
    for run in _group_runs(client, experiment_id, study):
        existing.setdefault(run.data.tags.get(TAG_GROUP, ""), []).append(run)
    written = kept = 0
    for label, content in contents.items():
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
        old = existing.pop(label, [])
        if len(old) == 1 and old[0].data.tags.get(TAG_GROUP_DIGEST) == digest:
            kept += 1
            continue
        for run in old:
            client.delete_run(run.info.run_id)
        run = client.create_run(experiment_id, run_name=label, tags={
            PARENT_TAG: parent_run_id, TAG_STUDY: study, TAG_ROLE: ROLE_GROUP, TAG_GROUP: label,
            TAG_GROUP_DIGEST: digest, RUN_COLOR_TAG: content["color"]})
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in content["metrics"].items()]
        for step, x, acc in content["curve"]:
            metrics += [Metric(GROUP_X, x, now, step), Metric(GROUP_CURVE, acc, now, step)]
        params = [Param(k, v) for k, v in content["params"].items()]
        for i in range(0, max(len(metrics), 1), 1000):  # MLflow takes 1,000 metrics per batch
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000], params=params if i == 0 else [])
        client.set_terminated(run.info.run_id)
        written += 1
    for runs in existing.values():  # groups the study no longer has
        for run in runs:
            client.delete_run(run.info.run_id)
    return written, kept


def _group_runs(client: Any, experiment_id: str, study: str) -> list[Any]:
    from analysis.load import _search_all

    return _search_all(client, [experiment_id], f"tags.`{TAG_STUDY}` = '{study}' and "
                       f"tags.`{TAG_ROLE}` = '{ROLE_GROUP}'")


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _param(v: Any) -> str | None:
    """A group key as a run param (as the member runs log it); None for a missing level (growth of L1)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return f"{v:g}" if isinstance(v, float) else str(v)
