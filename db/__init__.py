"""Feedback store: every line of SQL of the app (SQLite by default, PostgreSQL for teams).

Use `FeedbackStore`; it returns the plain records of `db.records` and raises `StoreError`
for bad input.
"""

from db.engine import DEFAULT_DB_PATH, sqlite_url_or
from db.errors import StoreError
from db.records import (
    BASE_VERSION,
    FLAG_KINDS,
    AdapterVersion,
    Cursor,
    Feedback,
    FeedbackCounts,
    Flag,
    Generation,
    Guideline,
    MetricPoint,
    NewGeneration,
    Page,
    PageJudgement,
    Preference,
    PreferencePair,
    Prompt,
    RatedGeneration,
    Rating,
    Submission,
    VersionRecord,
    VersionSummary,
    WorkerStatus,
)
from db.store import FeedbackStore

__all__ = [
    "BASE_VERSION",
    "FLAG_KINDS",
    "DEFAULT_DB_PATH",
    "AdapterVersion",
    "Cursor",
    "Feedback",
    "FeedbackCounts",
    "FeedbackStore",
    "Flag",
    "Generation",
    "Guideline",
    "MetricPoint",
    "NewGeneration",
    "Page",
    "PageJudgement",
    "Preference",
    "PreferencePair",
    "Prompt",
    "RatedGeneration",
    "Rating",
    "StoreError",
    "Submission",
    "VersionRecord",
    "VersionSummary",
    "WorkerStatus",
    "sqlite_url_or",
]
