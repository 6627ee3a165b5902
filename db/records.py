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
BASE_VERSION = 0
"""Adapter version 0 is the base model without an adapter; stored versions start at 1."""


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    source: str
    active: bool
    created_at: datetime


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
    """One rating revision; `current` is False once the rater rated the same generation again."""

    id: int
    generation_id: int
    rater: str
    score: int
    comment: str | None
    current: bool
    created_at: datetime


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
