"""The quick study end to end, lockstep on vs off: the same design (study/configs/quick.yaml), one study
each, interleaved on, off (`--repeats` pairs), on one embedded Ray. Members per hour from each study's
wall time (StudyResult.wall_s: dense model + Tune) and from study.run() end to end.

    python -m benchmarks.lockstep_study [--config study/configs/quick.yaml] [--repeats 1] [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

from benchmarks.timing import machine, parser, table

QUICK = {"finetune.epochs": 1, "finetune.lr": [1e-3, 1e-2], "dense.epochs": 1, "space.pr": [0.5],
         "space.seeds": [0], "space.growth": [0.2], "fixed.stabilize_reg_interval": 10}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="study/configs/quick.yaml")
    p.add_argument("--repeats", type=int, default=1, help="on/off pairs (ratios are their medians)")
    args = p.parse_args()
    import ray

    import study
    from study.driver import _start_ray

    storage = tempfile.mkdtemp(prefix="tpp-lockstep-study-")
    rows, ratios = [], []
    started = _start_ray(None, None)  # one embedded Ray for all: each wall_s excludes its start anyway
    try:
        for i in range(1 if args.quick else args.repeats):
            walls = {}
            for on in (True, False):
                t0 = time.perf_counter()
                res = study.run(args.config, storage=storage, name=f"ls-{'on' if on else 'off'}-{i}",
                                lockstep=on, if_exists="replace", **({"set": QUICK} if args.quick else {}))
                total = time.perf_counter() - t0
                walls[on] = res.wall_s
                rows.append({"pair": i, "lockstep": on, "runs": res.num_runs, "status": dict(res.counts),
                             "study wall s": res.wall_s, "study.run() s": total,
                             "runs per hour": res.num_runs / res.wall_s * 3600})
            ratios.append(walls[False] / walls[True])
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()
    print(table(rows))
    print(f"\nlockstep on vs off, members per hour: {statistics.median(ratios):.3g}x "
          f"(median of {len(ratios)}; goal >= 1.5)")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
