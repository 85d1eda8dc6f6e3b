"""The MLflow dashboard of a study: its saved view (columns, charts), the experiment's and the study run's
notes, and the URLs that open them in the training layout."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from study.schema import (
    GROUP_CURVE,
    GROUP_MEASURES,
    GROUP_X,
    ROLE_GROUP,
    ROLE_MEMBER,
    TAG_ROLE,
    TAG_STATUS,
    TAG_STUDY,
)

log = logging.getLogger("study.mlflow")


# What MLflow 3.17's UI reads (checked in its JS bundle, mlflow/server/js/build/static/js):
# * The GenAI-or-training switch is `workflowType`: the URL parameter `?workflowType=machine_learning`,
#   else the browser's localStorage key `mlflow.workflowType_v1` (set by the sidebar's GenAI / Model
#   training switch), else "genai". An experiment opened without a tab lands on Runs only in the
#   machine_learning workflow. 3.17 derives the experiment kind from that switch and ignores the
#   experiment tag `mlflow.experimentKind` (its feature flag is hard-wired on); earlier 3.x releases read
#   the tag, so it is still set. Nothing on the tracking side changes the home page.
# * Saved views: an experiment tag `mlflow.sharedViewState.<key>` holding {name, createdAt, updatedAt,
#   state} (state: the runs page's filter, sort, columns, widths and charts as JSON), listed under
#   "Views" and opened by `#/experiments/<id>/runs?viewStateShareKey=<key>`. Default columns otherwise
#   live only in the browser's localStorage.
# * Markdown in `mlflow.note.content`, on runs and on experiments (shown above the runs table).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


VIEW_TAG_PREFIX = "mlflow.sharedViewState."


NOTE_TAG = "mlflow.note.content"


AUTO_NOTE_TAG = "tpp.auto_note"  # the experiment note as tpp last wrote it: a note edited since is kept


VIEW_METRICS = ("test_acc_at_best_val", "last_acc", "acc_after_removal", "param_ratio", "speedup")


MAX_VIEW_CHARS = 20000  # MLflow's limit on an experiment tag's value


def view_key(study: str) -> str:
    """The study's saved-view key (the `viewStateShareKey` of its runs page URL)."""
    return "tpp-" + re.sub(r"[^A-Za-z0-9_-]", "-", study)


def group_view_key(study: str) -> str:
    """The key of the study's group view (one summary run per group, written by tpp-analyze)."""
    return view_key(study) + "--groups"


def runs_route(experiment_id: str, study: str | None = None, *, groups: bool = False) -> str:
    """The hash route of the runs page in MLflow's training workflow, on the study's saved view (its
    member runs, or with `groups` its group summary runs)."""
    key = (group_view_key if groups else view_key)(study) if study else None
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={key}" if key else "")
    return f"#/experiments/{experiment_id}/runs?{query}"


