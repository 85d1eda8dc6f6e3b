"""The verdict and the summary, on synthetic studies with a known answer, and the summary-consistency check.

- "robust": 6 seeds; TPP's accuracy is built to be flat over the LR (a 2-decade window), L1's peaked
  (0.7 decade) and diverging at the top LR at PR 0.9: the verdict must say TPP's window is wider, with a
  95% CI above 0 and the exact p = 2/64.
- "two": the same, 2 seeds only: no direction may be claimed (the smallest p is 0.5), and it says why.
- "null": 6 seeds, TPP = L1 ± seed noise of both signs: a tie.
- "multi": l1, tpp at two growth rates, greg, l1+fpgm (2 seeds): every method against the baseline.

`check_report(out_dir)` reads summary.md, parses every sentence with the templates of analysis.summary and
recomputes each number from the CSV tables next to it (curves.csv, lr_points.csv, members.csv,
trainability.csv, comparison.csv), independently of analysis' own code; it returns the problems found.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_store import Member, ladder, new_store, write_study

LADDER = ladder(1e-4, 1e-1, 2)
X0 = -2.5  # the best log10 LR of both methods


def _acc(method: str, pr: float, k: int, seed: int, flat_l1: bool = False) -> float:
    x = math.log10(LADDER[k])
    wiggle = 0.15 * math.sin(3.0 * k + seed)  # seed-and-LR noise, small against both windows
    if method == "l1" and not flat_l1:
        return 80.0 - 10 * pr - 8.0 * (x - X0) ** 2 + 0.4 * seed + wiggle
    return 85.0 - 10 * pr - 1.0 * (x - X0) ** 2 + 0.4 * seed + wiggle


def _members(seeds, methods=(("l1", None), ("tpp", 1e-3)), *, null: bool = False) -> list[Member]:
    out = []
    for pr in (0.5, 0.9):
        for method, growth in methods:
            for seed in seeds:
                for k, lr in enumerate(LADDER):
                    acc = _acc(method, pr, k, seed)
                    if null:  # TPP = L1 + noise whose sign changes with the seed: no real difference
                        acc = _acc("l1", pr, k, seed) + (0.3 if seed % 2 else -0.3) * (method != "l1")
                    div = method == "l1" and pr == 0.9 and k == len(LADDER) - 1 and not null
                    out.append(Member(method, pr, lr, seed, 10.0 if div else acc, growth=growth,
                                      status="diverged" if div else "completed",
                                      jsv=(0.01 if method.startswith("l1") else 1.0) * (1 + 0.1 * seed),
                                      acc_removal=(20.0 if method.startswith("l1") else 60.0) + seed
                                      - 10 * pr,
                                      loss_removal=(3.0 if method.startswith("l1") else 1.0) + 0.1 * seed))
    return out


MULTI = (("l1", None), ("tpp", 1e-4), ("tpp", 1e-3), ("greg", 1e-3), ("l1+fpgm", None))
# #24's PR 0.8 pattern on LADDER (1e-4 ... 1e-1): L1 at chance up to 1e-3, TPP flat and high; both peak at
# 3.2e-2 with the same shape around the peak (2 points down on either side): equal δ = 1 windows.
CHANCE = {"l1": [10.0, 10.0, 10.0, 60.0, 90.0, 92.0, 90.0], "tpp": [88.0, 88.5, 89.0, 89.4, 89.5, 91.5, 89.5]}


def _chance_members() -> list[Member]:
    out = []
    for method, growth in (("l1", None), ("tpp", 1e-3)):
        for seed in range(6):
            for k, lr in enumerate(LADDER):
                acc = CHANCE[method][k] + 0.05 * seed * (k == 5) + 0.02 * math.sin(k + seed)
                out.append(Member(method, 0.8, lr, seed, acc, growth=growth, jsv=1.0, acc_removal=50.0,
                                  loss_removal=1.0))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdict")
    uri, client = new_store(root)
    robust = _members(range(6))
    write_study(client, "robust", robust, root=root, planned=len(robust))
    write_study(client, "two", _members(range(2)), root=root)
    write_study(client, "null", _members(range(6), null=True), root=root)
    write_study(client, "multi", _members(range(2), MULTI), root=root)
    write_study(client, "chance", _chance_members(), root=root)
    return uri, root


@pytest.fixture(scope="module")
def reports(store, tmp_path_factory):
    """report folder by name: robust, two, null, multi (baseline l1), multi_tpp (baseline tpp)."""
    from analysis import build_report

    uri, _ = store
    out = tmp_path_factory.mktemp("reports")
    paths = {}
    for name, study, kw in (("robust", "robust", {}), ("two", "two", {}), ("null", "null", {}),
                            ("multi", "multi", {}), ("multi_tpp", "multi", {"baseline": "tpp"}),
                            ("robust_delta", "robust", {"delta": 0.5, "metric": "best_acc"}),
                            ("chance", "chance", {}), ("chance_window", "chance", {"sensitivity": "window"}),
                            ("robust_range", "robust", {"sensitivity": "range"})):
        paths[name] = build_report(study, uri, out / name, log=False, **kw).parent
    return paths


def _verdict(out: Path) -> list[str]:
    text = (out / "summary.md").read_text()
    block = text.split("## Verdict\n\n", 1)[1].split("\n## Summary", 1)[0]
    return [line[2:] for line in block.splitlines() if line.startswith("- ")]


# -------------------------------------------------------------------------------------- the verdict

def test_less_sensitive_method_is_detected_with_its_ci(reports):
    cmp = pd.read_csv(reports["robust"] / "comparison.csv")
    w = cmp[cmp["measure"] == "window_decades"]
    assert len(w) == 2 and w["n"].eq(6).all() and w["interval"].eq("bootstrap95").all()
    assert w["outcome"].eq("higher").all() and (w["lo"] > 1.0).all() and np.allclose(w["p"], 2 / 64)
    b = cmp[cmp["measure"] == "best_acc"]
    assert b["outcome"].eq("higher").all() and (b["lo"] > 4.0).all()
    r = cmp[cmp["measure"] == "lr_regret"]  # the primary measure: both curves over the same LRs
    assert r["primary"].all() and r["outcome"].eq("lower").all()
    assert r["sensitivity"].eq("less sensitive").all()
    assert np.allclose(r["p"], 2 / 64) and (r["hi"] < 0).all()
    assert not cmp.loc[cmp["measure"] != "lr_regret", "primary"].any()
    lines = _verdict(reports["robust"])
    assert lines[0].startswith("Paired comparison with L1 (same LR ladder and seeds; accuracy: "
                               "test_acc_at_best_val; primary sensitivity measure: LR regret")
    assert len(lines) == 3  # no small-n warning with 6 seeds
    assert lines[2].startswith("PR 0.9 (TPP growth 1e-3 vs L1): LR regret, the primary measure, is ")
    assert "p = 0.031, 6 seeds): TPP is less sensitive to the LR; best accuracy" in lines[2]
    assert lines[2].endswith("TPP is more accurate.") and ", 95% CI +" in lines[2]


def test_a_77_point_effect_is_never_called_a_tie(reports):
    """#24's PR 0.8 pattern: the baseline sits at chance below 1e-3, the method stays flat and high, and
    both are within 1 point of their best only at their peak (equal δ = 1 windows). The window cannot see
    the difference; the primary measure (LR regret) must, and the verdict must say so."""
    cmp = pd.read_csv(reports["chance"] / "comparison.csv")
    w = cmp[cmp["measure"] == "window_decades"]
    assert w["outcome"].eq("tie").all() and (w["diff"].abs() < 0.1).all()  # the windows agree
    r = cmp[cmp["measure"] == "lr_regret"].iloc[0]
    assert r["primary"] and r["sensitivity"] == "less sensitive" and r["diff"] < -30 and r["p"] < 0.05
    line = _verdict(reports["chance"])[1]
    assert "LR regret, the primary measure" in line and "TPP is less sensitive to the LR" in line
    assert check_report(reports["chance"]) == []
    # the same study with the window declared primary says tie, and says what it rested on
    win = _verdict(reports["chance_window"])
    assert "primary sensitivity measure: robust window at δ = 1 point" in win[0]
    assert "no detectable difference in LR sensitivity" in win[-1]
    assert check_report(reports["chance_window"]) == []


def test_the_consistency_check_rejects_a_tie_the_primary_measure_decides(reports, tmp_path):
    import shutil

    bad = tmp_path / "tie"
    shutil.copytree(reports["chance"], bad)
    text = (bad / "summary.md").read_text()
    (bad / "summary.md").write_text(text.replace("TPP is less sensitive to the LR",
                                                 "no detectable difference in LR sensitivity", 1))
    assert any("calls the sensitivity a tie" in p for p in check_report(bad))


def test_two_seeds_never_claim_a_direction(reports):
    cmp = pd.read_csv(reports["two"] / "comparison.csv")
    seed_rows = cmp[cmp["measure"] != "acc_at_lr"]
    assert seed_rows["outcome"].eq("tie").all() and np.allclose(seed_rows["p"], 0.5)
    lines = _verdict(reports["two"])
    assert lines[1] == ("n = 2 seeds: intervals are wide (the min–max over seeds is shown instead of a "
                        "bootstrap CI); with 2 seeds the smallest p the test can give is 0.5, so no "
                        "difference can be declared (that takes ≥ 6 seeds).")
    for line in lines[2:]:
        assert "range over seeds" in line and "no detectable difference in LR sensitivity" in line
        assert "less sensitive" not in line and "more accurate" not in line


def test_no_real_difference_is_a_tie(reports):
    cmp = pd.read_csv(reports["null"] / "comparison.csv")
    w = cmp[cmp["measure"].isin(["lr_regret", "window_decades", "best_acc"])]
    assert w["outcome"].eq("tie").all() and (w["lo"] <= 0).all() and (w["hi"] >= 0).all()
    assert all("no detectable difference" in line for line in _verdict(reports["null"])[1:])


def test_baseline_by_name_and_any_number_of_methods(reports):
    cmp = pd.read_csv(reports["multi"] / "comparison.csv")
    w = cmp[cmp["measure"] == "window_decades"]
    assert sorted(set(zip(w["method"], w["growth"].fillna(0), strict=True))) == [
        ("greg", 1e-3), ("l1+fpgm", 0), ("tpp", 1e-4), ("tpp", 1e-3)]
    assert w["baseline"].eq("l1").all() and len(w) == 8  # 4 method groups x 2 PRs
    lines = _verdict(reports["multi"])
    assert "PR 0.5 (GReg-1 growth 1e-3 vs L1): LR regret, the primary measure, is" in "\n".join(lines)
    assert "PR 0.9 (l1+fpgm vs L1): LR regret, the primary measure, is" in "\n".join(lines)
    rev = pd.read_csv(reports["multi_tpp"] / "comparison.csv")
    rw = rev[rev["measure"] == "window_decades"]
    pairs = sorted(set(zip(rw["group"], rw["baseline_group"], strict=True)))
    assert ("greg pr=0.5 growth=0.001", "tpp pr=0.5 growth=0.001") in pairs
    assert ("greg pr=0.5 growth=0.001", "tpp pr=0.5 growth=0.0001") not in pairs  # equal growth only
    assert {("l1 pr=0.5", "tpp pr=0.5 growth=0.0001"), ("l1 pr=0.5", "tpp pr=0.5 growth=0.001")} <= set(pairs)
    assert len(rw) == 2 * (2 + 1 + 2)
    assert any(line.startswith("PR 0.5 (L1 vs TPP growth 1e-4): LR regret, the primary measure") for line in
               _verdict(reports["multi_tpp"]))


def test_reverse_comparison_says_narrower(store, tmp_path):
    from analysis import build_report

    out = build_report("robust", store[0], tmp_path, baseline="tpp", methods=["l1"], log=False).parent
    cmp = pd.read_csv(out / "comparison.csv")
    assert cmp.loc[cmp["measure"] == "window_decades", "outcome"].eq("lower").all()
    assert cmp.loc[cmp["measure"] == "lr_regret", "sensitivity"].eq("more sensitive").all()
    assert all("L1 is more sensitive to the LR" in line for line in _verdict(out)[1:])
    assert check_report(out) == []


def test_report_shows_ladder_heatmap_without_holes(reports):
    page = (reports["robust"] / "report.html").read_text()
    # the robustness profile is the eighth figure; speed drawn, recipe skipped (nothing varies)
    assert page.count("data:image/png;base64,") == 8 and "figure 'recipe' skipped" in page
    assert (reports["robust"] / "figures" / "robustness_profile.png").stat().st_size > 10_000
    assert (reports["robust"] / "figures" / "speed.png").stat().st_size > 10_000
    assert "<h2>Verdict</h2><div class='verdict'>" in page
    pts = pd.read_csv(reports["robust"] / "lr_points.csv")
    assert len(pts) == 4 * len(LADDER) and pts["n"].eq(6).all() and pts["acc"].notna().all()
    assert (reports["robust"] / "figures" / "heatmap_lr_pr.png").stat().st_size > 10_000
    for name in ("members", "points", "curves", "groups", "lr_points", "profile", "comparison",
                 "trainability", "paper_table"):
        assert (reports["robust"] / f"{name}.csv").stat().st_size > 0, name


# ----------------------------------------------------------------------------- the consistency check

ACC, DEC = 1, 2  # decimals the report uses for accuracy points and decades
IVL = {"95% CI": "bootstrap95", "range over seeds": "range"}
LABEL = {"l1": "L1", "tpp": "TPP", "greg": "GReg-1"}
TAU_NAMES = {"JSV mean after removal": "jsv_after_removal_mean",
             "JSV retained (after removal / unpruned control)": "jsv_retained",
             "accuracy after removal": "acc_after_removal", "loss after removal": "loss_after_removal",
             "robust window (decades)": "window_decades", "best accuracy": "best_acc"}
NUM = r"[-+]?\d+(?:\.\d+)?"


class Problems(list):
    def near(self, where: str, text: str, value: float, digits: int) -> None:
        """`text` must be `value` rounded to `digits` decimals ("–" for a missing value)."""
        if text == "–":
            if np.isfinite(value):
                self.append(f"{where}: says – but the table has {value}")
            return
        if not np.isfinite(value) or abs(float(text) - value) > 0.5 * 10.0 ** -digits + 1e-9:
            self.append(f"{where}: says {text}, the tables give {value}")

    def lr(self, where: str, text: str, value: float) -> None:
        if text == "none" and not np.isfinite(value):
            return
        tol = 0.05 * 10.0 ** math.floor(math.log10(value)) + 1e-15 if np.isfinite(value) else 0.0
        if not np.isfinite(value) or abs(float(text) - value) > tol:
            self.append(f"{where}: says LR {text}, the tables give {value}")

    def same(self, where: str, said, value) -> None:
        if said != value:
            self.append(f"{where}: says {said!r}, the tables give {value!r}")


def _p(d: np.ndarray) -> float:
    obs = abs(d.mean())
    flips = [abs(np.dot(s, d)) / len(d) for s in itertools.product((1, -1), repeat=len(d))]
    return float(np.mean([f >= obs - 1e-9 for f in flips]))


def _title(method: str, growth: float) -> str:
    from analysis.fmt import fmt_lr

    name = LABEL.get(method, method)
    return f"{name} (growth {fmt_lr(growth)})" if np.isfinite(growth) else name


def _keys(curves: pd.DataFrame) -> list[str]:
    return list(curves.columns[:list(curves.columns).index("group")])


def _head(row: pd.Series, keys: list[str]) -> str:
    parts = [f"PR {row['pr']:g}"] + [f"{k} {row[k]:g}" if not isinstance(row[k], str) else f"{k} {row[k]}"
                                     for k in keys if k not in ("method", "pr", "growth")]
    return ", ".join(parts)


def _pop_std(v) -> float:
    v = np.asarray(v, float)
    return float(v.std()) if len(v) >= 2 else math.nan


def check_report(out: Path, planned: int | None = None) -> list[str]:
    """Every problem between the sentences of out/summary.md and the CSV tables next to it."""
    pr = Problems()
    text = (out / "summary.md").read_text()
    verdict, summary = (block.strip().splitlines() for block in text.split("## Summary"))
    verdict = [v[2:] for v in verdict if v.startswith("- ")]
    summary = [s[2:] for s in summary if s.startswith("- ")]
    members = pd.read_csv(out / "members.csv")
    curves = pd.read_csv(out / "curves.csv", keep_default_na=False, na_values=[""])
    curves["window_open"] = curves["window_open"].fillna("")
    pts = pd.read_csv(out / "lr_points.csv")
    tau = pd.read_csv(out / "trainability.csv")
    cmp = pd.read_csv(out / "comparison.csv")
    points = pd.read_csv(out / "points.csv")
    keys = _keys(curves)
    groups = curves.drop_duplicates("group")[[*keys, "group"]]
    titles = {g["group"]: _title(g["method"], g["growth"]) for _, g in groups.iterrows()}
    for line in verdict:
        _check_verdict_line(pr, line, curves, cmp, keys, points)
    for line in summary:
        for kind, check in SUMMARY_CHECKS:
            m = re.match(kind, line)
            if m:
                check(pr, line, m, members=members, curves=curves, pts=pts, tau=tau, keys=keys,
                      groups=groups, titles=titles, planned=planned, points=points)
                break
        else:
            pr.append(f"unrecognised summary sentence (add a check): {line}")
    return pr


PRIMARY_NAMES = {"lr_regret": "LR regret", "window_decades": "robust window",
                 "stable_range": "accuracy range over the stable LRs"}
VERDICT_RE = re.compile(
    rf"^(?P<where>.+?): (?P<name>LR regret|accuracy range over the stable LRs|robust window at δ = "
    rf"(?P<delta>{NUM}) points?), the primary measure, is (?P<wm>≥?{NUM}) (?P<unit>points|decades) for "
    rf"(?P<m>\S+) vs (?P<wb>≥?{NUM}) for (?P<b>\S+) \(difference (?P<d>{NUM}) (?:points|decades), "
    rf"(?P<ivl>95% CI|range over seeds) (?P<lo>{NUM}) to (?P<hi>{NUM}), p = (?P<p>[^,]+), (?P<n>\d+) "
    rf"seeds\): (?P<wc>[^;]+); best accuracy (?P<am>{NUM})% vs (?P<ab>{NUM})% \(difference (?P<da>{NUM}) "
    rf"points, (?P<ivl2>95% CI|range over seeds) (?P<alo>{NUM}) to (?P<ahi>{NUM}), p = (?P<ap>[^)]+)\): "
    rf"(?P<ac>.+)\.$")


def regret(lrs, accs) -> float:
    """LR regret, computed here independently: the exact integral of the piecewise-linear gap to the best
    (float64, one segment at a time) over log10 LR, divided by the range."""
    x = [math.log10(v) for v in lrs]
    best = max(accs)
    area = 0.0
    for i in range(len(x) - 1):
        area += 0.5 * ((best - accs[i]) + (best - accs[i + 1])) * (x[i + 1] - x[i])
    return area / (x[-1] - x[0]) if len(x) >= 2 and x[-1] > x[0] else math.nan


def paired_regrets(pts: pd.DataFrame, gm: str, gb: str, seed) -> tuple[float, float]:
    """Both curves of one seed over the LRs where both ran and neither diverged."""
    a = pts[(pts["group"] == gm) & (pts["seed"] == seed)].set_index("lr")
    b = pts[(pts["group"] == gb) & (pts["seed"] == seed)].set_index("lr")
    common = sorted(lr for lr in set(a.index) & set(b.index) if not a.at[lr, "diverged"]
                    and not b.at[lr, "diverged"])
    return (regret(common, [a.at[lr, "acc"] for lr in common]),
            regret(common, [b.at[lr, "acc"] for lr in common]))


def _check_verdict_line(pr: Problems, line: str, curves, cmp, keys, pts) -> None:
    if line.startswith("Paired comparison with "):
        m = re.match(r"Paired comparison with (\S+) \(same LR ladder and seeds; accuracy: (\S+); primary "
                     r"sensitivity measure: (.+?), chosen before the analysis with --sensitivity; the other "
                     r"measures are descriptive, in the comparison table\): a direction is stated only when "
                     r"the exact sign-flip test gives p < 0.05 and the interval excludes 0\. Both must hold: "
                     r"an interval can exclude 0 while p cannot fall below 2/2\^n with n seeds, so a claim "
                     r"needs at least (\d+) seeds\.$", line)
        if not m:
            pr.append(f"verdict header does not parse: {line}")
            return
        pr.same("verdict header metric", m[2], curves["metric"].iloc[0])
        primary = cmp.loc[cmp["primary"], "measure"].iloc[0]
        pr.same("verdict header primary", m[3].split(" at δ")[0], PRIMARY_NAMES[primary])
        pr.same("verdict header baseline", m[1], LABEL.get(cmp["baseline"].iloc[0], cmp["baseline"].iloc[0]))
        needed = next(n for n in itertools.count(1) if 2 / 2**n < 0.05)
        pr.same("verdict header seeds needed", int(m[4]), needed)
        return
    if line.startswith("A window marked ≥ reaches an end of the LR ladder"):
        primary = cmp.loc[cmp["primary"], "measure"].iloc[0]
        pr.same("≥ line with the window primary", primary, "window_decades")
        return
    if line.startswith("n = "):
        m = re.match(r"n = (\d+)(?:–(\d+))? seeds: intervals are wide \(the min–max over seeds is shown "
                     r"instead of a bootstrap CI\)(?:; with (\d+) seeds the smallest p the test can give is "
                     r"(\S+), so no difference can be declared \(that takes ≥ (\d+) seeds\))?\.$", line)
        ns = cmp.loc[cmp["measure"] != "acc_at_lr", "n"]
        ns = ns[ns >= 1]
        if not m:
            pr.append(f"small-n line does not parse: {line}")
            return
        pr.same("small-n: n", (int(m[1]), int(m[2] or m[1])), (int(ns.min()), int(ns.max())))
        if ns.min() >= 5:
            pr.append("small-n line with 5 or more seeds everywhere")
        if m[3]:
            pr.same("small-n: floor", float(m[4]), 2 / 2 ** int(m[3]))
            needed = next(n for n in itertools.count(1) if 2 / 2**n < 0.05)
            pr.same("small-n: seeds needed", int(m[5]), needed)
        return
    m = VERDICT_RE.match(line)
    if not m:
        pr.append(f"verdict sentence does not parse: {line}")
        return
    primary = cmp.loc[cmp["primary"], "measure"].iloc[0]
    rows = {}
    for _, r in cmp[cmp["measure"].isin([primary, "best_acc"])].iterrows():
        who = _title(r["method"], r["growth"]).replace(" (growth ", " growth ").rstrip(")")
        base = _title(r["baseline"], r["baseline_growth"]).replace(" (growth ", " growth ").rstrip(")")
        rows.setdefault(f"{_head(r, keys)} ({who} vs {base})", {})[r["measure"]] = r
    if m["where"] not in rows:
        pr.append(f"verdict for an unknown comparison: {m['where']}")
        return
    r = rows[m["where"]]
    w = r[primary]
    pr.same(f"{m['where']} primary named", m["name"].split(" at δ")[0], PRIMARY_NAMES[primary])
    cm = curves[curves["group"] == w["group"]].set_index("seed")
    cb = curves[curves["group"] == w["baseline_group"]].set_index("seed")
    if m["delta"]:
        pr.near(f"{m['where']} δ", m["delta"], float(cm["delta"].iloc[0]), 3)
    for col, said in ((primary, ("wm", "wb", "d", "lo", "hi", "p", "n", "ivl", "wc",
                                 DEC if primary == "window_decades" else ACC)),
                      ("best_acc", ("am", "ab", "da", "alo", "ahi", "ap", None, "ivl2", "ac", ACC))):
        s_m, s_b, s_d, s_lo, s_hi, s_p, s_n, s_ivl, s_c, digits = said
        both = sorted(cm.index.intersection(cb.index))
        if col == "lr_regret":
            got = {s: paired_regrets(pts, w["group"], w["baseline_group"], s) for s in both}
            seeds = [s for s in both if np.isfinite(got[s][0]) and np.isfinite(got[s][1])]
            xm = np.array([got[s][0] for s in seeds])
            xb = np.array([got[s][1] for s in seeds])
        else:
            seeds = [s for s in both if np.isfinite(cm.at[s, col]) and np.isfinite(cb.at[s, col])]
            xm, xb = cm.loc[seeds, col].to_numpy(float), cb.loc[seeds, col].to_numpy(float)
        d = xm - xb
        where = f"{m['where']} {col}"
        if s_n:
            pr.same(f"{where} n", int(m[s_n]), len(seeds))
        for key, value in ((s_m, xm.mean()), (s_b, xb.mean()), (s_d, d.mean())):
            pr.near(f"{where} {key}", m[key].lstrip("≥"), value, digits)
        if col == "window_decades":
            pr.same(f"{where} ≥ on the method", m["wm"].startswith("≥"),
                    bool((cm.loc[seeds, "window_open"] != "").any()))
            pr.same(f"{where} ≥ on the baseline", m["wb"].startswith("≥"),
                    bool((cb.loc[seeds, "window_open"] != "").any()))
        kind = "bootstrap95" if len(d) >= 5 else "range"
        pr.same(f"{where} interval kind", IVL[m[s_ivl]], kind)
        lo, hi = (d.min(), d.max()) if kind == "range" else (r[col]["lo"], r[col]["hi"])
        if kind == "bootstrap95" and not lo <= d.mean() <= hi:
            pr.append(f"{where}: the CI {lo}..{hi} does not hold the mean {d.mean()}")
        pr.near(f"{where} lo", m[s_lo], lo, digits)
        pr.near(f"{where} hi", m[s_hi], hi, digits)
        p = _p(d)
        pr.near(f"{where} p", m[s_p], p, 3 if p < 0.1 else 2)
        direction = "higher" if d.mean() > 0 else "lower"
        outcome = direction if p < 0.05 and (lo > 0 or hi < 0) else "tie"
        name = m["m"]
        if col == "best_acc":
            words = {"higher": f"{name} is more accurate", "lower": f"{name} is less accurate",
                     "tie": "no detectable difference in best accuracy"}[outcome]
        else:
            less = outcome == ("higher" if col == "window_decades" else "lower")
            words = ("no detectable difference in LR sensitivity" if outcome == "tie" else
                     f"{name} is {'less' if less else 'more'} sensitive to the LR")
            # the rule a summary must never break: no tie where the primary measure decides
            decided = r[col]["p"] < 0.05 and (r[col]["lo"] > 0 or r[col]["hi"] < 0)
            if m[s_c] == "no detectable difference in LR sensitivity" and decided:
                pr.append(f"{where}: calls the sensitivity a tie although the primary measure's interval "
                          "excludes 0 with p < 0.05")
        pr.same(f"{where} conclusion", m[s_c], words)


def _progress(pr, line, m, *, members, planned, **_) -> None:
    st = members["status"].value_counts()
    fin = int(st.get("completed", 0) + st.get("diverged", 0))
    pr.same("progress finished", int(m["fin"]), fin)
    pr.same("progress completed", int(m["c"]), int(st.get("completed", 0)))
    pr.same("progress diverged", int(m["d"]), int(st.get("diverged", 0)))
    pr.same("progress failed", int(m["f"] or 0), int(st.get("failed", 0)))
    if planned is not None:
        pr.same("progress planned", int(m["planned"]), planned)


def _design(pr, line, m, *, curves, pts, **_) -> None:
    lrs = sorted(pts["lr"].unique())
    pr.same("design: ladder size", int(m["L"]), len(lrs))
    pr.lr("design: lowest LR", m["lo"], lrs[0])
    pr.lr("design: highest LR", m["hi"], lrs[-1])
    pr.same("design: per decade", int(m["per"]), round(1 / np.median(np.diff(np.log10(lrs)))))
    pr.same("design: groups", int(m["G"]), curves["group"].nunique())
    pr.same("design: seeds", int(m["S"]), curves["seed"].nunique())
    pr.same("design: curves", int(m["C"]), len(curves))
    short = int((curves["n_lrs"] < len(lrs)).sum())
    pr.same("design: complete", m["tail"], "every curve ran the full ladder" if not short else
            f"{short} of {len(curves)} curves miss ladder LRs")


def _metric(pr, line, m, *, curves, **_) -> None:
    pr.same("metric", m["metric"], curves["metric"].iloc[0])


CLAUSE_RE = re.compile(
    rf"(?P<title>[^: ][^:]*): (?:stable up to LR (?P<stable>\S+) in every seed|no LR is stable in every "
    rf"seed) \((?P<share>\d+)% of members diverged\); best (?P<best>{NUM}|–)% \(best LR per seed: "
    rf"(?P<lrs>[^)]*)\); "
    rf"robust window (?P<win>≥?(?:{NUM}|–)) decades; LR regret (?P<regret>{NUM}|–) points; accuracy range in "
    rf"the stable range (?P<range>{NUM}|–) "
    rf"points; LR main effect (?P<eff>{NUM}|–) points\.")


def _pr_line(pr, line, m, *, curves, pts, keys, groups, titles, points, **_) -> None:
    pts_all = points
    head, body = line.split(" — ", 1)
    in_head = groups[[_head(g, keys) == head for _, g in groups.iterrows()]]
    clauses = list(CLAUSE_RE.finditer(body))
    if " ".join(c[0] for c in clauses) != body:
        pr.append(f"PR line does not parse: {line}")
    pr.same(f"{head}: groups named", sorted(c["title"] for c in clauses),
            sorted(titles[g] for g in in_head["group"]))
    for c in clauses:
        hit = [g for g in in_head["group"] if titles[g] == c["title"]]
        if len(hit) != 1:
            continue
        cc = curves[curves["group"] == hit[0]].sort_values("seed")
        where = f"{head} {c['title']}"
        stable = cc["lr_stable_max"].to_numpy(float)
        pr.lr(f"{where} stable", c["stable"] or "none",
              stable.min() if np.isfinite(stable).all() else math.nan)
        share = 100 * cc["n_diverged"].sum() / cc["n_members"].sum()
        pr.near(f"{where} diverged share", c["share"], share, 0)
        pr.near(f"{where} best", c["best"], cc["best_acc"].mean(), ACC)
        said = c["lrs"].split(", ")
        pr.same(f"{where} best LRs count", len(said), len(cc))
        for s, v in zip(said, cc["best_lr"], strict=False):
            pr.lr(f"{where} best LR", s, v)
        pr.near(f"{where} window", c["win"].lstrip("≥"), cc["window_decades"].mean(), DEC)
        pr.same(f"{where} window ≥", c["win"].startswith("≥"), bool((cc["window_open"] != "").any()))
        pr.near(f"{where} stable range", c["range"], cc["stable_range"].mean(), ACC)
        own = []
        for seed in cc["seed"]:
            q = pts_all[(pts_all["group"] == hit[0]) & (pts_all["seed"] == seed) & ~pts_all["diverged"]]
            q = q.sort_values("lr")
            own.append(regret(list(q["lr"]), list(q["acc"])))
        pr.near(f"{where} LR regret", c["regret"], float(np.nanmean(own)), ACC)
        p = pts[pts["group"] == hit[0]]
        use = p[(p["n"] == cc["seed"].nunique()) & (p["n_diverged"] == 0)]
        pr.near(f"{where} LR main effect", c["eff"], _pop_std(use["acc"]), ACC)


def _acc_diff(pr, line, m, *, curves, keys, groups, titles, **_) -> None:
    pr.same("Acc. diff metric", m["metric"], curves["metric"].iloc[0])
    pr.lr("Acc. diff A", m["a"], float(curves["lr_a"].iloc[0]))
    pr.lr("Acc. diff B", m["b"], float(curves["lr_b"].iloc[0]))
    hows = set(curves["acc_diff_how"])
    if hows == {"exact"}:
        pr.same("Acc. diff how", m["how"], "exact ladder points")
    for part in m["rest"].rstrip(".").split("; "):
        head, vals = part.split(": ", 1)
        for item in vals.split(", "):
            title, value = item.rsplit(" ", 1)
            hit = [g for g in groups["group"] if titles[g] == title and _head(
                groups[groups["group"] == g].iloc[0], keys) == head]
            if len(hit) != 1:
                pr.append(f"Acc. diff names an unknown group: {head} {title}")
                continue
            mean = curves.loc[curves["group"] == hit[0], "acc_diff"].mean()
            pr.near(f"Acc. diff {head} {title}", value, mean, ACC)


def _tau(pr, line, m, *, curves, tau, **_) -> None:
    from scipy.stats import kendalltau

    body = line.split("95% CI): ", 1)[1].split(". The CI excludes", 1)[0]
    allt = tau[tau["stratum"] == "all"]
    for part in body.split("; "):
        x = TAU_NAMES[part.split(" vs ", 1)[0]]
        for y_name, t, lo, hi in re.findall(rf"vs (.+?) ({NUM}) \(({NUM}) to ({NUM})\)", part):
            y = TAU_NAMES[y_name]
            ok = curves[[x, y]].dropna()
            pr.near(f"τ {x} {y}", t, kendalltau(ok[x], ok[y]).statistic, 2)
            row = allt[(allt["predictor"] == x) & (allt["outcome"] == y)].iloc[0]
            pr.near(f"τ {x} {y} lo", lo, row["lo"], 2)
            pr.near(f"τ {x} {y} hi", hi, row["hi"], 2)
            pr.same(f"τ {x} {y} n", int(m["n"]), len(ok))
    k, of = re.search(r"The CI excludes 0 for (\d+) of (\d+) pairs", line).groups()
    fin = allt[np.isfinite(allt["tau"])]
    excl = int(((fin["lo"] > 0) | (fin["hi"] < 0)).sum())
    pr.same("τ: pairs excluding 0", (int(k), int(of)), (excl, len(fin)))


def _which(pr, line, m, *, curves, **_) -> None:
    for value, metric in re.findall(rf"({NUM})% by (\w+)", line):
        pr.near(f"which accuracy {metric}", value, curves[f"top_{metric}"].mean(), ACC)


def _divergence(pr, line, m, *, members, **_) -> None:
    fin = members[members["status"].isin(["completed", "diverged"])]
    div = fin[fin["status"] == "diverged"]
    if line.startswith("No member"):
        pr.same("divergence: none", len(div), 0)
        pr.same("divergence: finished", int(re.search(r"\((\d+) finished", line)[1]), len(fin))
        return
    pr.same("divergence: counts", (int(m["k"]), int(m["n"])), (len(div), len(fin)))
    for name, k, lrs in re.findall(r"(\S+) (\d+) \(at LR ([^)]*)\)", line):
        method = {v: k_ for k_, v in LABEL.items()}.get(name, name)
        mine = div[div["method"] == method]
        pr.same(f"divergence {name}", int(k), len(mine))
        said = lrs.split(", ")
        pr.same(f"divergence {name} LRs", len(said), mine["lr"].nunique())
        for s, v in zip(said, sorted(mine["lr"].unique()), strict=False):
            pr.lr(f"divergence {name} LR", s, v)


SUMMARY_CHECKS = [
    (r"The study holds (?P<fin>\d+) finished member runs(?: of (?P<planned>\d+) planned)? "
     r"\((?P<c>\d+) completed, (?P<d>\d+) diverged\); (?:none failed\.$|(?:(?P<f>\d+) failed)?)", _progress),
    (r"LR: a ladder of (?P<L>\d+) LRs from (?P<lo>\S+) to (?P<hi>\S+) \((?P<per>\d+) per decade\), "
     r"(?P<G>\d+) groups × (?P<S>\d+) seeds = (?P<C>\d+) curves; (?P<tail>.+)\.$", _design),
    (r"Accuracy in every table but the paper table: (?P<metric>\S+) = ", _metric),
    (r"PR \d", _pr_line),
    (r"Paper's Acc\. diff = acc\((?P<a>\S+)\) − acc\((?P<b>\S+)\) of (?P<metric>\S+), mean over seeds "
     r"\((?P<how>[^)]+)\): "
     r"(?P<rest>.+)$", _acc_diff),
    (r"Before vs after finetuning \(Kendall τ over (?P<n>\d+) curves", _tau),
    (r"Before vs after finetuning: too few curves, or no variation, for a Kendall τ\.$",
     lambda pr, line, m, *, tau, **_: pr.same("τ: none finite", bool(np.isfinite(tau["tau"]).any()), False)),
    (r"Which accuracy: ", _which),
    (r"(?P<k>\d+) of (?P<n>\d+) finished members diverged: |No member diverged", _divergence),
]


@pytest.mark.parametrize("name", ["robust", "two", "null", "multi", "multi_tpp", "robust_delta",
                                  "robust_range"])
def test_every_number_in_the_summary_is_recomputed_from_the_tables(reports, name):
    planned = 2 * 2 * 6 * len(LADDER) if name.startswith("robust") else None
    assert check_report(reports[name], planned=planned) == []


def test_the_consistency_check_catches_a_wrong_number_and_a_wrong_direction(reports, tmp_path):
    import shutil

    src = reports["two"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    text = (src / "summary.md").read_text()
    m = re.search(r"the primary measure, is (\d+\.\d) points", text)
    wrong = f"{float(m[1]) + 0.3:.1f}"
    (bad / "summary.md").write_text(text.replace(m[0], m[0].replace(m[1], wrong), 1))
    assert any("says " + wrong in p for p in check_report(bad))
    (bad / "summary.md").write_text(text.replace("no detectable difference in LR sensitivity",
                                                 "TPP is less sensitive to the LR", 1))
    assert any("conclusion" in p for p in check_report(bad))
    m = re.search(r"best (\d+\.\d)% \(best LR per seed", text)
    (bad / "summary.md").write_text(text.replace(m[0], m[0].replace(m[1], f"{float(m[1]) + 1:.1f}"), 1))
    assert any("best: says" in p for p in check_report(bad))
    extra = text.replace("## Summary\n\n", "## Summary\n\n- TPP is less sensitive.\n")
    (bad / "summary.md").write_text(extra)
    assert any("unrecognised summary sentence" in p for p in check_report(bad))
