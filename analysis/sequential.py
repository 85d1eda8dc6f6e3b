"""Seeds until decided: grow a study's seeds in waves, looking at the primary verdict after each, and stop
once every comparison is decided or the seed budget is spent.

Looking at a test after every wave and stopping at the first p < alpha inflates the error rate (each
look is another chance of a false "decided"). The rule here plans its looks up front -- the seed counts
`looks` -- and gives each look alpha / len(looks) (a Bonferroni split): the chance of any false decision
over all the looks is at most the sum, alpha. The sign-flip test is exact, so each look's share is
honoured; the verdict's other condition (the interval excludes 0) only makes a decision rarer. Its
price: with n seeds the smallest p is 2 / 2**n, so a look needs n >= log2(2 * looks / alpha) seeds to be
able to decide at all (8 seeds for 5 looks at 0.05) -- `Looks.first_decisive` says which look that is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pandas as pd

from analysis.stats import ALPHA, p_floor


@dataclass(frozen=True)
class Looks:
    """The planned looks: the seed counts after each wave, and the alpha each look spends."""

    seeds: tuple[int, ...]
    alpha: float = ALPHA

    @classmethod
    def plan(cls, start: int, max_seeds: int, step: int, alpha: float = ALPHA) -> Looks:
        if step < 1:
            raise ValueError(f"step: got {step}; accepted: a whole number of seeds >= 1")
        if max_seeds < start:
            raise ValueError(f"max_seeds: got {max_seeds}; accepted: at least the study's {start} seeds")
        counts = list(range(start, max_seeds + 1, step))
        if counts[-1] != max_seeds:
            counts.append(max_seeds)
        return cls(tuple(counts), alpha)

    @property
    def per_look(self) -> float:
        return self.alpha / len(self.seeds)

    @property
    def first_decisive(self) -> int | None:
        """The first look (1-based) whose seed count can reach p < alpha per look, None if none can."""
        return next((i + 1 for i, n in enumerate(self.seeds) if p_floor(n) < self.per_look), None)


def decided(comparison: pd.DataFrame, alpha: float) -> pd.Series:
    """Per primary comparison row: is its verdict decided at `alpha` (p < alpha and the interval excludes
    0, with at least 2 paired seeds)? The same rule as the report's verdict, at this look's alpha."""
    rows = comparison[comparison["primary"].astype(bool)]
    excl = (rows["lo"] > 0) | (rows["hi"] < 0)
    return (rows["n"] >= 2) & (rows["p"] < alpha) & excl


def null_error_rate(looks: Looks, trials: int, seed: int = 0) -> tuple[float, float]:
    """(rate with the planned rule, rate when every look spends the full alpha) of false decisions on
    null data: the paired differences of two identical methods (symmetric around 0), looked at after each
    wave of the same trial. The simulation that checks the rule (tests) and shows why it is needed."""
    import numpy as np

    from analysis.stats import interval, sign_flip_p

    rng = np.random.default_rng(seed)
    planned = naive = 0
    for _ in range(trials):
        diffs = rng.standard_normal(looks.seeds[-1])
        hit_planned = hit_naive = False
        for n in looks.seeds:
            d = diffs[:n]
            p, iv = sign_flip_p(d), interval(d, n_boot=200)
            excl = iv.n >= 2 and (iv.lo > 0 or iv.hi < 0)
            hit_planned |= bool(excl and p < looks.per_look)
            hit_naive |= bool(excl and p < looks.alpha)
        planned += hit_planned
        naive += hit_naive
    return planned / trials, naive / trials


@dataclass
class SequentialOutcome:
    """What a seeds-until-decided run did: the looks planned, the one it stopped at and why, the runs it
    saved against running every comparison to the maximum."""

    looks: list[int]
    alpha: float
    alpha_per_look: float
    stopped_at_look: int
    seeds: int
    all_decided: bool
    undecided: list[str]
    runs: int
    runs_at_max: int
    decided_at: dict[str, int] = field(default_factory=dict)  # comparison (its method group) -> seeds

    @property
    def runs_saved(self) -> int:
        return self.runs_at_max - self.runs

    def sentence(self) -> str:
        how = ("every primary verdict decided" if self.all_decided
               else f"stopped at the seed budget with {len(self.undecided)} undecided")
        return (f"seeds until decided: {how} at {self.seeds} seeds, look {self.stopped_at_look} of "
                f"{len(self.looks)} (looks at {', '.join(map(str, self.looks))} seeds; alpha "
                f"{self.alpha:g} split over the looks: {self.alpha_per_look:.4g} per look); "
                f"{self.runs} runs, {self.runs_saved} saved against {self.runs_at_max} at the maximum"
                + (f" (seeds stop where a comparison is decided: {when})" if (when := self._when()) else ""))

    def _when(self) -> str:
        """e.g. "tpp pr=0.8 g=0.001 at 8; tpp pr=0.9 g=0.001 at 10" for the comparisons decided early."""
        early = {g: n for g, n in self.decided_at.items() if n < self.seeds}
        return "; ".join(f"{g} at {n}" for g, n in sorted(early.items(), key=lambda kv: (kv[1], kv[0])))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def sequential_note(tags: dict[str, str]) -> list[str]:
    """The report's line on a seeds-until-decided run, from the study run's tag."""
    from study.schema import TAG_SEQUENTIAL

    if TAG_SEQUENTIAL not in tags:
        return []
    try:
        d = json.loads(tags[TAG_SEQUENTIAL])
        return [SequentialOutcome(**d).sentence()]
    except (ValueError, TypeError):
        return [f"the study run's tag {TAG_SEQUENTIAL} is not a record this version reads"]

