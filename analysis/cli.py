"""`tpp-analyze STUDY`: the LR-sensitivity report of a study, from what it logged to MLflow.

Bad input is one line on stderr naming the field, exit code 2. Heavy imports (MLflow, matplotlib) happen
only after the arguments are checked, so mistakes are reported at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

PROG = "tpp-analyze"
METRIC_CHOICES = ("auto", "test_acc_at_best_val", "best_acc", "last_acc")
SENSITIVITY_CHOICES = ("regret", "window", "range")
_API_FIELDS = {"baseline": "--baseline", "methods": "--methods", "metric": "--metric",
               "sensitivity": "--sensitivity", "group_by": "--group-by", "out": "--out",
               "max_seeds": "--until-decided", "step": "--seed-step"}


class _BadInput(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _lr_pair(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        a, b = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        a = b = math.nan
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise _BadInput("--lrs", f"expected two positive learning rates separated by a comma, got {text!r}")
    if math.isclose(a, b):
        raise _BadInput("--lrs", f"expected two different learning rates, got {text!r}")
    return a, b


def _names(text: str | None, field: str) -> list[str] | None:
    if text is None:
        return None
    names = [m.strip() for m in text.split(",")]
    if not all(names):
        raise _BadInput(field, f"expected method names separated by commas, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="How much does the result depend on the finetuning LR, per method and pruning ratio, "
                    "and is one method less sensitive than another? Reads a study's MLflow runs (no "
                    "re-running) and writes an HTML report (verdict, summary, figures, tables) with the CSV "
                    "tables behind every number; logs them to the study run.",
        epilog="examples: tpp-analyze quick --storage studies    |    "
               "tpp-analyze quick --tracking-uri sqlite:////abs/studies/quick/mlflow.db --out report/ "
               "--baseline l1 --methods tpp,greg",
    )
    p.add_argument("study", metavar="STUDY", help="study name (or the id of its parent MLflow run)")
    p.add_argument("--storage", default=None,
                   help="the studies folder tpp-study wrote (DIR/STUDY/study.json names the tracking URI); "
                        "the report then goes to DIR/STUDY/report/ unless --out is given")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: from --storage, else $MLFLOW_TRACKING_URI), e.g. "
                        "sqlite:////abs/mlflow.db or http://127.0.0.1:5000")
    p.add_argument("--out", default=None, help="output folder (default: DIR/STUDY/report with --storage, "
                                                "else reports/STUDY)")
    p.add_argument("--baseline", default=None, help="the method every other method is compared with, paired "
                                                    "by seed and LR (default: l1 when the study has it, else "
                                                    "its first method)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare with the baseline (default: every other method)")
    p.add_argument("--compare", default=None, metavar="TREATMENT,BASELINE",
                   help="shorthand for --methods TREATMENT --baseline BASELINE")
    p.add_argument("--metric", default="auto",
                   help="accuracy of every table but the paper table: auto (test_acc_at_best_val when the "
                        "study held out a validation split, else best_acc), test_acc_at_best_val, best_acc "
                        "(max test accuracy over epochs, the paper's convention) or last_acc")
    p.add_argument("--sensitivity", default="regret",
                   help="the primary LR-sensitivity measure the verdict rests on, chosen before looking: "
                        "regret "
                        "(default: the mean accuracy lost to a blindly picked LR over the ladder, no "
                        "tolerance), window (the robust window at --delta) or range (max - min over the "
                        "stable LRs); the others stay in the tables as descriptive measures")
    p.add_argument("--delta", default="1", help="robust window: accuracy within DELTA points of the best "
                                                "(default: 1; the tables also give δ = 1, 2 and 5)")
    p.add_argument("--lrs", default="1e-3,1e-2",
                   help="the two LRs A,B of the paper's Acc. diff = acc(A) - acc(B) (default: 1e-3,1e-2)")
    p.add_argument("--group-by", default=None,
                   help="extra comma-separated run parameters to measure separately (method, pr, growth and "
                        "the finetuning recipe keys that vary always are)")
    p.add_argument("--until-decided", type=int, default=None, metavar="MAX_SEEDS",
                   help="first add seeds to the study (tpp-study extend, needs --storage) in waves of "
                        "--seed-step until every primary verdict is decided or MAX_SEEDS is reached; alpha "
                        "is split over the planned looks, so the answer stays valid under repeated looks")
    p.add_argument("--seed-step", type=int, default=2, help="seeds added per wave (default: 2)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the study's MLflow run")
    p.add_argument("--quiet", action="store_true", help="print only where the report is")
    return p


def _resolve(args) -> dict:
    """The checked arguments of build_report, or _BadInput naming the flag."""
    from analysis.load import tracking_uri_problem
    from analysis.locate import LocateError, study_folder, tracking_uri_from_storage
    from study.store import StudyFolder

    lrs = _lr_pair(args.lrs)
    try:
        delta = float(args.delta)
    except ValueError:
        delta = math.nan
    if not (math.isfinite(delta) and delta > 0):
        raise _BadInput("--delta", f"expected a positive number of accuracy points, got {args.delta!r}")
    if args.metric not in METRIC_CHOICES:
        raise _BadInput("--metric", f"got {args.metric!r}; accepted: {', '.join(METRIC_CHOICES)}")
    baseline, methods = args.baseline, _names(args.methods, "--methods")
    if args.compare is not None:
        pair = _names(args.compare, "--compare")
        if len(pair) != 2 or pair[0] == pair[1]:
            raise _BadInput("--compare",
                            f"expected TREATMENT,BASELINE (two different methods), got {args.compare!r}")
        methods, baseline = [pair[0]], pair[1]
    uri, out = args.tracking_uri, args.out
    if args.storage is not None:
        if uri is None:
            try:
                uri = tracking_uri_from_storage(args.storage, args.study)
            except LocateError as exc:
                raise _BadInput("--storage", str(exc).removeprefix("--storage: ")) from None
        out = out or str(StudyFolder(study_folder(args.storage, args.study)).report_dir)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    problem = tracking_uri_problem(uri)
    if problem:
        if not uri:
            problem = "none given (pass --storage DIR or --tracking-uri URI, or set MLFLOW_TRACKING_URI)"
        raise _BadInput("--tracking-uri", problem)
    if args.sensitivity not in SENSITIVITY_CHOICES:
        raise _BadInput("--sensitivity",
                        f"got {args.sensitivity!r}; accepted: {', '.join(SENSITIVITY_CHOICES)}")
    return {"tracking_uri": uri, "out_dir": Path(out) if out else None, "lrs": lrs, "metric": args.metric,
            "baseline": baseline, "methods": methods, "delta": delta, "sensitivity": args.sensitivity,
            "group_by": _names(args.group_by, "--group-by") or ()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        kw = _resolve(args)
    except _BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    from analysis.load import StudyNotFoundError
    from analysis.report import build_report

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    try:
        if args.until_decided is not None:
            if not args.storage:
                raise _BadInput("--until-decided", "adds seeds to a study folder: give --storage too")
            from analysis.grow import seeds_until_decided

            seeds_until_decided(args.study, args.storage, args.until_decided, args.seed_step,
                                baseline=kw["baseline"], sensitivity=args.sensitivity, progress=say)
        path = build_report(args.study, log=not args.no_log, progress=say, **kw)
    except _BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (StudyNotFoundError, ValueError, FileNotFoundError) as exc:
        msg = str(exc)
        field = msg.split(":", 1)[0]
        if field in _API_FIELDS:  # name the flag, not the build_report argument
            msg = _API_FIELDS[field] + msg[len(field):]
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback helps nobody here
        first = (str(exc).strip().splitlines() or [""])[0][:200]  # SQLAlchemy's errors run over 3 lines
        print(f"{PROG}: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    if args.quiet:
        print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
