"""Study config validation, the search space / designs, and the CLI's refusal to start on a bad config."""

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from study.config import StudyConfigError
from study.design import member_param_keys, members, plan, points, run_config, size
from study.loading import load_config
from study.record import logged_params, run_name
from study.searcher import DefineByRun

CONFIGS = Path(__file__).resolve().parents[1] / "study" / "configs"

BASE = {
    "name": "t",
    "model": {"name": "mlp", "kwargs": {"depth": 3, "width": 16}},
    "data": {"name": "synthetic"},
    "dense": {"epochs": 2, "lr": 0.05},
    "methods": ["l1", "tpp"],
    "space": {"pr": [0.5, 0.8, 0.9], "growth": [1e-3, 1e-2], "seeds": [0, 1]},
    "finetune": {"lr": {"low": 1e-4, "high": 1e-1, "per_decade": 1}, "epochs": 2},
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
    (dict(finetune__lr={"low": 1e-1, "high": 1e-4, "per_decade": 2}), "finetune.lr", "inverted"),
    (dict(finetune__lr={"low": 1e-3, "high": 1e-3}), "finetune.lr", "low < high"),
    (dict(finetune__lr=[0.01, -1]), "finetune.lr", "> 0"),
    (dict(finetune__lr={"low": 0, "high": 1e-2, "per_decade": 2}), "finetune.lr", "> 0"),
    (dict(finetune__lr=[]), "finetune.lr", "a list of numbers"),
    (dict(finetune__lr={"low": 1e-3, "hi": 1}), "finetune.lr.hi", "accepted: low, high, per_decade"),
    (dict(finetune__lr="fast"), "finetune.lr", "{low: L, high: H, per_decade: N}"),
    (dict(finetune__lr=["fast", 1e-3]), "finetune.lr", "accepted: a number, a list of numbers, or {low"),
    (dict(finetune__lr={"low": 1e-4, "high": 1e-1}), "finetune.lr", "ladder"),
    (dict(finetune__lr=...), "finetune.lr", "required"),
    (dict(space__lr=[1e-3]), "space.lr", "moved to finetune.lr"),
    (dict(space__pr=[0.5, 1.0]), "space.pr", "(0, 1)"),
    (dict(space__pr=[0.0]), "space.pr", "(0, 1)"),
    (dict(space__pr={"low": 0.9, "high": 0.3}), "space.pr", "inverted"),
    (dict(space__pr=[0.5, 0.5]), "space.pr", "duplicate"),
    (dict(space__growth=[0]), "space.growth", "> 0"),
    (dict(space__growth=[-1e-3]), "space.growth", "> 0"),
    (dict(space__growth=...), "space.growth", "tpp"),
    (dict(space__seeds=[0, 0]), "space.seeds", "duplicate"),
    (dict(space__seeds=[]), "space.seeds", ""),
    (dict(space__speed=[1]), "space.speed", "accepted: pr, growth, seeds"),
    (dict(model={"name": "resnet1000"}), "model.name", "accepted: "),
    (dict(model={"name": "mlp", "kwargs": {"deep": 3}}), "model.kwargs", "accepted: depth"),
    (dict(data={"name": "imagenet21k"}), "data.name", "accepted: "),
    (dict(data={"name": "synthetic", "kwargs": {"n_samples": 3}}), "data.kwargs", "accepted: "),
    (dict(data={"name": "cifar10", "root": "/no/such/folder"}), "data.root", "does not exist"),
    (dict(data={"name": "synthetic", "val_fraction": 1.5}), "data.val_fraction", "less than 1"),
    (dict(methods=["l1", "magic"]), "methods[1].name", "accepted: l1, tpp"),
    (dict(methods=[]), "methods", ""),
    (dict(methods=["l1", "l1"]), "methods", "duplicate"),
    (dict(methods=["l1", {"name": "l1", "lw_opp": 3.0}]), "methods[1].label", "required"),
    (dict(methods=["l1", {"name": "tpp", "label": "x", "lr": 3.0}]), "methods[1].lr", "prune-stage"),
    (dict(methods=["l1", {"name": "tpp", "label": "x", "reg_lr": -3.0}]), "methods[1].reg_lr", "> 0"),
    (dict(sampler="random"), "sampler", "'qmc', 'grid' or 'tpe'"),
    (dict(sampler="qmc"), "sampler", "accepted: sampler: grid"),
    (dict(sampler="qmc", space__pr={"low": 0.3, "high": 0.9}), "num_trials", "required"),
    (dict(num_trials=8), "num_trials", "leave num_trials out"),
    (dict(sampler="tpe"), "num_trials", "required"),
    (dict(sampler="tpe", num_trials=0), "num_trials", "greater than or equal to 1"),
    (dict(sampler="tpe", num_trials=4, finetune__per_trial=3), "finetune.per_trial", "accepted: 1"),
    (dict(early_stopping={"asha": True}), "early_stopping.asha", "sampler tpe"),
    (dict(dense={"epochs": 2, "checkpoint": "x.pt"}), "dense", "exactly one"),
    (dict(dense={}), "dense", "exactly one"),
    (dict(dense={"checkpoint": "/no/such/dense.pt"}), "dense.checkpoint", "not a file"),
    (dict(dense={"epochs": 2, "lr": -0.1}), "dense.lr", "> 0"),
    (dict(dense={"epochs": 2, "speed": 1}), "dense.speed", "accepted: checkpoint, seed, epochs, lr"),
    (dict(finetune__epochs=0), "finetune.epochs", ">= 1"),
    (dict(finetune__schedule="exponential"), "finetune.schedule", "accepted: step"),
    (dict(finetune__schedule=["step", "exponential"]), "finetune.schedule", "accepted: step"),
    (dict(finetune__milestones=[0.5, 1.5]), "finetune.milestones", "(0, 1)"),
    (dict(finetune__schedule="onecycle"), "finetune.warmup_epochs", "onecycle"),
    (dict(finetune__epochs=[]), "finetune.epochs", "empty list"),
    (dict(finetune__dropout=0.1), "finetune.dropout", "accepted: lr, per_trial"),
    (dict(fixed={"reg_batch_size": 0}), "fixed.reg_batch_size", ">= 1"),
    (dict(fixed={"reg_lr": -1.0}), "fixed.reg_lr", "> 0"),
    (dict(fixed={"lr": 0.1}), "fixed.lr", "set it in finetune"),
    (dict(fixed={"pr": 0.1}), "fixed.pr", "set it in space"),
    (dict(fixed={"warp": 9}), "fixed.warp", "accepted: prune_layers"),
    (dict(objective={"metric": "loss"}), "objective.metric", "accepted: auto, best_acc"),
    (dict(objective={"metric": "test_acc_at_best_val"}), "objective.metric", "val_fraction"),
    (dict(objective={"mode": "maximize"}), "objective.mode", "'max' or 'min'"),
    (dict(resources={"gpu": "lots"}), "resources.gpu", "auto"),
    (dict(resources={"gpu": -0.5}), "resources.gpu", "auto"),
    (dict(resources={"cpus": 0}), "resources.cpus", "greater than 0"),
    (dict(max_concurrent=0), "max_concurrent", "greater than or equal to 1"),
    (dict(sampler="tpe", num_trials=2, early_stopping={"asha": True, "reduction_factor": 1}),
     "early_stopping.reduction_factor", "greater than 1"),
    (dict(mlflow={"uri": "x"}), "mlflow.uri", "accepted: tracking_uri, experiment"),
    (dict(ray={"adress": "auto"}), "ray.adress", "accepted: address, num_cpus"),
    (dict(name="bad name/../x"), "name", "pattern"),
    (dict(sampler="grid", space__pr={"low": 0.3, "high": 0.9}), "space.pr", "grid sampler crosses"),
    (dict(finetune__weight_decay=[0.0] * 1 + [1e-4, 1e-3], finetune__epochs=list(range(1, 400)),
          finetune__lr={"low": 1e-6, "high": 1.0, "per_decade": 100}), "finetune", "accepted: at most"),
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


def test_repeated_keys_and_non_utf8_files_are_refused(tmp_path):
    """yaml.safe_load keeps the last of repeated keys silently: the user would run what they did not see."""
    twice = tmp_path / "twice.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False)
    first = text.splitlines().index("methods:") + 1
    twice.write_text(text + "methods: [l1]\n")
    with pytest.raises(StudyConfigError) as info:
        load_config(twice)
    last = len(text.splitlines()) + 1
    assert str(info.value) == (f"methods: repeated key (lines {first} and {last}); "
                               "accepted: each key once per mapping")
    nested = tmp_path / "nested.yaml"
    nested.write_text("space:\n  pr: [0.5]\n  pr: [0.9]\n")
    with pytest.raises(StudyConfigError, match=r"^pr: repeated key \(lines 2 and 3\)"):
        load_config(nested)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: t\n\xff\xfe\x00junk")
    with pytest.raises(StudyConfigError, match=r"not UTF-8 text \(byte 0xff at offset 8\)"):
        load_config(binary)


def test_the_objective_is_never_chosen_on_the_test_set_when_a_validation_split_exists(tmp_path):
    """#24: "best" defaults to the test accuracy at the best-validation epoch; the saved config names it."""
    with_val = load_config(cfg_with(data__val_fraction=0.1), storage=str(tmp_path))
    assert with_val.objective.metric == "test_acc_at_best_val"
    assert "metric: test_acc_at_best_val" in with_val.to_yaml()
    assert load_config(cfg_with(), storage=str(tmp_path)).objective.metric == "best_acc"  # nothing else
    explicit = load_config(cfg_with(data__val_fraction=0.1, objective={"metric": "best_acc"}),
                           storage=str(tmp_path))
    assert explicit.objective.metric == "best_acc"  # what a user names stays


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(cfg_with(), storage=str(tmp_path / "s"), tracking_uri=None,
                      set={"space.seeds": [3], "finetune.epochs": 4})
    assert cfg.sampler == "grid" and cfg.objective.metric == "best_acc" and cfg.objective.mode == "max"
    assert cfg.early_stopping.asha is False and cfg.resources.gpu == "auto" and cfg.lockstep == "auto"
    assert cfg.space.seeds == [3] and cfg.finetune.axes() == {"epochs": [4]}
    assert cfg.study_dir() == (tmp_path / "s" / "t").absolute()
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 's' / 't' / 'mlflow.db'}"
    assert cfg.experiment() == "t"
    cfg2 = load_config(cfg_with(), address="auto", tracking_uri="http://127.0.0.1:5000", experiment="e")
    assert cfg2.ray.address == "auto" and cfg2.tracking_uri() == "http://127.0.0.1:5000"
    assert cfg2.experiment() == "e"
    with pytest.raises(StudyConfigError, match="num_trials"):
        load_config(cfg_with(sampler="tpe"), num_trials=-1)
    # a scalar for a dimension is a one-level list; the saved YAML reads back the same config
    assert load_config(cfg_with(finetune__lr=0.01)).finetune.lr == [0.01]
    with_label = cfg_with(methods=["l1", {"name": "tpp", "label": "tpp-lw10", "lw_opp": 10.0}])
    assert load_config(yaml.safe_load(load_config(with_label).to_yaml())) == load_config(with_label)


