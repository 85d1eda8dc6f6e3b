"""Every benchmark script runs in its smoke mode and prints a Markdown table (no timing assertions:
the numbers of a loaded CI machine mean nothing; BENCHMARKS.md has real runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["regularizer_overhead", "pruned_speedup", "jsv_cost", "data_path", "gpu_throughput", "lockstep",
           "lockstep_study", "study_overhead", "mlflow_store", "design_scale", "study_scale"]


def test_every_script_is_listed():
    found = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "timing", "nets"}
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_prints_a_table(name):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("|---") for line in lines), proc.stdout[-2000:]
    assert any(line.startswith("machine: ") for line in lines), proc.stdout[-2000:]
