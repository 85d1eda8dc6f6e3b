"""`tpp-study plan`: a design as text -- the table of prune groups, the members, the prune stages and
the work they take, balance notes. Nothing runs."""

from __future__ import annotations

import math

from study.config import StudyConfig
from study.design import _prune_iterations, plan, run_config, varying
from study.record import short


def describe(cfg: StudyConfig, slots: int = 1, train_samples: int | None = None) -> str:
    """`tpp-study plan`: the design as a table, the prune stages to compute, the work, balance notes."""
    from collections import Counter

    from study.text import table_text

    if not cfg.is_design:
        n = cfg.num_trials or 0
        return (f"{cfg.name}: sampler {cfg.sampler} proposes {n} single-member trials adaptively over "
                f"methods {', '.join(m.shown for m in cfg.methods)} (no fixed design: methods are not paired "
                "at equal LRs and seeds; for an LR-sensitivity map use grid or qmc)")
    p = plan(cfg, slots, train_samples=train_samples or 0)
    lrs = sorted({m["lr"] for m in p.members})
    rows = Counter((pt.method, pt.pr, "-" if pt.growth is None else short(pt.growth)) for pt in p.points)
    table = [["method", "pr", "growth", "seeds", "members", "runs"]]
    table += [[m, f"{pr:.3g}", g, str(n), str(len(p.members)), str(n * len(p.members))]
              for (m, pr, g), n in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
    stages = [_prune_iterations(cfg, pt, train_samples or 0) for pt in p.points]
    penalty = [s for s in stages if s]
    epochs = sum(run_config(cfg, p.points[0], m).epochs for m in p.members) * len(p.points)
    reg_batch = run_config(cfg, p.points[0], p.members[0]).reg_batch_size
    reg_per_epoch = math.ceil(max(train_samples or 1, 1) / reg_batch)
    lines = [f"{cfg.name}: {cfg.sampler} design, {len(p.points)} prune points x {len(p.members)} members = "
             f"{p.num_runs} runs in {len(p.units)} trials "
             f"({sum(u.kind == 'prune' for u in p.units)} of them prune units, lockstep "
             + ("auto: decided at the start, on with GPUs, on CPUs for the models measured faster so)"
                if cfg.lockstep == "auto" else f"{'on' if cfg.lockstep else 'off'})"), table_text(table),
             f"members: {len(lrs)} LRs ({short(lrs[0])} ... {short(lrs[-1])})"
             + (f" x {', '.join(varying(cfg))}" if varying(cfg) else "") + ", the same for every prune point",
             f"prune stages to compute: {len(penalty)} with a penalty stage "
             f"({sum(penalty):,} regularisation iterations, the longest {max(penalty, default=0):,}"
             + (f" = {max(penalty) / reg_per_epoch:,.1f} passes over the {train_samples:,} training samples "
                f"at batch {reg_batch}" if penalty and train_samples else "")
             + ("; at most: the magnitude-ratio early stop (reg_mag_ratio_limit) may end the growth sooner"
                if penalty and run_config(cfg, p.points[0], p.members[0]).reg_mag_ratio_limit else "")
             + f"), {len(stages) - len(penalty)} without one",
             f"finetuning: {epochs:,} member-epochs"
             + (f" of {math.ceil(train_samples / run_config(cfg, p.points[0], p.members[0]).batch_size)} "
                f"iterations each" if train_samples else ""),
             "balance: every method is crossed with the same PRs and seeds, every prune point with the same "
             "members: method differences are paired"]
    if cfg.space.extra_seeds:
        lines[-1] = ("balance: every method is crossed with the same PRs and seeds, and space.extra_seeds "
                     "gives some groups more (paired where both sides of a comparison have them); every "
                     "prune point has the same members")
    if (seeds := len(cfg.space.seeds)) < 6:
        lines.append(f"note: {seeds} seed(s): a paired sign-flip test over seeds cannot reach p < 0.05 below "
                     "6 seeds, so the report's verdict will call differences ties")
    return "\n".join(lines)
