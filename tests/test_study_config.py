"""Study config validation, the search space / designs, and the CLI's refusal to start on a bad config."""

import copy
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from study.config import StudyConfigError, load_config
from study.space import (
    DefineByRun,
    design,
    grid_cells,
    grid_size,
    logged_params,
    point_from_config,
    run_config,
    run_name,
)

CONFIGS = Path(__file__).resolve().parents[1] / "study" / "configs"

BASE = {
    "name": "t",
    "model": {"name": "mlp", "kwargs": {"depth": 3, "width": 16}},
    "data": {"name": "synthetic"},
    "dense": {"epochs": 2, "lr": 0.05},
    "methods": ["l1", "tpp"],
    "space": {"lr": {"low": 1e-4, "high": 1e-1}, "pr": [0.5, 0.8, 0.9], "growth": [1e-3, 1e-2],
              "seeds": [0, 1]},
    "finetune": {"epochs": 2},
    "num_trials": 8,
}


def cfg_with(**changes):
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        d = raw
        keys = dotted.split("__")
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        if value is ...:
            d.pop(keys[-1], None)
        else:
            d[keys[-1]] = value
    return raw


# (change, expected field path, a fragment the one-line message must contain)
BAD = [
    (dict(unknown_key=1), "unknown_key", "accepted: name"),
    (dict(space__lr={"low": 1e-1, "high": 1e-4}), "space.lr", "inverted"),
    (dict(space__lr={"low": 1e-3, "high": 1e-3}), "space.lr", "low < high"),
    (dict(space__lr=[0.01, -1]), "space.lr", "> 0"),
    (dict(space__lr={"low": 0, "high": 1e-2}), "space.lr", "> 0"),
    (dict(space__lr=[]), "space.lr", "non-empty"),
    (dict(space__lr={"low": 1e-3, "hi": 1}), "space.lr.hi", "accepted: low, high"),
    (dict(space__lr="fast"), "space.lr", "{low: L, high: H}"),
    (dict(space__pr=[0.5, 1.0]), "space.pr", "(0, 1)"),
    (dict(space__pr=[0.0]), "space.pr", "(0, 1)"),
    (dict(space__pr={"low": 0.9, "high": 0.3}), "space.pr", "inverted"),
    (dict(space__growth=[0]), "space.growth", "> 0"),
    (dict(space__growth=[-1e-3]), "space.growth", "> 0"),
    (dict(space__growth=...), "space.growth", "tpp"),
    (dict(space__seeds=[0, 0]), "space.seeds", "duplicate"),
    (dict(space__seeds=[]), "space.seeds", ""),
    (dict(space__speed=[1]), "space.speed", "accepted: lr, pr, growth, seeds"),
    (dict(model={"name": "resnet1000"}), "model.name", "accepted: "),
    (dict(model={"name": "mlp", "kwargs": {"deep": 3}}), "model.kwargs", "accepted: depth"),
    (dict(data={"name": "imagenet21k"}), "data.name", "accepted: "),
    (dict(data={"name": "synthetic", "kwargs": {"n_samples": 3}}), "data.kwargs", "accepted: "),
    (dict(data={"name": "cifar10", "root": "/no/such/folder"}), "data.root", "does not exist"),
    (dict(methods=["l1", "magic"]), "methods[1]", "accepted: l1, tpp"),
    (dict(methods=[]), "methods", ""),
    (dict(sampler="random"), "sampler", "'qmc', 'grid', 'tpe' or 'gp'"),
    (dict(num_trials=0), "num_trials", "greater than or equal to 1"),
    (dict(num_trials=...), "num_trials", "required"),
    (dict(dense={"epochs": 2, "checkpoint": "x.pt"}), "dense", "exactly one"),
    (dict(dense={}), "dense", "exactly one"),
    (dict(dense={"checkpoint": "/no/such/dense.pt"}), "dense.checkpoint", "not a file"),
    (dict(dense={"epochs": 2, "lr": -0.1}), "dense.lr", "greater than 0"),
    (dict(finetune={"epochs": 0}), "finetune.epochs", "greater than or equal to 1"),
    (dict(finetune={"epochs": 2, "schedule": "linear"}), "finetune.schedule", "accepted: step"),
    (dict(finetune={"epochs": 2, "milestones": [0.5, 1.5]}), "finetune.milestones", "(0, 1)"),
    (dict(fixed={"batch_size": 0}), "fixed.batch_size", ">= 1"),
    (dict(fixed={"reg_lr": -1.0}), "fixed.reg_lr", "> 0"),
    (dict(fixed={"lr": 0.1}), "fixed.lr", "own section"),
    (dict(fixed={"warp": 9}), "fixed.warp", "accepted: prune_layers"),
    (dict(objective={"metric": "loss"}), "objective.metric", "accepted: best_acc"),
    (dict(objective={"mode": "maximize"}), "objective.mode", "'max' or 'min'"),
    (dict(resources={"gpu": "lots"}), "resources.gpu", "auto"),
    (dict(resources={"gpu": -0.5}), "resources.gpu", "auto"),
    (dict(resources={"cpus": 0}), "resources.cpus", "greater than 0"),
    (dict(max_concurrent=0), "max_concurrent", "greater than or equal to 1"),
    (dict(early_stopping={"asha": True, "reduction_factor": 1}), "early_stopping.reduction_factor",
     "greater than 1"),
    (dict(mlflow={"uri": "x"}), "mlflow.uri", "accepted: tracking_uri, experiment"),
    (dict(ray={"adress": "auto"}), "ray.adress", "accepted: address, num_cpus"),
    (dict(name="bad name/../x"), "name", "pattern"),
    (dict(sampler="grid", num_trials=...), "space.lr", "grid sampler needs a list"),
    (dict(sampler="grid", num_trials=5, space__lr=[1e-3, 1e-2]), "num_trials", "accepted: 36"),
]


