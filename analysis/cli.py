"""`tpp-analyze STUDY`: the LR-sensitivity report of a study, from what it logged to MLflow.

Bad input is one line on stderr naming the field, exit code 2. Heavy imports (MLflow, matplotlib, Optuna)
happen only after the arguments are checked, so mistakes are reported at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

PROG = "tpp-analyze"


class _BadInput(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _pair(text: str, field: str, *, ordered: bool) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise _BadInput(field, f"expected two numbers separated by a comma, got {text!r}")
    try:
        a, b = float(parts[0]), float(parts[1])
    except ValueError:
        raise _BadInput(field, f"expected two numbers separated by a comma, got {text!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise _BadInput(field, f"learning rates must be positive numbers, got {text!r}")
    if ordered and not a < b:
        raise _BadInput(field, f"expected LOW,HIGH with LOW < HIGH, got {text!r}")
    if not ordered and math.isclose(a, b):
        raise _BadInput(field, f"expected two different learning rates, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="How much does the result depend on the finetuning LR, per method and pruning ratio, "
                    "and does TPP reduce that dependence? Reads a study's MLflow runs (no re-running) and "
                    "writes an HTML report, figures and CSV/Markdown tables; logs them to the study run.",
        epilog="example: tpp-analyze quick --tracking-uri sqlite:////abs/studies/quick/mlflow.db "
               "--out studies/quick/report",
    )
    p.add_argument("study", metavar="STUDY", help="study name (or the id of its parent MLflow run)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI), e.g. sqlite:////abs/mlflow.db "
                        "or http://127.0.0.1:5000")
    p.add_argument("--out", default=None, help="output folder (default: reports/STUDY)")
    p.add_argument("--lrs", default="1e-3,1e-2",
                   help="the two LRs of the paper's Acc. diff = acc(A) - acc(B) (default: 1e-3,1e-2)")
    p.add_argument("--window", default=None,
                   help="LR window LOW,HIGH for the robustness score (mean accuracy over the window; "
                        "default: the whole LR range studied)")
    p.add_argument("--metric", default="best_acc",
                   help="per-trial accuracy metric (default: best_acc; e.g. last_acc)")
    p.add_argument("--compare", default="tpp,l1",
                   help="TREATMENT,BASELINE methods compared in the summary and difference heatmap "
                        "(default: tpp,l1)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the study's MLflow run")
    p.add_argument("--quiet", action="store_true", help="print only where the report is")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from analysis.load import tracking_uri_problem

    try:
        lrs = _pair(args.lrs, "--lrs", ordered=False)
        window = _pair(args.window, "--window", ordered=True) if args.window else None
        compare = [m.strip() for m in args.compare.split(",")]
        if len(compare) != 2 or not all(compare):
            raise _BadInput("--compare", f"expected TREATMENT,BASELINE, got {args.compare!r}")
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        problem = tracking_uri_problem(uri)
        if problem:
            raise _BadInput("--tracking-uri", problem)
    except _BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    from analysis.load import StudyNotFoundError
    from analysis.report import build_report

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    try:
        path = build_report(args.study, uri, args.out, lrs=lrs, window=window, metric=args.metric,
                            treatment=compare[0], baseline=compare[1], log=not args.no_log, progress=say)
    except (StudyNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback helps nobody here
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.quiet:
        print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
