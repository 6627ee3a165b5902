"""SQLAlchemy ORM tables of the feedback store, as of the newest migration in `db/migrations`.

Every schema change needs a new migration there as well; `tests/test_store_migrations.py`
checks that these models and the migrated schema agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from db.records import ADMISSIONS, FLAG_KINDS, SUBMISSION_STATUSES

LEASE_ROW_ID = 1
NAME_LENGTH = 200


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in Python, naive UTC in the database (same on every engine)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(timezone.utc)")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[int]: JSON,
        list[float]: JSON,
    }


def _current_index(name: str, *columns: str) -> Index:
    """Return the unique index over `columns` of the rows in force (is_current true): one current row
    per key, any number of superseded ones."""
    return Index(name, *columns, unique=True, sqlite_where=text("is_current"), postgresql_where=text("is_current"))


class Prompt(Base):
    """A prompt; only active, admitted ones are in the pool (offered to raters, sampled for training).
    `admission`: a rater's own typed prompt is pending until an admin admits or rejects it."""

    __tablename__ = "prompts"
    __table_args__ = (
        CheckConstraint("source IN ('builtin', 'uploaded', 'rater')", name="source"),
        CheckConstraint(f"admission IN {ADMISSIONS}", name="admission"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool]
    created_at: Mapped[datetime]
    admission: Mapped[str] = mapped_column(String(16), index=True, server_default="admitted")
    added_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    reviewed_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    reviewed_at: Mapped[datetime | None]


class Page(Base):
    """One request for candidates: the prompt, who asked (None only for pages migration 0003
    could not attribute), the version serving when it was asked; its generations point to it."""

    __tablename__ = "pages"
    __table_args__ = (CheckConstraint("adapter_version >= 0", name="adapter_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    rater: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    adapter_version: Mapped[int]
    created_at: Mapped[datetime]


class PageViewer(Base):
    """A rater a page was shown to besides the rater who asked for it (an --overlap page): they may
    judge its candidates too."""

    __tablename__ = "page_viewers"
    __table_args__ = (UniqueConstraint("page_id", "rater", name="uq_page_viewers_page_rater"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    page_id: Mapped[int] = mapped_column(ForeignKey("pages.id"), index=True)
    rater: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    created_at: Mapped[datetime]


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (CheckConstraint("adapter_version >= 0", name="adapter_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    page_id: Mapped[int] = mapped_column(ForeignKey("pages.id"), index=True)
    adapter_version: Mapped[int] = mapped_column(index=True)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[int]]
    logprobs: Mapped[list[float]]
    sampling: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class Guideline(Base):
    """One version of the rating guidelines an admin wrote; the newest is in force (none: version 0)."""

    __tablename__ = "guidelines"
    __table_args__ = (CheckConstraint("version >= 1", name="version"),)

    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime]


class Submission(Base):
    """One rater's judgement of one page, stored as a unit: its ratings and preferences point here;
    its ties, flags, none-is-good and comment are its own. `status`: current, superseded (the rater
    submitted the same page again) or undone; rows are never deleted."""

    __tablename__ = "submissions"
    __table_args__ = (
        CheckConstraint(f"status IN {SUBMISSION_STATUSES}", name="status"),
        CheckConstraint("guideline_version >= 0", name="guideline_version"),
        UniqueConstraint("rater", "client_key", name="uq_submissions_rater_client_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    page_id: Mapped[int] = mapped_column(ForeignKey("pages.id"), index=True)
    rater: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    client_key: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    guideline_version: Mapped[int]
    none_good: Mapped[bool]
    comment: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime]
    status_changed_at: Mapped[datetime | None]


class Tie(Base):
    """A candidate a submission judged equally best with the others of its tie (two or more rows)."""

    __tablename__ = "ties"
    __table_args__ = (UniqueConstraint("submission_id", "generation_id", name="uq_ties_submission_generation"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), index=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)


class Flag(Base):
    """A candidate a submission flagged (offensive, broken, off-prompt or other) with a reason."""

    __tablename__ = "flags"
    __table_args__ = (
        CheckConstraint(f"kind IN {FLAG_KINDS}", name="kind"),
        UniqueConstraint("submission_id", "generation_id", name="uq_flags_submission_generation"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), index=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)


class Skip(Base):
    """A prompt a rater skipped: never offered to them again by `next_prompt`."""

    __tablename__ = "skips"
    __table_args__ = (UniqueConstraint("rater", "prompt_id", name="uq_skips_rater_prompt"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    rater: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    created_at: Mapped[datetime]


class Rating(Base):
    """Every rating ever given; exactly one row per (generation, rater) has is_current true.

    `submission_id`: the submission it came with (None: rated alone, /rate); `guideline_version`:
    the guidelines in force when it was given (0: none written yet)."""

    __tablename__ = "ratings"
    __table_args__ = (
        CheckConstraint("score BETWEEN 1 AND 5", name="score"),
        _current_index("uq_ratings_current", "generation_id", "rater"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    rater: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    score: Mapped[int]
    comment: Mapped[str | None] = mapped_column(Text)
    is_current: Mapped[bool]
    created_at: Mapped[datetime]
    submission_id: Mapped[int | None] = mapped_column(ForeignKey("submissions.id"), index=True)
    guideline_version: Mapped[int] = mapped_column(server_default=text("0"))


class Preference(Base):
    """A stated "chosen over rejected"; at most one current row per (pair, rater). A later submission of
    the same page, or undoing the submission it came with, makes it not current (kept)."""

    __tablename__ = "preferences"
    __table_args__ = (
        CheckConstraint("chosen_generation_id <> rejected_generation_id", name="distinct"),
        _current_index("uq_preferences_current", "chosen_generation_id", "rejected_generation_id", "rater"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    chosen_generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    rejected_generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    rater: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    created_at: Mapped[datetime]
    is_current: Mapped[bool] = mapped_column(server_default=true())
    submission_id: Mapped[int | None] = mapped_column(ForeignKey("submissions.id"), index=True)


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        CheckConstraint("version >= 1", name="version"),
        CheckConstraint("status IN ('published', 'failed', 'rolled_back')", name="status"),
    )

    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    path: Mapped[str | None] = mapped_column(Text)
    parent: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), index=True)
    n_ratings: Mapped[int]
    n_preferences: Mapped[int]
    rating_cursor: Mapped[int]
    preference_cursor: Mapped[int]
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    status_changed_at: Mapped[datetime | None]
    exported_at: Mapped[datetime | None]
    """When the version was last exported: `--keep-versions` keeps its files."""
    pruned_at: Mapped[datetime | None]
    """When `--keep-versions` removed its files (None: they are kept); it can no longer be served."""


class TrainingMetric(Base):
    __tablename__ = "training_metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(index=True)
    iteration: Mapped[int]
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    value: Mapped[float]
    created_at: Mapped[datetime]


class TrainingLease(Base):
    """The single row (id 1, created by migration 0001) that says which worker may train."""

    __tablename__ = "training_lease"
    __table_args__ = (CheckConstraint(f"id = {LEASE_ROW_ID}", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    state: Mapped[str] = mapped_column(Text)
    acquired_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    round_started_at: Mapped[datetime | None]
    """When the newest training round began reading feedback (closes the undo window, see FeedbackStore.undo)."""
    token: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    """The fencing token: incremented on every acquisition; a worker's writes name the token it acquired."""