@pytest.mark.parametrize(("change", "path", "fragment"), BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_config_fails_with_one_line_naming_the_field(change, path, fragment):
    with pytest.raises(StudyConfigError) as info:
        load_config(cfg_with(**change))
    msg = str(info.value)
    assert info.value.path == path, msg
    assert msg.startswith(path + ":"), msg
    assert "\n" not in msg
    assert fragment in msg, msg


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    for src in (bad, tmp_path / "missing.yaml"):
        with pytest.raises(StudyConfigError) as info:
            load_config(src)
        assert "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(StudyConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(cfg_with(), storage=str(tmp_path / "s"), tracking_uri=None,
                      set={"space.seeds": [3], "finetune.epochs": 4})
    assert cfg.sampler == "qmc" and cfg.objective.metric == "best_acc" and cfg.objective.mode == "max"
    assert cfg.early_stopping.asha is False and cfg.resources.gpu == "auto"
    assert cfg.space.seeds == [3] and cfg.finetune.epochs == 4
    assert cfg.study_dir() == (tmp_path / "s" / "t").absolute()
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 's' / 't' / 'mlflow.db'}"
    assert cfg.experiment() == "t"
    cfg2 = load_config(cfg_with(), address="auto", tracking_uri="http://127.0.0.1:5000", experiment="e")
    assert cfg2.ray.address == "auto" and cfg2.tracking_uri() == "http://127.0.0.1:5000"
    assert cfg2.experiment() == "e"
    with pytest.raises(StudyConfigError, match="num_trials"):
        load_config(cfg_with(), num_trials=-1)
    # a scalar for a dimension is a one-level list
    assert load_config(cfg_with(space__lr=0.01)).space.lr == [0.01]


def test_growth_not_required_without_penalty_methods():
    cfg = load_config(cfg_with(methods=["l1", "orthp"], space__growth=...))
    assert cfg.space.growth is None
    assert all(p.growth is None for p in design(cfg))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    overrides = {}
    if raw["data"].get("root"):
        (tmp_path / "train").mkdir()
        overrides["data.root"] = str(tmp_path)
    if raw["dense"].get("checkpoint"):
        ckpt = tmp_path / "dense.pt"
        ckpt.write_bytes(b"")
        overrides["dense.checkpoint"] = str(ckpt)
    cfg = load_config(path, set=overrides)
    assert cfg.trials >= 1


