"""The outbox's bulk path on a SQL store (study.sql_writes) leaves the store exactly as MLflow's own client
does, one write at a time: the same queued writes go to two fresh SQLite stores, one through each path,
and everything MlflowClient reads back -- runs, params, tags, latest metrics, metric histories, inputs --
is compared. Includes what the bulk path hands back to the client (a changed param, a metric row already
stored, a deleted run) and what it must reproduce itself (latest-value order, inf, tag overwrites)."""

from __future__ import annotations

import copy

import pytest
from mlflow.entities import Dataset, DatasetInput, InputTag

from study import sql_writes
from study.outbox import Outbox
from study.tracking import client


def _store(tmp_path, name):
    uri = f"sqlite:///{tmp_path / name}.db"
    c = client(uri, create=True)
    exp = c.create_experiment("e")
    parent = c.create_run(exp, run_name="study").info.run_id
    data = DatasetInput(Dataset(name="digits", digest="abc123", source_type="code", source='{"x": 1}',
                                schema=None, profile='{"n": 3}'), [InputTag("mlflow.data.context", "train")])
    c.log_inputs(parent, datasets=[data])  # the study run brings the data set into the experiment
    model = c.create_logged_model(exp, name="dense", source_run_id=parent).model_id
    return uri, c, exp, parent, data, model


def _first_wave(box: Outbox, exp, parent, data, model) -> None:
    for i in range(3):
        box.create_run(f"m{i}", exp, f"member {i}", {"mlflow.parentRunId": parent, "tpp.member": f"m{i}",
                                                      "tpp.status": "running"})
        box.inputs(f"m{i}", data, model)
        box.batch(f"m{i}", params={"lr": str(0.1 * (i + 1)), "seed": "0"})
        box.batch(f"m{i}", metrics=[("loss", 2.0 - i, 0), ("loss", 1.5, 1), ("acc", 0.5, 1),
                                    ("acc", 0.25, 0)])  # an older step logged later: not the latest
    box.batch("m0", metrics=[("acc", 0.5, 1)])  # the same row again: stored once
    box.batch("m1", metrics=[("big", float("inf"), 0), ("small", float("-inf"), 0)])
    box.batch("m1", tags={"tpp.status": "done", "note": "x" * 6000})  # overwritten, and cut
    box.status("m0", "FINISHED")
    box.status("m1", "FAILED")
    box.status("m1", "RUNNING")  # reopened (a resume)
    box.batch("parent", metrics=[("runs", 3.0, 0)], tags={"tpp.outcome": "{}"})


def _second_wave(box: Outbox) -> None:
    box.batch("m1", metrics=[("loss", 0.5, 2), ("loss", 9.0, 1)], params={"lr": "0.2"},  # same value again
              tags={"tpp.status": "completed"})
    box.batch("m2", metrics=[("acc", 0.75, 1)])  # same step, later: the latest
    box.status("m1", "FINISHED")
    box.status("m2", "FINISHED")


def _changed_param(box: Outbox) -> None:
    box.batch("m2", params={"lr": "99"}, metrics=[("loss", 0.1, 5)])  # MLflow refuses the whole batch
    box.batch("m0", metrics=[("new", 1.0, 0)])


def _duplicate_row(box: Outbox, row) -> None:
    box.batch("m0", metrics=[row, ("more", 2.0, 3)])  # a row stored by the first wave, and a new one


def _read(c, exp) -> dict:
    """Everything MlflowClient shows of the experiment's runs, keyed by run name (ids and times differ)."""
    out = {}
    for run in c.search_runs([exp], max_results=1000):
        info, data = run.info, run.data
        histories = {k: sorted((m.step, m.timestamp, m.value) for m in c.get_metric_history(info.run_id, k))
                     for k in data.metrics}
        latest = {k: (m.value, m.step, m.timestamp) for k, m in
                  ((m.key, m) for m in c.get_run(info.run_id).data._metric_objs)}
        inputs = c.get_run(info.run_id).inputs
        out[info.run_name] = {
            "status": info.status, "lifecycle": info.lifecycle_stage, "ended": info.end_time is not None,
            "user": info.user_id, "artifacts": info.artifact_uri.endswith(f"/{info.run_id}/artifacts"),
            "params": data.params, "tags": {k: v for k, v in data.tags.items() if k != "mlflow.parentRunId"},
            "parent": "mlflow.parentRunId" in data.tags, "latest": latest, "history": histories,
            "datasets": sorted((d.dataset.name, d.dataset.digest, tuple((t.key, t.value) for t in d.tags))
                               for d in inputs.dataset_inputs),
            "models": len(inputs.model_inputs or [])}
    return out