def test_growth_not_required_without_penalty_methods():
    cfg = load_config(cfg_with(methods=["l1", "orthp"], space__growth=...))
    assert cfg.space.growth is None
    assert all(p.growth is None for p in points(cfg))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_are_balanced(path, tmp_path):
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
    if cfg.is_design:
        check_balanced(cfg)


def check_balanced(cfg) -> None:
    """Every method sees the same PRs and seeds (and growth levels among penalty methods), every prune
    point the same members: method differences are paired comparisons."""
    pts = points(cfg)
    by_method = {}
    for p in pts:
        by_method.setdefault(p.method, []).append(p)
    prs_seeds = {m: Counter((p.pr, p.seed) for p in ps) for m, ps in by_method.items()}
    assert all(set(c) == set(next(iter(prs_seeds.values()))) for c in prs_seeds.values()), prs_seeds
    penalty = [ps for ps in by_method.values() if ps[0].growth is not None]
    assert len({frozenset(Counter((p.pr, p.growth, p.seed) for p in ps)) for ps in penalty}) <= 1
    p = plan(cfg, slots=2)
    runs = Counter(u.points[0] for u in p.units if u.kind == "finetune" for _ in u.members)
    assert set(runs.values()) == {len(p.members)} and len(runs) == len(pts)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_small_qmc_designs_cross_methods_with_seeds_and_prs(n):
    """A Sobol design once gave every TPP trial seed 0 and every L1 trial seed 1: now it spreads only
    the ranged prune dimensions and crosses methods and seeds with every point."""
    cfg = load_config(cfg_with(sampler="qmc", num_trials=n, space__pr={"low": 0.3, "high": 0.9}))
    check_balanced(cfg)
    pts = points(cfg)
    assert len({p.pr for p in pts}) == n and all(0.3 <= p.pr <= 0.9 for p in pts)
    assert Counter(p.method for p in pts) == {"l1": 2 * n, "tpp": 2 * 2 * n}
    assert points(cfg) == pts  # reproducible from sampler_seed


