"""The raters' own verdict on a new version: on pages that mix candidates of two versions
(`--mix-versions`), how often the candidate picked as best is the newer version's.

Arena-style: it needs no reward model and no simulated taste, only the picks raters make anyway.
A pick counts when the submission in force names one best candidate of either version, or a tie
whose candidates are all of one version; a tie across both versions and none-is-good pages count
for neither. The interval is the 95% Wilson score interval of a binomial proportion
(`scipy.stats.binomtest(...).proportion_ci`).
"""
from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binomtest


@dataclass(frozen=True)
class WinRate:
    """How often `new` was picked over `old`: `wins` of `picks` picks, the share and its 95% interval
    (None with no pick yet)."""

    new: int
    old: int
    wins: int
    picks: int
    rate: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict:
        """Return the record the page shows."""
        return {"new": self.new, "old": self.old, "wins": self.wins, "picks": self.picks, "rate": self.rate,
                "low": self.low, "high": self.high}


def win_rate(wins: int, picks: int, new: int, old: int) -> WinRate:
    """Return the WinRate of `wins` out of `picks`, with the Wilson interval."""
    if picks == 0:
        return WinRate(new, old, 0, 0, None, None, None)
    interval = binomtest(wins, picks).proportion_ci(confidence_level=0.95, method="wilson")
    return WinRate(new, old, wins, picks, wins / picks, float(interval.low), float(interval.high))


def picks_between(store, new: int, old: int, page_versions: dict[int, dict[int, int]] | None = None) -> tuple[int, int]:
    """Return (picks of a `new` candidate, picks that count) over the submissions in force whose page
    holds candidates of both versions. `page_versions` ({page id: {generation id: version}}, filled
    as pages are read) saves reading a page again: a judged page's candidates do not change."""
    page_versions = {} if page_versions is None else page_versions
    wins = picks = 0
    for submission in store.submissions():
        if submission.none_good or not submission.best:
            continue
        if submission.page_id not in page_versions:
            page_versions[submission.page_id] = {g.id: g.adapter_version
                                                 for g in store.page_generations(submission.page_id)}
        versions = page_versions[submission.page_id]
        if not {new, old} <= set(versions.values()):
            continue
        picked = {versions[g] for g in submission.best}
        if picked in ({new}, {old}):
            picks += 1
            wins += picked == {new}
    return wins, picks


def serving_win_rate(store, serving: int, page_versions: dict[int, dict[int, int]] | None = None) -> WinRate | None:
    """Return the WinRate of the serving version over the version it replaced (its parent; None for the
    base model); `page_versions` as `picks_between`'s."""
    if serving == 0:
        return None
    old = store.get_version(serving).parent
    return win_rate(*picks_between(store, serving, old, page_versions), serving, old)
