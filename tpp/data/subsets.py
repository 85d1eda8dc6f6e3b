"""Balanced, seeded subsets: a small but class-balanced slice of a data set for cheap studies."""

from __future__ import annotations

import torch


def _quotas(counts: list[int], n: int) -> list[int]:
    """Split `n` over classes as evenly as their sizes allow (water-filling).

    A class smaller than its fair share gives all it has and the others share the rest; a remainder of
    the integer division goes one each to the lowest class indices, so the result is deterministic.
    """
    quota = [0] * len(counts)
    open_ = list(range(len(counts)))
    remaining = n
    while open_:
        share = remaining // len(open_)
        small = [c for c in open_ if counts[c] <= share]
        if not small:
            extra = remaining - share * len(open_)
            for k, c in enumerate(open_):
                quota[c] = share + (1 if k < extra else 0)
            break
        for c in small:
            quota[c] = counts[c]
            remaining -= counts[c]
        open_ = [c for c in open_ if c not in small]
    return quota


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of `n` samples with the classes as balanced as their sizes allow.

    Which samples of a class are taken is drawn from `seed`, so the same call always picks the same
    subset. `n` at or above the number of samples returns every index.
    """
    labels = torch.as_tensor(labels).long().flatten()
    total = len(labels)
    n = int(n)
    if n < 1:
        raise ValueError(f"a subset needs at least 1 sample, got {n}")
    if n >= total:
        return torch.arange(total)
    classes, counts = torch.unique(labels, return_counts=True)
    order = torch.argsort(labels, stable=True)  # members of each class, class by class
    gen = torch.Generator().manual_seed(int(seed))
    picks = []
    for members, q in zip(torch.split(order, counts.tolist()), _quotas(counts.tolist(), n), strict=True):
        picks.append(members[torch.randperm(len(members), generator=gen)[:q]])
    return torch.cat(picks).sort().values
