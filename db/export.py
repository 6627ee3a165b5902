"""Ratings and preferences as JSONL in the formats other RLHF tools read.

- `preference`: {"prompt", "chosen", "rejected"} (TRL reward modelling / DPO), from explicit
  preferences in force and from pairs of generations of one page whose mean current ratings differ;
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
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import Any

from db.store import FeedbackStore

LIKED_SCORE = 4


@dataclass
class _Scored:
    prompt: str
    completion: str
    scores: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Judged:
    """The page-level judgements in force as the exports need them."""

    blocked: frozenset[int]  # generation ids never to be made likelier: none-is-good pages', flagged ones
    tied: frozenset[frozenset[int]]  # unordered pairs of generations one tie holds
    unrated_bad: tuple[tuple[str, str], ...]  # (prompt, completion) of none-is-good candidates nobody rated


def _judged(store: FeedbackStore, rated: set[int]) -> _Judged:
    """Return the judgements in force; `rated`: the generation ids with a current rating."""
    blocked: set[int] = set()
    tied: set[frozenset[int]] = set()
    unrated_bad: dict[int, tuple[str, str]] = {}
    for judgement in store.judgements():
        blocked.update(judgement.flagged)
        tied.update(frozenset((a, b)) for a, b in combinations(judgement.tied, 2))
        if judgement.none_good:
            for generation in judgement.generations:
                blocked.add(generation.id)
                if generation.id not in rated:
                    unrated_bad[generation.id] = (judgement.prompt_text, generation.text)
    return _Judged(frozenset(blocked), frozenset(tied), tuple(unrated_bad[g] for g in sorted(unrated_bad)))


def preference_rows(store: FeedbackStore) -> Iterator[dict[str, str]]:
    """Yield {"prompt", "chosen", "rejected"} rows: explicit preferences in force first, then every pair
    of generations of the same page (shown side by side) whose mean current ratings differ (higher
    mean chosen); never a pair a rater tied, never a chosen one on a none-is-good page or flagged."""
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
        for (id_a, a), (id_b, b) in combinations(sorted(generations.items()), 2):
            mean_a, mean_b = fmean(a.scores), fmean(b.scores)
            if mean_a == mean_b or frozenset((id_a, id_b)) in judged.tied:
                continue
            (chosen_id, chosen), rejected = ((id_a, a), b) if mean_a > mean_b else ((id_b, b), a)
            if chosen_id not in judged.blocked:
                yield {"prompt": a.prompt, "chosen": chosen.completion, "rejected": rejected.completion}


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
