"""A user's method plug-in through a real study: `tpp-study run` (the CLI, in a subprocess) on an
embedded Ray, its trials in Ray worker processes, results in MLflow. Tiny MLP on the synthetic set.

The plug-in reaches every process the way it would on a cluster: as an installed distribution
declaring a `tpp_study.methods` entry point. Here that distribution is a `*.dist-info` folder on a
temporary `PYTHONPATH` entry; the driver's environment is inherited by the Ray it starts, so the
workers' `importlib.metadata` finds it too, and `tpp.methods` discovers it on first use in each process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_study_run import tiny

from study.store import StudyFolder

TPP_STUDY = str(Path(sys.executable).with_name("tpp-study"))

# The plug-in: its own selection (the first units of every group, from an offset), the library's
# growing L2 penalty in its loop (so the prune cache and reuse see a user method), and a post-removal
# step that records where it ran and with which resolved parameters (a file per call, under $MARKS).
PLUGIN = '''
import json, math, os, sys
import torch
from tpp.methods import Method, Param, filter_penalty, penalty_stage

def prune_first(ctx):
    """Prune the units offset, offset+1, ... of every group (wrapping), at each group's ratio."""
    masks = {}
    for root, group in ctx.groups.items():
        n = group.units
        k = min(math.ceil(ctx.ratios[root] * n), n - 1)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[[(ctx.params["offset"] + i) % n for i in range(k)]] = True
        masks[root] = mask
    return masks

def record(ctx):
    mark = {"argv0": sys.argv[0], "pid": os.getpid(), "params": ctx.params, "method": ctx.cfg.method,
            "widths": [m.out_features for m in ctx.model.modules() if isinstance(m, torch.nn.Linear)]}
    path = os.path.join(os.environ["MARKS"], f"{os.getpid()}-{len(os.listdir(os.environ['MARKS']))}.json")
    with open(path, "w") as f:
        json.dump(mark, f)

METHOD = Method("ep-prune-first", "prunes the first units, a growing L2 penalty, records itself",
                select=prune_first, stage=penalty_stage(filter_penalty(gram=False, bn=False)),
                after_removal=record,
                params={"offset": Param(0, "index of the first pruned unit", minimum=0),
                        "tag": Param("none", "a free-text tag", choices=("none", "a", "b"))})
'''


@pytest.fixture
def plugin_env(tmp_path):
    """(env, marks folder): an environment whose PYTHONPATH holds a distribution declaring the plug-in."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tpp_study_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "tpp_study_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tpp-study-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tpp_study.methods]\n"
                                           "prune-first = tpp_study_test_plugin:METHOD\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env["MARKS"] = str(marks)
    return env, marks


def _config(tmp_path: Path, name: str, method_params: dict) -> Path:
    mine = {"name": "ep-prune-first", "label": "first", "method_params": method_params}
    cfg = tiny(name, methods=["l1", mine], space={"pr": [0.5], "growth": [0.2], "seeds": [0]},
               finetune__lr=[1e-2, 3e-2])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _study(path: Path, storage: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([TPP_STUDY, "run", str(path), "--storage", str(storage)], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_bad_plugin_parameter_is_a_one_line_error_before_anything_starts(plugin_env, tmp_path, monkeypatch):
    env, marks = plugin_env
    storage = tmp_path / "studies"
    proc = _study(_config(tmp_path, "bad", {"offset": -1}), storage, env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "method_params: got offset=-1; accepted: an integer >= 0" in err, err
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (storage / "bad").exists() and not list(marks.iterdir())  # nothing started

    # the other checks of the schema, in this process (the plug-in discovered into a copy of the registry)
    from study.config import StudyConfigError
    from study.loading import load_config
    from tpp.methods import discover_methods, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.syspath_prepend(env["PYTHONPATH"].split(os.pathsep)[0])
    assert "prune-first" in discover_methods()
    for params, says in [({"tag": "c"}, "method_params: got tag='c'; accepted: none | a | b"),
                         ({"ofset": 1}, "method_params: got 'ofset', which method 'ep-prune-first' does not "
                                        "take; accepted: offset, tag")]:
        with pytest.raises(StudyConfigError) as e:
            load_config(_config(tmp_path, "bad", params), storage=str(storage))
        assert says in str(e.value) and "\n" not in str(e.value), e.value
    assert load_config(_config(tmp_path, "good", {"tag": "b"}), storage=str(storage)).methods[1].name \
        == "ep-prune-first"


def test_a_plugin_method_runs_through_a_real_study_in_ray_workers(plugin_env, tmp_path):
    env, marks = plugin_env
    storage = tmp_path / "studies"
    proc = _study(_config(tmp_path, "plugin", {"offset": 2, "tag": "a"}), storage, env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    # the prune stage ran in a Ray worker (not the CLI's process), with the resolved parameters, once
    # for the (pr, seed) point: the second LR reused it
    recorded = [json.loads(p.read_text()) for p in marks.iterdir()]
    assert len(recorded) == 1, recorded
    assert recorded[0]["argv0"].endswith("default_worker.py"), recorded  # a Ray worker process
    assert recorded[0]["method"] == "ep-prune-first" and recorded[0]["params"] == {"offset": 2, "tag": "a"}
    assert recorded[0]["widths"][:2] == [8, 8]  # 16 wide, pr 0.5

    from mlflow.tracking import MlflowClient

    meta = StudyFolder(storage / "plugin").read_meta()  # its store is named relative to the folder
    c = MlflowClient(meta.tracking_uri)
    runs = c.search_runs([meta.experiment_id], f"tags.`mlflow.parentRunId` = '{meta.parent_run_id}'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    mine = [r for r in runs if r.data.params["method_label"] == "first"]
    assert len(mine) == 2
    for r in mine:
        p = r.data.params
        assert p["method"] == "ep-prune-first" and json.loads(p["method_params"]) == {"offset": 2, "tag": "a"}
        assert p["has_penalty"] == "1" and float(p["growth"]) == 0.2
        assert r.data.tags["tpp.status"] == "completed" and r.data.tags["tpp.method"] == "first"
        assert 0 <= r.data.metrics["best_acc"] <= 100
    assert sorted(r.data.tags["tpp.reuse"] for r in mine) == ["computed", "reused"]
    assert [r.data.params["method_params"] for r in runs if r not in mine] == ["{}", "{}"]
