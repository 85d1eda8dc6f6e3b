"""Studies that grow (`tpp-study extend`): more seeds, ladder points, PR levels or methods run into the same
study, reusing the dense model, every cached prune stage and every finished run; the extended study holds
what a study run with the full design from the start holds; anything that is not an extension is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_study_run import child_runs, local_ray, tiny  # noqa: F401 - local_ray is a fixture

import study
from study.store import StudyFolder

TPP_STUDY = str(Path(sys.executable).with_name("tpp-study"))
BASE = dict(space={"pr": [0.5], "growth": [0.2], "seeds": [0, 1]}, finetune__lr=[1e-2, 3e-2])
GROWN = {"space.seeds": [0, 1, 2], "space.pr": [0.5, 0.75], "finetune.lr": [1e-2, 3e-2, 1e-1],
         "methods": ["l1", "tpp", "greg"]}


def _by_member(res: study.StudyResult) -> dict[str, object]:
    runs = child_runs(res)
    ids = [r.data.tags["tpp.member_id"] for r in runs]
    assert len(ids) == len(set(ids)) == res.num_runs and all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags["tpp.member_id"]: r for r in runs}


def test_an_extended_study_runs_only_what_is_new_and_equals_the_full_design(local_ray, tmp_path,  # noqa: F811
                                                                           capsys):
    storage = str(tmp_path / "studies")
    first = study.run(tiny("grow", **BASE), storage=storage)
    assert first.status == "completed" and first.num_runs == 2 * 1 * 2 * 2  # (l1, tpp) x pr x seeds x lrs
    before = _by_member(first)
    folder = StudyFolder(first.path)
    dense_mtime = folder.dense_path.stat().st_mtime_ns

    grown_cfg = study.load_config(tiny("grow", **BASE), set=GROWN)
    (tmp_path / "grown.yaml").write_text(grown_cfg.to_yaml())
    from study.cli import main as tpp_study

    capsys.readouterr()
    assert tpp_study(["plan", str(tmp_path / "grown.yaml"), "--extend", "grow", "--storage", storage]) == 0
    said = capsys.readouterr().out
    assert said.startswith("extend grow: +46 runs (54 in all; the 8 of the study are kept)"), said
    plan = study.extend("grow", set=GROWN, storage=storage, dry_run=True)
    assert (plan.runs_before, plan.runs_after) == (8, 3 * 2 * 3 * 3)  # 3 methods x 2 PRs x 3 seeds x 3 LRs
    assert folder.read_meta().num_runs == 8  # a dry run changes nothing

    grown = study.extend("grow", set=GROWN, storage=storage)
    assert grown.status == "completed" and grown.num_runs == 54 and grown.parent_run_id == first.parent_run_id
    after = _by_member(grown)
    # every finished run kept as it was (same MLflow run), the dense model not trained again
    assert set(before) <= set(after)
    assert all(after[m].info.run_id == r.info.run_id for m, r in before.items())
    assert folder.dense_path.stat().st_mtime_ns == dense_mtime
    # each prune stage computed once over both sessions: the first study's 2 (tpp, 2 seeds) are reused
    computed = Counter(r.data.tags["tpp.prune_key"] for r in after.values()
                       if r.data.tags["tpp.reuse"] == "computed")
    penalty_points = 2 * 2 * 3  # tpp and greg x 2 PRs x 3 seeds
    assert len(computed) == penalty_points and set(computed.values()) == {1}
    # recorded: study.json's history, the study run's tag and planned count, the config now in force
    meta = folder.read_meta()
    assert len(meta.extensions) == 1 and meta.extensions[0]["runs_before"] == 8
    assert "space.seeds" in meta.extensions[0]["changed"]
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(meta.tracking_uri).get_run(meta.parent_run_id).data.tags
    assert tags["tpp.num_trials"] == "54" and "tpp.extension.1" in tags
    assert yaml.safe_load(folder.config_path.read_text())["space"]["seeds"] == [0, 1, 2]
    from analysis.cli import main as analyze

    assert tpp_study(["status", "grow", "--storage", storage]) == 0
    assert "extended   " in capsys.readouterr().out
    assert analyze(["grow", "--storage", storage, "--no-log", "--quiet"]) == 0
    page = (folder.report_dir / "report.html").read_text()
    assert "8 -&gt; 54 planned runs" in page and "joins all 54 member runs" in page

    # the same design run from the start holds the same members with the same results
    full = study.run(tiny("full", **BASE), storage=storage, set=GROWN)
    whole = _by_member(full)
    assert set(whole) == set(after)
    for m, r in whole.items():
        assert after[m].data.metrics["best_acc"] == pytest.approx(r.data.metrics["best_acc"], abs=0.5), m

    # nothing left to add: said in one line
    with pytest.raises(study.StudyError, match="adds no run"):
        study.extend("grow", set=GROWN, storage=storage)


@pytest.mark.parametrize(("change", "says"), [
    ({"finetune.epochs": 3}, "drops or changes 8 of the study's 8 members (finetune.epochs"),
    ({"space.seeds": [1, 2]}, "drops or changes 4 of the study's 8 members"),
    ({"objective": {"metric": "last_acc", "mode": "max"}}, "objective.metric: an extension keeps"),
])
def test_what_is_not_an_extension_is_refused_in_one_line(tmp_path, change, says):
    """Through the CLI, on a study folder never run: the refusal needs no run, and changes nothing."""
    folder = tmp_path / "studies" / "s"
    folder.mkdir(parents=True)
    cfg = study.load_config(tiny("s", **BASE), storage=str(tmp_path / "studies"))
    (folder / "study_config.yaml").write_text(cfg.to_yaml())
    (folder / "study.json").write_text('{"name": "s"}')
    sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in change.items()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([TPP_STUDY, "extend", "s", "--storage", str(tmp_path / "studies"),
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
    assert (folder / "study_config.yaml").read_text() == cfg.to_yaml()


SLOW = dict(space={"pr": [0.5], "growth": [0.2], "seeds": [0, 1]}, finetune__lr=[1e-3, 3e-3, 1e-2, 3e-2],
            finetune__epochs=3, finetune__per_trial=2, max_concurrent=1, lockstep=False,
            data={"name": "synthetic", "kwargs": {"n_train": 2048, "n_test": 128}})


@pytest.mark.slow
def test_an_extend_killed_midway_is_refused_a_second_writer_and_resume_finishes_it(local_ray,  # noqa: F811
                                                                                     tmp_path):
    import re
    import signal
    import threading
    import time

    storage = tmp_path / "studies"
    first = study.run(tiny("k", **SLOW), storage=str(storage))
    assert first.status == "completed" and first.num_runs == 16
    kept = {m: r.info.run_id for m, r in _by_member(first).items()}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([TPP_STUDY, "extend", "k", "--storage", str(storage), "--set",
                             "space.seeds=[0, 1, 2, 3]"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 300
    while not any(re.search(r"\[k\] (1[89]|2\d)/32 runs done", line) for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-30:])
        time.sleep(0.2)
    with pytest.raises(study.StudyError, match="is being run by"):  # one writer, also for extend
        study.extend("k", set={"space.seeds": [0, 1, 2, 3, 4]}, storage=str(storage))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    resumed = study.resume("k", storage=str(storage))
    assert resumed.status == "completed" and resumed.num_runs == 32
    after = _by_member(resumed)  # one FINISHED run per member of the extended design
    assert all(after[m].info.run_id == run_id for m, run_id in kept.items())


def test_a_stop_between_recording_and_placing_the_new_config_is_finished_by_resume(tmp_path):
    """The one moment an extension's config is in two places: study.json has its digest, the new config
    still waits beside study_config.yaml. `resume` puts it in place (and drops a leftover never recorded)."""
    from study.driver import _finish_extension, config_digest

    folder = StudyFolder(tmp_path / "s")
    folder.path.mkdir()
    old = study.load_config(tiny("s", **BASE))
    new = study.load_config(tiny("s", **BASE), set={"space.seeds": [0, 1, 2]})
    folder.config_path.write_text(old.to_yaml())
    folder.extension_config_path.write_text(new.to_yaml())
    from study.store import StudyMeta

    folder.write_meta(StudyMeta(name="s", config_digest=config_digest(new)))
    assert _finish_extension(folder, folder.read_meta())
    assert folder.config_path.read_text() == new.to_yaml() and not folder.extension_config_path.exists()
    folder.extension_config_path.write_text(old.to_yaml())  # never recorded: study.json has new's digest
    assert not _finish_extension(folder, folder.read_meta()) and not folder.extension_config_path.exists()
    assert folder.config_path.read_text() == new.to_yaml()


def test_a_recipe_level_added_after_the_prune_cache_was_deleted_recomputes_only_the_missing_stage(
        local_ray, tmp_path):  # noqa: F811
    storage = str(tmp_path / "studies")
    first = study.run(tiny("recipe", space={"pr": [0.5, 0.75], "growth": [0.2], "seeds": [0]},
                           finetune__lr=[1e-2]), storage=storage)
    folder = StudyFolder(first.path)
    before = set(_by_member(first))
    keys = sorted(p.name for p in folder.prune_cache.glob("*.pt") if not p.name.startswith("control-"))
    assert len(keys) == 2  # tpp at PR 0.5 and 0.75
    (folder.prune_cache / keys[0]).unlink()  # one stage lost (disk cleanup, a copy without the cache)
    grown = study.extend("recipe", set={"finetune.epochs": [2, 3]}, storage=storage)  # a recipe level
    assert grown.status == "completed" and grown.num_runs == 2 * 2 * 2  # (l1, tpp) x 2 PRs x 2 budgets
    new = [r for m, r in _by_member(grown).items() if m not in before]
    assert Counter(r.data.tags["tpp.reuse"] for r in new) == {"none": 2, "reused": 2}  # the 2 stages served
    from study.prune_cache import PruneCache

    # only the deleted stage was computed again (the cache's log counts every computation that started)
    assert PruneCache(folder.prune_cache).computations() == {keys[0].removesuffix(".pt"): 2,
                                                              keys[1].removesuffix(".pt"): 1}


def test_a_ladder_grows_both_ways_by_whole_steps_and_a_refusal_names_the_ends_that_would():
    """A ladder {low, high, per_decade} extended down or up keeps its points exactly when its ends move
    by whole steps; other ends are refused, the refusal naming the nearest ends that keep them."""
    from study.extension import plan_extension

    def cfg(low, high):
        return study.load_config(tiny("l", finetune__lr={"low": low, "high": high, "per_decade": 3}))

    old = cfg(1e-3, 1e-1)
    step = 10 ** (1 / 3)
    grown = plan_extension(old, cfg(1e-3 / step, 1e-1 * step))
    assert grown.added_runs == 2 * grown.runs_before // 7  # 7 LRs -> 9 LRs: two per prune point and seed
    with pytest.raises(study.StudyError, match="ends move by whole steps: low 0.000464158883361") as e:
        plan_extension(old, cfg(4.6e-4, 1e-1))
    hinted = float(str(e.value).split("low ")[-1].split(",")[0])
    assert plan_extension(old, cfg(hinted, 1e-1)).added_runs == grown.runs_before // 7
