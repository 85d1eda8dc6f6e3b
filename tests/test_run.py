"""The run pipeline: schedules, config stages and prune keys, validation split, members, resume,
divergence, CLI."""

import dataclasses
import json
import math
import os
import re
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
from tpp.config import PRUNE_INPUT_STAGES, RunConfig, is_penalty_only, stage_of
from tpp.results import DenseModel
from tpp.run import (
    finetune_stage,
    load_run_data,
    prune_key,
    prune_stage,
    run_pipeline,
    run_splits,
    train_dense,
)
from tpp.schedules import DenseSchedule, PenaltySchedule, finetune_lr

# A tiny but real setup: the bundled digits, a 4-layer MLP, a few epochs.
TINY = dict(model="mlp", model_kwargs={"depth": 4, "width": 32, "activation": "relu"}, data="digits",
            batch_size=64, reg_batch_size=64, dense_batch_size=64, epochs=4, dense_epochs=3, dense_lr=0.05,
            growth=0.05, update_reg_interval=1, stabilize_reg_interval=10, lr=0.01, jsv_samples=8,
            device="cpu")


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


def _torch_schedule(make, epochs: int, lr: float = 0.1) -> list[float]:
    """The LR of each epoch of a torch.optim.lr_scheduler stepped once per epoch (the reference)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, out = make(opt), []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("epochs", [7, 30])
def test_schedules_equal_torchs_own_schedulers(epochs):
    S = torch.optim.lr_scheduler
    cases = {
        "step": (S.MultiStepLR, {"milestones": [round(0.5 * epochs), round(0.75 * epochs)], "gamma": 0.1}),
        "cosine": (S.CosineAnnealingLR, {"T_max": epochs, "eta_min": 0.0}),
        "linear": (S.LinearLR, {"start_factor": 1.0, "end_factor": 0.0, "total_iters": epochs}),
        "constant": (S.ConstantLR, {"factor": 1.0, "total_iters": 1}),
    }
    for name, (cls, kw) in cases.items():
        ref = _torch_schedule(lambda opt, cls=cls, kw=kw: cls(opt, **kw), epochs)
        mine = [finetune_lr(name, 0.1, e, epochs, (0.5, 0.75)) for e in range(epochs)]
        assert mine == pytest.approx(ref, rel=1e-9, abs=1e-12), name
    for warmup in (2, 3):  # OneCycleLR defines no warmup of one epoch (it divides by zero)
        ref = [torch_onecycle(e, epochs, warmup) for e in range(epochs)]
        mine = [finetune_lr("onecycle", 0.1, e, epochs, (), warmup) for e in range(epochs)]
        assert mine == pytest.approx(ref, rel=1e-9), warmup


def torch_onecycle(epoch: int, epochs: int, warmup: int, lr: float = 0.1) -> float:
    """OneCycleLR(total_steps=epochs, pct_start=warmup/epochs) after `epoch` steps, read off torch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs, pct_start=warmup / epochs)
    for _ in range(epoch):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_warmup_and_rewind_follow_their_formulas():
    epochs, warmup, base = 10, 3, 0.2
    for e in range(warmup):  # linear ramp to the base LR
        ramp = base * (e + 1) / (warmup + 1)
        assert finetune_lr("cosine", base, e, epochs, (), warmup) == pytest.approx(ramp)
        assert finetune_lr("linear", base, e, epochs, (), warmup) == pytest.approx(ramp)
    for e in range(warmup, epochs):  # then the decay over the remaining epochs
        t = (e - warmup) / (epochs - warmup)
        assert finetune_lr("cosine", base, e, epochs, (), warmup) == pytest.approx(
            base * 0.5 * (1 + math.cos(math.pi * t)))
        assert finetune_lr("linear", base, e, epochs, (), warmup) == pytest.approx(base * (1 - t))
    dense = DenseSchedule("cosine", 0.05, 30)
    own = [dense.lr_at(t) for t in range(30)]
    # rewinding 10 epochs replays the dense schedule's last 10 epochs, scaled to start at the base LR
    start = own[20]
    assert [finetune_lr("rewind", start, e, 10, dense=dense) for e in range(10)] == pytest.approx(own[20:])
    assert [finetune_lr("rewind", 1.0, e, 10, dense=dense) for e in range(10)] == pytest.approx(
        [v / start for v in own[20:]])
    with pytest.raises(ValueError, match="records none"):
        finetune_lr("rewind", 0.1, 0, 10)


