"""Inter-rater agreement on the pages two or more raters judged (`--overlap` offers them), so an
operator can spot a careless or adversarial rater.

- Ratings: Krippendorff's alpha, ordinal (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability";
  the `krippendorff` package), over the generations rated by two or more raters: 1 is perfect
  agreement, 0 what chance gives, below 0 systematic disagreement. None where it is undefined (no
  generation rated by both, or every rating the same value).
- Picks: the share of pages both raters judged whose "best" agrees: the same candidate picked, the
  same candidates tied, or both saying none is good.

Both per rater pair and overall (alpha over every rater at once; picks over every pair's shared pages).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

import krippendorff
import numpy as np

SCORES = (1, 2, 3, 4, 5)
NONE_GOOD = "none is good"


@dataclass(frozen=True)
class Agreement:
    """Agreement of one rater pair (`raters` two names) or of everybody (`raters` all names)."""

    raters: tuple[str, ...]
    alpha: float | None  # Krippendorff's alpha (ordinal) on ratings; None: undefined
    shared_generations: int  # generations rated by two or more of `raters`
    pick_agreement: float | None  # share of shared judged pages whose best agrees; None: none shared
    shared_pages: int  # (pair, page) judgements compared for picks

    def as_dict(self) -> dict:
        """Return the record the API returns."""
        return {"raters": list(self.raters), "alpha": self.alpha, "shared_generations": self.shared_generations,
                "pick_agreement": self.pick_agreement, "shared_pages": self.shared_pages}


def krippendorff_alpha(ratings: Mapping[str, Mapping[int, int]]) -> tuple[float | None, int]:
    """Return (Krippendorff's alpha, ordinal, on scores 1..5; the number of units) for {rater: {unit: score}}.

    Units are those rated by two or more of the raters; alpha is None when there is none or when it is
    undefined (every pairable rating the same value: no disagreement expected by chance either).
    """
    counts: dict[int, int] = defaultdict(int)
    for scores in ratings.values():
        for unit in scores:
            counts[unit] += 1
    units = sorted(u for u, n in counts.items() if n >= 2)
    if not units:
        return None, 0
    data = np.array([[scores.get(u, np.nan) for u in units] for scores in ratings.values()], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 when every rating is the same value
        alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal",
                                         value_domain=list(SCORES)))
    return (alpha if math.isfinite(alpha) else None), len(units)


def pick_agreement(bests: Mapping[str, Mapping[int, object]], raters: Iterable[str]) -> tuple[float | None, int]:
    """Return (share of agreeing judgements, how many were compared) over every pair of `raters` and every
    page both judged; `bests`: {rater: {page id: their best (a frozenset of candidates, or NONE_GOOD)}}."""
    agree = compared = 0
    for a, b in combinations(sorted(raters), 2):
        for page in bests.get(a, {}).keys() & bests.get(b, {}).keys():
            compared += 1
            agree += bests[a][page] == bests[b][page]
    return (agree / compared if compared else None), compared


def judgements_of(store) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, object]]]:
    """Return ({rater: {generation id: current score}}, {rater: {page id: best}}) from the store: current
    ratings, and the best of each submission in force that states one (a pick, a tie, none is good)."""
    ratings: dict[str, dict[int, int]] = defaultdict(dict)
    for batch in store.iter_feedback():
        for rated in batch.ratings:
            ratings[rated.rating.rater][rated.generation.id] = rated.rating.score
    bests: dict[str, dict[int, object]] = defaultdict(dict)
    for submission in store.submissions():
        if submission.none_good:
            bests[submission.rater][submission.page_id] = NONE_GOOD
        elif submission.best:
            bests[submission.rater][submission.page_id] = frozenset(submission.best)
    return dict(ratings), dict(bests)


def agreement(store) -> dict:
    """Return {"overall": Agreement record, "pairs": [one per rater pair that shares a rated generation or a
    judged page]} of the store's judgements in force."""
    ratings, bests = judgements_of(store)
    raters = sorted(ratings.keys() | bests.keys())
    pairs = []
    for pair in combinations(raters, 2):
        found = _agreement(pair, ratings, bests)
        if found.shared_generations or found.shared_pages:
            pairs.append(found.as_dict())
    return {"overall": _agreement(tuple(raters), ratings, bests).as_dict(), "pairs": pairs}


def _agreement(raters: tuple[str, ...], ratings: Mapping[str, Mapping[int, int]],
               bests: Mapping[str, Mapping[int, object]]) -> Agreement:
    """Return the Agreement of `raters` on their ratings and picks."""
    alpha, units = krippendorff_alpha({r: ratings[r] for r in raters if r in ratings})
    picks, pages = pick_agreement(bests, raters)
    return Agreement(raters, alpha, units, picks, pages)
