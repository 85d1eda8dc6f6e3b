"""The method plug-in interface: a user method registered from this module (selection, a penalty stage
in the library's loop or its own loop, a post-removal step, parameters) runs end to end through
`tpp run`; a plug-in found through the `tpp_study.methods` entry point group (an installed
distribution on sys.path) too; the built-ins on the same interface (Table 1's KernOrth, OrthConv and
approximate-isometry rows included); criteria and scopes through a run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tpp.cli
from tpp.config import RunConfig
from tpp.methods import (
    METHODS,
    Method,
    Param,
    PenaltyHooks,
    StageResult,
    discover_methods,
    get_method,
    list_methods,
    penalty_stage,
    register_method,
    registry,
)
from tpp.pruning import num_pruned
from tpp.pruning.penalties import isometry_gap
from tpp.run import load_run_data, prune_key, run_pipeline, train_dense

TINY = dict(model="mlp", model_kwargs={"depth": 3, "width": 16, "activation": "relu"}, data="digits",
            batch_size=64, reg_batch_size=64, dense_batch_size=64, epochs=2, dense_epochs=2, growth=0.25,
            update_reg_interval=1, stabilize_reg_interval=2, jsv_samples=4, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    cfg = RunConfig(**TINY)
    data = load_run_data(cfg)
    return cfg, data, train_dense(cfg, data)


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations of a test go to a copy of the registry, dropped afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


# --------------------------------------------------------------------------------- a user method
CALLS: list[tuple] = []


class CountingHooks(PenaltyHooks):
    """A penalty stage in the library's loop that only records what the loop calls."""

    def __init__(self, ctx):
        self.shift = ctx.params["shift"]

    def loss(self, factor):
        CALLS.append(("loss", factor))

    def after_step(self, iteration):
        CALLS.append(("step", iteration))

    def finish(self):
        CALLS.append(("finish",))


def after(ctx):
    CALLS.append(("after_removal", sum(p.numel() for p in ctx.model.parameters())))


def prune_last_units(ctx):
    """Prune each group's last units (shifted by `shift`): a deliberately non-L1 rule."""
    masks = {}
    for root, group in ctx.groups.items():
        k = num_pruned(ctx.ratios[root], group.units)
        mask = torch.zeros(group.units, dtype=torch.bool)
        mask[group.units - k - ctx.params["shift"]: group.units - ctx.params["shift"]] = True
        masks[root] = mask
    return masks


def register_user_method():
    CALLS.clear()
    shift = Param(0, "units left unpruned at the end", minimum=0)
    register_method("test-last", description="prune the last units", stage=penalty_stage(CountingHooks),
                    after_removal=after, params={"shift": shift})(prune_last_units)


def test_a_user_method_runs_every_hook_in_order(tiny, own_registry):
    cfg, data, dense = tiny
    register_user_method()
    cfg = cfg.replace(method="test-last", method_params={"shift": 2}, pr=0.5)
    out = run_pipeline(cfg, dense=dense, data=data)
    assert out.members[0].status == "completed"
    # its selection was removed: the last 8 units but the final 2, in both hidden layers
    assert out.pruned.kept == {f"layers.{i}": list(range(6)) + [14, 15] for i in range(2)}
    total = math_total(cfg)
    steps = [c for c in CALLS if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, total + 1))
    assert CALLS.index(("finish",)) > CALLS.index(steps[-1]) and CALLS[-1][0] == "after_removal"
    assert CALLS[-1][1] == out.pruned.metrics["params"]
    assert get_method("test-last").regularize and "test-last" in list_methods() and "test-last" in METHODS


def math_total(cfg: RunConfig) -> int:
    return round(cfg.reg_upper_limit / cfg.growth) * cfg.update_reg_interval + cfg.stabilize_reg_interval


