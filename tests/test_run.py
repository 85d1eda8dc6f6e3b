"""The run pipeline: schedules, config validation, prune-stage keys, resume, divergence, CLI."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tpp.checkpoint import (
    CheckpointError,
    load_dense,
    load_pruned,
    load_state,
    save_dense,
    save_pruned,
    save_state,
)
from tpp.config import RunConfig
from tpp.run import finetune_stage, load_run_data, prune_key, prune_stage, run_experiment, train_dense
from tpp.schedules import PenaltySchedule, finetune_lr

# A tiny but real setup: the bundled digits, a 4-layer MLP, a few epochs.
TINY = dict(model="mlp", model_kwargs={"depth": 4, "width": 32, "activation": "relu"}, data="digits",
            batch_size=64, epochs=4, dense_epochs=3, dense_lr=0.05, growth=0.05, update_reg_interval=1,
            stabilize_reg_interval=10, lr=0.01, jsv_samples=8, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    cfg = RunConfig(**TINY)
    data = load_run_data(cfg)
    return cfg, data, train_dense(cfg, data)


def test_penalty_schedule_matches_the_authors_accumulation_loop():
    growth, interval, limit, stabilize = 0.03, 4, 0.5, 7
    sched = PenaltySchedule(growth, interval, limit, stabilize)
    reg, factors, it = 0.0, [], 0
    # The authors' loop: every `interval` iterations add `growth`, capped at the limit; then stabilize.
    while True:
        if it > 0 and it % interval == 0 and reg < limit:
            reg = min(limit, reg + growth)
        factors.append(reg)
        it += 1
        if reg >= limit:
            break
    assert len(factors) == sched.growing_iters + 1
    assert [sched.factor(i) for i in range(len(factors))] == pytest.approx(factors)
    assert sched.total_iters == sched.growing_iters + stabilize
    assert sched.factor(sched.total_iters) == limit


def test_penalty_schedule_rounds_like_a_person_would():
    assert PenaltySchedule(1e-3, 1, 1.0, 0).steps_to_limit == 1000  # not 1001 from float error
    assert PenaltySchedule(1e-4, 10, 1.0, 10_000).total_iters == 110_000  # the authors' CIFAR setting
    zs = PenaltySchedule(0.5, 1, 1.0, 9).zeroing_iterations(3)
    assert zs == [2, 5, 8]


def test_step_schedule_is_the_papers_60_90_of_120():
    lrs = [finetune_lr("step", 0.01, e, 120, (0.5, 0.75)) for e in range(120)]
    assert lrs[0] == lrs[59] == 0.01
    assert lrs[60] == pytest.approx(1e-3) and lrs[89] == pytest.approx(1e-3)
    assert lrs[90] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    assert finetune_lr("cosine", 0.1, 0, 10, ()) == pytest.approx(0.1)
    assert finetune_lr("cosine", 0.1, 5, 10, ()) == pytest.approx(0.05)


@pytest.mark.parametrize("field,value,accepted", [
    ("method", "magnitude", "l1, tpp"), ("pr", 1.0, "[0, 1)"), ("lr", 0.0, "> 0"), ("growth", -1e-3, "> 0"),
    ("schedule", "linear", "step, cosine"), ("epochs", 0, ">= 1"),
])
def test_bad_config_names_the_field_and_what_it_accepts(field, value, accepted):
    with pytest.raises(ValueError) as e:
        RunConfig(**{field: value})
    assert str(e.value).startswith(f"{field}:") and accepted in str(e.value)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="^learning_rate: unknown"):
        RunConfig.from_dict({"learning_rate": 0.1})
    cfg = RunConfig(pr=0.7, milestones=(0.3,))
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_prune_key_depends_on_the_prune_stage_inputs_only(tiny):
    cfg, _, dense = tiny
    key = prune_key(cfg, dense)
    assert prune_key(cfg.replace(lr=0.5, epochs=99, schedule="cosine"), dense) == key
    for change in ({"pr": 0.6}, {"growth": 0.01}, {"seed": 1}, {"method": "greg"}):
        assert prune_key(cfg.replace(**change), dense) != key, change
    l1 = cfg.replace(method="l1")
    assert prune_key(l1.replace(growth=0.3), dense) == prune_key(l1, dense)  # growth means nothing to L1
    other = train_dense(cfg.replace(seed=5, dense_epochs=1))
    assert prune_key(cfg, other) != key


def test_tpp_prune_stage_zeroes_then_removes(tiny):
    cfg, data, dense = tiny
    events = []
    pruned = prune_stage(cfg.replace(pr=0.5), dense, data, events.append)
    widths = {name: len(idx) for name, idx in pruned.kept.items()}
    assert widths == {f"layers.{i}": 16 for i in range(3)}  # 32 -> 16 in every hidden layer
    assert pruned.metrics["params"] < pruned.metrics["params_dense"]
    assert pruned.metrics["speedup"] > 1.5
    prune_epochs = [e for e in events if e["event"] == "epoch" and e["stage"] == "prune"]
    assert prune_epochs and prune_epochs[-1]["reg"] == pytest.approx(cfg.reg_upper_limit)
    assert pruned.metrics["prune_iterations"] == math.ceil(1 / cfg.growth) + cfg.stabilize_reg_interval
    # The pruned model, rebuilt from its saved form, computes what the stage measured.
    model = pruned.build().eval()
    x = data.eval_inputs(8, torch.device("cpu"))
    assert model(x).shape == (8, 10)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny, tmp_path):
    cfg, data, dense = tiny
    cfg = cfg.replace(method="l1", epochs=4)
    pruned = prune_stage(cfg, dense, data)
    full = finetune_stage(cfg, pruned, data)
    states = []

    def stop_after_two(event):
        if event["event"] == "epoch" and "checkpoint" in event:
            states.append(event["checkpoint"])
            if event["epoch"] == 1:
                raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint

    with pytest.raises(KeyboardInterrupt):
        finetune_stage(cfg, pruned, data, stop_after_two)
    save_state(tmp_path / "state.pt", states[-1])
    resumed = finetune_stage(cfg, load_pruned_roundtrip(pruned, tmp_path), data,
                             resume_state=load_state(tmp_path / "state.pt"))
    assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in full.history]
    assert resumed.metrics["best_acc"] == full.metrics["best_acc"]
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoints_follow_the_epoch_period_and_the_minimum_interval(tiny):
    cfg, data, dense = tiny
    cfg = cfg.replace(method="l1", epochs=4)
    pruned = prune_stage(cfg, dense, data)

    def checkpointed(**kw) -> list[int]:
        events = []
        finetune_stage(cfg, pruned, data, events.append, **kw)
        return [e["epoch"] for e in events if e["event"] == "epoch" and "checkpoint" in e]

    assert checkpointed(checkpoint_every=1) == [0, 1, 2, 3]
    assert checkpointed(checkpoint_every=2) == [1, 3]
    assert checkpointed(checkpoint_every=0) == []
    # tiny epochs take milliseconds: an hour between checkpoints means none within the run
    assert checkpointed(checkpoint_every=1, checkpoint_min_interval_s=3600) == []


def load_pruned_roundtrip(pruned, tmp_path):
    save_pruned(tmp_path / "pruned.pt", pruned)
    return load_pruned(tmp_path / "pruned.pt")


def test_a_huge_lr_diverges_as_a_result_not_an_exception(tiny):
    cfg, data, dense = tiny
    result = run_experiment(cfg.replace(method="l1", lr=1e4, epochs=3), dense, data=data)
    assert result.status == "diverged"
    assert result.metrics["epochs_run"] <= 3 and "best_acc" in result.metrics


def test_same_seed_same_result_on_cpu(tiny):
    cfg, data, dense = tiny
    a = run_experiment(cfg.replace(epochs=2), dense, data=data)
    b = run_experiment(cfg.replace(epochs=2), dense, data=data)
    assert a.metrics["best_acc"] == b.metrics["best_acc"]
    assert a.metrics["jsv_after_removal_mean"] == b.metrics["jsv_after_removal_mean"]


def test_dense_checkpoint_roundtrip_and_errors(tiny, tmp_path):
    cfg, data, dense = tiny
    path = tmp_path / "dense.pt"
    save_dense(path, dense)
    again = load_dense(path, expected=dense.spec)
    assert again.spec == dense.spec and again.metrics == dense.metrics
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_dense(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_dense(tmp_path / "corrupt.pt")
    other = RunConfig(**{**TINY, "model_kwargs": {"depth": 3, "width": 8}})
    with pytest.raises(CheckpointError, match="needs mlp"):
        from tpp.run import model_spec
        load_dense(path, expected=model_spec(other, data))


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "tpp.cli", *args], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_pretrain_then_run_json(tmp_path):
    dense = tmp_path / "dense.pt"
    common = ["--model", "mlp", "--model-kwargs", '{"depth": 3, "width": 16}', "--data", "digits",
              "--device", "cpu", "--batch-size", "128"]
    run_cli("pretrain", *common, "--dense-epochs", "2", "--out", str(dense), "--quiet")
    proc = run_cli("run", *common, "--method", "tpp", "--pr", "0.5", "--lr", "1e-2", "--growth", "0.2",
                   "--update-reg-interval", "1", "--stabilize-reg-interval", "2", "--epochs", "2",
                   "--seed", "0",
                   "--dense", str(dense), "--json")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["config"]["method"] == "tpp"
    assert 0 <= out["best_acc"] <= 100 and out["speedup"] > 1
    assert "[finetune] epoch   1" in proc.stderr


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("run", "--method", "magnitude", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "method" in proc.stderr and "tpp" in proc.stderr
    proc = run_cli("run", "--dense", str(tmp_path / "nope.pt"), "--epochs", "1", check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_importing_tpp_makes_idle_openmp_threads_sleep_unless_the_user_chose():
    """Spin-waiting OpenMP threads slow torch many times over on a busy small machine (BENCHMARKS.md)."""
    code = "import os, tpp, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