def test_paper_config_is_table_1():
    cfg = load_config(CONFIGS / "paper_resnet56_cifar10.yaml", set={"data.root": str(CONFIGS)})
    assert cfg.sampler == "grid" and size(cfg) == (2 * 5 * 3, 2)
    assert sorted(levels_of(cfg.space.pr)) == [0.3, 0.5, 0.7, 0.9, 0.95]
    assert sorted(cfg.finetune.lr) == [1e-3, 1e-2]
    assert cfg.resources.gpu == 0.25
    rc = run_config(cfg, points(cfg)[-1], members(cfg)[0])
    assert (rc.batch_size, rc.reg_batch_size, rc.growth, rc.update_reg_interval, rc.stabilize_reg_interval,
            rc.epochs) == (128, 128, 1e-4, 10, 10000, 120)
    assert rc.milestones == (0.5, 0.75)  # drops at epochs 60 and 90 of 120


def levels_of(values):
    from study.config import levels

    return levels(values)


def test_quick_config_is_the_demo():
    cfg = load_config(CONFIGS / "quick.yaml")
    assert (cfg.data.name, cfg.model.name, cfg.sampler) == ("digits", "mlp7_linear", "grid")
    assert {m.name for m in cfg.methods} == {"l1", "tpp"} and len(cfg.space.seeds) >= 3
    lrs = levels_of(cfg.finetune.lr)
    assert lrs[0] <= 1e-4 and lrs[-1] >= 1e-1 and len(lrs) >= 7