def test_a_user_method_through_tpp_run(tiny, own_registry, tmp_path, capsys):
    _, _, dense = tiny
    register_user_method()
    from tpp.checkpoint import save_dense

    save_dense(tmp_path / "dense.pt", dense)
    args = ["run", "--model", "mlp", "--model-kwargs", json.dumps(TINY["model_kwargs"]), "--data", "digits",
            "--device", "cpu", "--method", "test-last", "--method-params", '{"shift": 1}', "--growth", "0.5",
            "--update-reg-interval", "1", "--stabilize-reg-interval", "1", "--epochs", "1", "--dense",
            str(tmp_path / "dense.pt"), "--json", "--quiet"]
    assert tpp.cli.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["config"]["method_params"] == {"shift": 1}
    assert tpp.cli.main([*args[:-4], "--method-params", '{"shift": -1}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method_params: got shift=-1; accepted: an integer >= 0" in err


def test_own_loop_stages_selection_order_and_divergence(tiny, own_registry):
    cfg, data, dense = tiny

    def boost_first_filter(ctx):  # a regularisation "stage" of its own: make filter 0 the largest
        with torch.no_grad():
            ctx.model.layers[0].weight[0] *= 100
        return StageResult(7)

    register_method(Method("test-before", "boost, then select", stage=boost_first_filter,
                           stage_before_selection=True))
    register_method(Method("test-diverges", "a stage whose loss blew up",
                           stage=lambda ctx: StageResult(3, "it blew up")))
    out = run_pipeline(cfg.replace(method="test-before", pr=0.9), dense=dense, data=data)
    assert out.pruned.metrics["iters_prune"] == 7 and 0 in out.pruned.kept["layers.0"]  # selected afterwards
    out = run_pipeline(cfg.replace(method="test-diverges"), dense=dense, data=data)
    assert out.pruned.diverged == "it blew up" and out.members[0].status == "diverged"


def test_bad_methods_and_parameters_are_one_line_errors(tiny, own_registry):
    cfg, data, dense = tiny
    with pytest.raises(ValueError, match="'tpp' is a built-in method"):
        register_method(Method("tpp", "mine"))
    register_method("test-empties", description="prunes everything")(
        lambda ctx: {root: torch.ones(g.units, dtype=torch.bool) for root, g in ctx.groups.items()})
    with pytest.raises(ValueError, match=r"'test-empties': its selection must give 'layers.0' a bool mask"):
        run_pipeline(cfg.replace(method="test-empties"), dense=dense, data=data)
    for params, message in [({"lw": "a lot"}, r"^method_params: got lw='a lot'; accepted: a number >= 0"),
                            ({"iters": 5}, r"^method_params: got 'iters', which method 'l1-kernorth'"),
                            ({"lw": True}, r"^method_params: got lw=True")]:
        with pytest.raises(ValueError, match=message):
            RunConfig(method="l1-kernorth", method_params=params)
    assert get_method("ai").resolve_params({"iters": 5}) == {"iters": 5, "lr": 1e-3}


def test_method_params_are_part_of_the_prune_key(tiny):
    _, _, dense = tiny
    a = RunConfig(method="ai", method_params={"iters": 5})
    assert prune_key(a, dense) != prune_key(a.replace(method_params={"iters": 6}), dense)
    assert a.to_dict()["method_params"] == {"iters": 5}  # logged with the config


# --------------------------------------------------------------------------------- entry points
PLUGIN = '''
import torch
from tpp.methods import Method, Param

def keep_first(ctx):
    """Prune all but the first `keep` units of every group."""
    masks = {}
    for root, group in ctx.groups.items():
        mask = torch.ones(group.units, dtype=torch.bool)
        mask[: ctx.params["keep"]] = False
        masks[root] = mask
    return masks

METHOD = Method("ep-keep-first", "keeps the first units", select=keep_first,
                params={"keep": Param(3, "units kept per group", minimum=1)})
'''


@pytest.fixture
def plugin_dir(tmp_path):
    """An installed distribution on a sys.path entry, declaring one `tpp_study.methods` entry point."""
    (tmp_path / "tpp_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "tpp_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tpp-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tpp_study.methods]\nkeep-first = tpp_test_plugin:METHOD\n")
    return tmp_path


def test_an_entry_point_plugin_is_discovered(plugin_dir, monkeypatch, own_registry):
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert "keep-first" in discover_methods()
    assert get_method("ep-keep-first").params["keep"].default == 3


def test_an_entry_point_plugin_runs_through_tpp_run_in_a_fresh_process(plugin_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "tpp.cli", "run", "--model", "mlp", "--model-kwargs",
            '{"depth": 3, "width": 8}', "--data", "digits", "--device", "cpu", "--dense-epochs", "1",
            "--epochs", "1", "--method", "ep-keep-first", "--method-params", '{"keep": 2}',
            "--save-pruned", str(tmp_path / "p.pt"), "--json", "--quiet"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["config"]["method"] == "ep-keep-first"
    from tpp.checkpoint import load_pruned

    assert load_pruned(tmp_path / "p.pt").kept == {"layers.0": [0, 1], "layers.1": [0, 1]}
    (plugin_dir / "tpp_test_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[tpp_study.methods]\nbroken = tpp_test_plugin:NOT_THERE\n")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "method: got 'ep-keep-first'; accepted: l1, tpp" in proc.stderr
    assert "the plug-in 'broken' of entry point group tpp_study.methods failed to load " \
           "(tpp_test_plugin:NOT_THERE: AttributeError" in proc.stderr


# --------------------------------------------------------------------------------- built-ins
def test_the_builtins_are_on_the_same_interface():
    names = set(list_methods())
    assert {"l1", "tpp", "greg", "tpp-nobn", "tpp-korth", "orthp", "ai", "scratch", "l1-kernorth",
            "l1-orthconv", "kernorth-l1", "orthconv-l1"} <= names
    assert all(isinstance(METHODS[n], Method) for n in names)
    regularizing = {n for n in names if get_method(n).regularize}
    assert {"tpp", "greg", "tpp-nobn", "tpp-korth", "kernorth-l1", "orthconv-l1"} <= regularizing
    assert not regularizing & {"l1", "orthp", "ai", "scratch", "l1-kernorth", "l1-orthconv"}
    assert get_method("kernorth-l1").stage_before_selection and get_method("l1-kernorth").finetune_penalty


def test_a_finetuning_penalty_of_weight_zero_is_plain_l1(tiny):
    cfg, data, dense = tiny
    cfg = cfg.replace(epochs=1)
    l1 = run_pipeline(cfg.replace(method="l1"), dense=dense, data=data).members[0]
    zero = run_pipeline(cfg.replace(method="l1-kernorth", method_params={"lw": 0.0}), dense=dense, data=data)
    assert [h["train_loss"] for h in zero.members[0].history] == [h["train_loss"] for h in l1.history]
    kern = run_pipeline(cfg.replace(method="l1-kernorth", method_params={"lw": 1.0}), dense=dense, data=data)
    assert kern.members[0].history[0]["train_loss"] > l1.history[0]["train_loss"] + 0.1  # the penalty is in


@pytest.mark.parametrize("method", ["kernorth-l1", "orthconv-l1"])
def test_orthogonality_before_l1_selection(tiny, method):
    cfg, data, dense = tiny
    out = run_pipeline(cfg.replace(method=method, method_params={"lw": 0.1}), dense=dense, data=data)
    assert out.members[0].status == "completed" and out.pruned.metrics["iters_prune"] == math_total(cfg)


def test_approximate_isometry_reinitialises_towards_isometry(tiny):
    cfg, data, dense = tiny
    l1 = run_pipeline(cfg.replace(method="l1", epochs=1), dense=dense, data=data).pruned.build()
    ai = run_pipeline(cfg.replace(method="ai", epochs=1, method_params={"iters": 100, "lr": 0.02}),
                      dense=dense, data=data).pruned.build()
    for a, b in zip(ai.layers, l1.layers, strict=True):
        assert isometry_gap(a.weight).item() < 0.1 * isometry_gap(b.weight).item()


# --------------------------------------------------------------------------------- criteria in runs
@pytest.mark.parametrize("criterion,scope", [("l2", "global"), ("taylor", "layer"), ("hessian", "global"),
                                             ("fpgm", "layer"), ("lamp", "global")])
def test_criteria_and_scopes_select_in_a_run(tiny, criterion, scope):
    cfg, data, dense = tiny
    cfg = cfg.replace(method="tpp", criterion=criterion, scope=scope, criterion_samples=64, epochs=1)
    out = run_pipeline(cfg, dense=dense, data=data)
    assert out.members[0].status == "completed"
    kept = out.pruned.kept
    assert sum(map(len, kept.values())) == 16 and all(kept.values())  # the per-layer total, no layer emptied


def test_data_driven_criteria_use_fixed_seeded_samples(tiny, own_registry):
    cfg, data, dense = tiny
    seen = []

    def record(ctx):
        batches = ctx.criterion_batches()
        seen.append((sum(len(y) for _, y in batches), torch.cat([x for x, _ in batches]).sum().item()))
        assert ctx.criterion_batches() is batches  # drawn once per stage
        from tpp.methods import select_by_criterion

        return select_by_criterion(ctx)

    register_method("test-record", description="records the criterion samples")(record)
    for seed in (0, 0, 1):
        run_pipeline(cfg.replace(method="test-record", criterion="taylor", criterion_samples=100, seed=seed,
                                 epochs=1), dense=dense, data=data)
    assert seen[0] == seen[1] and seen[0][0] == 100 and seen[2][1] != seen[0][1]


# --------------------------------------------------------------------------------- the shipped example
EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "custom_method")


def test_the_example_plugin_runs_and_declares_its_entry_point(monkeypatch, own_registry):
    import tomllib

    with open(os.path.join(EXAMPLE, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["tpp_study.methods"]
    assert eps == {"variance-lasso": "tpp_example_method"}
    monkeypatch.syspath_prepend(EXAMPLE)
    monkeypatch.delitem(sys.modules, "tpp_example_method", raising=False)
    import tpp_example_method  # noqa: F401  (registers "variance-lasso")

    cfg = RunConfig(model="resnet20", data="synthetic", method="variance-lasso", pr=0.5,
                    data_kwargs={"input_shape": [3, 8, 8], "n_train": 32, "n_test": 16}, batch_size=16,
                    reg_batch_size=16, dense_batch_size=16, dense_epochs=1, epochs=1, growth=0.5,
                    update_reg_interval=1, stabilize_reg_interval=1, criterion_samples=32, jsv_samples=2,
                    device="cpu", method_params={"lw": 0.1})
    out = run_pipeline(cfg)
    assert out.members[0].status == "completed" and out.pruned.metrics["iters_prune"] == 3
    assert all(len(kept) == 8 * 2**i for i, kept in enumerate(list(out.pruned.kept.values())[::3]))
