"""`tpp-study`: run, resume and inspect hyperparameter studies of pruning methods.

    tpp-study run study/configs/quick.yaml                    # embedded local Ray, SQLite MLflow
    tpp-study run CONFIG --address auto --tracking-uri http://127.0.0.1:5000 --storage /shared/studies
    tpp-study resume quick                                    # continue an interrupted study
    tpp-study extend quick --set 'space.seeds=[0,1,2,3,4,5,6,7]'   # grow it: only the new runs run
    tpp-study list                                            # studies under ./studies
    tpp-study status quick

Exit codes: see EXIT_DOC (also in --help).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from study.config import StudyConfigError

EXIT_DOC = ("Exit codes: 0 completed; 1 interrupted or stopped (resume it); 2 bad config or cannot start "
            "(nothing ran); 3 every run finished but some failed (`tpp-study status` lists them).")
EPILOG = ("Configs: study/configs/*.yaml (quick.yaml is the embedded demo). Paths in a config are relative "
          "to the current directory. A cluster: --address auto (or ray://HOST:10001, or RAY_ADDRESS) with "
          "--storage on a shared path and --tracking-uri http://HOST:PORT of an mlflow server. " + EXIT_DOC)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpp-study", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a study from a YAML config", description="Run a study end to end: "
                       "dense model once, then every trial on Ray Tune, logged to MLflow.")
    r.add_argument("config", help="study config (YAML), e.g. study/configs/quick.yaml")
    r.add_argument("--address", help="Ray cluster to join: auto, ray://HOST:10001, HOST:PORT "
                   "(default: RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI: http://HOST:PORT or sqlite:///ABS.db "
                   "(default: sqlite:///<study folder>/mlflow.db)")
    r.add_argument("--experiment", help="MLflow experiment name (default: the study name)")
    r.add_argument("--storage", help="folder holding study folders (default: the config's, ./studies)")
    r.add_argument("--num-trials", type=int, help="override num_trials (not for the grid sampler)")
    r.add_argument("--name", help="override the study name (the folder name under --storage)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    r.add_argument("--if-exists", choices=("error", "replace", "resume"), default="error",
                   help="when the study folder exists: refuse (default), delete it first, or resume it")
    _add_set(r)

    e = sub.add_parser("extend", help="add seeds, LRs, PRs, methods or recipe levels to a study",
                       description="Run only what a grown config adds to a study, into the same study: the "
                       "dense model, cached prune stages and finished runs are reused. The new config must "
                       "hold every run of the study (more levels; every other setting unchanged).")
    e.add_argument("study", metavar="NAME_OR_PATH", help="study name (under --storage) or study folder")
    e.add_argument("config", nargs="?", help="the grown config (YAML; default: the study's own config)")
    _add_set(e)
    e.add_argument("--storage", default="./studies", help="where to look up NAME (default: ./studies)")
    e.add_argument("--address", help="Ray cluster to join (default: the one the study used, else local)")
    e.add_argument("--dry-run", action="store_true", help="say what would be added, change nothing")

    s = sub.add_parser("resume", help="continue an interrupted study", description="Continue a study: "
                       "finished trials are kept, unfinished ones continue from their last checkpoint.")
    s.add_argument("study", metavar="NAME_OR_PATH", help="study name (under --storage) or study folder")
    s.add_argument("--storage", default="./studies", help="where to look up NAME (default: ./studies)")
    s.add_argument("--address", help="Ray cluster to join (default: the one the study used, else local)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI, if it moved (default: the study's)")

    pl = sub.add_parser("plan", help="show what a config would run, without running it",
                        description="A dry run: the design as a table (runs per method x PR x growth), the "
                        "prune stages to compute, the work in iterations, balance notes. Nothing starts.")
    pl.add_argument("config", help="study config (YAML), or a study's name or folder (its saved config)")
    pl.add_argument("--storage", default="./studies",
                    help="folder holding study folders, for a study given by name (default: ./studies)")
    pl.add_argument("--extend", metavar="STUDY", default=None,
                    help="plan CONFIG as an extension of STUDY: what it would add (tpp-study extend "
                    "--dry-run), then its design")
    pl.add_argument("--max-concurrent", type=int, default=None,
                    help="concurrent trials to plan prune units for (default: the config's, else 1)")
    _add_set(pl)

    ls = sub.add_parser("list", help="list the studies under a storage folder",
                        description="Studies under --storage with status, trials done/total, parent run.")
    ls.add_argument("--storage", default="./studies",
                    help="folder holding study folders (default: ./studies)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    st = sub.add_parser("status", help="show one study", description="A study's status, progress, best trial "
                        "and where its results are (asks MLflow for per-trial counts when reachable).")
    st.add_argument("study", metavar="NAME_OR_PATH")
    st.add_argument("--storage", default="./studies", help="where to look up NAME (default: ./studies)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one key of the config, a YAML value: --set 'space.seeds=[0,1,2,3,4,5]' "
                   "(repeatable)")


def _sets(items: list[str]) -> dict[str, Any]:
    """The --set KEY=VALUE items as {dotted key: YAML value}; ValueError naming the bad one."""
    import yaml

    sets: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: got {item!r}; accepted: KEY=VALUE, e.g. 'space.seeds=[0,1,2,3,4,5]'")
        try:
            sets[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key}: not a YAML value ({str(e).splitlines()[0]})") from None
    return sets


def _err(msg: str) -> int:
    print(f"tpp-study: error: {msg}", file=sys.stderr)
    return 2


def _interrupted(e: KeyboardInterrupt) -> int:
    print(f"tpp-study: {e}" if str(e) else "tpp-study: interrupted", file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from study.driver import StudyError, run

    overrides: dict[str, Any] = {"address": args.address, "tracking_uri": args.tracking_uri,
                                 "experiment": args.experiment, "storage": args.storage,
                                 "num_trials": args.num_trials, "name": args.name, "num_cpus": args.num_cpus}
    try:
        result = run(args.config, if_exists=args.if_exists, set=_sets(args.set), **overrides)
    except (StudyConfigError, StudyError, ValueError) as e:
        return _err(str(e))
    except KeyboardInterrupt as e:
        return _interrupted(e)
    return result.exit_code


def cmd_resume(args: argparse.Namespace) -> int:
    from study.driver import StudyError, resume

    try:
        result = resume(args.study, storage=args.storage, address=args.address,
                        tracking_uri=args.tracking_uri)
    except (StudyConfigError, StudyError, FileNotFoundError, ValueError) as e:
        return _err(str(e))
    except KeyboardInterrupt as e:
        return _interrupted(e)
    return result.exit_code


def cmd_extend(args: argparse.Namespace) -> int:
    from study.errors import StudyError
    from study.extension import Extension, extend

    try:
        out = extend(args.study, args.config, set=_sets(args.set), storage=args.storage, address=args.address,
                     dry_run=args.dry_run)
    except (StudyConfigError, StudyError, FileNotFoundError, ValueError) as e:
        return _err(str(e))
    except KeyboardInterrupt as e:
        return _interrupted(e)
    if isinstance(out, Extension):
        print(out.summary())
        return 0
    return out.exit_code


def cmd_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from study.record import collect, study_status
    from study.store import StudyMeta, list_studies

    if not Path(args.storage).is_dir():
        return _err(f"--storage: {args.storage} is not a folder (studies live in <storage>/<name>/)")
    rows = []
    for f in list_studies(args.storage):
        try:
            m = f.read_meta()
        except (OSError, ValueError) as e:  # one damaged study.json: said on its row, the others listed
            rows.append((StudyMeta(name=f.name), f"damaged ({str(e).split('(')[-1].rstrip(')')[:40]})", None))
            continue
        try:
            res = collect(f, recorded=True) if m.parent_run_id else None
            finished = sum(res.counts.get(k, 0) for k in ("completed", "diverged", "failed")) if res else 0
        except Exception:  # noqa: BLE001 - an unreadable store shows as unknown, the others still list
            res, finished = None, None
        status = (study_status(f, res) if res or not m.parent_run_id
                  else "running" if f.holder() else "unknown")
        rows.append((m, status, finished))
    if args.json:
        print(json.dumps([{**asdict(m), "status": st, "finished": n} for m, st, n in rows], indent=2))
        return 0
    if not rows:
        print(f"no studies under {args.storage}")
        return 0
    print(f"{'name':<24} {'status':<12} {'runs':>9}  {'parent run':<32}  tracking URI")
    for m, st, n in rows:
        done = f"{'?' if n is None else n}/{m.num_runs}"
        print(f"{m.name:<24} {st:<12} {done:>9}  "
              f"{m.parent_run_id or '-':<32}  {m.tracking_uri}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from study.record import collect, study_status
    from study.store import disk_usage, find_study, human_bytes
    from study.tracking import TrackingUnavailable, is_http, one_line, server_healthy

    try:
        folder = find_study(args.study, args.storage)
        meta = folder.read_meta()
    except (FileNotFoundError, ValueError) as e:
        return _err(str(e))
    info: dict[str, Any] = {**asdict(meta), "path": str(folder.path), "disk_bytes": disk_usage(folder.path),
                            "running_by": folder.holder()}
    reachable = not is_http(meta.tracking_uri) or server_healthy(meta.tracking_uri)
    res = None
    if reachable and meta.parent_run_id:
        try:
            res = collect(folder, recorded=True)
            info.update(counts=res.counts, reuse=res.reuse, best=res.best, ui=res.ui_lines())
        except TrackingUnavailable as e:  # the store is gone: say so, create nothing
            return _err(f"mlflow: {e}")
        except Exception as e:  # noqa: BLE001 - a damaged store: one line, and not a success
            return _err(f"mlflow: {meta.tracking_uri} cannot be read as the study's MLflow store "
                        f"({one_line(e)})")
    info["status"] = study_status(folder, res) if res or not meta.parent_run_id else (
        "running" if info["running_by"] else "unknown")
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    counts = info.get("counts", {})
    finished = sum(counts.get(k, 0) for k in ("completed", "diverged", "failed"))
    print(f"study      {meta.name}  ({info['status']})")
    print(f"folder     {folder.path}  ({human_bytes(info['disk_bytes'])})")
    print(f"runs       {finished}/{meta.num_runs} finished ({counts.get('failed', 0)} failed)"
          + (f", running ({info['running_by']})" if info["running_by"] else ""))
    for ext in meta.extensions:
        print(f"extended   {ext['at']}: {ext['runs_before']} -> {ext['runs_after']} runs "
              f"({', '.join(ext['changed'][:4])}{' ...' if len(ext['changed']) > 4 else ''})")
    if counts:
        print("by status  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print("prune      " + ", ".join(f"{k} {v}" for k, v in sorted(info["reuse"].items())))
    best = info.get("best")
    if best:
        name = best.get("run_name") or best.get("trial")
        print(f"best       {best.get('metric', '')} {best['value']:.2f}  {name}")
    print(f"MLflow     {meta.tracking_uri}  experiment {meta.experiment!r}, parent run {meta.parent_run_id}")
    print(f"created    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(meta.created))}")
    for line in info.get("ui", []):
        print(line)
    if info["status"] in ("interrupted", "failed"):
        print(f"resume     tpp-study resume {shlex.quote(str(folder.path))}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from study.describe import describe
    from study.design import dense_run_config
    from study.loading import load_config
    from study.store import find_study
    from tpp.data import DataError
    from tpp.run import load_run_data, run_splits

    source = args.config
    if not Path(source).is_file():
        try:
            source = str(find_study(source, args.storage).config_path)
        except FileNotFoundError as e:
            return _err(f"config: {args.config} is neither a config file nor a study: {e}")
    try:
        sets = _sets(args.set)
        cfg = load_config(source, set=sets)
        run_cfg = dense_run_config(cfg)
        train = run_splits(run_cfg, load_run_data(run_cfg))[0].num_train  # what every stage trains on
    except (StudyConfigError, DataError, ValueError) as e:
        return _err(str(e).splitlines()[0])
    if args.extend:
        from study.errors import StudyError
        from study.extension import extend

        try:
            print(extend(args.extend, source, set=sets, storage=args.storage, dry_run=True).summary())
        except (StudyConfigError, StudyError, FileNotFoundError) as e:
            return _err(str(e))
    slots = args.max_concurrent or cfg.max_concurrent or 1
    print(describe(cfg, slots, train))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"run": cmd_run, "resume": cmd_resume, "extend": cmd_extend, "plan": cmd_plan, "list": cmd_list,
            "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
