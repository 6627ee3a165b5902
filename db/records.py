"""Plain frozen records the store returns (never ORM objects), safe to pass between processes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

PromptSource = Literal["builtin", "uploaded", "rater"]
VersionStatus = Literal["published", "failed", "rolled_back"]

PROMPT_SOURCES: tuple[str, ...] = ("builtin", "uploaded", "rater")
VERSION_STATUSES: tuple[str, ...] = ("published", "failed", "rolled_back")
ADMISSIONS: tuple[str, ...] = ("pending", "admitted", "rejected")
"""A prompt's admission: a rater's own typed prompt is pending until an admin admits or rejects it."""
BASE_VERSION = 0
"""Adapter version 0 is the base model without an adapter; stored versions start at 1."""


@dataclass(frozen=True)
class Prompt:
    """A stored prompt. It is in the pool (offered to raters, sampled for training) when `active` and
    `admission` is "admitted"; a pending one is offered only to `added_by`, the rater who typed it."""

    id: int
    text: str
    source: str
    active: bool
    created_at: datetime
    admission: str = "admitted"
    added_by: str | None = None


@dataclass(frozen=True)
class NewGeneration:
    """One sampled completion to record with `FeedbackStore.record_generations`.

    `token_ids` are the response tokens and `logprobs` their behaviour log-probabilities as plain
    Python numbers (call `.tolist()` on tensors); `sampling` holds seed, temperature, top_p,
    max_new_tokens and the like.
    """

    text: str
    token_ids: Sequence[int] = ()
    logprobs: Sequence[float] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    """One request for candidates of a prompt, shown side by side: `rater` asked for it (None only
    for a page migration 0003 made for generations nobody rated), `adapter_version` was serving
    when it was asked (each generation keeps the version that sampled it)."""

    id: int
    prompt_id: int
    rater: str | None
    adapter_version: int
    created_at: datetime


@dataclass(frozen=True)
class Generation:
    """One stored completion; `page_id` is the page it was shown on, with its sibling candidates."""

    id: int
    prompt_id: int
    page_id: int
    adapter_version: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    sampling: Mapping[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Rating:
    """One rating revision; `current` is False once the rater rated the same generation again or
    undid the submission it came with. `submission_id`: that submission (None: rated alone);
    `guideline_version`: the guidelines in force when it was given (0: none)."""

    id: int
    generation_id: int
    rater: str
    score: int
    comment: str | None
    current: bool
    created_at: datetime
    submission_id: int | None = None
    guideline_version: int = 0


@dataclass(frozen=True)
class Preference:
    id: int
    chosen_generation_id: int
    rejected_generation_id: int
    rater: str
    created_at: datetime


@dataclass(frozen=True)
class Cursor:
    """Position in the feedback stream: the highest rating and preference ids already consumed."""

    rating_id: int = 0
    preference_id: int = 0


@dataclass(frozen=True)
class RatedGeneration:
    """A current rating together with the generation it rates and that generation's prompt text."""

    rating: Rating
    generation: Generation
    prompt_text: str


@dataclass(frozen=True)
class PreferencePair:
    """A preference together with both generations and their (shared) prompt."""

    preference: Preference
    prompt_id: int
    prompt_text: str
    chosen: Generation
    rejected: Generation


@dataclass(frozen=True)
class Feedback:
    """Feedback after a cursor; `cursor` is where the next call should continue from."""

    ratings: tuple[RatedGeneration, ...]
    preferences: tuple[PreferencePair, ...]
    cursor: Cursor


@dataclass(frozen=True)
class FeedbackCounts:
    ratings: int
    preferences: int
    rated_prompts: int = 0
    """Distinct prompts among the counted ratings' generations."""


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    path: str | None
    parent: int
    status: str
    n_ratings: int
    n_preferences: int
    cursor: Cursor
    metrics: Mapping[str, Any]
    created_at: datetime
    status_changed_at: datetime | None
    exported_at: datetime | None = None  # when last exported (retention keeps it)
    pruned_at: datetime | None = None  # when retention removed its files (it cannot be served again)


@dataclass(frozen=True)
class VersionRecord:
    """A trained adapter version as its publisher describes it, before it has a number.

    One value for both places a version is recorded: its folder's `metadata.json` and its
    `adapter_versions` row (`FeedbackStore.publish_version`). `cursor` is the feedback it was
    trained up to, `n_ratings` and `n_preferences` how much feedback there was then, `metrics` its
    last PPO iteration's statistics and the reward model's, and `base_model` the model spec it was
    trained on (kept in `metadata.json` only; the store has no column for it).
    """

    parent: int
    base_model: str
    cursor: Cursor
    n_ratings: int
    n_preferences: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricPoint:
    id: int
    version: int
    iteration: int
    name: str
    value: float
    created_at: datetime


@dataclass(frozen=True)
class WorkerStatus:
    """The training lease as the status panel sees it; `present` is False once the lease expired."""

    holder: str | None
    state: str
    heartbeat_at: datetime | None
    expires_at: datetime | None
    present: bool


@dataclass(frozen=True)
class VersionSummary:
    """Mean of the current ratings of the generations one adapter version produced."""

    version: int
    mean_rating: float
    n_ratings: int


FLAG_KINDS: tuple[str, ...] = ("offensive", "broken", "off_prompt", "other")
"""What a flag on a candidate says is wrong with it ("other" needs a reason)."""
SUBMISSION_STATUSES: tuple[str, ...] = ("current", "superseded", "undone")


@dataclass(frozen=True)
class Flag:
    """A flag on one candidate: `kind` one of FLAG_KINDS, `reason` free text (required for "other")."""

    generation_id: int
    kind: str
    reason: str | None = None


@dataclass(frozen=True)
class Guideline:
    """One version of the rating guidelines (versions count from 1; 0 means none written yet)."""

    version: int
    text: str
    author: str
    created_at: datetime


@dataclass(frozen=True)
class Submission:
    """One rater's judgement of one page, stored as a unit (`FeedbackStore.submit_page`).

    `scores`: (generation id, score) of the ratings it gave; `best`: the candidate picked as best, or
    with `tie` the two or more judged equally best (each preferred over the page's others, no
    preference among them); `none_good`: every candidate of the page judged undesirable; `status`:
    current, superseded (the rater submitted the page again) or undone.
    """

    id: int
    page_id: int
    prompt_id: int
    rater: str
    client_key: str | None
    guideline_version: int
    none_good: bool
    comment: str | None
    status: str
    created_at: datetime
    status_changed_at: datetime | None
    scores: tuple[tuple[int, int], ...] = ()
    best: tuple[int, ...] = ()
    tie: bool = False
    flags: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class PageJudgement:
    """A current submission's page-level facts with the page's candidates, as the learners read them:
    none-is-good, the tied candidates, the flagged ones."""

    submission_id: int
    page_id: int
    rater: str
    prompt_text: str
    generations: tuple[Generation, ...]
    none_good: bool
    tied: tuple[int, ...]
    flagged: tuple[int, ...]