# ---------------------------------------------------------------------------------------------- design
def test_ladder_is_log_spaced_inclusive():
    cfg = load_config(cfg_with(finetune__lr={"low": 1e-4, "high": 1e-1, "per_decade": 3}))
    lrs = [m["lr"] for m in members(cfg)]
    assert len(lrs) == 10 and lrs[0] == 1e-4 and lrs[3] == 1e-3 and lrs[-1] == 0.1
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4) == pytest.approx(10 ** (1 / 3), rel=1e-4)


def test_grid_crosses_levels_with_conditional_growth_and_the_members():
    cfg = load_config(cfg_with(finetune__lr=[1e-3, 1e-2]))
    pts = points(cfg)
    # l1: 3 pr x 2 seeds; tpp: x 2 growth levels
    assert len(pts) == 6 + 12 and len(set(pts)) == len(pts) and size(cfg) == (len(pts), 2)
    assert {p.growth for p in pts if p.method == "l1"} == {None}
    assert Counter(p.growth for p in pts if p.method == "tpp") == {1e-3: 6, 1e-2: 6}
    check_balanced(cfg)


def test_recipe_axes_cross_with_warmup_only_where_it_applies():
    cfg = load_config(cfg_with(finetune__lr=[1e-3, 1e-2], finetune__schedule=["step", "cosine"],
                               finetune__warmup_epochs=[0, 1], finetune__epochs=[2, 4]))
    ms = members(cfg)
    # step ignores warmup: 2 lr x 2 epochs x (step x 1 warmup + cosine x 2 warmups)
    assert len(ms) == 2 * 2 * 3 and len({tuple(sorted(m.items())) for m in ms}) == len(ms)
    assert all(m["warmup_epochs"] == 0 for m in ms if m["schedule"] == "step")
    rc = run_config(cfg, points(cfg)[0], ms[-1])
    assert (rc.schedule, rc.warmup_epochs, rc.epochs) == ("cosine", 1, 4)


