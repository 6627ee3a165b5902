"""Ratings and preferences as JSONL in the formats other RLHF tools read.

- `preference`: {"prompt", "chosen", "rejected"} (TRL reward modelling / DPO), from explicit
  preferences in force and from pairs of generations of one page whose mean current ratings differ
  (at most MAX_RATING_PAIRS_PER_PAGE per page, made lazily);
  none between two candidates a rater tied (TRL's format has no ties), none whose chosen one is
  on a none-is-good page or flagged;
- `unpaired`: {"prompt", "completion", "label"} (TRL KTO), one row per current rating, label true
  for scores >= 4 unless the candidate is on a none-is-good page or flagged; plus a false row for
  each unrated candidate of a none-is-good page;
- `ratings`: every rating ever given, superseded and undone ones marked (`status`), with prompt, page,
  completion, score, rater, adapter version, time, the guidelines' version, and its submission's
  facts about the candidate (best, tie, none-is-good, flag); a candidate a submission judged
  (none-is-good, tie, flag) without rating it has a row with `score` null.

Each file loads with `datasets.load_dataset("json", data_files=...)`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations, islice
from pathlib import Path
from statistics import fmean
from typing import Any

from db.store import FeedbackStore

LIKED_SCORE = 4
MAX_RATING_PAIRS_PER_PAGE = 190
"""Most rating-derived pairs the `preference` export makes of one page (every pair of up to 20 rated
candidates): a page of k rated candidates has k(k-1)/2 pairs, millions for a few thousand."""


@dataclass
class _Scored:
    prompt: str
    completion: str
    scores: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Judged:
    """The page-level judgements in force as the exports need them."""

    blocked: frozenset[int]  # generation ids never to be made likelier: none-is-good pages', flagged ones
    ties: dict[int, frozenset[int]]  # generation id -> the submissions that tied it with others
    unrated_bad: tuple[tuple[str, str], ...]  # (prompt, completion) of none-is-good candidates nobody rated

    def tied(self, a: int, b: int) -> bool:
        """Return whether one tie holds both generations (memory linear in the tied candidates, not pairs)."""
        return bool(self.ties.get(a, frozenset()) & self.ties.get(b, frozenset()))


def _judged(store: FeedbackStore, rated: set[int]) -> _Judged:
    """Return the judgements in force; `rated`: the generation ids with a current rating."""
    blocked: set[int] = set()
    ties: dict[int, set[int]] = defaultdict(set)
    unrated_bad: dict[int, tuple[str, str]] = {}
    for judgement in store.judgements():
        blocked.update(judgement.flagged)
        for generation_id in judgement.tied:
            ties[generation_id].add(judgement.submission_id)
        if judgement.none_good:
            for generation in judgement.generations:
                blocked.add(generation.id)
                if generation.id not in rated:
                    unrated_bad[generation.id] = (judgement.prompt_text, generation.text)
    return _Judged(frozenset(blocked), {g: frozenset(t) for g, t in ties.items()},
                   tuple(unrated_bad[g] for g in sorted(unrated_bad)))


def preference_rows(store: FeedbackStore, max_pairs_per_page: int = MAX_RATING_PAIRS_PER_PAGE) -> Iterator[dict[str, str]]:
    """Yield {"prompt", "chosen", "rejected"} rows: explicit preferences in force first, then pairs of
    generations of the same page (shown side by side) whose mean current ratings differ (higher mean
    chosen), at most `max_pairs_per_page` per page (see `_rating_pairs`); never a pair a rater tied,
    never a chosen one on a none-is-good page or flagged. Rows are made one at a time as they are read."""
    if isinstance(max_pairs_per_page, bool) or not isinstance(max_pairs_per_page, int) or max_pairs_per_page < 1:
        raise ValueError(f"max_pairs_per_page must be a whole number of at least 1, not {max_pairs_per_page!r}")
    by_page: dict[int, dict[int, _Scored]] = defaultdict(dict)
    picks = []
    for batch in store.iter_feedback():
        picks.extend(batch.preferences)
        for rated in batch.ratings:
            generation = rated.generation
            entry = by_page[generation.page_id].setdefault(
                generation.id, _Scored(rated.prompt_text, generation.text)
            )
            entry.scores.append(rated.rating.score)
    judged = _judged(store, {g for page in by_page.values() for g in page})
    for pair in picks:
        if pair.chosen.id not in judged.blocked:
            yield {"prompt": pair.prompt_text, "chosen": pair.chosen.text, "rejected": pair.rejected.text}
    for generations in by_page.values():
        yield from islice(_rating_pairs(generations, judged), max_pairs_per_page)


def _rating_pairs(generations: dict[int, _Scored], judged: _Judged) -> Iterator[dict[str, str]]:
    """Yield a page's rating pairs, lazily: in id order when the page has few candidates (at most 20),
    else candidates ranked by mean rating, neighbours first (rank gap 1, then 2, ...), so that a cap on
    the pairs keeps every candidate and the finest distinctions."""
    means = {g: fmean(s.scores) for g, s in generations.items()}
    ranked = sorted(generations, key=lambda g: (-means[g], g))
    if len(ranked) <= 20:
        pairs: Iterable[tuple[int, int]] = combinations(sorted(generations), 2)
    else:
        pairs = ((ranked[i], ranked[i + gap]) for gap in range(1, len(ranked)) for i in range(len(ranked) - gap))
    for id_a, id_b in pairs:
        if means[id_a] == means[id_b] or judged.tied(id_a, id_b):
            continue
        chosen, rejected = (id_a, id_b) if means[id_a] > means[id_b] else (id_b, id_a)
        if chosen not in judged.blocked:
            yield {"prompt": generations[chosen].prompt, "chosen": generations[chosen].completion,
                   "rejected": generations[rejected].completion}


def unpaired_rows(store: FeedbackStore) -> Iterator[dict[str, Any]]:
    """Yield one {"prompt", "completion", "label"} row per current rating (label: score >= 4, and not on a
    none-is-good page nor flagged), then a false row per unrated candidate of a none-is-good page."""
    ratings = [rated for batch in store.iter_feedback() for rated in batch.ratings]
    judged = _judged(store, {rated.generation.id for rated in ratings})
    for rated in ratings:
        yield {
            "prompt": rated.prompt_text,
            "completion": rated.generation.text,
            "label": rated.rating.score >= LIKED_SCORE and rated.generation.id not in judged.blocked,
        }
    for prompt, completion in judged.unrated_bad:
        yield {"prompt": prompt, "completion": completion, "label": False}


def rating_rows(store: FeedbackStore) -> Iterator[dict[str, Any]]:
    """Yield every rating ever given (`status`: current, superseded, or undone with its submission) with
    its prompt, page, completion, score, rater, version, time, guidelines' version and what its
    submission said of the candidate; then each candidate a submission judged without rating it."""
    submissions = {s.id: s for s in store.submissions(current_only=False)}
    covered: set[tuple[int, int]] = set()
    after = 0
    while batch := store.rating_revisions(after):
        for rated in batch:
            rating, generation = rated.rating, rated.generation
            submission = submissions.get(rating.submission_id) if rating.submission_id else None
            if submission is not None:
                covered.add((submission.id, generation.id))
            status = "current" if rating.current else (
                "undone" if submission is not None and submission.status == "undone" else "superseded")
            yield _rating_row(rated.prompt_text, generation, submission, status, {
                "rating_id": rating.id, "score": rating.score, "comment": rating.comment or "",
                "rater": rating.rater, "guideline_version": rating.guideline_version,
                "created_at": rating.created_at.isoformat()})
        after = batch[-1].rating.id
    for submission in submissions.values():
        for generation, prompt in _judged_unrated(store, submission, covered):
            yield _rating_row(prompt, generation, submission, submission.status, {
                "rating_id": None, "score": None, "comment": submission.comment or "",
                "rater": submission.rater, "guideline_version": submission.guideline_version,
                "created_at": submission.created_at.isoformat()})


def _judged_unrated(store: FeedbackStore, submission: Any, covered: set[tuple[int, int]]) -> list[tuple[Any, str]]:
    """Return (generation, prompt text) of the candidates `submission` judged (none-is-good, tie, flag)
    without rating them."""
    named = {f.generation_id for f in submission.flags} | (set(submission.best) if submission.tie else set())
    if not named and not submission.none_good:
        return []
    prompt = store.get_prompt(submission.prompt_id).text
    return [(g, prompt) for g in store.page_generations(submission.page_id)
            if (submission.id, g.id) not in covered and (submission.none_good or g.id in named)]


def _rating_row(prompt: str, generation: Any, submission: Any, status: str, rating: dict[str, Any]) -> dict[str, Any]:
    """Return one `ratings` row: the rating's fields and its submission's facts about the candidate."""
    flag = next((f for f in submission.flags if f.generation_id == generation.id), None) if submission else None
    return {
        "rating_id": rating["rating_id"],
        "prompt_id": generation.prompt_id,
        "prompt": prompt,
        "page_id": generation.page_id,
        "generation_id": generation.id,
        "completion": generation.text,
        "score": rating["score"],
        "comment": rating["comment"],
        "rater": rating["rater"],
        "adapter_version": generation.adapter_version,
        "created_at": rating["created_at"],
        "status": status,
        "guideline_version": rating["guideline_version"],
        "submission_id": submission.id if submission else None,
        "best": bool(submission and generation.id in submission.best),
        "tie": bool(submission and submission.tie and generation.id in submission.best),
        "none_good": bool(submission and submission.none_good),
        "flag": flag.kind if flag else None,
        "flag_reason": flag.reason if flag else None,
    }


FORMATS: dict[str, Callable[[FeedbackStore], Iterable[dict[str, Any]]]] = {
    "preference": preference_rows,
    "unpaired": unpaired_rows,
    "ratings": rating_rows,
}


def export_jsonl(store: FeedbackStore, fmt: str, out: str | os.PathLike[str]) -> int:
    """Write the `fmt` rows as UTF-8 JSONL to `out` ("-" for stdout); return the number of rows."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = FORMATS[fmt](store)
    if os.fspath(out) == "-":
        return _write(rows, sys.stdout)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        return _write(rows, handle)


def _write(rows: Iterable[dict[str, Any]], handle: Any) -> int:
    count = 0
    for row in rows:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count