def test_paper_config_is_table_1():
    cfg = load_config(CONFIGS / "paper_resnet56_cifar10.yaml", set={"data.root": str(CONFIGS)})
    assert cfg.sampler == "grid" and cfg.trials == 5 * 2 * 2 * 3
    assert sorted(cfg.space.pr) == [0.3, 0.5, 0.7, 0.9, 0.95] and sorted(cfg.space.lr) == [1e-3, 1e-2]
    assert cfg.finetune.epochs == 120 and cfg.resources.gpu == 0.25
    rc = run_config(cfg, design(cfg)[0])
    assert (rc.batch_size, rc.growth, rc.update_reg_interval, rc.stabilize_reg_interval) == (
        128, 1e-4, 10, 10000)
    assert rc.milestones == (0.5, 0.75)  # drops at epochs 60 and 90 of 120


def test_quick_config_is_the_demo():
    cfg = load_config(CONFIGS / "quick.yaml")
    assert (cfg.data.name, cfg.model.name, cfg.sampler) == ("digits", "mlp7_linear", "qmc")
    assert set(cfg.methods) == {"l1", "tpp"} and len(cfg.space.seeds) >= 2 and len(cfg.space.pr) >= 3
    lr = cfg.space.lr
    assert lr.low <= 1e-4 and lr.high >= 1e-1


# ---------------------------------------------------------------------------------------------- space
def test_grid_is_the_exact_factorial_with_conditional_growth():
    cfg = load_config(cfg_with(sampler="grid", num_trials=..., space__lr=[1e-3, 1e-2]))
    cells = grid_cells(cfg)
    # l1: 3 pr x 2 lr x 2 seeds; tpp: x 2 growth levels
    assert len(cells) == grid_size(cfg) == cfg.trials == 12 + 24
    assert len(set(cells)) == len(cells)
    assert {c.growth for c in cells if c.method == "l1"} == {None}
    assert Counter(c.growth for c in cells if c.method == "tpp") == {1e-3: 12, 1e-2: 12}


def test_qmc_design_balances_categorical_choices():
    cfg = load_config(cfg_with(num_trials=16, space__pr=[0.5, 0.9]))
    pts = design(cfg)
    assert len(pts) == 16
    assert Counter(p.method for p in pts) == {"l1": 8, "tpp": 8}
    assert Counter(p.seed for p in pts) == {0: 8, 1: 8}
    assert Counter(p.pr for p in pts) == {0.5: 8, 0.9: 8}
    # the LR range is covered on a log scale: every decade of [1e-4, 1e-1] gets trials
    decades = Counter(min(int(-__import__("math").log10(p.lr)), 3) for p in pts)
    assert set(decades) == {1, 2, 3} and min(decades.values()) >= 4
    assert all(1e-4 <= p.lr <= 1e-1 for p in pts)
    assert all((p.growth is None) == (p.method == "l1") for p in pts)
    assert design(cfg) == pts  # reproducible from sampler_seed


@pytest.mark.parametrize("reuse", [True, False])
def test_design_starts_every_prune_stage_before_the_trials_that_reuse_one(reuse):
    from study.space import qmc_design

    cfg = load_config(cfg_with(num_trials=32, space__pr=[0.5, 0.9], prune_reuse=reuse))
    sobol, ordered = qmc_design(cfg), design(cfg)
    assert sorted(map(repr, ordered)) == sorted(map(repr, sobol))  # the same trials, reordered
    keys = [(p.pr, p.growth, p.seed) if p.method == "tpp" else None for p in ordered]
    computing = len({k for k in keys if k} if reuse else [k for k in keys if k])
    head, tail = keys[:computing], keys[computing:]
    assert None not in head and (len(set(head)) == len(head) or not reuse)
    assert all(k is None or k in head for k in tail)  # later tpp trials reuse a stage started earlier
    assert [k[1] for k in head] == sorted(k[1] for k in head)  # slowest penalty schedule (least growth) first
    assert ordered != sobol