def test_plan_puts_prune_stages_in_lockstep_units_and_splits_members():
    cfg = load_config(cfg_with(finetune__lr=[1e-3, 1e-2, 3e-2]))
    p = plan(cfg, slots=2)
    prune = [u for u in p.units if u.kind == "prune"]
    tpp_points = {i for i, pt in enumerate(p.points) if pt.method == "tpp"}
    assert len(prune) == 2 and sorted(i for u in prune for i in u.points) == sorted(tpp_points)
    assert p.units[:2] == prune and p.num_runs == len(p.points) * 3
    alone = plan(load_config(cfg_with(finetune__lr=[1e-3, 1e-2, 3e-2], lockstep=False)), slots=2)
    assert [u.kind for u in alone.units] == ["finetune"] * len(alone.points)  # each trial prunes its own
    split = plan(load_config(cfg_with(finetune__lr=[1e-3, 1e-2, 3e-2], lockstep=False,
                                      finetune__per_trial=2)), slots=2)
    assert {len(u.points) for u in split.units if u.kind == "prune"} == {1}  # shared by two trials
    assert Counter(len(u.members) for u in split.units if u.kind == "finetune") == {2: 18, 1: 18}


def test_define_by_run_for_adaptive_samplers():
    import optuna

    cfg = load_config(cfg_with(sampler="tpe", num_trials=10, finetune__lr={"low": 1e-4, "high": 1e-1}))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True))
    for _ in range(10):
        t = study.ask()
        out = DefineByRun(cfg)(t)
        assert ("growth" in t.params) == (out["method"] == "tpp") == (out["growth"] is not None)
        assert 1e-4 <= out["member"]["lr"] <= 1e-1 and out["pr"] in (0.5, 0.8, 0.9) and out["seed"] in (0, 1)
        study.tell(t, out["member"]["lr"])


def test_run_config_names_and_params():
    cfg = load_config(cfg_with(fixed={"reg_batch_size": 32}, finetune__batch_size=16))
    tpp_pt = next(p for p in points(cfg) if p.method == "tpp" and p.pr == 0.9 and p.growth == 1e-3)
    l1_pt = next(p for p in points(cfg) if p.method == "l1" and p.seed == 1)
    member = {"lr": 0.0032}
    assert run_name(tpp_pt, run_config(cfg, tpp_pt, member)) == "lr=3.2e-3 tpp pr=0.9 g=1e-3 s0"
    rc = run_config(cfg, l1_pt, {"lr": 0.1, "schedule": "cosine"})
    assert run_name(l1_pt, rc, ["schedule"]) == "lr=1e-1 l1 pr=0.5 s1 cosine"
    rc = run_config(cfg, tpp_pt, member)
    assert (rc.method, rc.pr, rc.lr, rc.growth, rc.seed, rc.epochs, rc.batch_size, rc.reg_batch_size,
            rc.dense_epochs) == ("tpp", 0.9, 0.0032, 1e-3, 0, 2, 16, 32, 2)
    params = logged_params(l1_pt, run_config(cfg, l1_pt, member))
    assert "growth" not in params and params["has_penalty"] == "0" and params["method_label"] == "l1"
    assert params["log10_lr"] == "-2.4949" and params["model_kwargs"].startswith("{")
    assert set(params) >= {"model", "data", "method", "pr", "lr", "seed", "epochs", "batch_size"}
    assert logged_params(tpp_pt, rc)["growth"] == "0.001"
    # in a study: the fields that vary between its members, and the whole config as one param
    keys = member_param_keys(cfg)
    assert keys == {"method", "pr", "growth", "seed", "lr"}  # one recipe: nothing else varies
    short = logged_params(tpp_pt, rc, keys)
    assert set(short) == {*keys, "method_label", "has_penalty", "log10_lr", "run_config"}
    assert json.loads(short["run_config"]) == json.loads(json.dumps(rc.to_dict()))
    assert {k: v for k, v in params.items() if k in short} == {
        k: v for k, v in logged_params(l1_pt, run_config(cfg, l1_pt, member), keys).items() if k in params}
    cross = load_config(cfg_with(finetune__schedule=["step", "cosine"], methods=[
        "l1", {"name": "tpp", "label": "tpp-fpgm", "criterion": "fpgm"}]))
    assert member_param_keys(cross) >= {"schedule", "criterion"}  # a recipe axis, a method's setting


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


def test_lockstep_accepts_true_false_auto_only(tmp_path):
    for value in (True, False, "auto"):
        assert load_config(cfg_with(lockstep=value)).lockstep == value
    with pytest.raises(StudyConfigError, match="lockstep"):
        load_config(cfg_with(lockstep="sometimes"))


