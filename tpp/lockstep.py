"""Lockstep training: K same-shaped models as one vectorised model, one forward/backward per step.

A study trains one architecture many times: every finetune member of a pruned model starts from the
same weights and sees the same mini-batches; only its LR schedule, momentum, weight decay and budget
differ. Stacking the members' weights on a leading dimension (`torch.func.stack_module_state`) and
running `vmap(functional_call)` turns K small steps into one wide one: the per-step Python and kernel
launch overhead is paid once, and a GPU gets work it can fill. BatchNorm keeps per-member running
statistics (vmap updates each member's stacked buffers in place), and evaluation uses each member's
own. The optimizer is SGD written over the stacked tensors because torch's optimizers take one LR per
parameter group, and here every member has its own LR, momentum and weight decay.

`finetune_lockstep` is proven equal to `tpp.run.finetune_stage` member by member (tests), then used.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class LockstepUnsupported(RuntimeError):
    """The model cannot be run under vmap (e.g. it draws random numbers): train members one by one."""


MAX_MEMBERS = 16  # members stacked at once: the study's prune units and a pipeline's finetune groups
Lockstep = bool | str  # True (whenever the model vectorises), False, or "auto" (where it was measured faster)


def lockstep_refusal(model: nn.Module, device: torch.device | str) -> str | None:
    """Why members of `model` on `device` should train one by one under lockstep "auto" (None: they
    should not). The rule is measured (BENCHMARKS.md, "lockstep"): on a CPU, a vmapped convolutional
    net is no faster than its members one after another (ResNet20: 0.84-0.96x at K = 1-4), because one
    member's convolutions already keep a core busy; models with a batched `stacked_forward` (the MLPs:
    2.1-3.0x at K = 4-16) gain there. On a GPU, where one small model leaves the device idle, every model
    runs in lockstep."""
    if torch.device(device).type != "cpu" or getattr(model, "stacked_forward", None) is not None:
        return None
    return (f"on a CPU, vectorised {type(model).__name__} training was measured no faster than one by one "
            "(BENCHMARKS.md, lockstep); lockstep true forces it")


def use_lockstep(lockstep: Lockstep, model: nn.Module, device: torch.device | str) -> tuple[bool, str | None]:
    """(whether to train in lockstep, the notice to give when "auto" decided against it)."""
    if lockstep not in (True, False, "auto"):
        raise ValueError(f"lockstep must be true, false or 'auto', got {lockstep!r}")
    if lockstep != "auto":
        return bool(lockstep), None
    why = lockstep_refusal(model, device)
    return why is None, why


class StackedModel:
    """K copies of one architecture: stacked parameters and buffers, and a vmapped forward."""

    def __init__(self, models: list[nn.Module]):
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.k = len(models)

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def forward(self, x: torch.Tensor, shared: bool = True) -> torch.Tensor:
        """[K, B, ...] outputs for input `x` ([B, ...] given to every member, or [K, B, ...] each its own).

        A model class may provide `stacked_forward(params, x, shared)` (the MLPs do: batched matrix
        products); every other model runs under vmap.
        """
        stacked = getattr(self.base, "stacked_forward", None)
        if stacked is not None:
            return stacked(self.params, x, shared)

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor):
            return functional_call(self.base, (params, buffers), (x,))

        try:
            return vmap(one, in_dims=(0, 0, None if shared else 0), randomness="error")(
                self.params, self.buffers, x)
        except RuntimeError as e:
            if "randomness" in str(e) or "vmap" in str(e).lower() and "support" in str(e).lower():
                raise LockstepUnsupported(str(e).splitlines()[0]) from None
            raise

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state_dict (CPU copies), loadable into the plain model."""
        tensors = {**self.params, **self.buffers}
        return {name: t[k].detach().to("cpu", copy=True) for name, t in tensors.items()}

    def select(self, keep: list[int], *others: dict[str, torch.Tensor]) -> None:
        """Keep members `keep` (positions into the current stack), here and in the stacked `others`."""
        idx = torch.tensor(keep, dtype=torch.long, device=next(iter(self.params.values())).device)
        self.params = {k: v.detach().index_select(0, idx).requires_grad_(True)
                       for k, v in self.params.items()}
        self.buffers = {k: v.index_select(0, idx) for k, v in self.buffers.items()}
        for d in others:
            for name in list(d):
                d[name] = d[name].index_select(0, idx)
        self.k = len(keep)

    def state(self) -> dict[str, Any]:
        return {"params": {k: v.detach().cpu() for k, v in self.params.items()},
                "buffers": {k: v.cpu() for k, v in self.buffers.items()}}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.params = {k: v.to(device).requires_grad_(True) for k, v in state["params"].items()}
        self.buffers = {k: v.to(device) for k, v in state["buffers"].items()}
        self.k = next(iter(self.params.values())).shape[0]


