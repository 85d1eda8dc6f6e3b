"""A study's member runs read from a SQL tracking store in a few queries.

MLflow's `search_runs` builds every run, its params, tags and latest metrics as ORM objects and then as
entities: ~4 ms a run on SQLite, the whole of `status` and `tpp-analyze` on a large study (BENCHMARKS.md
§9). Here the same `Run` entities (info and data; not the inputs, which no reader of member runs uses)
come from four plain SELECTs over MLflow's own tables. Any other store goes through `search_runs`.
`tests/test_sql_reads.py` proves both give the same runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from study.schema import PARENT_TAG, ROLE_MEMBER, TAG_ROLE
from study.sql_writes import chunks, sql_store

CHUNK = 500  # runs per read: the IN (...) bound MLflow's store uses, and what one step holds alive


def member_runs(mlflow_client: Any, experiment_id: str, parent_run_id: str, *,
                metrics: Collection[str] | None = None, params: Collection[str] | None = None,
                tags: Collection[str] | None = None) -> list[Any]:
    """Every active member run of the study run `parent_run_id` (not tpp-analyze's group runs), newest
    first, as MLflow `Run` entities. `metrics`, `params`, `tags`: the keys the caller needs, None for all
    (a member has ~60 metrics, ~25 params, ~12 tags: a caller that needs a few keys keeps ~6 KB a run
    fewer alive); a SQL store reads only these, other stores give all."""
    return list(each_member_run(mlflow_client, experiment_id, parent_run_id, metrics=metrics, params=params,
                                tags=tags))


def each_member_run(mlflow_client: Any, experiment_id: str, parent_run_id: str, *,
                    metrics: Collection[str] | None = None, params: Collection[str] | None = None,
                    tags: Collection[str] | None = None) -> Iterator[Any]:
    """`member_runs` one at a time, read CHUNK runs at a time on a SQL store: a caller that keeps a little
    of each run (a study's end keeps a row) never holds every run's entities at once (~3 KB a run)."""
    store = sql_store(mlflow_client)
    if store is None:
        yield from _searched(mlflow_client, experiment_id, parent_run_id)
        return
    with store.ManagedSessionMaker() as session:
        yield from _read(session, experiment_id, parent_run_id, metrics, params, tags)


def _searched(c: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                             f"tags.`{TAG_ROLE}` = '{ROLE_MEMBER}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _read(session: Any, experiment_id: str, parent_run_id: str, metric_keys: Collection[str] | None,
          param_keys: Collection[str] | None, tag_keys: Collection[str] | None) -> Iterator[Any]:
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import and_, func, select, true

    # the tables' columns, not the ORM classes: plain rows, without SQLAlchemy's ORM loading of each
    run, tag, param, metric = (m.__table__.c for m in (SqlRun, SqlTag, SqlParam, SqlLatestMetric))
    parent, role = SqlTag.__table__.alias(), SqlTag.__table__.alias()
    ids = session.execute(  # newest first, as MLflow's search orders them
        select(run.run_uuid)
        .join(parent, and_(parent.c.run_uuid == run.run_uuid, parent.c.key == PARENT_TAG,
                           parent.c.value == parent_run_id))
        .join(role, and_(role.c.run_uuid == run.run_uuid, role.c.key == TAG_ROLE,
                         role.c.value == ROLE_MEMBER))
        .where(run.experiment_id == int(experiment_id), run.lifecycle_stage == "active")
        .order_by(func.coalesce(run.start_time, 0).desc(), run.run_uuid)).scalars().all()

    def only(table: Any, keys: Collection[str] | None) -> Any:
        return true() if keys is None else table.key.in_(list(keys))

    for chunk in chunks(ids, CHUNK):
        tags: dict[str, list[Any]] = {i: [] for i in chunk}
        params: dict[str, list[Any]] = {i: [] for i in chunk}
        metrics: dict[str, list[Any]] = {i: [] for i in chunk}
        infos = {r[0]: r for r in session.execute(
            select(run.run_uuid, run.name, run.experiment_id, run.user_id, run.status, run.start_time,
                   run.end_time, run.lifecycle_stage, run.artifact_uri).where(run.run_uuid.in_(chunk)))}
        for run_id, k, v in session.execute(select(tag.run_uuid, tag.key, tag.value)
                                            .where(tag.run_uuid.in_(chunk), only(tag, tag_keys))):
            tags[run_id].append(RunTag(k, v))
        for run_id, k, v in session.execute(select(param.run_uuid, param.key, param.value)
                                            .where(param.run_uuid.in_(chunk), only(param, param_keys))):
            params[run_id].append(Param(k, v))
        for run_id, k, v, ts, step, is_nan in session.execute(
                select(*(metric[c] for c in ("run_uuid", "key", "value", "timestamp", "step", "is_nan")))
                .where(metric.run_uuid.in_(chunk), only(metric, metric_keys))):
            metrics[run_id].append(Metric(k, float("nan") if is_nan else v, ts, step))
        for i in chunk:
            _, name, exp, user, status, start, end, stage, uri = infos[i]
            yield Run(RunInfo(run_id=i, experiment_id=str(exp), user_id=user, status=status, start_time=start,
                              end_time=end, lifecycle_stage=stage, artifact_uri=uri, run_name=name),
                      RunData(metrics=metrics.pop(i), params=params.pop(i), tags=tags.pop(i)))