def test_define_by_run_follows_the_design_even_after_a_lost_trial():
    """Tune saves its searcher (this object) with its trial list; a trial asked after the last save is
    lost by a hard kill. The restored searcher must ask for that point again, and Optuna must record
    exactly the points that run."""
    import pickle

    import optuna

    from study.design_sampler import DesignSampler

    cfg = load_config(cfg_with(num_trials=8))
    sampler = DesignSampler()
    study = optuna.create_study(direction="maximize", sampler=sampler)
    space = DefineByRun(cfg, sampler)
    got = []
    for i in range(3):
        if i == 2:
            saved = pickle.dumps(space)  # Tune's last save, before the third trial
        t = study.ask()
        got.append(point_from_config(space(t)))
        assert point_from_config(t.params) == got[-1]  # what Optuna records is what runs
        study.tell(t, 1.0)
    space = pickle.loads(saved)  # the driver was killed; resume restores the saved searcher
    study.sampler = space.sampler
    got = got[:2]
    for _ in range(6):
        t = study.ask()
        got.append(point_from_config(space(t)))
        assert point_from_config(t.params) == got[-1]
        study.tell(t, 1.0)
    assert got == design(cfg)
    with pytest.raises(RuntimeError, match="8 points"):
        space(study.ask())


def test_define_by_run_for_adaptive_samplers():
    import optuna

    cfg = load_config(cfg_with(sampler="tpe"))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True))
    for _ in range(10):
        t = study.ask()
        out = DefineByRun(cfg)(t)
        assert ("growth" in t.params) == (out["method"] == "tpp")
        p = point_from_config(out)
        assert 1e-4 <= p.lr <= 1e-1 and p.pr in (0.5, 0.8, 0.9) and p.seed in (0, 1)
        study.tell(t, p.lr)


def test_run_config_names_and_params():
    cfg = load_config(cfg_with(fixed={"batch_size": 32}))
    tpp_pt = point_from_config({"method": "tpp", "pr": 0.9, "lr": 0.0032, "growth": 1e-3, "seed": 0})
    l1_pt = point_from_config({"method": "l1", "pr": 0.5, "lr": 0.1, "growth": 1e-3, "seed": 1})
    assert l1_pt.growth is None  # l1 has no penalty: growth dropped whatever the searcher said
    assert run_name(tpp_pt) == "tpp pr=0.9 g=1e-3 lr=3.2e-3 s0"
    assert run_name(l1_pt) == "l1 pr=0.5 lr=1e-1 s1"
    rc = run_config(cfg, tpp_pt)
    assert (rc.method, rc.pr, rc.lr, rc.growth, rc.seed, rc.epochs, rc.batch_size, rc.dense_epochs) == (
        "tpp", 0.9, 0.0032, 1e-3, 0, 2, 32, 2)
    params = logged_params(run_config(cfg, l1_pt), l1_pt)
    assert params["growth"] == "none" and params["method"] == "l1" and params["model_kwargs"].startswith("{")
    assert set(params) >= {"model", "data", "method", "pr", "lr", "growth", "seed", "epochs", "batch_size"}


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_bad_config_exits_2_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg_with(space__pr=[0.5, 1.2])))
    storage = tmp_path / "studies"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "study.cli", "run", str(bad), "--storage", str(storage)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "space.pr" in err[0] and "(0, 1)" in err[0]
    assert not storage.exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert "ray" not in proc.stdout.lower()


def test_cli_help_everywhere():
    from study.cli import main

    for argv in ([], ["run"], ["resume"], ["list"], ["status"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--help"])
        assert info.value.code == 0


def test_cli_list_and_status_on_empty_storage(tmp_path, capsys):
    from study.cli import main

    assert main(["list", "--storage", str(tmp_path)]) == 0
    assert "no studies" in capsys.readouterr().out
    assert main(["status", "nope", "--storage", str(tmp_path)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
