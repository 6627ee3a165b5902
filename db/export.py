"""Ratings and preferences as JSONL in the formats other RLHF tools read.

- `preference`: {"prompt", "chosen", "rejected"} (TRL reward modelling / DPO), from explicit
  preferences and from pairs of generations of one page whose mean current ratings differ;
- `unpaired`: {"prompt", "completion", "label"} (TRL KTO), label true for scores >= 4;
- `ratings`: every current rating with prompt, page, completion, score, rater, adapter version, time.

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


def preference_rows(store: FeedbackStore) -> Iterator[dict[str, str]]:
    """Yield {"prompt", "chosen", "rejected"} rows: explicit preferences first, then every pair
    of generations of the same page (shown side by side) whose mean current ratings differ
    (higher mean chosen)."""
    by_page: dict[int, dict[int, _Scored]] = defaultdict(dict)
    for batch in store.iter_feedback():
        for pair in batch.preferences:
            yield {"prompt": pair.prompt_text, "chosen": pair.chosen.text, "rejected": pair.rejected.text}
        for rated in batch.ratings:
            generation = rated.generation
            entry = by_page[generation.page_id].setdefault(
                generation.id, _Scored(rated.prompt_text, generation.text)
            )
            entry.scores.append(rated.rating.score)
    for generations in by_page.values():
        for (_, a), (_, b) in combinations(sorted(generations.items()), 2):
            mean_a, mean_b = fmean(a.scores), fmean(b.scores)
            if mean_a != mean_b:
                chosen, rejected = (a, b) if mean_a > mean_b else (b, a)
                yield {"prompt": a.prompt, "chosen": chosen.completion, "rejected": rejected.completion}


def unpaired_rows(store: FeedbackStore) -> Iterator[dict[str, Any]]:
    """Yield one {"prompt", "completion", "label"} row per current rating; label is score >= 4."""
    for batch in store.iter_feedback():
        for rated in batch.ratings:
            yield {
                "prompt": rated.prompt_text,
                "completion": rated.generation.text,
                "label": rated.rating.score >= LIKED_SCORE,
            }


def rating_rows(store: FeedbackStore) -> Iterator[dict[str, Any]]:
    """Yield every current rating with its prompt, page, completion, score, rater, version and time."""
    for batch in store.iter_feedback():
        for rated in batch.ratings:
            rating, generation = rated.rating, rated.generation
            yield {
                "rating_id": rating.id,
                "prompt_id": generation.prompt_id,
                "prompt": rated.prompt_text,
                "page_id": generation.page_id,
                "generation_id": generation.id,
                "completion": generation.text,
                "score": rating.score,
                "comment": rating.comment or "",
                "rater": rating.rater,
                "adapter_version": generation.adapter_version,
                "created_at": rating.created_at.isoformat(),
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
