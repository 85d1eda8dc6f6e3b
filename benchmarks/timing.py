"""Side-by-side timing: the machine is noisy, so variants are interleaved and medians reported."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, calling them in turn (A B C A B C ...)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    """One line describing where the numbers were taken."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load avg 1/5/15 min {load}")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, CI-sized time")
    return p


def table(rows: list[dict[str, object]]) -> str:
    """A Markdown table of dict rows (same keys), numbers shown with 3 significant digits."""
    keys = list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def interleaved_setup(variants: dict[str, Callable[[], Callable[[], object]]], repeats: int,
                      warmup: int = 1) -> dict[str, float]:
    """Like `interleaved`, but each variant is a factory called untimed before every measurement.

    For measurements that need a fresh state each time whose creation must not count (a new epoch
    iterator with its worker processes already started). The timed callable is dropped and garbage
    collected untimed too, so shutting down workers never lands in another variant's timing.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + repeats):
        for name, factory in variants.items():
            fn = factory()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            del fn
            gc.collect()
            if rep >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}
