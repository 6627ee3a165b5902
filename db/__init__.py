"""Feedback store: every line of SQL of the app (SQLite by default, PostgreSQL for teams).

Use `FeedbackStore`; it returns the plain records of `db.records` and raises `StoreError`
for bad input.
"""

from db.engine import DEFAULT_DB_PATH, sqlite_url_or
from db.errors import StoreError
from db.records import (
    BASE_VERSION,
    AdapterVersion,
    Cursor,
    Feedback,
    FeedbackCounts,
    Generation,
    MetricPoint,
    NewGeneration,
    Page,
    Preference,
    PreferencePair,
    Prompt,
    RatedGeneration,
    Rating,
    VersionRecord,
    VersionSummary,
    WorkerStatus,
)
from db.store import FeedbackStore

__all__ = [
    "BASE_VERSION",
    "DEFAULT_DB_PATH",
    "AdapterVersion",
    "Cursor",
    "Feedback",
    "FeedbackCounts",
    "FeedbackStore",
    "Generation",
    "MetricPoint",
    "NewGeneration",
    "Page",
    "Preference",
    "PreferencePair",
    "Prompt",
    "RatedGeneration",
    "Rating",
    "StoreError",
    "VersionRecord",
    "VersionSummary",
    "WorkerStatus",
    "sqlite_url_or",
]