# ------------------------------------------------------------------------------------ issue #27's holes
@pytest.mark.parametrize("change, path, fragment", [
    (dict(finetune__epochs=2.5), "finetune.epochs", "accepted: an integer"),
    (dict(finetune__epochs="abc"), "finetune.epochs", "accepted: an integer"),
    (dict(finetune__weight_decay=float("inf")), "finetune.weight_decay", "accepted: a finite number"),
    (dict(fixed={"reg_lr": float("nan")}), "fixed.reg_lr", "accepted: a finite number"),
])
def test_values_that_fail_only_after_training_started_are_refused_up_front(change, path, fragment):
    with pytest.raises(StudyConfigError) as e:
        load_config(cfg_with(**change))
    assert e.value.path == path and fragment in str(e.value) and "\n" not in str(e.value)


def test_yaml_that_would_exhaust_memory_or_is_not_text_is_refused_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"  # nine levels of "billion laughs": 10^9 values from 10 lines
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    bomb.write_text("\n".join(lines) + "\nname: t\n")
    with pytest.raises(StudyConfigError, match=r"YAML alias at line 2 \(\*name\)"):
        load_config(bomb)
    big = tmp_path / "big.yaml"
    big.write_text("name: t\n" + "# padding\n" * 40_000)
    with pytest.raises(StudyConfigError, match="accepted: a study config under 256 KB"):
        load_config(big)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: t\x00\n")
    with pytest.raises(StudyConfigError, match="holds a NUL byte at offset 7"):
        load_config(nul)


def test_read_only_commands_never_create_a_store(tmp_path, capsys):
    """A study whose mlflow.db was deleted: `status` says so in one line (exit 2) and creates nothing;
    `list` of a storage folder that does not exist is an error too."""
    import json as _json

    from study.cli import main

    folder = tmp_path / "studies" / "gone"
    folder.mkdir(parents=True)
    db = folder / "mlflow.db"
    (folder / "study.json").write_text(_json.dumps({"name": "gone", "tracking_uri": f"sqlite:///{db}",
                                                    "experiment_id": "1", "parent_run_id": "abc",
                                                    "num_runs": 4}))
    (folder / "study_config.yaml").write_text(yaml.safe_dump(cfg_with(name="gone")))
    assert main(["status", "gone", "--storage", str(tmp_path / "studies")]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow database at {db}" in err and err.count("\n") == 1
    assert not db.exists()
    assert main(["list", "--storage", str(tmp_path / "nowhere")]) == 2
    assert "--storage: " in capsys.readouterr().err


def test_plan_takes_a_study_by_name_or_folder_as_well_as_a_config(tmp_path, capsys):
    from study.cli import main

    folder = tmp_path / "studies" / "saved"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"name": "saved"}))
    (folder / "study_config.yaml").write_text(yaml.safe_dump(cfg_with(name="saved")))
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(cfg_with(name="saved")))
    outs = []
    for source in ("saved", str(folder), str(tmp_path / "saved.yaml")):
        assert main(["plan", source, "--storage", str(tmp_path / "studies")]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()  # the saved config is the study's plan
    assert main(["plan", "nosuch", "--storage", str(tmp_path / "studies")]) == 2
    err = capsys.readouterr().err
    assert "config: nosuch is neither a config file nor a study" in err and err.count("\n") == 1


def test_set_changes_one_key_for_plan_and_run_and_bad_items_are_one_line(tmp_path, capsys):
    """`--set KEY=VALUE` (a YAML value) works on plan and run as on extend; a malformed item or a value
    the config refuses is one line naming it, and nothing is created."""
    from study.cli import main

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg_with(name="s")))
    assert main(["plan", str(tmp_path / "s.yaml"), "--set", "space.seeds=[0, 1, 2]"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:4]]
    assert {r[3] for r in rows} == {"3"}  # three seeds per group
    storage = tmp_path / "studies"
    for item, says in (("space.seeds", "--set: got 'space.seeds'; accepted: KEY=VALUE"),
                       ("space.seeds=[0, 0]", "space.seeds: duplicate seeds in [0, 0]")):
        assert main(["run", str(tmp_path / "s.yaml"), "--storage", str(storage), "--set", item]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert not storage.exists()
