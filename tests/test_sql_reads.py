"""`study.sql_reads.member_runs` on a SQL store gives the runs MLflow's own `search_runs` gives: the same
member runs (not group runs, other studies' runs or deleted ones), with the same info, params, tags and
latest metrics (NaN and inf included)."""

from __future__ import annotations

from study.schema import PARENT_TAG, ROLE_MEMBER, TAG_ROLE
from study.sql_reads import _searched, member_runs
from study.tracking import client


def _runs(tmp_path):
    c = client(f"sqlite:///{tmp_path / 'm.db'}", create=True)
    exp = c.create_experiment("e")
    parent, other = (c.create_run(exp, run_name=n).info.run_id for n in ("study", "other study"))
    for i in range(7):
        role = "group" if i == 5 else ROLE_MEMBER
        run = c.create_run(exp, run_name=f"m{i}", tags={PARENT_TAG: other if i == 6 else parent,
                                                          TAG_ROLE: role, "tpp.member": f"m{i}"}).info.run_id
        c.log_batch(run, params=[], metrics=[])
        c.log_param(run, "lr", str(0.1 * i))
        c.log_metric(run, "acc", 0.5 + i / 100, step=0)
        c.log_metric(run, "acc", 0.9, step=3)
        loss = float("nan") if i == 1 else float("inf") if i == 2 else 1.0
        c.log_metric(run, "finetune/loss", loss, step=2)
        if i % 2:
            c.set_terminated(run, "FINISHED" if i != 3 else "FAILED")
        if i == 4:
            c.delete_run(run)
    return c, exp, parent


def _view(runs):
    return {r.info.run_id: (r.info.to_proto().SerializeToString(deterministic=True), r.data.params,
                            r.data.tags, {k: repr(v) for k, v in r.data.metrics.items()}) for r in runs}


def test_member_runs_equal_mlflows_search(tmp_path):
    c, exp, parent = _runs(tmp_path)
    fast, searched = member_runs(c, exp, parent), _searched(c, exp, parent)
    assert len(fast) == 4 and [r.info.run_name for r in fast] == [r.info.run_name for r in searched]
    assert _view(fast) == _view(searched)
    by_name = {r.info.run_name: r for r in fast}
    assert repr(by_name["m1"].data.metrics["finetune/loss"]) == "nan"
    assert by_name["m3"].info.status == "FAILED" and by_name["m0"].data.metrics["acc"] == 0.9


def test_a_study_with_no_member_runs_reads_empty(tmp_path):
    c = client(f"sqlite:///{tmp_path / 'e.db'}", create=True)
    exp = c.create_experiment("e")
    parent = c.create_run(exp).info.run_id
    assert member_runs(c, exp, parent) == [] == _searched(c, exp, parent)


def test_member_runs_read_only_the_keys_asked_for(tmp_path):
    c, exp, parent = _runs(tmp_path)
    full = {r.info.run_id: r for r in _searched(c, exp, parent)}
    fast = member_runs(c, exp, parent, metrics=["acc", "nothing"], params=["lr"], tags=["tpp.member"])
    assert [r.info.run_id for r in fast] == list(full)  # the same runs, in the same order
    for r in fast:
        want = full[r.info.run_id].data
        assert r.data.metrics == {"acc": want.metrics["acc"]} and r.data.params == {"lr": want.params["lr"]}
        assert r.data.tags == {"tpp.member": want.tags["tpp.member"]}
    only_metrics = member_runs(c, exp, parent, metrics=[])
    assert [r.data.params for r in only_metrics] == [full[r.info.run_id].data.params for r in only_metrics]
    assert all(r.data.metrics == {} for r in only_metrics)


def test_runs_read_a_chunk_at_a_time_are_the_same_runs_in_the_same_order(tmp_path, monkeypatch):
    """`each_member_run` reads CHUNK runs per query round: across chunk edges the runs, their order (newest
    first, then by id, as MLflow's search) and their data are the same as in one read."""
    from study import sql_reads

    c, exp, parent = _runs(tmp_path)
    whole = member_runs(c, exp, parent)
    monkeypatch.setattr(sql_reads, "CHUNK", 3)  # 4 member runs: a chunk of 3, then one of 1
    chunked = list(sql_reads.each_member_run(c, exp, parent))
    assert [r.info.run_id for r in chunked] == [r.info.run_id for r in whole]
    assert _view(chunked) == _view(whole) == _view(_searched(c, exp, parent))
