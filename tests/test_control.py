"""#25: the unpruned control, stage budgets in passes over the data, the overfit warning.

- The control is the prune stage's own loop with no penalty and no mask: it must equal a plain SGD run of
  the same settings, written here independently (bit-identical on the CPU).
- A schedule given in epochs equals the iteration schedule it converts to.
- The prune stage warns when it fits its training set (64 digits) and not when it cannot (the same digits
  randomly shifted by up to 2 pixels each epoch).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpp.config import RunConfig
from tpp.run import control_key, load_run_data, run_pipeline, run_splits, train_control, train_dense
from tpp.schedules import PenaltySchedule
from tpp.train import epoch_generator

BASE = dict(model="mlp7_linear", data="digits", device="cpu", dense_epochs=3, dense_batch_size=64,
            reg_batch_size=64, jsv_samples=8, method="tpp", pr=0.5, growth=0.05, update_reg_interval=1,
            stabilize_reg_interval=30, epochs=1, batch_size=64, seed=3, val_fraction=0.1)


def test_the_control_equals_a_plain_training_run_bit_for_bit():
    cfg = RunConfig(**BASE)
    data = load_run_data(cfg)
    dense = train_dense(cfg, data)
    iters = 57  # more than two epochs of the 1,294 training digits at batch 64 (21 per epoch)
    got = train_control(cfg, dense, data, iters)
    assert got["control_iterations"] == iters
    # the same by hand: torch's SGD, the prune stage's batch order, nothing else
    torch.manual_seed(cfg.seed)
    model = dense.build()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.reg_lr, momentum=cfg.reg_momentum,
                          weight_decay=cfg.reg_weight_decay)
    train, _ = run_splits(cfg, data)
    done, epoch = 0, 0
    model.train()
    while done < iters:
        for x, y in train.train_batches(cfg.reg_batch_size, epoch_generator(cfg.seed, "prune", epoch), "cpu"):
            if done == iters:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        epoch += 1
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data.test_batches(512, "cpu")])
        labels = torch.cat([y for _, y in data.test_batches(512, "cpu")])
    assert got["control_acc"] == 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)
    # and the control's JSV is the JSV of exactly that model
    from tpp.run import measure_jsv

    assert got["control_jsv_mean"] == measure_jsv(model, data, cfg, torch.device("cpu"))["mean"]


def test_every_member_logs_its_control_and_the_retained_ratio():
    cfg = RunConfig(**BASE)
    data = load_run_data(cfg)
    dense = train_dense(cfg, data)
    res = run_pipeline([cfg, cfg.replace(lr=1e-3)], dense=dense, data=data, lockstep=False)
    for r in res.members:
        m = r.metrics
        assert m["control_iterations"] == m["prune_iterations"] > 0
        assert m["jsv_retained"] == pytest.approx(m["jsv_after_removal_mean"] / m["control_jsv_mean"])
    # L1 has no stage: its control is the dense model itself (0 iterations)
    l1 = run_pipeline(cfg.replace(method="l1"), dense=dense, data=data).members[0].metrics
    assert l1["control_iterations"] == 0 and l1["control_acc"] == pytest.approx(dense.metrics["dense_acc"])
    # shared like a prune stage: the key ignores the method, the PR and the penalty, not the iterations
    other = cfg.replace(method="greg", pr=0.8, lw_opp=1.0)
    assert control_key(cfg, dense, 50) == control_key(other, dense, 50)
    assert control_key(cfg, dense, 50) != control_key(cfg, dense, 51)
    assert control_key(cfg, dense, 50) != control_key(cfg.replace(seed=4), dense, 50)
    off = run_pipeline(cfg.replace(control=False), dense=dense, data=data).members[0].metrics
    assert "control_acc" not in off and "jsv_retained" not in off


@pytest.mark.parametrize("interval, steps", [(1, 20), (10, 20), (7, 3)])
def test_a_schedule_in_epochs_equals_the_iteration_schedule_it_converts_to(interval, steps):
    growth, per_epoch = 1.0 / steps, 40
    plain = PenaltySchedule(growth, interval, 1.0, 120)
    growing_epochs = plain.growing_iters / per_epoch  # exactly its growing phase, in passes
    epochs = PenaltySchedule.from_epochs(growth, 1.0, growing_epochs, 120 / per_epoch, per_epoch)
    assert (epochs.growing_iters, epochs.total_iters) == (plain.growing_iters, plain.total_iters)
    assert [epochs.factor(i) for i in range(plain.total_iters + 5)] == \
        [plain.factor(i) for i in range(plain.total_iters + 5)]
    # and RunConfig sizes it from the training set (1,294 digits at batch 64: 21 iterations per pass)
    cfg = RunConfig(**{**BASE, "reg_growth_epochs": 2.0, "stabilize_reg_epochs": 1.0})
    s = cfg.penalty_schedule(1294)
    assert (s.growing_iters, s.stabilize) == (42, 21) and s.factor(41) < 1.0 == s.factor(42)


def test_the_prune_stage_warns_when_it_fits_its_training_set_and_only_then():
    def notices(cfg: RunConfig) -> list[str]:
        data = load_run_data(cfg)
        events: list[dict] = []
        run_pipeline(cfg, dense=train_dense(cfg, data), data=data, on_event=events.append)
        return [e["message"] for e in events
                if e.get("event") == "notice" and "training accuracy" in e["message"]]

    small = {**BASE, "model": "mlp", "model_kwargs": {"depth": 2, "width": 32}, "dense_epochs": 10,
             "dense_batch_size": 16, "reg_batch_size": 16, "batch_size": 16, "stabilize_reg_interval": 100,
             "reg_lr": 1e-2, "val_fraction": 0.0}
    # 64 digits: separable, fitted within the stage's first epochs (100 % from iteration ~56)
    separable = RunConfig(**{**small, "data_kwargs": {"subset": 64}})
    said = notices(separable)
    assert len(said) == 1 and "fits its training set" in said[0]
    # the same 64 digits moved by up to 2 pixels each epoch (seeded): never fitted (~25 %), no warning
    shifted = RunConfig(**{**small, "data_kwargs": {"subset": 64, "shift": 2}})
    assert notices(shifted) == []


def _stage(limit: float | None, pruned_scale: float):
    """A TPP stage on the synthetic MLP whose weights barely move (reg_lr 1e-12): every pruned layer's
    kept-to-pruned ratio of mean |w| stays (to ~1e-10) what the pruned rows were scaled to."""
    from tpp.run import prepare_prune

    cfg = RunConfig(model="mlp", model_kwargs={"depth": 3, "width": 16}, data="synthetic", device="cpu",
                    dense_epochs=0, method="tpp", pr=0.5, growth=0.01, update_reg_interval=5,
                    stabilize_reg_interval=40, reg_lr=1e-12, reg_momentum=0.0, reg_weight_decay=0.0,
                    jsv_samples=4, reg_mag_ratio_limit=limit, seed=1)
    data = load_run_data(cfg)
    job = prepare_prune(cfg, train_dense(cfg, data), data)
    modules = dict(job.ctx.model.named_modules())
    with torch.no_grad():
        for name, mask in job.ctx.masks.items():
            w = modules[name].weight
            kept, pruned = w[~mask].abs().mean(), w[mask].abs().mean()
            w[mask] *= kept / pruned / pruned_scale  # now kept / pruned = pruned_scale exactly
    return job, job.method.stage(job.ctx)


def test_the_authors_early_stop_fires_where_the_ratio_crosses_the_limit():
    # ratio 50 everywhere, limit 40: the first check (iteration 5) stops the growth; 40 stabilising follow
    job, result = _stage(40.0, 50.0)
    s = job.ctx.schedule
    assert s.stopped_at == 5 and result.iterations == 5 + 40 and s.factor(100) == s.factor(5) == 0.01
    # limit 60 above the ratio: it never fires and the full schedule runs (100 steps x 5 + 40)
    job, result = _stage(60.0, 50.0)
    assert job.ctx.schedule.stopped_at is None and result.iterations == 500 + 40
    # off by default
    job, result = _stage(None, 50.0)
    assert job.ctx.schedule.stopped_at is None and result.iterations == 540