@pytest.mark.parametrize("field,value,accepted", [
    ("method", "magnitude", "l1, tpp"), ("pr", 1.0, "[0, 1)"), ("lr", 0.0, "> 0"), ("growth", -1e-3, "> 0"),
    ("schedule", "exponential", "step, cosine"), ("epochs", 0, ">= 1"), ("val_fraction", 1.0, "[0, 1)"),
    ("warmup_epochs", 2, "warmup applies to"),
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


def test_to_dict_is_dataclasses_asdict_with_independent_containers():
    import dataclasses

    cfg = RunConfig(model="mlp", model_kwargs={"depth": 3, "widths": [8, 4]}, data_kwargs={"n_train": 64},
                    prune_layers={"fc.*": 0.5}, milestones=(0.5, 0.75))
    ref = {**dataclasses.asdict(cfg), "milestones": [0.5, 0.75]}
    got = cfg.to_dict()
    assert got == ref and [type(v) for v in got.values()] == [type(v) for v in ref.values()]
    got["model_kwargs"]["widths"].append(2)  # a copy: the config is unchanged
    assert cfg.model_kwargs == {"depth": 3, "widths": [8, 4]}


# Another valid value for every RunConfig field (with the companions it needs to stay valid).
ALTERNATIVES = {
    "model": {"model": "mlp"}, "model_kwargs": {"model_kwargs": {"depth": 3}}, "data": {"data": "synthetic"},
    "data_kwargs": {"data_kwargs": {"subset": 100}}, "val_fraction": {"val_fraction": 0.1},
    "dense_epochs": {"dense_epochs": 2}, "dense_lr": {"dense_lr": 0.01},
    "dense_batch_size": {"dense_batch_size": 32},
    "dense_momentum": {"dense_momentum": 0.5}, "dense_weight_decay": {"dense_weight_decay": 0.0},
    "method": {"method": "greg"}, "pr": {"pr": 0.7}, "prune_layers": {"prune_layers": {"layers.0": 0.5}},
    "criterion": {"criterion": "l2"}, "scope": {"scope": "global"}, "coupling": {"coupling": "groups"},
    "criterion_samples": {"criterion_samples": 64},
    "method_params": {"method": "l1-kernorth", "method_params": {"lw": 0.5}},
    "seed": {"seed": 3}, "growth": {"growth": 0.01}, "update_reg_interval": {"update_reg_interval": 2},
    "reg_upper_limit": {"reg_upper_limit": 0.5}, "stabilize_reg_interval": {"stabilize_reg_interval": 3},
    "lw_opp": {"lw_opp": 10.0}, "reg_lr": {"reg_lr": 0.1}, "reg_batch_size": {"reg_batch_size": 32},
    "reg_momentum": {"reg_momentum": 0.0}, "reg_weight_decay": {"reg_weight_decay": 0.0},
    "bf16": {"bf16": True},
    "jsv_samples": {"jsv_samples": 4}, "lr": {"lr": 0.5}, "epochs": {"epochs": 99},
    "schedule": {"schedule": "cosine"}, "milestones": {"milestones": (0.3,)},
    "warmup_epochs": {"warmup_epochs": 2, "schedule": "cosine"}, "batch_size": {"batch_size": 32},
    "momentum": {"momentum": 0.0}, "weight_decay": {"weight_decay": 0.0}, "jsv_every": {"jsv_every": 2},
    "data_root": {"data_root": "/elsewhere"}, "device": {"device": "cuda"},
    "channels_last": {"channels_last": True},
    "eval_batch_size": {"eval_batch_size": 64}, "control": {"control": False},
    "reg_growth_epochs": {"reg_growth_epochs": 3.0}, "stabilize_reg_epochs": {"stabilize_reg_epochs": 1.0},
    "reg_mag_ratio_limit": {"reg_mag_ratio_limit": 1000.0},
}


@pytest.mark.parametrize("method", ["tpp", "l1"])
def test_prune_key_changes_with_exactly_the_prune_stage_inputs(tiny, method):
    """Walk every field: a model/data/dense/prune field changes the key (penalty knobs only for
    methods with a penalty), a finetune or I/O field does not, and a field without a stage fails."""
    _, _, dense = tiny
    base = RunConfig(method=method)
    key = prune_key(base, dense)
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert sorted(ALTERNATIVES) == sorted(names), "give the new RunConfig field an alternative value here"
    for name in names:
        if name == "method":
            continue
        changed = prune_key(base.replace(**ALTERNATIVES[name]), dense) != key
        expected = stage_of(name) in PRUNE_INPUT_STAGES and (method == "tpp" or not is_penalty_only(name))
        assert changed == expected, (name, stage_of(name))
    assert prune_key(base.replace(method="greg" if method == "tpp" else "orthp"), dense) != key
    # the dense model is named by its weights, not its path: one weight more or less changes the key
    bumped = {k: v.clone() for k, v in dense.state_dict.items()}
    first = next(iter(bumped))
    bumped[first].view(-1)[0] += 1e-3
    assert prune_key(base, DenseModel(dense.spec, bumped, dense.metrics)) != key
    assert prune_key(base, DenseModel(dense.spec, dict(dense.state_dict), {})) == key


def test_a_field_declared_without_a_stage_is_refused():
    with pytest.raises(KeyError, match="declares no stage"):
        stage_of("not_a_field")


def test_validation_split_is_held_out_balanced_and_the_same_for_every_seed(tiny):
    cfg, data, _ = tiny
    train, val = run_splits(cfg.replace(val_fraction=0.2), data)
    assert train.num_train + val.num_test == data.num_train and train.num_test == data.num_test
    counts = torch.bincount(val.test_labels(), minlength=10)
    assert val.num_test == round(0.2 * data.num_train) and int(counts.max() - counts.min()) <= 1  # balanced
    held = {tuple(row.flatten().tolist()) for x, _ in val.test_batches(512, "cpu") for row in x}
    epoch = train.train_batches(512, torch.Generator().manual_seed(0), "cpu")
    seen = {tuple(row.flatten().tolist()) for x, _ in epoch for row in x}
    assert not held & seen  # no held-out sample is trained on
    again, val2 = run_splits(cfg.replace(val_fraction=0.2, seed=7), data)
    assert torch.equal(val2.test_labels(), val.test_labels())


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
    out = run_pipeline([cfg.replace(method="l1", lr=1e4, epochs=3), cfg.replace(method="l1", epochs=3)],
                       dense=dense, data=data)
    diverged, fine = out.members
    assert diverged.status == "diverged" and fine.status == "completed"  # one member never spoils another
    assert diverged.metrics["epochs_run"] <= 3 and "best_acc" in diverged.metrics


def test_a_diverging_prune_stage_makes_every_member_diverged(tiny):
    cfg, data, dense = tiny
    bad = cfg.replace(reg_lr=1e6, lw_opp=1e6)
    out = run_pipeline([bad, bad.replace(lr=0.1)], dense=dense, data=data)
    assert out.pruned.diverged and [m.status for m in out.members] == ["diverged", "diverged"]
    assert all(m.metrics["best_acc"] == pytest.approx(10.0) for m in out.members)  # chance on 10 classes


def test_members_of_a_pipeline_equal_single_runs_and_must_share_the_prune_stage(tiny):
    cfg, data, dense = tiny
    cfg = cfg.replace(epochs=2, val_fraction=0.1)
    members = [cfg.replace(lr=lr) for lr in (0.003, 0.03)]
    members.append(cfg.replace(schedule="cosine", weight_decay=0.0))
    together = run_pipeline(members, dense=dense, data=data)
    for member, result in zip(members, together.members, strict=True):
        alone = run_pipeline(member, dense=dense, data=data).members[0]
        assert [h["test_acc"] for h in result.history] == [h["test_acc"] for h in alone.history]
        assert result.metrics["best_acc"] == alone.metrics["best_acc"]
        assert result.metrics["test_acc_at_best_val"] == alone.metrics["test_acc_at_best_val"]
        m = result.metrics
        assert m["iters_total"] == m["iters_prune"] + m["iters_finetune"]
    with pytest.raises(ValueError, match=r"members\[1\]: .* differs in pr"):
        run_pipeline([cfg, cfg.replace(pr=0.7)], dense=dense, data=data)


def test_same_seed_same_result_on_cpu(tiny):
    cfg, data, dense = tiny
    a = run_pipeline(cfg.replace(epochs=2), dense=dense, data=data).members[0]
    b = run_pipeline(cfg.replace(epochs=2), dense=dense, data=data).members[0]
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
              "--device", "cpu"]
    run_cli("pretrain", *common, "--dense-epochs", "2", "--dense-batch-size", "128", "--out", str(dense),
            "--quiet")
    proc = run_cli("run", *common, "--method", "tpp", "--pr", "0.5", "--lr", "1e-2", "--growth", "0.2",
                   "--update-reg-interval", "1", "--stabilize-reg-interval", "2", "--epochs", "2",
                   "--seed", "0",
                   "--dense", str(dense), "--json")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["config"]["method"] == "tpp"
    assert 0 <= out["best_acc"] <= 100 and out["speedup"] > 1
    assert "[finetune] epoch   1/2" in proc.stderr
    # off a terminal the prune stage prints its first line, then one per PRUNE_LINE_EVERY_S, and its last
    prune = [line for line in proc.stderr.splitlines() if line.startswith("[   prune] iteration")]
    total = prune[-1].split("/")[1].split()[0]
    assert len(prune) <= 3 and f"iteration {total:>6}/{total}" in prune[-1], prune
    # several LRs: members of one pruned model, one JSON line each, in the order given
    proc = run_cli("run", *common, "--method", "l1", "--pr", "0.5", "--lr", "1e-2", "3e-2", "--epochs", "1",
                   "--dense", str(dense), "--json")
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [o["config"]["lr"] for o in lines] == [1e-2, 3e-2]
    # each member's lines name its LR; epochs count from 1 in the lines and in the metrics alike
    assert "[finetune lr=0.01] epoch   1/1" in proc.stderr and "[finetune lr=0.03] done: " in proc.stderr
    assert [o["best_epoch"] for o in lines] == [1, 1] and "at epoch 1" in proc.stderr
    assert lines[0]["acc_after_removal"] == lines[1]["acc_after_removal"]  # one prune stage


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


def test_tpp_list_aligns_every_table_and_lists_the_criteria(capsys):
    from tpp.cli import main
    from tpp.pruning.criteria import CRITERIA, register_criterion

    register_criterion("a-plug-in-criterion-with-a-long-name", description="the test's")(lambda inputs: {})
    try:
        assert main(["list"]) == 0
    finally:
        CRITERIA.pop("a-plug-in-criterion-with-a-long-name")
    out = capsys.readouterr().out
    tables = out.split("\ncriteria")
    assert len(tables) == 2 and "taylor*" in tables[1]
    assert "a-plug-in-criterion-with-a-long-name  the test's" in out
    for table in (tables[0].split("methods:\n")[1], tables[1].split(":\n", 1)[1]):
        rows = [line for line in table.splitlines() if line.startswith("  ")]
        starts = {re.match(r"  \S+\s+", line).end() for line in rows}  # where the description begins
        assert len(rows) >= 6 and len(starts) == 1, rows


def test_tpp_run_help_groups_the_flags_by_stage(capsys):
    from tpp.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [t.split(" (")[0] for t in titles[-6:]] == ["model", "data", "dense model", "prune stage",
                                                      "finetuning", "run"], titles
    prune = out.split("\nprune stage (")[1].split("\nfinetuning:")[0]
    assert "--growth" in prune and "--epochs" not in prune and "--method" in prune


def test_run_command_is_the_inverse_of_the_parser():
    """Every member of the shipped configs, as `tpp run` flags, parses back into its exact RunConfig
    (fields left at None defaults and the JSON, tuple and boolean flags included)."""
    from pathlib import Path

    from study import design
    from study.config import StudyConfigError
    from study.loading import load_config
    from tpp.cli import _configs_from_args, build_parser, run_command

    configs = sorted((Path(__file__).parents[1] / "study" / "configs").glob("*.yaml"))
    checked = 0
    for path in configs:
        try:
            cfg = load_config(path)
        except StudyConfigError:  # a config whose data set is not on this machine (CIFAR, ImageNet)
            continue
        if not cfg.is_design:
            continue
        for point in design.points(cfg)[:6]:
            for member in design.members(cfg)[:4]:
                rc = design.run_config(cfg, point, member)
                argv = run_command(rc, "/x/dense.pt")
                args = build_parser().parse_args(argv[1:])
                assert _configs_from_args(args, multi=("lr",)) == [rc], (path.name, argv)
                assert args.dense == "/x/dense.pt" and args.json
                checked += 1
    assert checked > 100
    rc = RunConfig(reg_growth_epochs=2.5, stabilize_reg_epochs=1.0, prune_layers={"fc.*": 0.5}, control=False)
    args = build_parser().parse_args(run_command(rc)[1:])  # fields whose default is None take their type
    assert _configs_from_args(args, multi=("lr",)) == [rc]