class StackedSGD:
    """torch.optim.SGD (dampening 0, no Nesterov) over stacked tensors, per-member LR, momentum and
    weight decay: d = g + wd * p; buf = momentum * buf + d (buf = d at the first step); p -= lr * buf."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.buf: dict[str, torch.Tensor] = {}
        self.params = params

    @staticmethod
    def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, lr: torch.Tensor, momentum: torch.Tensor, weight_decay: torch.Tensor) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            d = p.grad.addcmul(self._view(weight_decay, p), p)
            buf = self.buf.get(name)
            if buf is None:
                buf = self.buf[name] = d.clone()
            else:
                buf.mul_(self._view(momentum, p)).add_(d)
            p.addcmul_(self._view(lr, p), buf, value=-1.0)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def _stacked_epoch(stack: StackedModel, opt: StackedSGD, batches, device, precision, lr, momentum, wd,
                   extra_loss: Callable[[], torch.Tensor] | None = None,
                   shared: bool = True) -> tuple[torch.Tensor, int]:
    """One pass over `batches`; (per-member mean training loss [K] on the device, iterations)."""
    stack.train(True)
    total = torch.zeros(stack.k, device=device)
    n = 0
    for x, y in batches:
        x = precision.prepare_input(x, device)
        with precision.autocast(device):
            logits = stack.forward(x, shared)
        k, b = logits.shape[:2]
        yy = y.expand(k, b) if y.dim() == 1 else y
        losses = F.cross_entropy(logits.reshape(k * b, -1).float(), yy.reshape(-1), reduction="none")
        losses = losses.view(k, b).mean(1)
        if extra_loss is not None:
            losses = losses + extra_loss()
        opt.zero_grad()
        losses.sum().backward()
        opt.step(lr, momentum, wd)
        total += losses.detach()
        n += 1
    return total / max(n, 1), n


@torch.no_grad()
def evaluate_stacked(stack: StackedModel, batches, device, precision) -> torch.Tensor:
    """Top-1 accuracy in percent of every member [K] (CPU), each in eval mode on its own statistics."""
    stack.train(False)
    correct = torch.zeros(stack.k, device=device, dtype=torch.long)
    count = 0
    for x, y in batches:
        with precision.autocast(device):
            logits = stack.forward(precision.prepare_input(x, device))
        correct += (logits.argmax(-1) == y).sum(1)
        count += y.numel()
    return 100.0 * correct.cpu().double() / max(count, 1)


def lockstep_groups(members: list[Any]) -> list[list[int]]:
    """Member indices that can train together: the same mini-batches (batch size) make one group."""
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(m.batch_size, []).append(i)
    return list(groups.values())


def _member_model(stack: StackedModel, pos: int, template: nn.Module) -> nn.Module:
    """Member `pos` of the stack as a plain model (for its Jacobian and the returned RunResult)."""
    model = copy.deepcopy(template)
    model.load_state_dict(stack.member_state(pos))
    return model


def finetune_lockstep(cfgs: list[Any], pruned: Any, data: Any, on_event: Callable | None = None,
                      on_done: Callable[[int, Any], None] | None = None,
                      resume_state: dict[str, Any] | None = None, checkpoint_every: int = 1,
                      checkpoint_min_interval_s: float = 0.0) -> list[Any]:
    """`tpp.run.finetune_stage` of every member in `cfgs` at once (same pruned model, same batch size).

    Events are finetune_stage's, each with `member` (the position in `cfgs`); a member that diverges
    or reaches its last epoch leaves the stack and is handed to `on_done(position, RunResult)` at once.
    After the epoch's members are done, a `checkpoint` event carries the state of those still training
    (every `checkpoint_every` epochs, at most every `checkpoint_min_interval_s`); `resume_state`
    continues it.
    """
    from tpp.results import RunResult
    from tpp.schedules import DenseSchedule, finetune_lr
    from tpp.stages import history_metrics, measure_jsv, run_splits, test_batches, train_flops
    from tpp.train import Precision, epoch_generator, resolve_device, seed_everything

    cfg = cfgs[0]
    if any(c.batch_size != cfg.batch_size or c.seed != cfg.seed for c in cfgs):
        raise ValueError("members: lockstep members share their mini-batches (batch_size and seed)")
    train, val = run_splits(cfg, data)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    dense_schedule = DenseSchedule(**pruned.dense_schedule) if pruned.dense_schedule else None
    seed_everything(cfg.seed)
    template = precision.prepare_model(pruned.build(), device)
    stack = StackedModel([template] * len(cfgs))
    opt = StackedSGD(stack.params)
    active = list(range(len(cfgs)))
    histories: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    iterations = [0] * len(cfgs)
    results: list[Any] = [None] * len(cfgs)
    start_epoch, elapsed = 0, 0.0
    if resume_state is not None:
        stack.load(resume_state["stack"], device)
        opt = StackedSGD(stack.params)
        opt.buf = {k: v.to(device) for k, v in resume_state["buf"].items()}
        active, iterations = list(resume_state["active"]), list(resume_state["iterations"])
        histories = [list(h) for h in resume_state["histories"]]
        start_epoch, elapsed = resume_state["epoch"] + 1, resume_state["elapsed_s"]
        torch.set_rng_state(resume_state["torch_rng"])
    t0 = time.perf_counter() - elapsed
    last_checkpoint = time.perf_counter()

    def scalars(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    for epoch in range(start_epoch, max(cfgs[i].epochs for i in active) if active else 0):
        t_epoch = time.perf_counter()
        members = [cfgs[i] for i in active]
        lrs = [finetune_lr(m.schedule, m.lr, epoch, m.epochs, m.milestones, m.warmup_epochs,
                           dense_schedule) for m in members]
        batches = train.train_batches(cfg.batch_size, epoch_generator(cfg.seed, "finetune", epoch), device)
        loss, n = _stacked_epoch(stack, opt, batches, device, precision, scalars(lrs),
                                 scalars([m.momentum for m in members]),
                                 scalars([m.weight_decay for m in members]))
        loss = loss.cpu()
        test_acc = evaluate_stacked(stack, test_batches(data, cfg, device), device, precision)
        val_acc = evaluate_stacked(stack, test_batches(val, cfg, device), device, precision) \
            if val is not None else None
        leaving: list[int] = []
        seconds = (time.perf_counter() - t_epoch) / len(active)
        for pos, i in enumerate(active):
            iterations[i] += n
            record: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss[pos]), "lr": lrs[pos],
                                      "test_acc": float(test_acc[pos])}
            if val_acc is not None:
                record["val_acc"] = float(val_acc[pos])
            finite = math.isfinite(record["train_loss"])
            if finite and cfgs[i].jsv_every and (epoch + 1) % cfgs[i].jsv_every == 0:
                record["jsv_mean"] = measure_jsv(_member_model(stack, pos, template), data, cfgs[i],
                                                 device)["mean"]
            histories[i].append(record)
            if not finite or epoch == cfgs[i].epochs - 1:
                leaving.append(pos)
            if on_event is not None:
                on_event({"event": "epoch", "stage": "finetune", "epochs": cfgs[i].epochs, "seconds": seconds,
                          "member": i, **record})
        for pos in leaving:
            i = active[pos]
            status = "diverged" if not math.isfinite(histories[i][-1]["train_loss"]) else "completed"
            model = _member_model(stack, pos, template)
            metrics = history_metrics(histories[i], status, data.num_classes)
            metrics.update(iters_finetune=iterations[i], time_finetune_s=time.perf_counter() - t0,
                           flops_train_finetune=train_flops(pruned.metrics.get("flops", 0),
                                                            iterations[i] * cfgs[i].batch_size))
            if resume_state is not None:
                metrics["resumed_from_epoch"] = resume_state["epoch"]
            if status == "completed":
                jsv = measure_jsv(model, data, cfgs[i], device)
                metrics.update({f"final_jsv_{k}": v for k, v in jsv.items()})
            if on_event is not None:
                on_event({"event": "stage_end", "stage": "finetune", "status": status, "member": i,
                          **metrics})
            results[i] = RunResult(status, metrics, histories[i], model)
            if on_done is not None:
                on_done(i, results[i])
        staying = [j for p, j in enumerate(active) if p not in leaving]
        due = checkpoint_every and (epoch + 1) % checkpoint_every == 0
        if (staying and due and on_event is not None
                and time.perf_counter() - last_checkpoint >= checkpoint_min_interval_s):
            last_checkpoint = time.perf_counter()  # after the leaving members are done: they are not in it
            on_event({"event": "checkpoint", "stage": "finetune", "checkpoint": _checkpoint(
                stack, opt, active, staying, epoch, histories, iterations, time.perf_counter() - t0)})
        if not staying:  # every member left early (e.g. the longest one diverged): nothing to train
            break
        if leaving:
            stack.select([p for p in range(len(active)) if p not in leaving], opt.buf)
            opt.params = stack.params
        active = staying
    return results


def _checkpoint(stack: StackedModel, opt: StackedSGD, active: list[int], staying: list[int], epoch: int,
                histories: list[list[dict[str, Any]]], iterations: list[int],
                elapsed: float) -> dict[str, Any]:
    """The resumable state of the members in `staying` after `epoch` (bit-exact: stacked weights,
    buffers, momentum, histories, the torch RNG)."""
    positions = torch.tensor([active.index(j) for j in staying], dtype=torch.long)
    state = stack.state()
    pick = {name: t.index_select(0, positions) for name, t in state["params"].items()}
    bufs = {name: t.index_select(0, positions) for name, t in state["buffers"].items()}
    momentum = {name: b.detach().cpu().index_select(0, positions) for name, b in opt.buf.items()}
    return {"lockstep": True, "epoch": epoch, "stack": {"params": pick, "buffers": bufs}, "buf": momentum,
            "active": staying, "histories": [list(h) for h in histories], "iterations": list(iterations),
            "elapsed_s": elapsed, "torch_rng": torch.get_rng_state()}


# ------------------------------------------------------------------------------------- prune stages
class _StackedPenalty:
    """The TPP / GReg penalty (`tpp.pruning.PruneRegularizer`) of every member at once, rebuilt from
    each member's `named_plan()`: per-member gram targets, L2 masks and zeroing plans on the stack."""

    def __init__(self, plans: list[dict[str, Any]], zero_plans: list[list[tuple[int, str]]],
                 params: dict[str, torch.Tensor], device: torch.device):
        k = len(plans)
        self.plans, self.zero_plans = plans, [list(z) for z in zero_plans]
        self.target = plans[0]["target"]
        self.gram_on = torch.tensor([float(p["gram_on"]) for p in plans], device=device)
        self.lw = torch.tensor([p["lw"] for p in plans], device=device)
        # Same-shaped weights in one batched gram term: shape -> (names, targets [K,L,N,N], active [K,L])
        names_by_shape: dict[tuple, list[str]] = {}
        for plan in plans:
            for name, _ in plan["gram"]:
                names = names_by_shape.setdefault(tuple(params[name].shape[1:]), [])
                if name not in names:
                    names.append(name)
        self.gram: dict[tuple, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
        for shape, names in names_by_shape.items():
            fill = torch.ones if self.target == "gram" else torch.zeros  # a no-op target where unpruned
            targets = fill(k, len(names), shape[0], shape[0], device=device)
            active = torch.zeros(k, len(names), device=device)
            for pos, plan in enumerate(plans):
                for name, target in plan["gram"]:
                    if name in names:
                        targets[pos, names.index(name)] = target.to(device)
                        active[pos, names.index(name)] = 1.0
            self.gram[shape] = (names, targets, active)
        self.l2: dict[str, torch.Tensor] = {}
        for pos, plan in enumerate(plans):
            for name, mask in plan["l2"].items():
                if name not in self.l2:
                    self.l2[name] = torch.zeros_like(params[name])
                self.l2[name][pos] = mask.to(device)
        self.keep: dict[str, torch.Tensor] = {}

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.lw.device)
        self.plans = [self.plans[i] for i in keep]
        self.zero_plans = [self.zero_plans[i] for i in keep]
        self.gram_on, self.lw = self.gram_on[idx], self.lw[idx]
        self.gram = {shape: (names, t.index_select(0, idx), a.index_select(0, idx))
                     for shape, (names, t, a) in self.gram.items()}
        self.l2 = {n: m.index_select(0, idx) for n, m in self.l2.items()}
        self.keep = {n: m.index_select(0, idx) for n, m in self.keep.items()}

    def loss(self, params: dict[str, torch.Tensor], factor: torch.Tensor) -> torch.Tensor:
        """[K]: lw * factor * sum over each member's layers of mean((G - T)^2)."""
        from tpp.pruning.penalties import gram_penalty

        total = torch.zeros_like(factor)
        for (n, *_), (names, targets, active) in self.gram.items():
            rows = torch.stack([params[name].reshape(factor.shape[0], n, -1) for name in names], 1)
            total = total + (active * gram_penalty(rows, targets, self.target)).sum(1)
        return self.lw * factor * self.gram_on * total

    @torch.no_grad()
    def add_l2_grads(self, params: dict[str, torch.Tensor], factor: torch.Tensor) -> None:
        for name, mask in self.l2.items():
            p = params[name]
            p.grad.addcmul_(mask * factor.view(-1, *([1] * (p.dim() - 1))), p)

    @torch.no_grad()
    def after_step(self, params: dict[str, torch.Tensor], iteration: int) -> None:
        """Zero the layers each member's plan zeroes by `iteration`, then keep every zeroed entry zero:
        one multiply per parameter."""
        for pos, plan in enumerate(self.zero_plans):
            while plan and plan[0][0] < iteration:
                layer = plan.pop(0)[1]
                for name, dim, index in self.plans[pos]["zero"][layer]:
                    if name not in self.keep:
                        self.keep[name] = torch.ones_like(params[name])
                    self.keep[name][pos].index_fill_(dim, index.to(params[name].device), 0.0)
        for name, keep in self.keep.items():
            params[name].mul_(keep)


