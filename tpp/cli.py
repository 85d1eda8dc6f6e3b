"""`tpp`: single runs of the library from the shell.

    tpp pretrain --model resnet20 --data cifar10 --data-root DIR --dense-epochs 30 --out dense.pt
    tpp run --model mlp7_linear --data digits --method tpp --pr 0.9 --lr 1e-3 --growth 1e-3 --epochs 30 --json

Every RunConfig field is a flag (underscores become dashes); dict fields take JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any

from tpp.checkpoint import CheckpointError, load_dense, save_dense, save_pruned
from tpp.config import RunConfig
from tpp.data import list_data
from tpp.methods import METHODS
from tpp.models import list_models
from tpp.run import DivergedError

# Short help for the flags people use most; the rest are documented in RunConfig.
HELP = {
    "model": "architecture (see `tpp list`)", "data": "data set (see `tpp list`)",
    "data_root": "folder of the data set (CIFAR/MNIST torchvision format, or train/ + val|test/ folders)",
    "method": f"pruning method: {', '.join(METHODS)}", "pr": "pruning ratio of the preset layers, in [0, 1)",
    "growth": "penalty growth: added to the penalty factor every --update-reg-interval iterations",
    "lr": "finetuning learning rate", "epochs": "finetuning epochs", "seed": "seed of every random choice",
    "prune_layers": 'explicit JSON {"glob pattern": ratio} instead of the model preset',
    "device": "auto | cpu | cuda | cuda:N", "bf16": "bf16 autocast (CUDA only)",
}


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        help_text = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, dict) or f.name == "prune_layers":
            parser.add_argument(flag, type=json.loads, default=default, metavar="JSON", help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=float, nargs="+", default=default, help=help_text)
        elif f.name == "data_root":
            parser.add_argument(flag, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig.from_dict({k: v for k, v in vars(args).items() if k in names})


def _progress(event: dict[str, Any]) -> None:
    """One line per epoch / stage on stderr, so stdout stays machine-readable with --json."""
    if event["event"] == "epoch":
        extra = f" reg={event['reg']:.3g}" if "reg" in event else ""
        print(f"[{event['stage']:>8}] epoch {event['epoch']:>3}  loss {event['train_loss']:.4f}  "
              f"acc {event['test_acc']:6.2f}%  lr {event['lr']:.2e}{extra}", file=sys.stderr, flush=True)
    elif event["event"] == "stage_end":
        keys = [k for k in ("dense_acc", "acc_after_removal", "speedup", "jsv_after_removal_mean", "best_acc")
                if k in event]
        print(f"[{event['stage']:>8}] done: " + ", ".join(f"{k}={event[k]:.4g}" for k in keys),
              file=sys.stderr, flush=True)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tpp.run import load_run_data, train_dense

    cfg = _config_from_args(args)
    dense = train_dense(cfg, load_run_data(cfg), None if args.quiet else _progress)
    save_dense(args.out, dense)
    print(f"dense model ({cfg.model}, test acc {dense.metrics['dense_acc']:.2f}%) written to {args.out}",
          file=sys.stderr)
    if args.json:
        print(json.dumps(_json_safe(dense.metrics)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tpp.run import finetune_stage, load_run_data, model_spec, prune_stage, train_dense

    cfg = _config_from_args(args)
    progress = None if args.quiet else _progress
    start = time.perf_counter()
    data = load_run_data(cfg)
    dense = (load_dense(args.dense, expected=model_spec(cfg, data)) if args.dense
             else train_dense(cfg, data, progress))
    pruned = prune_stage(cfg, dense, data, progress)
    if args.save_pruned:
        save_pruned(args.save_pruned, pruned)
    result = finetune_stage(cfg, pruned, data, progress)
    metrics = {"status": result.status, **dense.metrics, **pruned.metrics, **result.metrics,
               "time_total_s": time.perf_counter() - start}
    print(f"{cfg.method} pr={cfg.pr} lr={cfg.lr}: {result.status}, best acc {metrics['best_acc']:.2f}% "
          f"(dense {dense.metrics.get('dense_acc', float('nan')):.2f}%), "
          f"FLOPs speed-up {metrics['speedup']:.2f}x",
          file=sys.stderr)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), **_json_safe(metrics)}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print("models:  " + ", ".join(list_models()))
    print("data:    " + ", ".join(list_data()))
    print("methods:")
    for m in METHODS.values():
        print(f"  {m.name:<10} {m.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpp", description="Single pruning runs: pretrain a dense model, "
                                     "or prune + finetune one configuration.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train a dense model and save it",
                       description="Train the unpruned model (cosine LR from --dense-lr, --dense-epochs).")
    _add_config_flags(p, skip=("method", "pr", "prune_layers", "growth", "update_reg_interval",
                               "reg_upper_limit", "stabilize_reg_interval", "lw_opp", "reg_lr", "lr",
                               "epochs",
                               "schedule", "milestones", "jsv_every"))
    p.add_argument("--out", required=True, help="where to write the dense checkpoint (.pt)")
    p.set_defaults(fn=cmd_pretrain)
    r = sub.add_parser("run", help="prune and finetune one configuration",
                       description="Dense model (--dense PATH, or trained first) -> prune stage -> finetune.")
    _add_config_flags(r)
    r.add_argument("--dense", help="dense checkpoint from `tpp pretrain` (default: train one first)")
    r.add_argument("--save-pruned", metavar="PATH", help="also save the pruned model before finetuning")
    r.set_defaults(fn=cmd_run)
    for sp in (p, r):
        sp.add_argument("--json", action="store_true",
                        help="print the final metrics as one JSON line on stdout")
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
    except DivergedError as e:  # the dense or prune stage blew up: a result to act on, not a crash
        print(f"tpp: {e}; lower the stage's learning rate", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
