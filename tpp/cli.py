"""`tpp`: single runs of the library from the shell.

    tpp pretrain --model resnet20 --data cifar10 --data-root DIR --dense-epochs 30 --out dense.pt
    tpp run --model mlp7_linear --data digits --method tpp --pr 0.9 --lr 1e-3 1e-2 --growth 1e-3 --json

Every RunConfig field is a flag (underscores become dashes; dict fields take JSON), with the help text
its declaration carries. `--lr` takes several values: they are finetune members of one pruned model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import time
import typing
from typing import Any

from tpp.checkpoint import CheckpointError, load_dense, save_dense, save_pruned
from tpp.config import STAGES, RunConfig, fields_of, help_of, stage_of
from tpp.data import list_data
from tpp.methods import METHODS
from tpp.models import list_models
from tpp.run import DivergedError

# Prune-stage settings the dense stage reads too (its seed, numerics and JSV measurement).
DENSE_ALSO_READS = ("seed", "bf16", "jsv_samples")


_GROUP_TITLES = {"model": "model", "data": "data", "dense": "dense model (trained when --dense is not given)",
                 "prune": "prune stage (selection, penalty, removal)", "finetune": "finetuning",
                 "run": "run (seed, device, evaluation, output)"}


def _add_config_flags(parser: argparse.ArgumentParser, names: list[str], multi: tuple[str, ...] = ()) -> None:
    """One flag per RunConfig field, grouped in --help by the stage the field declares."""
    defaults = RunConfig()
    groups = {stage: parser.add_argument_group(_GROUP_TITLES[stage]) for stage in STAGES
              if any(stage_of(n) == stage for n in names)}
    for name in names:
        flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
        group = groups[stage_of(name)]
        help_text = f"{help_of(name)} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, dict) or name == "prune_layers":
            group.add_argument(flag, type=json.loads, default=default, metavar="JSON", help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=float, nargs="+", default=default, help=help_text)
        elif name in multi:
            group.add_argument(flag, type=type(default), nargs="+", default=[default],
                                help=help_text + "; several values: one finetune member each")
        else:
            group.add_argument(flag, type=_value_type(name), default=default, help=help_text)


def _value_type(name: str) -> type:
    """The type a flag's value is read as: the field's declared type (`float | None` -> float; a field
    that defaults to None has no type of its own to take it from)."""
    hint = typing.get_type_hints(RunConfig)[name]
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return kinds[0]


def run_command(cfg: RunConfig, dense: str | None = None) -> list[str]:
    """The `tpp run` argv that runs `cfg` alone: each setting that differs from its default as its flag
    (the inverse of the parser: `tpp run` parses it back into `cfg`), the dense checkpoint, --json."""
    argv, defaults = ["tpp", "run"], RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict) or f.name == "prune_layers":
            argv += [flag, json.dumps(value, sort_keys=True)]
        elif isinstance(value, (tuple, list)):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return [*argv, *(["--dense", dense] if dense else []), "--json"]


def _configs_from_args(args: argparse.Namespace, multi: tuple[str, ...] = ()) -> list[RunConfig]:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    values = {k: given.pop(k) for k in multi if k in given}
    if not values:
        return [RunConfig.from_dict(given)]
    (key, levels), = values.items()
    return [RunConfig.from_dict({**given, key: v}) for v in levels]


PRUNE_LINE_EVERY_S = 5.0  # off a terminal, one prune-stage progress line per this many seconds
_last_prune_line = [-math.inf]  # when the last one was printed (monotonic seconds)
_line_open = [False]  # a terminal line redrawn in place, not yet ended


def _say(line: str, redraw: bool = False) -> None:
    """A progress line on stderr; `redraw`: in place of the previous redrawn one (a terminal only)."""
    if redraw:
        print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
    else:
        print(("\n" if _line_open[0] else "") + line, file=sys.stderr, flush=True)
    _line_open[0] = redraw


def _progress(event: dict[str, Any], lrs: list[float] | None = None) -> None:
    """One line per epoch / stage on stderr, so stdout stays machine-readable with --json. With several
    members (`lrs`), each of a member's lines names its LR. The prune stage reports every few dozen
    iterations: on a terminal one line redrawn in place, otherwise a line every PRUNE_LINE_EVERY_S."""
    stage = event.get("stage", "")
    who = f"{stage:>8}"
    if lrs and len(lrs) > 1 and "member" in event:
        who += f" lr={lrs[event['member']]:g}"
    if event["event"] == "epoch":
        if stage == "prune":
            where = f"iteration {event['iteration']:>6}/{event['iterations']}"
        else:
            where = f"epoch {event['epoch'] + 1:>3}/{event['epochs']}"
        extra = f"  reg {event['reg']:.3g}" if "reg" in event else f"  lr {event['lr']:.2e}"
        line = (f"[{who}] {where}  loss {event['train_loss']:.4f}  acc {event['test_acc']:6.2f}%"
                f"{extra}  ({event['seconds']:.2f} s)")
        if stage == "prune":
            if sys.stderr.isatty():
                return _say(line, redraw=True)
            if (event["iteration"] < event["iterations"]
                    and time.monotonic() - _last_prune_line[0] < PRUNE_LINE_EVERY_S):
                return None
            _last_prune_line[0] = time.monotonic()
        _say(line)
    elif event["event"] == "notice":
        _say(f"[  notice] {event['message']}")
    elif event["event"] == "stage_end":
        if event.get("diverged"):
            return _say(f"[{who}] diverged: {event['diverged']}")
        keys = [k for k in ("dense_acc", "acc_after_removal", "speedup", "jsv_after_removal_mean", "best_acc")
                if k in event]
        done = ", ".join(f"{k}={event[k]:.4g}" for k in keys)
        if "best_epoch" in event:  # counted from 1, as the epoch lines are
            done += f" at epoch {int(event['best_epoch'])}"
        _say(f"[{who}] done: {done}")
    return None


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tpp.run import load_run_data, train_dense

    cfg, = _configs_from_args(args)
    dense = train_dense(cfg, load_run_data(cfg), None if args.quiet else _progress)
    save_dense(args.out, dense)
    print(f"dense model ({cfg.model}, test acc {dense.metrics['dense_acc']:.2f}%) written to {args.out}",
          file=sys.stderr)
    if args.json:
        print(json.dumps(_json_safe(dense.metrics)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tpp.run import load_run_data, model_spec, run_pipeline

    members = _configs_from_args(args, multi=("lr",))
    cfg = members[0]
    start = time.perf_counter()
    data = load_run_data(cfg)
    dense = load_dense(args.dense, expected=model_spec(cfg, data)) if args.dense else None
    lockstep = {"on": True, "off": False}.get(args.lockstep, "auto")
    out = run_pipeline(members, dense=dense, data=data, lockstep=lockstep,
                       on_event=None if args.quiet else lambda e: _progress(e, [m.lr for m in members]))
    if args.save_pruned and not out.pruned.diverged:
        save_pruned(args.save_pruned, out.pruned)
    for member, result in zip(members, out.members, strict=True):
        assert result is not None
        metrics = {"status": result.status, **result.metrics, "time_total_s": time.perf_counter() - start}
        speedup = f", FLOPs speed-up {metrics['speedup']:.2f}x" if "speedup" in metrics else ""
        print(f"{member.method} pr={member.pr} lr={member.lr}: {result.status}, best acc "
              f"{metrics['best_acc']:.2f}% (dense {out.dense.metrics.get('dense_acc', float('nan')):.2f}%)"
              f"{speedup}", file=sys.stderr)
        if args.json:
            print(json.dumps({"config": member.to_dict(), **_json_safe(metrics)}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tpp.pruning.criteria import CRITERIA

    for title, names in (("models", list_models()), ("data", list_data())):
        print(textwrap.fill(", ".join(names), width=100, initial_indent=f"{title + ':':<9}",
                            subsequent_indent=" " * 9, break_on_hyphens=False))
    _table("methods", {m.name: m.description for m in METHODS.values()})
    _table("criteria (a method's `criterion`; * needs data batches)",
           {c.name + ("*" if c.data_driven else ""): c.description for c in CRITERIA.values()})
    return 0


def _table(title: str, rows: dict[str, str]) -> None:
    """A titled two-column list, the names padded to the longest (a plug-in's long name stays aligned)."""
    print(f"{title}:")
    width = max(map(len, rows), default=0)
    for name, text in rows.items():
        print(f"  {name:<{width}}  {text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpp", description="Single pruning runs: pretrain a dense model, "
                                     "or prune + finetune one configuration.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train a dense model and save it",
                       description="Train the unpruned model (cosine LR from --dense-lr, --dense-epochs).")
    dense_flags = set(fields_of("model", "data", "dense", "run")) | set(DENSE_ALSO_READS)
    _add_config_flags(p, [f.name for f in dataclasses.fields(RunConfig) if f.name in dense_flags])
    p.add_argument("--out", required=True, help="where to write the dense checkpoint (.pt)")
    p.set_defaults(fn=cmd_pretrain)
    r = sub.add_parser("run", help="prune and finetune one configuration",
                       description="Dense model (--dense PATH, or trained first) -> prune stage -> "
                       "finetune; several --lr values finetune the same pruned model once each.")
    _add_config_flags(r, [f.name for f in dataclasses.fields(RunConfig)], multi=("lr",))
    r.add_argument("--dense", help="dense checkpoint from `tpp pretrain` (default: train one first)")
    r.add_argument("--save-pruned", metavar="PATH", help="also save the pruned model before finetuning")
    r.add_argument("--lockstep", choices=("auto", "on", "off"), default="auto",
                   help="train several --lr members as one vectorised model: on, off, or auto (default: "
                        "on a GPU, and on a CPU for the models measured faster that way, the MLPs)")
    r.set_defaults(fn=cmd_run)
    for sp in (p, r):
        sp.add_argument("--json", action="store_true",
                        help="print the final metrics as one JSON line per member on stdout")
        sp.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    sub.add_parser("list", help="list models, data sets and methods").set_defaults(fn=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, CheckpointError) as e:  # bad input: one line, no traceback
        print(f"tpp: error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:  # the dense stage blew up: a result to act on, not a crash
        print(f"tpp: {e}; lower the stage's learning rate", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