def run_route(experiment_id: str, run_id: str) -> str:
    """The hash route of one run's page, in the training workflow (without the parameter MLflow falls
    back to the GenAI layout unless the browser remembers the sidebar's switch)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def runs_page_url(base: str, experiment_id: str, study: str | None = None, *, groups: bool = False) -> str:
    """e.g. http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=tpp-x"""
    return f"{base.rstrip('/')}/{runs_route(experiment_id, study, groups=groups)}"


def _key_params(cfg: Any) -> list[str]:
    """The params that name a prune group: method, PR, and growth when some method has a penalty."""
    from study.design import has_penalty

    penalty = any(has_penalty(cfg, m.shown) for m in cfg.methods)
    return ["method_label", "pr", *(["growth"] if penalty else [])]


def _runs_view(cfg: Any, role: str, order: tuple[str, bool], columns: list[str], column_order: list[str],
               widths: dict[str, int], section: tuple[str, str], charts: list[dict]) -> dict[str, Any]:
    """A runs page state: the study's runs of one role, an order, columns (MLflow applies widths only to
    the columns listed in columnOrder, ids as its table names them), and one chart section first."""
    uuid, name = section
    return {
        "searchFilter": f"tags.`{TAG_STUDY}` = '{cfg.name}' and tags.`{TAG_ROLE}` = '{role}'",
        "orderByKey": order[0], "orderByAsc": order[1],
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs", "selectedColumns": columns,
        "columnOrder": column_order, "columnWidths": widths,
        "runsHiddenMode": "SHOW_ALL",  # charts show every run, not MLflow's default first 10
        "compareRunCharts": [{"metricSectionId": uuid, "isGenerated": False, "deleted": False, **c}
                             for c in charts],
        "compareRunSections": [{"uuid": uuid, "name": name, "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False}],
        "isAccordionReordered": True,  # the study's section first; MLflow adds its per-metric charts after
    }


def study_view(cfg: Any) -> dict[str, Any]:
    """The runs page state of a study's saved view: its member runs, best first, with the searched
    values and the main results as columns, a parallel-coordinates chart (method, PR, log10 LR and the
    finetune axes that vary against the objective: every run plottable) and the objective over log10 LR.
    """
    from study.design import varying

    metric = cfg.objective.metric
    params = [*_key_params(cfg), "log10_lr", "lr", "seed", *varying(cfg)]
    metrics = [metric, *(m for m in VIEW_METRICS if m != metric)]
    columns = ([f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
               + [f"tags.`{TAG_STATUS}`", "attributes.`Dataset`"])
    charts = [
        {"uuid": "tpp-parallel", "type": "PARALLEL",
         "selectedParams": ["method_label", "pr", "log10_lr", *varying(cfg)],
         "selectedMetrics": [metric], "showAllRuns": True},
        {"uuid": "tpp-lr", "type": "SCATTER", "xaxis": {"key": "log10_lr", "type": "PARAM"},
         "yaxis": {"key": metric, "type": "METRIC"}, "runsCountToCompare": 1000},
    ]
    return _runs_view(
        cfg, ROLE_MEMBER, (f"metrics.`{metric}`", cfg.objective.mode == "min"), columns,
        ["attributes.`Run Name`", "runDateAndNestInfo", "attributes.`Dataset`", "duration", *columns[:-1]],
        {"attributes.`Run Name`": 240, "runDateAndNestInfo": 125, "attributes.`Dataset`": 190,
         "duration": 70, **{c: 85 if c.startswith("params.") else 95 for c in columns[:-1]}},
        ("tpp-study", f"Study {cfg.name}"), charts)


def group_view(cfg: Any) -> dict[str, Any]:
    """The runs page state of the study's group view: its group summary runs (a few dozen, so every one
    is loaded and charted without "Load more"), in method order, each in its method's colour (tag
    mlflow.runColor): the seed-mean accuracy against log10 LR, one line per group (a line chart whose x
    axis is the metric `GROUP_X`), the primary sensitivity measure per group, and a parallel-coordinates
    chart of the keys against it."""
    from study.design import varying

    params = [*_key_params(cfg), *varying(cfg), "n_seeds"]
    columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in GROUP_MEASURES]
    charts = [
        {"uuid": "tpp-groups-lr", "type": "LINE", "metricKey": GROUP_CURVE,
         "selectedMetricKeys": [GROUP_CURVE], "xAxisKey": "metric", "selectedXAxisMetricKey": GROUP_X,
         "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False, "lineSmoothness": 0,
         "scaleType": "linear", "xAxisScaleType": "linear", "displayPoints": True, "yAxisKey": "metric",
         "yAxisExpressions": [], "ignoreOutliers": False,
         "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}},
        {"uuid": "tpp-groups-regret", "type": "BAR", "metricKey": GROUP_MEASURES[0]},
        {"uuid": "tpp-groups-parallel", "type": "PARALLEL", "selectedParams": params[:-1],
         "selectedMetrics": [GROUP_MEASURES[0]], "showAllRuns": True},
    ]
    return _runs_view(cfg, ROLE_GROUP, ("params.`method_label`", True), columns,
                      ["attributes.`Run Name`", *columns],
                      {"attributes.`Run Name`": 200, **{c: 90 for c in columns}},
                      ("tpp-study-groups", f"Study {cfg.name}: every group"), charts)


def write_study_view(c: Any, experiment_id: str, cfg: Any) -> str:
    """Save the study's two runs views on its experiment (MLflow's "Views" menu): its member runs, and
    its group summary runs; returns the member view's key."""
    now = int(time.time() * 1000)
    for key, name, state in ((view_key(cfg.name), f"tpp study {cfg.name}", study_view(cfg)),
                             (group_view_key(cfg.name), f"tpp groups {cfg.name}", group_view(cfg))):
        value = json.dumps({"name": name, "createdAt": now, "updatedAt": now,
                            "state": json.dumps(state, separators=(",", ":"))})
        if len(value) > MAX_VIEW_CHARS:
            raise ValueError(f"the saved view {name} has {len(value)} characters; MLflow keeps at most "
                             f"{MAX_VIEW_CHARS}")
        c.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, value)
    return view_key(cfg.name)


