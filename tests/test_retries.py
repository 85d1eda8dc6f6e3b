"""One member, one MLflow run, whatever Tune retries; and methods registered in a user's script reach the
Ray workers that run its trials.

The README's scripted pattern, as a user runs it: a script registers a selection method with
`@register_method` and calls `study.run` (a real subprocess, its embedded Ray, its worker processes).
The method's first call fails -- by raising, or by killing its worker process -- and Tune retries the trial
(`max_failures: 1`). Before, the retry created a second MLflow run per member while the first stayed
RUNNING forever, and the script's method was unknown to the workers (every run failed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import yaml
from test_study_run import tiny

SCRIPT = '''
import math, os, sys
import torch
import study
from tpp.methods import register_method


@register_method("flaky-first", description="prunes the first units; its first call ever fails")
def flaky_first(ctx):
    mark = os.path.join(os.environ["MARKS"], "attempted")
    if not os.path.exists(mark):
        open(mark, "w").close()
        if os.environ["FAIL_HOW"] == "kill":
            os._exit(1)  # the worker process dies
        raise RuntimeError("the first attempt fails")
    masks = {}
    for root, group in ctx.groups.items():
        n = group.units
        mask = torch.zeros(n, dtype=torch.bool)
        mask[: min(math.ceil(ctx.ratios[root] * n), n - 1)] = True
        masks[root] = mask
    return masks


result = study.run(sys.argv[1], storage=sys.argv[2])
sys.exit(result.exit_code)
'''


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_retried_trial_keeps_one_run_per_member_and_script_methods_reach_the_workers(tmp_path, how):
    from study.record import collect
    from study.schema import TAG_MEMBER, TAG_STATUS
    from study.store import StudyFolder
    from study.tracking import children

    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = tiny("retry", methods=["l1", {"name": "flaky-first", "label": "flaky"}],
               space={"pr": [0.5], "growth": [0.2], "seeds": [0]}, finetune__lr=[1e-2, 3e-2], max_failures=1)
    (tmp_path / "retry.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MARKS=str(marks), FAIL_HOW=how)
    proc = subprocess.run([sys.executable, "script.py", "retry.yaml", str(tmp_path / "studies")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (marks / "attempted").is_file()  # the first attempt did fail

    folder = StudyFolder(tmp_path / "studies" / "retry")
    meta = folder.read_meta()
    runs = children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id)
    members = Counter(r.data.tags[TAG_MEMBER] for r in runs if TAG_MEMBER in r.data.tags)
    assert len(members) == meta.num_runs == 4 and set(members.values()) == {1}, members
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[TAG_STATUS] for r in runs} == {"completed"}
    assert collect(folder).counts == {"completed": 4}
