"""The one-sentence definitions of every measure, shown in the report and repeated in analysis/README.md
(a test keeps the two identical)."""

from __future__ import annotations

DEFINITIONS: list[tuple[str, str]] = [
    ("curve",
     "one group (method, PR, growth and any varied finetuning-recipe setting) finetuned from one "
     "seed's pruned model at every LR of the ladder: accuracy as a function of the LR."),
    ("divergence",
     "a member whose status is diverged (its loss became NaN/inf); it is counted as divergence and "
     "left out of every accuracy measure except the per-LR accuracy, which shows what it reached."),
    ("stable LR range",
     "the LRs up to `lr_stable_max`, the largest LR such that it and every smaller LR of the curve did"
     " not diverge; across seeds the report gives the largest LR stable in every seed (a ladder LR "
     "that ran) and `diverged share` = diverged members / members."),
    ("robust LR window",
     "the widest contiguous run of non-diverged ladder points whose accuracy is within δ points "
     "(default 1) of the curve's best, its width in decades of LR = log10(high/low) with each edge "
     "interpolated linearly in log10 LR to where the accuracy crosses best − δ (never past the "
     "ladder's ends or towards a diverged LR; a window reaching an end is marked ≥, a lower bound; a "
     "lone point without a crossing is 0 decades)."),
    ("LR regret",
     "the mean, over the curve's LR range in log10 LR (trapezoid between ladder points), of (the curve's "
     "best accuracy − its accuracy at that LR), in accuracy points: what picking the LR blindly from the "
     "range loses on average; it needs no tolerance (it is the area above the robustness profile, per "
     "decade), is computed over the non-diverged LRs, and in a paired comparison both curves of a seed "
     "are scored over the same LRs, those where neither member diverged; its interval over seeds is the "
     "one below. It is relative to the curve's own best, so a curve flat because it is bad (at chance "
     "everywhere) has none: read it with the best accuracy, as the verdict states both."),
    ("robustness profile",
     "the robust-window width as a function of δ, from 0 to the group's accuracy span (seed mean with its"
     " interval); the tables give it at δ = 1, 2 and 5 points."),
    ("primary sensitivity measure",
     "the one measure the verdict's sensitivity sentence rests on, chosen before looking with "
     "`--sensitivity` (regret by default, or window at δ, or range); the other measures stay in the "
     "comparison table as descriptive, each with its interval and p."),
    ("sensitivity in the stable range",
     "max − min (range) and population std of the accuracy over the curve's stable LRs, reported apart"
     " from divergence."),
    ("Acc. diff",
     "the paper's acc(A) − acc(B) for the same seed (default A = 1e-3, B = 1e-2), at the ladder point "
     "when one lies within 1% of the LR, else interpolated linearly in log10 LR between the two ladder"
     " points around it (said so), and missing when that needs a diverged point or an LR outside the "
     "ladder."),
    ("best accuracy",
     "the highest accuracy over the curve's non-diverged LRs and the LR giving it (per seed; across "
     "seeds the mean accuracy, and the per-seed best LRs, which all ran)."),
    ("LR main effect",
     "the population std, over the ladder LRs where every seed ran and none diverged, of the seed-mean"
     " accuracy at that LR: the typical swing in accuracy points due to the LR alone, comparable "
     "across methods."),
    ("interval",
     "over seeds: the 95% percentile bootstrap CI of the mean (10,000 resamples, fixed RNG) with 5 or "
     "more seeds, the min–max range with 2–4 seeds (a bootstrap of so few is too narrow), none with "
     "one."),
    ("paired difference",
     "method − baseline per shared seed (and LR) at equal PR and recipe, with the mean, its interval "
     "and the exact two-sided sign-flip permutation p-value (all 2^n sign flips); a direction is "
     "stated only when p < 0.05 and the interval excludes 0, otherwise it is a tie — with n seeds the "
     "smallest possible p is 2/2^n, so a claim needs at least 6 seeds."),
    ("Kendall τ",
     "tau-b between a measurement taken right after removal (JSV mean, accuracy, loss) and an outcome "
     "(robust-window width, best accuracy) across curves (one pruned model each), with a 95% bootstrap"
     " CI over curves; pooled and within each PR."),
    ("accuracy metric",
     "`test_acc_at_best_val` (test accuracy at the epoch with the best accuracy on a held-out "
     "validation split) when the study has one, else `best_acc` (the maximum test accuracy over "
     "finetuning epochs, the paper's convention, selected on the test set); the paper table always "
     "uses `best_acc`; `last_acc` is the last epoch's."),
]
