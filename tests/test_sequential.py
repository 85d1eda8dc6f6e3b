"""Seeds until decided: the planned looks, the error rate of the rule under repeated looks (simulated on
null data, against the naive rule that spends the full alpha at every look), and a real study grown in
waves through `tpp-analyze --until-decided`, its outcome stated in the report."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from test_study_run import tiny

import study
from analysis.cli import main as analyze
from analysis.grow import wave
from analysis.sequential import Looks, SequentialOutcome, decided, null_error_rate
from study.cli import main as tpp_study
from study.describe import describe
from study.design import points, size


def test_the_looks_are_planned_up_front_and_say_which_can_decide():
    looks = Looks.plan(4, 12, 2)
    assert looks.seeds == (4, 6, 8, 10, 12) and looks.per_look == pytest.approx(0.01)
    assert looks.first_decisive == 3  # 8 seeds: the smallest sign-flip p is 2/256 < 0.01; 6 seeds: 2/64
    assert Looks.plan(6, 11, 2).seeds == (6, 8, 10, 11)  # the budget is always the last look
    assert Looks.plan(3, 4, 1).first_decisive is None  # 4 seeds can never reach p < 0.025
    with pytest.raises(ValueError, match="max_seeds"):
        Looks.plan(6, 4, 2)


def test_on_null_data_the_planned_rule_keeps_its_error_rate_and_the_naive_one_does_not():
    """Two identical methods: every 'decided' is false. 1,500 simulated studies, 5 looks each."""
    looks = Looks.plan(4, 12, 2)
    planned, naive = null_error_rate(looks, trials=1500, seed=1)
    slack = 3 * math.sqrt(0.05 * 0.95 / 1500)  # three Monte Carlo standard errors at alpha
    assert planned <= 0.05 + slack, planned
    assert naive > 0.05 + slack, naive  # looking five times at alpha 0.05 each: about twice the rate


def test_decided_is_the_verdict_rule_at_the_looks_alpha():
    table = pd.DataFrame({"primary": [True, True, True, True, False],
                          "n": [8, 8, 8, 1, 8], "p": [0.0078, 0.0078, 0.03, 0.0, 0.0001],
                          "lo": [0.5, -0.2, 0.5, 0.5, 0.5], "hi": [1.0, 1.0, 1.0, 1.0, 1.0]})
    assert decided(table, 0.01).tolist() == [True, False, False, False]  # non-primary rows are not looked at
    out = SequentialOutcome([4, 6, 8], 0.05, 0.05 / 3, 2, 6, True, [], runs=24, runs_at_max=32)
    assert out.runs_saved == 8 and "look 2 of 3" in out.sentence() and "8 saved against 32" in out.sentence()


def test_a_wave_gives_seeds_to_both_sides_of_the_undecided_comparisons_only():
    rows = [pd.Series({"method": "tpp", "baseline": "l1", "pr": 0.8, "growth": g, "baseline_growth": np.nan,
                       "group": f"tpp pr=0.8 g={g:g}"}) for g in (1e-3, 1e-2)]
    first = wave([], rows, [6, 7])
    assert first == [{"method": "l1", "pr": 0.8, "seeds": [6, 7]},
                     {"method": "tpp", "pr": 0.8, "growth": 1e-3, "seeds": [6, 7]},
                     {"method": "tpp", "pr": 0.8, "growth": 1e-2, "seeds": [6, 7]}]
    # the next wave: only g=1e-2 is still open; earlier waves are kept, the shared baseline grows once
    second = wave(first, rows[1:], [8, 9])
    assert second == [{"method": "l1", "pr": 0.8, "seeds": [6, 7, 8, 9]},
                      {"method": "tpp", "pr": 0.8, "growth": 1e-3, "seeds": [6, 7]},
                      {"method": "tpp", "pr": 0.8, "growth": 1e-2, "seeds": [6, 7, 8, 9]}]


def test_extra_seeds_add_exactly_the_named_groups_points():
    """The design with space.extra_seeds against the points built by hand; its size and plan agree."""
    cfg = study.load_config(tiny("x", space={"pr": [0.5, 0.75], "growth": [0.1, 0.2], "seeds": [0, 1],
                                             "extra_seeds": [{"method": "l1", "pr": 0.75, "seeds": [2, 3]},
                                                             {"method": "tpp", "pr": 0.75, "growth": 0.2,
                                                              "seeds": [2, 3]}]}))
    base = {(m, pr, g, s) for pr in (0.5, 0.75) for s in (0, 1)
            for m, g in (("l1", None), ("tpp", 0.1), ("tpp", 0.2))}
    extra = {("l1", 0.75, None, s) for s in (2, 3)} | {("tpp", 0.75, 0.2, s) for s in (2, 3)}
    got = [(p.method, p.pr, p.growth, p.seed) for p in points(cfg)]
    assert len(got) == len(set(got)) and set(got) == base | extra
    assert size(cfg)[0] == len(got) == 16
    table = [line.split() for line in describe(cfg).splitlines()[2:8]]
    assert [r[3] for r in table] == ["2", "4", "2", "2", "2", "4"]  # seeds per (method, pr, growth) group
    assert study.load_config(cfg.as_input()) == cfg  # the saved config reads back the same


@pytest.mark.parametrize(("entry", "says"), [
    ({"method": "l2", "seeds": [2]}, "space.extra_seeds[0].method: got 'l2'; accepted: l1, tpp"),
    ({"pr": 0.6, "seeds": [2]}, "space.extra_seeds[0].pr: got 0.6; accepted: a level of space.pr (0.5)"),
    ({"growth": 0.3, "seeds": [2]}, "space.extra_seeds[0].growth: got 0.3"),
    ({"seeds": [2, 2]}, "duplicate seeds"),
])
def test_extra_seeds_that_name_no_level_are_refused(entry, says):
    with pytest.raises(study.StudyConfigError, match=re.escape(says)):
        study.load_config(tiny("x", space={"pr": [0.5], "growth": [0.2], "seeds": [0],
                                           "extra_seeds": [entry]}))


@pytest.mark.slow
def test_a_study_grown_until_decided_reports_the_looks_and_the_runs(tmp_path, capsys):
    storage = tmp_path / "studies"
    cfg = tiny("seq", space={"pr": [0.75], "growth": [0.2], "seeds": [0, 1]}, finetune__lr=[1e-2, 3e-2])
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(cfg))
    assert tpp_study(["run", str(tmp_path / "seq.yaml"), "--storage", str(storage)]) == 0
    capsys.readouterr()
    assert analyze(["seq", "--storage", str(storage), "--until-decided", "8", "--seed-step", "3",
                    "--no-log"]) == 0
    out = capsys.readouterr().out
    # looks at 2, 5, 8 seeds (the budget last), alpha 0.05 / 3 each; waves of extend in between
    assert "look 2/3: adding seeds 2..4 (5 in all) to the 1 undecided comparison(s)" in out
    assert "look 3/3: adding seeds 5..7 (8 in all)" in out
    # the seeds went to both sides of the one comparison, as extra seeds of its two prune groups
    saved = yaml.safe_load((storage / "seq" / "study_config.yaml").read_text())["space"]
    assert saved["seeds"] == [0, 1] and saved["extra_seeds"] == [
        {"method": "l1", "pr": 0.75, "seeds": list(range(2, 8))},
        {"method": "tpp", "pr": 0.75, "growth": 0.2, "seeds": list(range(2, 8))}]
    page = (storage / "seq" / "report" / "report.html").read_text()
    assert "look 3 of 3 (looks at 2, 5, 8 seeds; alpha 0.05 split over the looks: 0.01667 per look)" in page
    assert "32 runs, 0 saved against 32 at the maximum" in page
    # a second plan of looks would spend alpha again: refused in one line naming the flag
    assert analyze(["seq", "--storage", str(storage), "--until-decided", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--until-decided: study seq already gave some groups extra seeds" in err
