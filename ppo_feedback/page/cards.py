"""The Rate tab's cards as plain data: the blind, shuffled order of a page's candidates, what the page
keeps about the page it shows (`ShownPage`), how the rater's choices become one submission, and the
short texts the tab shows (the confirmation, the rater's progress, the history of recent pages).

Before a page is submitted its cards carry only a letter, in an order shuffled per page; the versions
that wrote them are revealed once it is submitted. Nothing here touches Gradio or the store.
"""
from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from db.records import BASE_VERSION, FLAG_KINDS, Submission
from .inputs import as_int

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Candidates' names on the page, in card order."""
FLAG_CHOICES: tuple[tuple[str, str], ...] = tuple((kind.replace("_", "-"), kind) for kind in FLAG_KINDS)
"""(shown, stored) for each kind of flag a card can get."""


def version_label(version: int) -> str:
    """Return how the page names a version: "base model" for 0, else "v3"."""
    return "base model" if version == BASE_VERSION else f"v{version}"


def derived_order(seed: int, page_id: int, n: int) -> list[int]:
    """Return the card order of a page the app did not shuffle itself (one reopened after a restart, or
    offered to a second rater): a permutation of range(n) that depends only on (seed, page id)."""
    digest = hashlib.sha256(f"{seed}:{page_id}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


@dataclass
class ShownPage:
    """The page the Rate tab shows: its candidates' ids and versions in card order (card i shows
    `ids[i]`), the key that makes submitting it twice store it once, whether its versions are
    revealed (after it was submitted, or when reopened to change it) and whether it was submitted."""

    page_id: int
    prompt_id: int
    ids: list[int]
    versions: list[int]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    revealed: bool = False
    submitted: bool = False

    def as_state(self) -> dict[str, Any]:
        """Return the plain dict the page keeps in its gr.State."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Any) -> ShownPage:
        """Return the page kept in a gr.State; raise ValueError when no page is shown."""
        if not isinstance(state, dict) or not state.get("ids"):
            raise ValueError("Generate candidates first.")
        return cls(**state)


def shown_from_records(records: list[dict[str, Any]], order: list[int], revealed: bool = False) -> ShownPage:
    """Return the ShownPage of a recorded page's records (as `page_records` returns them, any order)
    shown in `order` (card i shows records[order[i]])."""
    ordered = [records[i] for i in order]
    return ShownPage(ordered[0]["page_id"], ordered[0]["prompt_id"], [r["generation_id"] for r in ordered],
                     [r["version"] for r in ordered], revealed=revealed)


@dataclass(frozen=True)
class Judgement:
    """A rater's choices on the cards, as the store takes them: {generation id: score}, the best
    (one, or two or more for a tie), none is good, flags [(generation id, kind, reason)], comment."""

    scores: dict[int, int]
    best: list[int]
    none_good: bool
    flags: list[tuple[int, str, str | None]]
    comment: str | None


def judgement_of(shown: ShownPage, scores: list[Any], best_letters: list[str] | None, none_good: bool,
                 flags: list[tuple[Any, Any]], comment: str | None) -> Judgement:
    """Return the Judgement of the cards' values: `scores[i]`, `flags[i]` (kind shown or stored, reason)
    belong to card i; `best_letters` name the best cards. Raise ValueError (with what to fix) on bad
    input or when the cards say nothing."""
    n = len(shown.ids)
    rated = {}
    for gid, score in zip(shown.ids, scores[:n]):
        if score in (None, ""):
            continue
        rated[gid] = as_int(score, "score")
        if not 1 <= rated[gid] <= 5:
            raise ValueError(f"Scores go from 1 to 5, not {rated[gid]}.")
    best = []
    for letter in best_letters or []:
        if letter not in LETTERS[:n]:
            raise ValueError(f"Candidate {letter} is not there (yet).")
        best.append(shown.ids[LETTERS.index(letter)])
    kinds = dict(FLAG_CHOICES) | {stored: stored for _, stored in FLAG_CHOICES}
    flagged = []
    for gid, (kind, reason) in zip(shown.ids, flags[:n]):
        if kind in (None, ""):
            continue
        if kind not in kinds:
            raise ValueError(f"Unknown flag {kind!r}; choose one of {', '.join(k for k, _ in FLAG_CHOICES)}.")
        flagged.append((gid, kinds[kind], (reason or "").strip() or None))
    if not rated and not best and not none_good and not flagged:
        raise ValueError("Rate at least one candidate (1–5), pick the best one or say none is good.")
    return Judgement(rated, best, bool(none_good), flagged, (comment or "").strip() or None)


def confirmation(submission: Submission, shown: ShownPage) -> str:
    """Return the one line that says what a submission stored ("Stored 3 ratings and a tie of A and C;
    undo with u.")."""
    letter = {gid: LETTERS[i] for i, gid in enumerate(shown.ids)}
    n = len(submission.scores)
    parts = [f"{n} rating{'s' if n != 1 else ''}"]
    best = sorted(letter.get(g, "?") for g in submission.best)
    if submission.tie:
        parts.append(f"a tie of {', '.join(best[:-1])} and {best[-1]}")
    elif best:
        parts.append(f"{best[0]} as the best")
    if submission.none_good:
        parts.append("none is good")
    if submission.flags:
        parts.append(f"{len(submission.flags)} flag{'s' if len(submission.flags) != 1 else ''}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Stored {listed}; undo with u."


def reveal_line(shown: ShownPage) -> str:
    """Return which version wrote which card ("A: v2 · B: base model · C: v2")."""
    return " · ".join(f"{LETTERS[i]}: {version_label(v)}" for i, v in enumerate(shown.versions))


def round_note(worker_state: str) -> str:
    """Return when the next training round comes, from the worker's state as the status panel shows it."""
    if worker_state.startswith("waiting for "):
        return "after " + worker_state.removeprefix("waiting for ")
    if worker_state.startswith("paused"):
        return "no worker is running"
    if worker_state.startswith("training"):
        return "training now"
    return "when the worker next looks (" + worker_state + ")"


def progress_line(counts: dict[str, int], worker_state: str) -> str:
    """Return the rater's progress line: ratings today and in total, and when the next round comes."""
    today, total = counts["since"], counts["total"]
    return (f"You: {today} rating{'s' if today != 1 else ''} today, {total} in total · "
            f"next training round: {round_note(worker_state)}")


def history_label(submission: Submission, prompt_text: str) -> str:
    """Return how the history lists one of my submissions: when, the prompt's start, what it stored."""
    prompt = " ".join(prompt_text.split())
    prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
    n = len(submission.scores)
    what = f"{n} rating{'s' if n != 1 else ''}" + (", none is good" if submission.none_good else "")
    status = "" if submission.status == "current" else f" ({submission.status})"
    return f"{submission.created_at:%H:%M} · {prompt} · {what}{status}"