def experiment_note(experiment_id: str, studies: list[str]) -> str:
    """The experiment's description (markdown, one line above its runs table): a link per tpp study."""
    links = " · ".join(f"[{s}]({runs_route(experiment_id, s)}) ([every group]"
                       f"({runs_route(experiment_id, s, groups=True)}))" for s in sorted(studies))
    return (f"**tpp studies**, their runs best first, and one summary run per group (after `tpp-analyze`): "
            f"{links} (saved views, also in the *Views* menu; a study's description is on its parent run)")


def study_note(description: str | None, experiment_id: str, study: str,
               best: dict[str, Any] | None = None) -> str:
    """The parent run's description (markdown): the config's description, a link to the best run with
    its value rounded, and a link to the study's runs, best first."""
    parts = [description.strip()] if description else []
    if best:
        link = run_route(experiment_id, best["run_id"])
        parts.append(f"**Best run:** [{best['run_name']}]({link}) -- {best['metric']} {best['value']:.4g}")
    parts.append(f"[All runs of this study, best first]({runs_route(experiment_id, study)}) · "
                 f"[Every group's LR curve and measures]({runs_route(experiment_id, study, groups=True)}) "
                 "(one summary run per group, written by `tpp-analyze`)")
    return "\n\n".join(parts)


def _view_studies(tags: dict[str, str]) -> list[str]:
    """The studies with a tpp saved view among an experiment's tags."""
    out = []
    for k, v in tags.items():
        if k.startswith(VIEW_TAG_PREFIX + "tpp-"):
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                name = json.loads(v)["name"]
                if name.startswith("tpp study "):  # not the group views
                    out.append(name.removeprefix("tpp study "))
    return out


def _dashboard(c: Any, experiment_id: str, study_dir: Path) -> None:
    """Experiment tags, the study's saved view and the experiment's note: what makes the UI open on the
    study's runs. Best effort: a failure is logged, never stops the study."""
    from study.loading import load_config
    from study.store import StudyFolder

    try:
        cfg = load_config(StudyFolder(study_dir).config_path)
        exp = c.get_experiment(experiment_id)
        for k, v in EXPERIMENT_TAGS.items():
            if exp.tags.get(k) != v:
                c.set_experiment_tag(experiment_id, k, v)
        write_study_view(c, experiment_id, cfg)
        note = exp.tags.get(NOTE_TAG)
        if note is None or note == exp.tags.get(AUTO_NOTE_TAG):  # never overwrite a user's description
            note = experiment_note(experiment_id, sorted(set(_view_studies(exp.tags)) | {cfg.name}))
            c.set_experiment_tag(experiment_id, NOTE_TAG, note)
            c.set_experiment_tag(experiment_id, AUTO_NOTE_TAG, note)
    except Exception as e:  # noqa: BLE001 - the dashboard is a convenience, the study goes on
        log.warning("MLflow: could not write the study's saved view or experiment tags: %s", str(e)[:300])