def _both(tmp_path, *waves):
    """Deliver the same queued writes (the same timestamps too) to two stores: bulk, and MlflowClient one
    write at a time. Each store's own parent run and dense model ids go into the copies."""
    stores = {name: _store(tmp_path, name) for name in ("bulk", "plain")}
    boxes = {name: Outbox(uri, {"parent": parent}, bulk=name == "bulk")
             for name, (uri, _, _, parent, _, _) in stores.items()}
    exp, data = stores["bulk"][2], stores["bulk"][4]
    for wave in waves:
        queued = Outbox(stores["bulk"][0], {})
        if wave is _first_wave:
            wave(queued, exp, "PARENT", data, "MODEL")
        else:
            wave(queued)
        for name, box in boxes.items():
            _, _, _, parent, _, model = stores[name]
            for kind, _, op in copy.deepcopy(list(queued.ops)):
                if kind == "create":
                    op["tags"]["mlflow.parentRunId"] = parent
                if kind == "inputs":
                    op["model_id"] = model
                box.ops.append([kind, _, op])
            assert box.flush(force=True)
    return {name: _read(c, e) for name, (_, c, e, _, _, _) in stores.items()}, boxes


def test_the_bulk_path_leaves_the_store_as_the_client_does(tmp_path):
    got, boxes = _both(tmp_path, _first_wave, _second_wave)
    assert got["bulk"] == got["plain"]
    assert boxes["bulk"].delivered < boxes["plain"].delivered / 5  # a few transactions, not one per write
    runs = got["bulk"]
    assert runs["member 0"]["latest"]["acc"][:2] == (0.5, 1) and len(runs["member 0"]["history"]["acc"]) == 2
    assert runs["member 1"]["latest"]["loss"][:2] == (0.5, 2) and runs["member 1"]["status"] == "FINISHED"
    assert runs["member 1"]["latest"]["big"][0] == pytest.approx(1.7976931348623157e308)
    assert runs["member 1"]["tags"]["tpp.status"] == "completed"
    assert len(runs["member 1"]["tags"]["note"]) == 5000
    assert runs["member 2"]["latest"]["acc"][0] == 0.75 and runs["member 2"]["models"] == 1
    assert runs["member 0"]["datasets"] == [("digits", "abc123", (("mlflow.data.context", "train"),))]


def test_what_the_bulk_path_cannot_reproduce_goes_through_the_client(tmp_path):
    got, _ = _both(tmp_path, _first_wave, _changed_param)
    assert got["bulk"] == got["plain"]
    assert got["bulk"]["member 2"]["params"]["lr"] == "0.30000000000000004"  # refused, not changed
    assert "new" in got["bulk"]["member 0"]["latest"]  # the rest of the slice still landed


def test_a_metric_row_already_stored_is_not_stored_twice(tmp_path):
    got, _ = _both(tmp_path, _first_wave, lambda box: _duplicate_row(box, ("acc", 0.5, 1)))
    assert got["bulk"] == got["plain"]


def test_a_run_deleted_meanwhile_refuses_its_writes_as_mlflow_does(tmp_path):
    uri, c, exp, parent, data, model = _store(tmp_path, "s")
    box = Outbox(uri, {"parent": parent})
    _first_wave(box, exp, parent, data, model)
    assert box.flush(force=True)
    c.delete_run(box.run_ids["m2"])
    box.batch("m2", metrics=[("late", 1.0, 0)])
    box.batch("m0", metrics=[("late", 1.0, 0)])
    with pytest.raises(sql_writes.Unsupported):
        sql_writes.deliver(sql_writes.sql_store(box.mlflow), list(box.ops), box.run_ids)
    assert box.flush(force=True) and not box.ops
    assert "late" in c.get_run(box.run_ids["m0"]).data.metrics
    assert "late" not in c.get_run(box.run_ids["m2"]).data.metrics


def test_only_a_sql_store_takes_the_bulk_path(tmp_path):
    uri, c, *_ = _store(tmp_path, "s")
    assert sql_writes.sql_store(c) is not None
    assert sql_writes.sql_store(client("http://127.0.0.1:5999")) is None  # a server's own store does it


def test_a_refusal_naming_a_run_id_with_503_in_it_is_not_an_outage():
    """A store's refusal quoting a hex run id that contains "503" or "502" is a refused write, not the
    server being away (which an HTTP 502/503 status is)."""
    from study.outbox import _transient

    assert not _transient(ValueError("Changing param values is not allowed ... run ID='21b11503efdd4495'"))
    assert not _transient(ValueError("run 7502aa refused"))
    assert _transient(ValueError("API request failed with error code 503 != 200"))
    assert _transient(ValueError("502 Server Error: Bad Gateway"))
    assert _transient(ValueError("sqlite3.OperationalError: database is locked"))