def lockstep_prune_supported(job: Any) -> bool:
    """Whether a prune job's stage is the library's filter penalty (TPP, GReg and their ablations),
    which `prune_lockstep` vectorises; any other stage (a plug-in's own) runs one by one."""
    make = getattr(job.method.stage, "make_hooks", None)
    return bool(job.needs_stage and make is not None and job.cfg.reg_mag_ratio_limit is None
                and getattr(make, "__name__", "").startswith("filter_penalty"))


def prune_lockstep(jobs: list[Any]) -> None:
    """Run the regularisation stages of `jobs` (`tpp.run.PruneJob`s of one dense model, built-in filter
    penalties, one batch size) together, as `tpp.methods.run_penalty_loop` runs each: per member its own
    masks, penalty schedule, seed (its own mini-batches), LR, momentum and weight decay. A member
    leaves the stack at its last iteration or when its loss becomes NaN/inf; each job's `result` and
    model are set as the plain loop would leave them, ready for `tpp.run.finish_prune`."""
    from tpp.methods import StageResult
    from tpp.methods.stage import note_fit
    from tpp.train import epoch_generator, evaluate

    if not jobs:
        return
    first = jobs[0]
    cfgs = [j.cfg for j in jobs]
    if any(c.reg_batch_size != cfgs[0].reg_batch_size for c in cfgs):
        raise ValueError("jobs: lockstep prune stages share one reg_batch_size")
    if len({j.method.name for j in jobs}) != 1:
        raise ValueError("jobs: lockstep prune stages run one method")
    device, precision = first.ctx.device, first.ctx.precision
    hooks = [j.method.stage.make_hooks(j.ctx) for j in jobs]
    schedules = [j.ctx.schedule for j in jobs]
    stack = StackedModel([j.ctx.model for j in jobs])
    opt = StackedSGD(stack.params)
    penalty = _StackedPenalty([h.reg.named_plan() for h in hooks], [h.zero_plan for h in hooks], stack.params,
                              device)
    active = list(range(len(jobs)))
    it, epoch = 0, 0
    tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=device)  # noqa: E731

    def leave(positions: list[int], results: list[Any], records: list[dict[str, Any] | None]) -> None:
        """Members at `positions` are done: their weights back into their own models (then, like the
        plain loop: the epoch's record with their own test accuracy, and the final zeroing)."""
        nonlocal active
        for pos, result, record in zip(positions, results, records, strict=True):
            i = active[pos]
            j = jobs[i]
            j.ctx.model.load_state_dict(stack.member_state(pos))
            if record is not None:
                test = j.ctx.data.test_batches(j.cfg.eval_batch_size, device)
                record["test_acc"] = evaluate(j.ctx.model, test, device, precision)
                note_fit(j.ctx, record, schedules[i].total_iters)
                j.ctx.history.append(record)
                j.ctx.emit(event="epoch", stage="prune", iterations=schedules[i].total_iters,
                           seconds=time.perf_counter() - t0, **record)
            if result.diverged is None:
                hooks[i].finish()  # every pruned unit zeroed, on the member's own model
            j.result = result
        keep = [p for p in range(len(active)) if p not in positions]
        if keep and positions:
            stack.select(keep, opt.buf)
            opt.params = stack.params
            penalty.select(keep)
        active = [active[p] for p in keep]

    while active:
        t0 = time.perf_counter()
        members = [cfgs[i] for i in active]
        seeds = sorted({m.seed for m in members})
        streams = {s: iter(jobs[active[0]].ctx.data.train_batches(
            cfgs[0].reg_batch_size, epoch_generator(s, "prune", epoch), device)) for s in seeds}
        total = torch.zeros(len(active), device=device)
        correct = torch.zeros(len(active), device=device)  # training accuracy, as the plain loop tracks it
        n = seen = 0
        stack.train(True)
        while active:
            try:
                drawn = {s: next(stream) for s, stream in streams.items()}
            except StopIteration:
                break
            shared = len(seeds) == 1
            x = drawn[seeds[0]][0] if shared else torch.stack([drawn[m.seed][0] for m in members])
            y = torch.stack([drawn[m.seed][1] for m in members])
            factor = tensor([schedules[i].factor(it) for i in active])
            with precision.autocast(device):
                logits = stack.forward(precision.prepare_input(x, device), shared)
            k, b = y.shape
            losses = F.cross_entropy(logits.reshape(k * b, -1).float(), y.reshape(-1), reduction="none")
            losses = losses.view(k, b).mean(1) + penalty.loss(stack.params, factor)
            opt.zero_grad()
            losses.sum().backward()
            penalty.add_l2_grads(stack.params, factor)
            opt.step(tensor([m.reg_lr for m in members]), tensor([m.reg_momentum for m in members]),
                     tensor([m.reg_weight_decay for m in members]))
            it += 1
            n += 1
            penalty.after_step(stack.params, it)
            total += losses.detach()
            correct += (logits.detach().argmax(-1) == y).sum(1)
            seen += b
            done = [p for p, i in enumerate(active) if it >= schedules[i].total_iters]
            if done:  # their last iteration: the record of this (truncated) epoch, then the stage's end
                loss, fit = (total / n).cpu(), (100.0 * correct / seen).cpu()
                records = [{"epoch": epoch, "train_loss": float(loss[p]), "train_acc": float(fit[p]),
                            "reg": schedules[active[p]].factor(it - 1), "iteration": it} for p in done]
                why = [None if math.isfinite(r["train_loss"]) else _why(cfgs[active[p]], it)
                       for p, r in zip(done, records, strict=True)]
                results = [StageResult(it, w) for w in why]
                stay = [p for p in range(len(active)) if p not in done]
                total, correct = total[stay], correct[stay]
                members = [m for p, m in enumerate(members) if p not in done]
                leave(done, results, records)
                seeds = sorted({m.seed for m in members}) or seeds
        if not active:
            break
        loss, fit = (total / max(n, 1)).cpu(), (100.0 * correct / max(seen, 1)).cpu()
        test = jobs[active[0]].ctx.data.test_batches(cfgs[0].eval_batch_size, device)
        acc = evaluate_stacked(stack, test, device, precision)
        records = [{"epoch": epoch, "train_loss": float(loss[p]), "train_acc": float(fit[p]),
                    "reg": schedules[i].factor(it - 1), "iteration": it, "test_acc": float(acc[p])}
                   for p, i in enumerate(active)]
        for p, i in enumerate(active):
            j = jobs[i]
            note_fit(j.ctx, records[p], schedules[i].total_iters)
            j.ctx.history.append(records[p])
            j.ctx.emit(event="epoch", stage="prune", iterations=schedules[i].total_iters,
                       seconds=time.perf_counter() - t0, **records[p])
        diverged = [p for p, r in enumerate(records) if not math.isfinite(r["train_loss"])]
        if diverged:
            leave(diverged, [StageResult(it, _why(cfgs[active[p]], it)) for p in diverged],
                  [None] * len(diverged))
        epoch += 1


def _why(cfg: Any, it: int) -> str:
    return (f"the regularisation loss became NaN/inf at iteration {it} "
            f"(reg_lr={cfg.reg_lr}, lw_opp={cfg.lw_opp}, growth={cfg.growth})")
