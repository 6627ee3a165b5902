"""FeedbackStore: every read and write of the feedback database.

Each public method is one transaction and returns plain frozen records (`db.records`), never
ORM objects, so callers in other threads or processes never hold a session. Bad input raises
`StoreError` (a `ValueError`) before anything is written.

Feedback cursor: rating and preference ids only grow, and rows become visible in id order
(SQLite serialises writers with BEGIN IMMEDIATE; on PostgreSQL feedback writes take an
advisory lock), so "everything after cursor C" never skips a row that commits late.

Rollback: `rollback_to(v)` marks every published version newer than `v` as `rolled_back`
(rows are kept, with `status_changed_at`); the UI serves `serving_version()`, the newest
published version. A version whose parent was rolled back cannot be published afterwards.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Update, and_, case, func, literal, or_, select, union, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased

from db import models as m
from db import validate as check
from db.engine import make_engine, read_only, sqlite_url_or
from db.errors import StoreError
from db.migrate import current_revision, upgrade_schema
from db.records import (
    BASE_VERSION,
    PROMPT_SOURCES,
    AdapterVersion,
    Cursor,
    FLAG_KINDS,
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

T = TypeVar("T")

MAX_COMMENT_CHARS = 4000
MAX_GUIDELINE_CHARS = 20_000
UNDO_GRACE = timedelta(minutes=2)
"""A submission can always be undone this long after it was made (later: until a training round starts)."""
MAX_STATE_CHARS = 1000
_MAX_ATTEMPTS = 8
_IN_CHUNK = 500
_FEEDBACK_LOCK = 0x70706662  # PostgreSQL advisory lock key: feedback rows commit in id order
_VERSIONS_LOCK = 0x70707676  # PostgreSQL advisory lock key: one version change (publish, rollback) at a time


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime (the only clock the store uses)."""
    return datetime.now(timezone.utc)


class FeedbackStore:
    """The feedback database behind a SQLAlchemy URL or a SQLite file path.

    Opening it creates the database if needed and upgrades its schema in place to the newest
    migration, keeping all data.
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike[str],
        max_prompt_chars: int = 4000,
        *,
        upgrade: bool = True,
    ) -> None:
        self.url = sqlite_url_or(url_or_path)
        self.max_prompt_chars = check.integer(max_prompt_chars, "prompt limit", minimum=1)
        self._engine = make_engine(self.url)
        self._reader = read_only(self._engine)
        self.dialect: str = self._engine.dialect.name
        if upgrade:
            upgrade_schema(self._engine)

    def close(self) -> None:
        """Close all pooled connections; returns nothing."""
        self._engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def schema_revision(self) -> str | None:
        """Return the database's migration revision (e.g. "0002")."""
        return current_revision(self._engine)

    # ----------------------------------------------------------------- prompts

    def add_prompts(
        self, texts: Iterable[str], source: str = "builtin", *, added_by: str | None = None,
        admitted: bool | None = None,
    ) -> list[int]:
        """Add prompts verbatim, skipping texts already stored; return the ids in input order.

        `admitted`: whether new prompts enter the pool at once; by default all do but a rater's own
        typed prompt (source "rater" with `added_by` naming them), which is pending until an admin
        admits it (`review_prompt`), offered only to `added_by` meanwhile. Adding admitted text that is stored and pending admits it (an admin typed
        or uploaded it); a rejected prompt stays rejected. Raises StoreError (adding none) if any text
        is blank, too long or not valid UTF-8.
        """
        if isinstance(texts, (str, bytes)):
            raise StoreError("add_prompts takes a list of texts; use add_prompt for one.")
        source = _prompt_source(source)
        added_by = None if added_by is None else check.name(added_by, "rater")
        admit = not (source == "rater" and added_by is not None) if admitted is None else admitted
        if not isinstance(admit, bool):
            raise StoreError("admitted must be true or false.")
        cleaned = [check.prompt_text(t, self.max_prompt_chars) for t in texts]
        digests = [_sha256(t) for t in cleaned]

        def work(s: Session) -> list[int]:
            ids: dict[str, int] = {}
            pending: list[int] = []
            for chunk in _chunks(list(dict.fromkeys(digests))):
                stmt = select(m.Prompt.text_sha256, m.Prompt.id, m.Prompt.admission).where(
                    m.Prompt.text_sha256.in_(chunk))
                for digest, prompt_id, admission in s.execute(stmt).tuples():
                    ids[digest] = prompt_id
                    if admission == "pending":
                        pending.append(prompt_id)
            now = utcnow()
            if admit and pending:
                s.execute(update(m.Prompt).where(m.Prompt.id.in_(pending))
                          .values(admission="admitted", reviewed_by=added_by, reviewed_at=now)
                          .execution_options(synchronize_session=False))
            new = {
                digest: m.Prompt(text=text, text_sha256=digest, source=source, active=True, created_at=now,
                                 admission="admitted" if admit else "pending", added_by=added_by)
                for text, digest in zip(cleaned, digests, strict=True)
                if digest not in ids
            }
            s.add_all(new.values())
            s.flush()
            ids.update((digest, row.id) for digest, row in new.items())
            return [ids[d] for d in digests]

        return self._run(work, conflicts=True)

    def add_prompt(
        self, text: str, source: str = "rater", *, added_by: str | None = None, admitted: bool | None = None
    ) -> int:
        """Add one prompt (or find the identical stored one), as `add_prompts` does; return its id."""
        return self.add_prompts([text], source, added_by=added_by, admitted=admitted)[0]

    def get_prompt(self, prompt_id: int) -> Prompt:
        """Return the prompt with this id."""
        prompt_id = check.record_id(prompt_id, "prompt")
        return self._run(lambda s: _prompt(_get(s, m.Prompt, prompt_id, "prompt")), write=False)

    def list_prompts(self, active_only: bool = True) -> list[Prompt]:
        """Return prompts in id order: only the pool (active and admitted; what training samples) unless
        `active_only` is False (then every prompt, pending and rejected ones included)."""
        stmt = select(m.Prompt).order_by(m.Prompt.id)
        if active_only:
            stmt = stmt.where(m.Prompt.active, m.Prompt.admission == "admitted")
        return self._run(lambda s: [_prompt(r) for r in s.scalars(stmt)], write=False)

    def pending_prompts(self, limit: int = 100) -> list[Prompt]:
        """Return up to `limit` prompts raters typed that wait for an admin's review, oldest first."""
        limit = check.integer(limit, "limit", minimum=1)
        stmt = select(m.Prompt).where(m.Prompt.admission == "pending").order_by(m.Prompt.id).limit(limit)
        return self._run(lambda s: [_prompt(r) for r in s.scalars(stmt)], write=False)

    def review_prompt(self, prompt_id: int, admit: bool, reviewer: str) -> Prompt:
        """Admit a prompt to the pool (`admit`) or reject it (offered to nobody, never trained on; the
        ratings already given stay feedback), recording who decided and when; return it."""
        prompt_id = check.record_id(prompt_id, "prompt")
        reviewer = check.name(reviewer, "reviewer")
        if not isinstance(admit, bool):
            raise StoreError("admit must be true or false.")

        def work(s: Session) -> Prompt:
            row = _get(s, m.Prompt, prompt_id, "prompt")
            row.admission = "admitted" if admit else "rejected"
            row.reviewed_by, row.reviewed_at = reviewer, utcnow()
            return _prompt(row)

        return self._run(work)

    def set_prompt_active(self, prompt_id: int, active: bool) -> Prompt:
        """Show (`active`) or hide a prompt from raters; return the updated prompt."""
        prompt_id = check.record_id(prompt_id, "prompt")

        def work(s: Session) -> Prompt:
            row = _get(s, m.Prompt, prompt_id, "prompt")
            row.active = bool(active)
            return _prompt(row)

        return self._run(work)

    def next_prompt(self, rater: str) -> Prompt | None:
        """Return the active prompt with the fewest current ratings (oldest first on ties) among
        those this rater has not rated, compared, submitted or skipped; None when none is left.
        Only admitted prompts are offered, and the rater's own pending ones (never another's)."""
        rater = check.name(rater, "rater")
        rated = (
            select(m.Generation.prompt_id)
            .join(m.Rating, m.Rating.generation_id == m.Generation.id)
            .where(m.Rating.rater == rater)
        )
        compared = (
            select(m.Generation.prompt_id)
            .join(m.Preference, m.Preference.chosen_generation_id == m.Generation.id)
            .where(m.Preference.rater == rater)
        )
        submitted = (
            select(m.Page.prompt_id).join(m.Submission, m.Submission.page_id == m.Page.id)
            .where(m.Submission.rater == rater)
        )
        skipped = select(m.Skip.prompt_id).where(m.Skip.rater == rater)
        counts = (
            select(m.Generation.prompt_id, func.count(m.Rating.id).label("n"))
            .join(m.Rating, m.Rating.generation_id == m.Generation.id)
            .where(m.Rating.is_current)
            .group_by(m.Generation.prompt_id)
            .subquery()
        )
        stmt = (
            select(m.Prompt)
            .outerjoin(counts, counts.c.prompt_id == m.Prompt.id)
            .where(
                m.Prompt.active,
                or_(m.Prompt.admission == "admitted",
                    (m.Prompt.admission == "pending") & (m.Prompt.added_by == rater)),
                m.Prompt.id.not_in(rated),
                m.Prompt.id.not_in(compared),
                m.Prompt.id.not_in(submitted),
                m.Prompt.id.not_in(skipped),
            )
            .order_by(func.coalesce(counts.c.n, 0), m.Prompt.id)
            .limit(1)
        )

        def work(s: Session) -> Prompt | None:
            row = s.scalars(stmt).first()
            return None if row is None else _prompt(row)

        return self._run(work, write=False)

    # ------------------------------------------------------------- generations

    def record_generations(
        self,
        prompt_id: int,
        adapter_version: int,
        generations: Sequence[NewGeneration],
        *,
        rater: str | None = None,
        page_id: int | None = None,
    ) -> list[Generation]:
        """Store completions of one prompt sampled from `adapter_version` (0 = base model) as one
        page, the candidates `rater` asked for and sees side by side; return them with their new
        ids and their page's id, in input order.

        Without `page_id` the call makes a new page (`rater` None: no person asked, e.g. a script).
        With it the completions join that page, which must show the same prompt and belong to the
        same rater: a page that shows its candidates one by one records them in several calls.
        An empty list records nothing.
        """
        prompt_id = check.record_id(prompt_id, "prompt")
        version = check.integer(adapter_version, "adapter version")
        rater = None if rater is None else check.name(rater, "rater")
        page_id = None if page_id is None else check.record_id(page_id, "page")
        fields = [_generation_fields(g) for g in generations]

        def work(s: Session) -> list[Generation]:
            _require(s, m.Prompt.id, prompt_id, "prompt")
            if version != BASE_VERSION:
                _require(s, m.AdapterVersion.version, version, "adapter version")
            now = utcnow()
            if page_id is not None:
                page = _page_to_extend(s, page_id, prompt_id, rater)
            elif not fields:
                return []
            else:
                page = m.Page(prompt_id=prompt_id, rater=rater, adapter_version=version, created_at=now)
                s.add(page)
                s.flush()
            rows = [
                m.Generation(
                    prompt_id=prompt_id, page_id=page.id, adapter_version=version, created_at=now, **f
                )
                for f in fields
            ]
            s.add_all(rows)
            s.flush()
            return [_generation(r) for r in rows]

        return self._run(work)

    def record_generation(
        self,
        prompt_id: int,
        adapter_version: int,
        text: str,
        token_ids: Sequence[int] = (),
        logprobs: Sequence[float] = (),
        sampling: Mapping[str, Any] | None = None,
        *,
        rater: str | None = None,
        page_id: int | None = None,
    ) -> Generation:
        """Store one completion (see `record_generations`: a page of its own unless `page_id`
        names one); return it with its new id."""
        new = NewGeneration(text, token_ids, logprobs, sampling or {})
        return self.record_generations(prompt_id, adapter_version, [new], rater=rater, page_id=page_id)[0]

    def get_page(self, page_id: int) -> Page:
        """Return the page with this id: its prompt, the rater who asked, the version then serving."""
        page_id = check.record_id(page_id, "page")
        return self._run(lambda s: _page(_get(s, m.Page, page_id, "page")), write=False)

    def page_generations(self, page_id: int) -> list[Generation]:
        """Return the generations shown on a page, in id order."""
        page_id = check.record_id(page_id, "page")
        stmt = select(m.Generation).where(m.Generation.page_id == page_id).order_by(m.Generation.id)

        def work(s: Session) -> list[Generation]:
            _require(s, m.Page.id, page_id, "page")
            return [_generation(r) for r in s.scalars(stmt)]

        return self._run(work, write=False)

    def get_generation(self, generation_id: int) -> Generation:
        """Return the generation with this id."""
        generation_id = check.record_id(generation_id, "generation")
        return self._run(
            lambda s: _generation(_get(s, m.Generation, generation_id, "generation")), write=False
        )

    # ---------------------------------------------------------------- feedback

    def rate(self, generation_id: int, rater: str, score: int, comment: str | None = None) -> Rating:
        """Record `rater`'s score (integer 1..5) for a generation and return the current rating.

        Rating the same generation again supersedes the earlier rating, which stays in the
        history; repeating the identical score and comment changes nothing (double clicks). Only a
        generation on a page shown to `rater` (see `submit_page`) may be rated; StoreError otherwise.
        """
        generation_id = check.record_id(generation_id, "generation")
        rater = check.name(rater, "rater")
        score = check.score(score)
        comment = check.comment(comment, MAX_COMMENT_CHARS)

        def work(s: Session) -> Rating:
            self._serialize_feedback(s)
            _require_shown(s, [generation_id], rater)
            current = s.scalars(
                select(m.Rating)
                .where(m.Rating.generation_id == generation_id, m.Rating.rater == rater, m.Rating.is_current)
                .with_for_update()
            ).one_or_none()
            if current is not None and (current.score, current.comment) == (score, comment):
                return _rating(current)
            return _rating(_add_rating(s, generation_id, rater, score, comment, utcnow(), _guideline_version(s)))

        return self._run(work, conflicts=True)

    def rating_history(self, generation_id: int, rater: str | None = None) -> list[Rating]:
        """Return every rating of a generation (optionally by one rater), oldest first,
        superseded ones included."""
        generation_id = check.record_id(generation_id, "generation")
        stmt = select(m.Rating).where(m.Rating.generation_id == generation_id).order_by(m.Rating.id)
        if rater is not None:
            stmt = stmt.where(m.Rating.rater == check.name(rater, "rater"))

        def work(s: Session) -> list[Rating]:
            _require(s, m.Generation.id, generation_id, "generation")
            return [_rating(r) for r in s.scalars(stmt)]

        return self._run(work, write=False)

    def prefer(self, chosen_id: int, rejected_id: int, rater: str) -> Preference:
        """Record that `rater` prefers one generation over another of the same prompt; return it
        (the existing row if this rater already gave this exact preference)."""
        return self.pick_best(chosen_id, [rejected_id], rater)[0]

    def pick_best(self, chosen_id: int, rejected_ids: Sequence[int], rater: str) -> list[Preference]:
        """Record "best of N": `chosen_id` preferred over each of `rejected_ids` (same prompt),
        all or nothing; return one preference per distinct rejected id, in input order. Every
        generation must be on a page shown to `rater` (see `submit_page`)."""
        chosen_id = check.record_id(chosen_id, "generation")
        rejected = list(dict.fromkeys(check.record_id(r, "generation") for r in rejected_ids))
        rater = check.name(rater, "rater")
        if not rejected:
            raise StoreError("Pick the best of at least two generations.")
        if chosen_id in rejected:
            raise StoreError("A generation cannot be preferred over itself.")

        def work(s: Session) -> list[Preference]:
            self._serialize_feedback(s)
            wanted = [chosen_id, *rejected]
            prompt_of = dict(
                s.execute(select(m.Generation.id, m.Generation.prompt_id).where(m.Generation.id.in_(wanted)))
                .tuples()
                .all()
            )
            for generation_id in wanted:
                if generation_id not in prompt_of:
                    raise StoreError(f"Unknown generation id {generation_id}.")
                if prompt_of[generation_id] != prompt_of[chosen_id]:
                    raise StoreError("Only generations of the same prompt can be compared.")
            _require_shown(s, wanted, rater)
            rows = {
                row.rejected_generation_id: row
                for row in s.scalars(
                    select(m.Preference).where(
                        m.Preference.chosen_generation_id == chosen_id,
                        m.Preference.rejected_generation_id.in_(rejected),
                        m.Preference.rater == rater,
                        m.Preference.is_current,
                    )
                )
            }
            now = utcnow()
            new = [
                m.Preference(
                    chosen_generation_id=chosen_id, rejected_generation_id=r, rater=rater, created_at=now,
                    is_current=True,
                )
                for r in rejected
                if r not in rows
            ]
            s.add_all(new)
            s.flush()
            rows.update((row.rejected_generation_id, row) for row in new)
            return [_preference(rows[r]) for r in rejected]

        return self._run(work, conflicts=True)

    def feedback_since(self, cursor: Cursor = Cursor(), limit: int | None = None) -> Feedback:
        """Return current ratings and preferences with ids after `cursor` (at most `limit` of
        each), oldest first, with everything a trainer needs (each generation with its prompt and
        its `page_id`, the page it was shown on), and the cursor to continue from."""
        cursor = _cursor(cursor)
        if limit is not None:
            limit = check.integer(limit, "limit", minimum=1)
        chosen, rejected = aliased(m.Generation), aliased(m.Generation)
        rating_stmt = (
            select(m.Rating, m.Generation, m.Prompt.text)
            .join(m.Generation, m.Rating.generation_id == m.Generation.id)
            .join(m.Prompt, m.Generation.prompt_id == m.Prompt.id)
            .where(m.Rating.id > cursor.rating_id, m.Rating.is_current)
            .order_by(m.Rating.id)
            .limit(limit)
        )
        preference_stmt = (
            select(m.Preference, chosen, rejected, m.Prompt.text)
            .join(chosen, m.Preference.chosen_generation_id == chosen.id)
            .join(rejected, m.Preference.rejected_generation_id == rejected.id)
            .join(m.Prompt, chosen.prompt_id == m.Prompt.id)
            .where(m.Preference.id > cursor.preference_id, m.Preference.is_current)
            .order_by(m.Preference.id)
            .limit(limit)
        )

        def work(s: Session) -> Feedback:
            ratings = tuple(
                RatedGeneration(_rating(r), _generation(g), text)
                for r, g, text in s.execute(rating_stmt).tuples()
            )
            preferences = tuple(
                PreferencePair(_preference(p), c.prompt_id, text, _generation(c), _generation(x))
                for p, c, x, text in s.execute(preference_stmt).tuples()
            )
            return Feedback(
                ratings,
                preferences,
                Cursor(
                    ratings[-1].rating.id if ratings else cursor.rating_id,
                    preferences[-1].preference.id if preferences else cursor.preference_id,
                ),
            )

        return self._run(work, write=False)

    def iter_feedback(self, page_size: int = 1000) -> Iterator[Feedback]:
        """Yield all current feedback in batches of at most `page_size` ratings and preferences
        (each batch its own transaction)."""
        cursor = Cursor()
        while True:
            batch = self.feedback_since(cursor, limit=page_size)
            if not batch.ratings and not batch.preferences:
                return
            yield batch
            cursor = batch.cursor

    def count_feedback_since(self, cursor: Cursor = Cursor()) -> FeedbackCounts:
        """Return how many current ratings and preferences have ids after `cursor`, and on how many prompts the ratings are."""
        cursor = _cursor(cursor)
        return self._run(lambda s: _count_since(s, cursor), write=False)

    def cursor_of(self, version: int) -> Cursor:
        """Return the feedback cursor an adapter version was trained up to (version 0: the start)."""
        version = check.integer(version, "adapter version")
        return self._run(lambda s: _cursor_of(s, version), write=False)

    # ------------------------------------------------------------- submissions

    def submit_page(
        self,
        page_id: int,
        rater: str,
        scores: Mapping[int, int] | None = None,
        best: Sequence[int] = (),
        *,
        tie: bool = False,
        none_good: bool = False,
        flags: Sequence[Flag] = (),
        comment: str | None = None,
        client_key: str | None = None,
    ) -> Submission:
        """Store one rater's judgement of one page in one transaction and return it.

        `scores`: {generation id: 1..5}; `best`: the candidate picked as best (preferred over every
        other of the page), or with `tie` two or more judged equally best (each preferred over the
        others, none over another); `none_good`: every candidate undesirable (no best then);
        `flags`: at most one per candidate; `comment` goes with the submission and its ratings.
        Every generation named must be on the page, and the page must have been shown to `rater`: they
        asked for it, it was offered to them (`offer_overlap_page`, `show_page`), or nobody asked for it
        (a page a script recorded). It supersedes the rater's earlier submission
        of the page (its pick, tie, flags, none-is-good; ratings are superseded per generation).

        With `client_key`, submitting again with the key this rater already used returns the stored
        submission and writes nothing. Raises StoreError, writing nothing, on bad input.
        """
        page_id = check.record_id(page_id, "page")
        rater = check.name(rater, "rater")
        rated = _scores(scores)
        best_ids = _distinct_ids(best, "best candidate")
        flagged = _flags(flags)
        comment = check.comment(comment, MAX_COMMENT_CHARS)
        key = None if client_key is None else check.name(client_key, "submission key")
        _check_judgement(rated, best_ids, tie, none_good, flagged)

        def work(s: Session) -> Submission:
            self._serialize_feedback(s)
            if key is not None:
                done = s.scalars(
                    select(m.Submission).where(m.Submission.rater == rater, m.Submission.client_key == key)
                ).one_or_none()
                if done is not None:
                    if done.page_id != page_id:
                        raise StoreError(f"Submission key {key!r} was already used for page {done.page_id}.")
                    return _submission(s, done)
            page = _get(s, m.Page, page_id, "page")
            _require_page_shown(s, page_id, page.rater, rater)
            on_page = set(s.scalars(select(m.Generation.id).where(m.Generation.page_id == page_id)))
            for generation_id in [*rated, *best_ids, *flagged]:
                if generation_id not in on_page:
                    raise StoreError(f"Generation {generation_id} is not on page {page_id}.")
            if best_ids and len(on_page) < 2:
                raise StoreError("Picking the best one needs at least two candidates.")
            now = utcnow()
            _supersede_page(s, rater, page_id, on_page, now)
            guideline = _guideline_version(s)
            row = m.Submission(
                page_id=page_id, rater=rater, client_key=key, guideline_version=guideline,
                none_good=none_good, comment=comment, status="current", created_at=now, status_changed_at=None,
            )
            s.add(row)
            s.flush()
            for generation_id, score in rated.items():
                _add_rating(s, generation_id, rater, score, comment, now, guideline, row.id)
            _add_page_facts(s, row, best_ids, sorted(on_page - set(best_ids)), tie, flagged.values())
            return _submission(s, row, page.prompt_id)

        return self._run(work, conflicts=True)

    def undo_last_submission(self, rater: str, *, now: datetime | None = None) -> Submission:
        """Undo `rater`'s newest submission that is not undone yet and return it (status "undone").

        Nothing is deleted: its ratings and preferences stop being current, and what it replaced is
        current again (the ratings it superseded, the rater's earlier submission of that page). The
        window: always within UNDO_GRACE of submitting, and after that until a training round
        starts (`begin_round`). `now` is for tests. Raises StoreError, changing nothing, when there
        is nothing to undo or the window has closed.
        """
        rater = check.name(rater, "rater")

        def work(s: Session) -> Submission:
            self._serialize_feedback(s)
            row = s.scalars(
                select(m.Submission)
                .where(m.Submission.rater == rater, m.Submission.status != "undone")
                .order_by(m.Submission.id.desc())
                .limit(1)
            ).first()
            if row is None:
                raise StoreError("Nothing to undo: no submission of yours is in force.")
            at = now or utcnow()
            _require_undo_window(s, row, at)
            row.status, row.status_changed_at = "undone", at
            for rating in s.scalars(
                select(m.Rating).where(m.Rating.submission_id == row.id, m.Rating.is_current)
            ).all():
                rating.is_current = False
                s.flush()
                _restore_rating(s, rating)
            s.execute(
                update(m.Preference)
                .where(m.Preference.submission_id == row.id)
                .values(is_current=False)
                .execution_options(synchronize_session=False)
            )
            s.flush()
            _restore_page(s, row, at)
            return _submission(s, row)

        return self._run(work)

    def my_submissions(self, rater: str, limit: int = 20) -> list[Submission]:
        """Return `rater`'s newest submissions, newest first, at most `limit`, undone ones included
        (their status says so): the history a rater picks a page to change from."""
        rater = check.name(rater, "rater")
        limit = check.integer(limit, "limit", minimum=1)
        stmt = (
            select(m.Submission).where(m.Submission.rater == rater).order_by(m.Submission.id.desc()).limit(limit)
        )
        return self._run(lambda s: [_submission(s, r) for r in s.scalars(stmt).all()], write=False)

    def rater_counts(self, rater: str, since: datetime) -> dict[str, int]:
        """Return how many ratings `rater` has in force: {"total", "since"} (those given at or after
        `since`, a timezone-aware time: the page passes the start of the day). An undone or
        superseded rating no longer counts; the rating that replaced it does."""
        rater = check.name(rater, "rater")
        if not isinstance(since, datetime) or since.tzinfo is None:
            raise StoreError("since must be a timezone-aware datetime.")
        mine = select(func.count(m.Rating.id)).where(m.Rating.rater == rater, m.Rating.is_current)

        def work(s: Session) -> dict[str, int]:
            return {"total": s.scalar(mine) or 0, "since": s.scalar(mine.where(m.Rating.created_at >= since)) or 0}

        return self._run(work, write=False)

    def submissions(self, *, current_only: bool = True) -> list[Submission]:
        """Return every submission in force (status current), or with `current_only` False every one
        ever made (superseded and undone ones too), oldest first."""
        stmt = select(m.Submission).order_by(m.Submission.id)
        if current_only:
            stmt = stmt.where(m.Submission.status == "current")
        return self._run(lambda s: [_submission(s, r) for r in s.scalars(stmt).all()], write=False)

    def rating_revisions(self, after_id: int = 0, limit: int = 1000) -> list[RatedGeneration]:
        """Return every rating row with id after `after_id` (at most `limit`), superseded and undone
        ones included (`rating.current` says which), each with its generation and prompt, oldest first."""
        after_id = check.integer(after_id, "rating id")
        limit = check.integer(limit, "limit", minimum=1)
        stmt = (
            select(m.Rating, m.Generation, m.Prompt.text)
            .join(m.Generation, m.Rating.generation_id == m.Generation.id)
            .join(m.Prompt, m.Generation.prompt_id == m.Prompt.id)
            .where(m.Rating.id > after_id)
            .order_by(m.Rating.id)
            .limit(limit)
        )
        return self._run(
            lambda s: [RatedGeneration(_rating(r), _generation(g), t) for r, g, t in s.execute(stmt).tuples()],
            write=False,
        )

    def judgements(self) -> list[PageJudgement]:
        """Return the page-level facts of the submissions in force that have any (none-is-good, a tie,
        flags), each with its page's candidates and prompt, oldest first."""

        def work(s: Session) -> list[PageJudgement]:
            tied = _by_submission(s, m.Tie)
            flagged = _by_submission(s, m.Flag)
            rows = s.execute(
                select(m.Submission, m.Prompt.text)
                .join(m.Page, m.Submission.page_id == m.Page.id)
                .join(m.Prompt, m.Page.prompt_id == m.Prompt.id)
                .where(
                    m.Submission.status == "current",
                    or_(m.Submission.none_good, m.Submission.id.in_(set(tied) | set(flagged))),
                )
                .order_by(m.Submission.id)
            ).tuples().all()
            out = []
            for row, prompt_text in rows:
                generations = s.scalars(
                    select(m.Generation).where(m.Generation.page_id == row.page_id).order_by(m.Generation.id)
                )
                out.append(PageJudgement(
                    row.id, row.page_id, row.rater, prompt_text, tuple(_generation(g) for g in generations),
                    row.none_good, tuple(tied.get(row.id, ())), tuple(flagged.get(row.id, ())),
                ))
            return out

        return self._run(work, write=False)

    def judgement_stamp(self) -> tuple[int, int]:
        """Return (newest submission id, number of undone submissions): it changes whenever a submission
        or an undo changes what the learners read, also where the feedback cursor does not move."""

        def work(s: Session) -> tuple[int, int]:
            newest = s.scalar(select(func.max(m.Submission.id))) or 0
            undone = s.scalar(select(func.count(m.Submission.id)).where(m.Submission.status == "undone")) or 0
            return newest, undone

        return self._run(work, write=False)

    def begin_round(self, holder: str, *, token: int | None = None) -> bool:
        """Record that `holder`'s training round starts reading feedback now (this closes the undo
        window of earlier submissions); return False, changing nothing, if it lost the lease (with
        `token`: if the lease was acquired again since, see `acquire_lease`)."""
        holder = check.name(holder, "lease holder")

        def work(s: Session) -> bool:
            stmt = (
                update(m.TrainingLease)
                .where(*_held_by(holder, token))
                .values(round_started_at=_db_now(s))
                .execution_options(synchronize_session=False)
            )
            return _updated_one_row(s, stmt)

        return self._run(work)

    def skip_prompt(self, prompt_id: int, rater: str) -> bool:
        """Record that `rater` skipped a prompt: `next_prompt` never offers it to them again; return
        whether this is new (skipping twice changes nothing)."""
        prompt_id = check.record_id(prompt_id, "prompt")
        rater = check.name(rater, "rater")

        def work(s: Session) -> bool:
            _require(s, m.Prompt.id, prompt_id, "prompt")
            found = s.scalar(select(m.Skip.id).where(m.Skip.rater == rater, m.Skip.prompt_id == prompt_id))
            if found is not None:
                return False
            s.add(m.Skip(prompt_id=prompt_id, rater=rater, created_at=utcnow()))
            return True

        return self._run(work, conflicts=True)

    def page_to_overlap(self, rater: str) -> Page | None:
        """Return a page someone else submitted a judgement of that `rater` has not judged (no
        submission, no rating of its candidates, its prompt not skipped, not their own page, its prompt
        admitted): the one with the fewest raters so far, oldest first; None when there is none.
        Agreement between raters is measured on such pages (the same generations, not only the same
        prompt). Read only: `offer_overlap_page` also lets the rater judge it."""
        stmt = _overlap_stmt(check.name(rater, "rater"))

        def work(s: Session) -> Page | None:
            row = s.scalars(stmt).first()
            return None if row is None else _page(row)

        return self._run(work, write=False)

    def offer_overlap_page(self, rater: str) -> Page | None:
        """Return the page `page_to_overlap` finds and record that it was shown to `rater` (a page
        viewer), who may then rate, pick and submit on it; None when there is none."""
        rater = check.name(rater, "rater")
        stmt = _overlap_stmt(rater)

        def work(s: Session) -> Page | None:
            row = s.scalars(stmt).first()
            if row is None:
                return None
            _add_viewer(s, row.id, rater)
            return _page(row)

        return self._run(work, conflicts=True)

    def show_page(self, page_id: int, rater: str) -> bool:
        """Record that a page someone else asked for was shown to `rater`, who may then judge it; return
        whether this is new (the page's own rater, or showing it twice, changes nothing)."""
        page_id = check.record_id(page_id, "page")
        rater = check.name(rater, "rater")

        def work(s: Session) -> bool:
            page = _get(s, m.Page, page_id, "page")
            return page.rater != rater and _add_viewer(s, page_id, rater)

        return self._run(work, conflicts=True)

    # --------------------------------------------------------------- guidelines

    def write_guidelines(self, text: str, author: str) -> Guideline:
        """Store a new version of the rating guidelines (plain text), in force from now on; return it.
        Writing the text in force again changes nothing and returns that version."""
        text = check.text(text, "guidelines")
        if len(text) > MAX_GUIDELINE_CHARS:
            raise StoreError(f"The guidelines have {len(text)} characters; the limit is {MAX_GUIDELINE_CHARS}.")
        author = check.name(author, "author")

        def work(s: Session) -> Guideline:
            newest = s.scalars(select(m.Guideline).order_by(m.Guideline.version.desc()).limit(1)).first()
            if newest is not None and newest.text == text:
                return _guideline(newest)
            row = m.Guideline(version=(newest.version if newest else 0) + 1, text=text, author=author,
                              created_at=utcnow())
            s.add(row)
            s.flush()
            return _guideline(row)

        return self._run(work, conflicts=True)

    def guidelines(self, version: int | None = None) -> Guideline | None:
        """Return the guidelines in force (or the given version); None when none were written."""
        stmt = select(m.Guideline).order_by(m.Guideline.version.desc()).limit(1)
        if version is not None:
            stmt = select(m.Guideline).where(
                m.Guideline.version == check.integer(version, "guideline version", minimum=1)
            )

        def work(s: Session) -> Guideline | None:
            row = s.scalars(stmt).first()
            return None if row is None else _guideline(row)

        return self._run(work, write=False)

    # ----------------------------------------------------------- training lease

    def acquire_lease(self, holder: str, ttl_s: float, state: str = "idle", *, token: int | None = None) -> int | None:
        """Take the training lease for `ttl_s` seconds if it is free or expired, by the database's clock;
        return the new fencing token (every acquisition increments it), or None when another holds it.
        Atomic across processes and machines.

        Without `token` (a worker starting) the lease is also taken from a holder of the same name (a
        crashed predecessor under the same `--worker-id`, fenced off by the new token). With the token
        of its last acquisition (a worker that lost its lease) it is taken back only if free, expired,
        or still held under that token.
        """
        holder = check.name(holder, "lease holder")
        ttl = timedelta(seconds=check.positive(ttl_s, "lease duration"))
        state = _state(state)
        lease = m.TrainingLease
        ours = lease.holder == holder if token is None else and_(lease.holder == holder, lease.token == token)

        def work(s: Session) -> int | None:
            now = _db_now(s)
            stmt = (
                update(lease)
                .where(
                    lease.id == m.LEASE_ROW_ID,
                    or_(lease.holder.is_(None), ours, lease.expires_at.is_(None), lease.expires_at < now),
                )
                .values(
                    token=lease.token + 1,
                    holder=holder,
                    acquired_at=case(
                        (lease.holder == holder, lease.acquired_at), else_=literal(now, m.UTCDateTime())
                    ),
                    heartbeat_at=now,
                    expires_at=now + ttl,
                    state=state,
                )
                .execution_options(synchronize_session=False)
            )
            if not _updated_one_row(s, stmt):
                return None
            return s.scalar(select(lease.token).where(lease.id == m.LEASE_ROW_ID))

        return self._run(work)

    def renew_lease(self, holder: str, ttl_s: float, state: str | None = None, *, token: int | None = None) -> bool:
        """Extend `holder`'s lease to `ttl_s` seconds from now (the database's clock) and optionally set
        the worker state shown in the status panel; return False (changing nothing) if `holder` lost
        the lease (with `token`: if the lease was acquired again since)."""
        holder = check.name(holder, "lease holder")
        ttl = timedelta(seconds=check.positive(ttl_s, "lease duration"))
        values: dict[str, Any] = {} if state is None else {"state": _state(state)}

        def work(s: Session) -> bool:
            now = _db_now(s)
            stmt = (
                update(m.TrainingLease)
                .where(*_held_by(holder, token))
                .values(heartbeat_at=now, expires_at=now + ttl, **values)
                .execution_options(synchronize_session=False)
            )
            return _updated_one_row(s, stmt)

        return self._run(work)

    def release_lease(self, holder: str, state: str = "stopped", *, token: int | None = None) -> bool:
        """Give the lease up so another worker can train at once; return whether `holder` held it
        (with `token`: under that token)."""
        holder = check.name(holder, "lease holder")
        state = _state(state)

        def work(s: Session) -> bool:
            stmt = (
                update(m.TrainingLease)
                .where(*_held_by(holder, token))
                .values(holder=None, expires_at=None, heartbeat_at=_db_now(s), state=state)
                .execution_options(synchronize_session=False)
            )
            return _updated_one_row(s, stmt)

        return self._run(work)

    def worker_status(self) -> WorkerStatus:
        """Return the lease holder, its state text and heartbeat; `present` is False when no
        worker holds an unexpired lease."""

        def work(s: Session) -> WorkerStatus:
            row = s.get(m.TrainingLease, m.LEASE_ROW_ID)
            if row is None:
                return WorkerStatus(None, "no worker yet", None, None, False)
            present = row.holder is not None and row.expires_at is not None and row.expires_at > _db_now(s)
            return WorkerStatus(row.holder, row.state, row.heartbeat_at, row.expires_at, present)

        return self._run(work, write=False)

    # --------------------------------------------------------- adapter versions

    def next_version_number(self) -> int:
        """Return the number the next adapter version should get (never reuses failed ones)."""
        return self._run(
            lambda s: (s.scalar(select(func.max(m.AdapterVersion.version))) or 0) + 1, write=False
        )

    def publish_version(
        self, version: int, record: VersionRecord, path: str, *, holder: str | None = None, token: int | None = None
    ) -> AdapterVersion:
        """Publish a trained adapter (served from now on) as `version`, described by `record`, its
        files at `path`; return it. With `holder`, refuses unless that worker still holds the
        lease (with `token`: under that token). Refuses a version number that exists or a parent
        that is not published (or 0)."""
        return self._add_version(version, record, "published", path=_path(path), holder=holder, token=token)

    def record_failed_version(
        self,
        version: int,
        parent: int,
        reason: str,
        *,
        path: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        holder: str | None = None,
        token: int | None = None,
    ) -> AdapterVersion:
        """Record a training run that was not published, with `reason` in its metrics; return it
        (with `holder` and `token`: refused as `publish_version` refuses)."""
        metrics = {**check.json_object(metrics, "metrics"), "reason": check.text(reason, "reason")}
        record = VersionRecord(parent, "", Cursor(), 0, 0, metrics)
        return self._add_version(
            version, record, "failed", path=None if path is None else _path(path), holder=holder, token=token
        )

    def rollback_to(self, version: int) -> list[int]:
        """Serve `version` (a published one, or 0 for the base model) again by marking every newer
        published version rolled back; return the version numbers rolled back."""
        version = check.integer(version, "adapter version")

        def work(s: Session) -> list[int]:
            self._serialize_versions(s)
            if version != BASE_VERSION:
                target = _get(s, m.AdapterVersion, version, "adapter version")
                if target.status != "published":
                    raise StoreError(
                        f"Version {version} is {target.status}; only a published one can be served."
                    )
                if target.pruned_at is not None:
                    raise StoreError(_pruned_message(version))
            rows = s.scalars(
                select(m.AdapterVersion)
                .where(m.AdapterVersion.version > version, m.AdapterVersion.status == "published")
                .order_by(m.AdapterVersion.version)
            ).all()
            now = utcnow()
            for row in rows:
                row.status, row.status_changed_at = "rolled_back", now
            return [row.version for row in rows]

        return self._run(work)

    def mark_exported(self, version: int) -> None:
        """Record that `version` was exported now (`--keep-versions` keeps its files from then on); returns nothing."""
        version = check.integer(version, "adapter version", minimum=1)

        def work(s: Session) -> None:
            _get(s, m.AdapterVersion, version, "adapter version").exported_at = utcnow()

        self._run(work)

    def mark_pruned(self, version: int) -> bool:
        """Record that `version`'s files are about to be removed (its row and metrics stay); return False,
        changing nothing, when it is the serving version, exported, or already pruned."""
        version = check.integer(version, "adapter version", minimum=1)

        def work(s: Session) -> bool:
            self._serialize_versions(s)
            row = _get(s, m.AdapterVersion, version, "adapter version")
            if row.pruned_at is not None or row.exported_at is not None or version == _serving(s):
                return False
            row.pruned_at = utcnow()
            return True

        return self._run(work)

    def serving_version(self) -> int:
        """Return the adapter version the UI should serve: the newest published one, 0 if none."""
        return self._run(_serving, write=False)

    def latest_published_version(self) -> AdapterVersion | None:
        """Return the newest published adapter version, or None when only the base model exists."""

        def work(s: Session) -> AdapterVersion | None:
            version = _serving(s)
            return None if version == BASE_VERSION else _version(s.get_one(m.AdapterVersion, version))

        return self._run(work, write=False)

    def get_version(self, version: int) -> AdapterVersion:
        """Return the adapter version with this number."""
        version = check.integer(version, "adapter version", minimum=1)
        return self._run(
            lambda s: _version(_get(s, m.AdapterVersion, version, "adapter version")), write=False
        )

    def list_versions(self) -> list[AdapterVersion]:
        """Return all adapter versions (published, failed, rolled back), oldest first."""
        stmt = select(m.AdapterVersion).order_by(m.AdapterVersion.version)
        return self._run(lambda s: [_version(r) for r in s.scalars(stmt)], write=False)

    # ---------------------------------------------------------- metrics, status

    def record_metrics(
        self, version: int, iteration: int, values: Mapping[str, float], *, holder: str | None = None,
        token: int | None = None,
    ) -> int:
        """Store one PPO iteration's metrics of the version being trained; return how many. With
        `holder` (and `token`), refused with StoreError unless that worker holds the lease."""
        holder = None if holder is None else check.name(holder, "lease holder")
        version = check.integer(version, "adapter version", minimum=1)
        iteration = check.integer(iteration, "iteration")
        points = [(check.name(k, "metric name"), check.finite(v, f"metric {k!r}")) for k, v in values.items()]

        def work(s: Session) -> int:
            now = utcnow()
            if holder is not None:
                _require_lease(s, holder, token)
            s.add_all(
                m.TrainingMetric(version=version, iteration=iteration, name=k, value=v, created_at=now)
                for k, v in points
            )
            return len(points)

        return self._run(work)

    def metrics(self, version: int | None = None, since_id: int = 0) -> list[MetricPoint]:
        """Return metric points with ids after `since_id` (of one version if given), oldest first."""
        since_id = check.integer(since_id, "metric id")
        stmt = select(m.TrainingMetric).where(m.TrainingMetric.id > since_id).order_by(m.TrainingMetric.id)
        if version is not None:
            stmt = stmt.where(m.TrainingMetric.version == check.integer(version, "adapter version"))
        return self._run(
            lambda s: [
                MetricPoint(r.id, r.version, r.iteration, r.name, r.value, r.created_at)
                for r in s.scalars(stmt)
            ],
            write=False,
        )

    def version_rating_summary(self) -> list[VersionSummary]:
        """Return, per adapter version with ratings, the mean and number of current ratings of
        its generations, by version."""
        stmt = (
            select(m.Generation.adapter_version, func.avg(m.Rating.score), func.count(m.Rating.id))
            .join(m.Rating, m.Rating.generation_id == m.Generation.id)
            .where(m.Rating.is_current)
            .group_by(m.Generation.adapter_version)
            .order_by(m.Generation.adapter_version)
        )
        return self._run(
            lambda s: [VersionSummary(v, float(mean), n) for v, mean, n in s.execute(stmt).tuples()],
            write=False,
        )

    def counts(self, since_version: int | None = None) -> dict[str, int]:
        """Return numbers for the status panel: active prompts, generations, current ratings,
        rating revisions, preferences, raters, serving version, and ratings/preferences since
        `since_version` (default: the serving version; a page passes the version it has loaded)."""

        def count(s: Session, stmt: Any) -> int:
            return s.scalar(select(func.count()).select_from(stmt.subquery())) or 0

        def work(s: Session) -> dict[str, int]:
            serving = _serving(s)
            since = _count_since(s, _cursor_of(s, serving if since_version is None else since_version))
            raters = union(select(m.Rating.rater), select(m.Preference.rater))
            return {
                "prompts": count(s, select(m.Prompt.id).where(m.Prompt.active)),
                "generations": count(s, select(m.Generation.id)),
                "ratings": count(s, select(m.Rating.id).where(m.Rating.is_current)),
                "rating_revisions": count(s, select(m.Rating.id)),
                "preferences": count(s, select(m.Preference.id).where(m.Preference.is_current)),
                "raters": count(s, raters),
                "serving_version": serving,
                "ratings_since_serving": since.ratings,
                "preferences_since_serving": since.preferences,
            }

        return self._run(work, write=False)

    # ----------------------------------------------------------------- internals

    def _run(self, work: Callable[[Session], T], *, write: bool = True, conflicts: bool = False) -> T:
        """Run `work` in one transaction and return its result; retry when SQLite stayed locked
        past busy_timeout, on PostgreSQL serialisation failures and deadlocks, and (with
        `conflicts`) when a concurrent transaction inserted the same unique row first."""
        engine = self._engine if write else self._reader
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with Session(engine, expire_on_commit=False) as session, session.begin():
                    return work(session)
            except DBAPIError as exc:
                if attempt == _MAX_ATTEMPTS or not _retryable(exc, conflicts):
                    raise
                time.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))
        raise AssertionError("unreachable")

    def _serialize_feedback(self, s: Session) -> None:
        # SQLite writers are already serialised by BEGIN IMMEDIATE.
        if self.dialect == "postgresql":
            s.execute(select(func.pg_advisory_xact_lock(_FEEDBACK_LOCK)))

    def _serialize_versions(self, s: Session) -> None:
        # A publish reads its parent's status and a rollback changes it: under READ COMMITTED both must
        # hold one lock, or a version trained from a just rolled-back parent is served. SQLite writers
        # are already serialised by BEGIN IMMEDIATE.
        if self.dialect == "postgresql":
            s.execute(select(func.pg_advisory_xact_lock(_VERSIONS_LOCK)))

    def _add_version(
        self, version: int, record: VersionRecord, status: str, *, path: str | None, holder: str | None,
        token: int | None = None,
    ) -> AdapterVersion:
        version = check.integer(version, "adapter version", minimum=1)
        fields = _version_fields(record)
        parent = fields["parent"]
        holder = None if holder is None else check.name(holder, "lease holder")
        if parent >= version:
            raise StoreError(f"Version {version} cannot have parent {parent}; parents are older.")

        def work(s: Session) -> AdapterVersion:
            self._serialize_versions(s)
            now = utcnow()
            if holder is not None:
                _require_lease(s, holder, token)
            if s.get(m.AdapterVersion, version) is not None:
                raise StoreError(f"Adapter version {version} already exists.")
            if parent != BASE_VERSION:
                parent_row = _get(s, m.AdapterVersion, parent, "parent version")
                if status == "published" and parent_row.status != "published":
                    raise StoreError(
                        f"Version {version} was trained from version {parent}, which is "
                        f"{parent_row.status}; it cannot be published."
                    )
            row = m.AdapterVersion(
                version=version, path=path, status=status, created_at=now, status_changed_at=now, **fields
            )
            s.add(row)
            s.flush()
            return _version(row)

        return self._run(work)


# -------------------------------------------------------------- session helpers


def _require(s: Session, id_column: Any, key: int, what: str) -> None:
    if s.scalar(select(id_column).where(id_column == key)) is None:
        raise StoreError(f"Unknown {what} id {key}.")


def _get(s: Session, model: type[Any], key: int, what: str) -> Any:
    row = s.get(model, key)
    if row is None:
        raise StoreError(f"Unknown {what} id {key}.")
    return row


def _page_to_extend(s: Session, page_id: int, prompt_id: int, rater: str | None) -> m.Page:
    page: m.Page = _get(s, m.Page, page_id, "page")
    if page.prompt_id != prompt_id:
        raise StoreError(f"Page {page_id} shows prompt {page.prompt_id}, not prompt {prompt_id}.")
    if page.rater != rater:
        raise StoreError(f"Page {page_id} was asked for by {page.rater!r}, not by {rater!r}.")
    return page


def _overlap_stmt(rater: str) -> Any:
    """Return the query of `FeedbackStore.page_to_overlap` for `rater` (already checked)."""
    judged_by_me = select(m.Submission.page_id).where(m.Submission.rater == rater)
    rated_by_me = (
        select(m.Generation.page_id)
        .join(m.Rating, m.Rating.generation_id == m.Generation.id)
        .where(m.Rating.rater == rater)
    )
    skipped = select(m.Skip.prompt_id).where(m.Skip.rater == rater)
    raters = func.count(func.distinct(m.Submission.rater))
    return (
        select(m.Page)
        .join(m.Submission, m.Submission.page_id == m.Page.id)
        .join(m.Prompt, m.Prompt.id == m.Page.prompt_id)
        .where(
            m.Submission.status == "current",
            m.Submission.rater != rater,
            m.Prompt.admission == "admitted",
            or_(m.Page.rater.is_(None), m.Page.rater != rater),
            m.Page.id.not_in(judged_by_me),
            m.Page.id.not_in(rated_by_me),
            m.Page.prompt_id.not_in(skipped),
        )
        .group_by(m.Page.id)
        .order_by(raters, m.Page.id)
        .limit(1)
    )


def _is_viewer(s: Session, page_id: int, rater: str) -> bool:
    """Return whether the page was offered to `rater` besides the rater who asked for it."""
    return s.scalar(select(m.PageViewer.id).where(m.PageViewer.page_id == page_id,
                                                  m.PageViewer.rater == rater)) is not None


def _add_viewer(s: Session, page_id: int, rater: str) -> bool:
    """Record `rater` as a viewer of the page unless they are already; return whether the row is new."""
    if _is_viewer(s, page_id, rater):
        return False
    s.add(m.PageViewer(page_id=page_id, rater=rater, created_at=utcnow()))
    s.flush()
    return True


def _require_shown(s: Session, generation_ids: Sequence[int], rater: str) -> None:
    """Raise StoreError unless every generation exists and is on a page shown to `rater`."""
    rows = s.execute(
        select(m.Generation.id, m.Page.id, m.Page.rater)
        .join(m.Page, m.Page.id == m.Generation.page_id)
        .where(m.Generation.id.in_(generation_ids))
    ).tuples().all()
    pages = {generation: (page, asked) for generation, page, asked in rows}
    for generation in generation_ids:
        if generation not in pages:
            raise StoreError(f"Unknown generation id {generation}.")
    for page, asked in set(pages.values()):
        _require_page_shown(s, page, asked, rater)


def _require_page_shown(s: Session, page_id: int, asked_by: str | None, rater: str) -> None:
    """Raise StoreError unless the page was shown to `rater`: they asked for it, it was offered to them
    (a viewer), or nobody asked for it (a page a script recorded)."""
    if asked_by is None or asked_by == rater:
        return
    if not _is_viewer(s, page_id, rater):
        raise StoreError(f"Page {page_id} was not shown to {rater!r}: judge only the candidates you were shown.")


def _serving(s: Session) -> int:
    stmt = select(func.max(m.AdapterVersion.version)).where(m.AdapterVersion.status == "published")
    return s.scalar(stmt) or BASE_VERSION


def _cursor_of(s: Session, version: int) -> Cursor:
    if version == BASE_VERSION:
        return Cursor()
    row = _get(s, m.AdapterVersion, version, "adapter version")
    return Cursor(row.rating_cursor, row.preference_cursor)


def _count_since(s: Session, cursor: Cursor) -> FeedbackCounts:
    ratings = s.scalar(
        select(func.count(m.Rating.id)).where(m.Rating.id > cursor.rating_id, m.Rating.is_current)
    )
    preferences = s.scalar(
        select(func.count(m.Preference.id)).where(m.Preference.id > cursor.preference_id, m.Preference.is_current)
    )
    rated_prompts = s.scalar(
        select(func.count(func.distinct(m.Generation.prompt_id)))
        .join(m.Rating, m.Rating.generation_id == m.Generation.id)
        .where(m.Rating.id > cursor.rating_id, m.Rating.is_current)
    )
    return FeedbackCounts(ratings or 0, preferences or 0, rated_prompts or 0)


def _updated_one_row(s: Session, stmt: Update) -> bool:
    result = cast("CursorResult[Any]", s.execute(stmt))
    return result.rowcount == 1


def _require_lease(s: Session, holder: str, token: int | None) -> None:
    """Lock the lease row; raise StoreError unless `holder` holds it unexpired (and under `token`, if given)."""
    lease = s.get(m.TrainingLease, m.LEASE_ROW_ID, with_for_update=True)
    if lease is None or lease.holder != holder or lease.expires_at is None or lease.expires_at <= _db_now(s):
        raise StoreError(f"Worker {holder!r} no longer holds the training lease.")
    if token is not None and lease.token != token:
        raise StoreError(f"Worker {holder!r} lost the training lease: it was acquired again since (token {token}, "
                         f"now {lease.token}).")


def _pruned_message(version: int) -> str:
    return (f"Version {version} was pruned (--keep-versions): its files are gone, so it cannot be served "
            "again; its ratings and metrics are kept.")


def _held_by(holder: str, token: int | None) -> list[Any]:
    """Return the WHERE clauses of the lease row held by `holder` (under `token`, if given)."""
    lease = m.TrainingLease
    clauses = [lease.id == m.LEASE_ROW_ID, lease.holder == holder]
    return clauses if token is None else [*clauses, lease.token == token]


def _db_now(s: Session) -> datetime:
    """Return the database's clock (PostgreSQL's transaction time), so that every machine judges lease
    expiry alike; SQLite's database is on this machine, whose clock it is."""
    if s.get_bind().dialect.name == "postgresql":
        return s.scalar(select(func.now())).astimezone(timezone.utc)
    return utcnow()


def _retryable(exc: DBAPIError, conflicts: bool) -> bool:
    message = str(exc.orig).lower()
    if getattr(exc.orig, "sqlstate", None) in ("40001", "40P01"):  # serialisation failure, deadlock
        return True
    if isinstance(exc, OperationalError) and "locked" in message:  # SQLite past busy_timeout
        return True
    unique = getattr(exc.orig, "sqlstate", None) == "23505" or "unique constraint failed" in message
    return conflicts and isinstance(exc, IntegrityError) and unique


# ---------------------------------------------------------- submission helpers


def _add_rating(
    s: Session,
    generation_id: int,
    rater: str,
    score: int,
    comment: str | None,
    now: datetime,
    guideline: int,
    submission_id: int | None = None,
) -> m.Rating:
    """Supersede `rater`'s current rating of the generation (if any) and add the new one; return it."""
    s.execute(
        update(m.Rating)
        .where(m.Rating.generation_id == generation_id, m.Rating.rater == rater, m.Rating.is_current)
        .values(is_current=False)
        .execution_options(synchronize_session=False)
    )
    s.flush()
    row = m.Rating(
        generation_id=generation_id, rater=rater, score=score, comment=comment, is_current=True,
        created_at=now, submission_id=submission_id, guideline_version=guideline,
    )
    s.add(row)
    s.flush()
    return row


def _check_judgement(
    rated: dict[int, int], best: list[int], tie: object, none_good: object, flagged: dict[int, Flag]
) -> None:
    """Raise StoreError unless the parts of a submission fit together: one best, or a tie of two or more;
    no best where none is good; something to submit at all."""
    if not isinstance(tie, bool) or not isinstance(none_good, bool):
        raise StoreError("tie and none_good must be true or false.")
    if tie and len(best) < 2:
        raise StoreError("A tie needs two or more candidates judged equally best.")
    if not tie and len(best) > 1:
        raise StoreError("Pick one best candidate, or mark two or more as a tie.")
    if none_good and best:
        raise StoreError("A page where none is good has no best candidate.")
    if not (rated or best or none_good or flagged):
        raise StoreError("Nothing to submit: rate, pick, tie, flag, or say none is good.")


def _add_page_facts(
    s: Session, row: m.Submission, best: list[int], others: list[int], tie: bool, flags: Iterable[Flag]
) -> None:
    """Add a submission's preferences (each best over each other candidate), its tie and its flags."""
    s.add_all(
        m.Preference(chosen_generation_id=c, rejected_generation_id=r, rater=row.rater, created_at=row.created_at,
                     is_current=True, submission_id=row.id)
        for c in best for r in others
    )
    if tie:
        s.add_all(m.Tie(submission_id=row.id, generation_id=g) for g in best)
    s.add_all(m.Flag(submission_id=row.id, generation_id=f.generation_id, kind=f.kind, reason=f.reason)
              for f in flags)
    s.flush()


def _guideline_version(s: Session) -> int:
    """Return the version of the guidelines in force, 0 when none were written."""
    return s.scalar(select(func.max(m.Guideline.version))) or 0


def _supersede_page(s: Session, rater: str, page_id: int, on_page: set[int], now: datetime) -> None:
    """Mark `rater`'s submission of the page in force, and their preferences among its candidates,
    superseded; returns nothing."""
    s.execute(
        update(m.Submission)
        .where(m.Submission.rater == rater, m.Submission.page_id == page_id, m.Submission.status == "current")
        .values(status="superseded", status_changed_at=now)
        .execution_options(synchronize_session=False)
    )
    s.execute(
        update(m.Preference)
        .where(m.Preference.rater == rater, m.Preference.is_current,
               m.Preference.chosen_generation_id.in_(on_page))
        .values(is_current=False)
        .execution_options(synchronize_session=False)
    )
    s.flush()


def _require_undo_window(s: Session, row: m.Submission, at: datetime) -> None:
    """Raise StoreError unless `row` may still be undone at `at`: within UNDO_GRACE of its time, or
    while no training round has started since."""
    if at - row.created_at < UNDO_GRACE:
        return
    started = s.scalar(select(m.TrainingLease.round_started_at).where(m.TrainingLease.id == m.LEASE_ROW_ID))
    if started is not None and started > row.created_at:
        raise StoreError(
            f"Submission {row.id} can no longer be undone: a training round started after it "
            f"(undo stays open {int(UNDO_GRACE.total_seconds())} s after submitting, then until a round starts)."
        )


def _restore_rating(s: Session, undone: m.Rating) -> None:
    """Make current again the rating `undone` superseded: the rater's newest earlier rating of the
    generation that no undone submission gave; returns nothing."""
    still_given = or_(m.Rating.submission_id.is_(None), m.Rating.submission_id.not_in(
        select(m.Submission.id).where(m.Submission.status == "undone")))
    earlier = s.scalars(
        select(m.Rating)
        .where(m.Rating.generation_id == undone.generation_id, m.Rating.rater == undone.rater,
               m.Rating.id < undone.id, still_given)
        .order_by(m.Rating.id.desc())
        .limit(1)
    ).first()
    if earlier is not None:
        earlier.is_current = True
        s.flush()


def _restore_page(s: Session, undone: m.Submission, at: datetime) -> None:
    """Put back what an undone submission superseded on its page: the rater's previous submission of
    it (and its preferences), or else the preferences they gave there without a submission."""
    previous = s.scalars(
        select(m.Submission)
        .where(m.Submission.rater == undone.rater, m.Submission.page_id == undone.page_id,
               m.Submission.id < undone.id, m.Submission.status != "undone")
        .order_by(m.Submission.id.desc())
        .limit(1)
    ).first()
    on_page = select(m.Generation.id).where(m.Generation.page_id == undone.page_id)
    restore = select(m.Preference).where(m.Preference.rater == undone.rater, ~m.Preference.is_current,
                                         m.Preference.chosen_generation_id.in_(on_page))
    if previous is not None:
        previous.status, previous.status_changed_at = "current", at
        restore = restore.where(m.Preference.submission_id == previous.id)
    else:
        restore = restore.where(m.Preference.submission_id.is_(None))
    for row in s.scalars(restore.order_by(m.Preference.id)).all():
        twin = s.scalar(select(m.Preference.id).where(
            m.Preference.chosen_generation_id == row.chosen_generation_id,
            m.Preference.rejected_generation_id == row.rejected_generation_id,
            m.Preference.rater == row.rater, m.Preference.is_current))
        if twin is None:
            row.is_current = True
            s.flush()


def _by_submission(s: Session, model: type[m.Tie] | type[m.Flag]) -> dict[int, list[int]]:
    """Return {submission id: generation ids} of the ties or flags of the submissions in force."""
    stmt = (
        select(model.submission_id, model.generation_id)
        .join(m.Submission, m.Submission.id == model.submission_id)
        .where(m.Submission.status == "current")
        .order_by(model.generation_id)
    )
    out: dict[int, list[int]] = {}
    for submission_id, generation_id in s.execute(stmt).tuples():
        out.setdefault(submission_id, []).append(generation_id)
    return out


def _submission(s: Session, row: m.Submission, prompt_id: int | None = None) -> Submission:
    """Return the record of a submission row with its ratings, best, tie and flags."""
    if prompt_id is None:
        prompt_id = s.scalar(select(m.Page.prompt_id).where(m.Page.id == row.page_id))
    scores = s.execute(
        select(m.Rating.generation_id, m.Rating.score).where(m.Rating.submission_id == row.id).order_by(m.Rating.id)
    ).tuples().all()
    tied = s.scalars(select(m.Tie.generation_id).where(m.Tie.submission_id == row.id).order_by(m.Tie.generation_id))
    best = tuple(tied) or tuple(s.scalars(
        select(m.Preference.chosen_generation_id).where(m.Preference.submission_id == row.id).distinct()
    ))
    flags = s.scalars(select(m.Flag).where(m.Flag.submission_id == row.id).order_by(m.Flag.generation_id))
    return Submission(
        row.id, row.page_id, cast(int, prompt_id), row.rater, row.client_key, row.guideline_version,
        row.none_good, row.comment, row.status, row.created_at, row.status_changed_at,
        tuple((g, score) for g, score in scores), best,
        bool(s.scalar(select(m.Tie.id).where(m.Tie.submission_id == row.id).limit(1))),
        tuple(Flag(f.generation_id, f.kind, f.reason) for f in flags),
    )


def _guideline(row: m.Guideline) -> Guideline:
    return Guideline(row.version, row.text, row.author, row.created_at)


def _scores(scores: Mapping[int, int] | None) -> dict[int, int]:
    """Return {generation id: score} checked (JSON clients send ids as text keys: "12" is 12)."""
    if scores is None:
        return {}
    if not isinstance(scores, Mapping):
        raise StoreError(f"Scores must map generation ids to 1..5, not {type(scores).__name__}.")
    out: dict[int, int] = {}
    for key, value in scores.items():
        generation_id = check.record_id(_id_key(key), "generation")
        if generation_id in out:
            raise StoreError(f"Generation {generation_id} is rated twice.")
        out[generation_id] = check.score(value)
    return out


def _id_key(key: object) -> object:
    """Return a mapping key as an int when it is decimal text (JSON object keys are text)."""
    if isinstance(key, str) and key.strip().isdigit() and len(key.strip()) < 19:
        return int(key.strip())
    return key


def _distinct_ids(ids: Sequence[int], what: str) -> list[int]:
    """Return the ids checked, refusing repeats (a list, not a single id)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise StoreError(f"The {what} ids must be a list, not {type(ids).__name__}.")
    out = [check.record_id(i, "generation") for i in ids]
    if len(set(out)) != len(out):
        raise StoreError(f"A {what} is named twice.")
    return out


def _flags(flags: Sequence[Flag]) -> dict[int, Flag]:
    """Return {generation id: Flag} checked: a known kind, a reason for "other", one flag a candidate."""
    if isinstance(flags, (str, bytes)) or not isinstance(flags, Sequence):
        raise StoreError(f"Flags must be a list, not {type(flags).__name__}.")
    out: dict[int, Flag] = {}
    for flag in flags:
        if not isinstance(flag, Flag):
            raise StoreError(f"Expected a Flag, not {type(flag).__name__}.")
        generation_id = check.record_id(flag.generation_id, "generation")
        if flag.kind not in FLAG_KINDS:
            raise StoreError(f"Unknown flag {flag.kind!r}; expected one of {', '.join(FLAG_KINDS)}.")
        reason = check.comment(flag.reason, MAX_COMMENT_CHARS)
        if flag.kind == "other" and reason is None:
            raise StoreError("A flag of kind 'other' needs a reason.")
        if generation_id in out:
            raise StoreError(f"Generation {generation_id} is flagged twice.")
        out[generation_id] = Flag(generation_id, flag.kind, reason)
    return out


# ----------------------------------------------------------- input and output


def _prompt_source(source: str) -> str:
    if source not in PROMPT_SOURCES:
        raise StoreError(f"Unknown prompt source {source!r}; expected one of {', '.join(PROMPT_SOURCES)}.")
    return source


def _state(state: str) -> str:
    state = check.text(state, "worker state")
    if len(state) > MAX_STATE_CHARS:
        raise StoreError(f"The worker state is longer than {MAX_STATE_CHARS} characters.")
    return state


def _path(path: str) -> str:
    path = check.text(os.fspath(path) if isinstance(path, os.PathLike) else path, "adapter path")
    if not path.strip():
        raise StoreError("The adapter path is empty.")
    return path


def _cursor(cursor: Cursor) -> Cursor:
    if not isinstance(cursor, Cursor):
        raise StoreError(f"Expected a Cursor, not {type(cursor).__name__}.")
    return Cursor(
        check.integer(cursor.rating_id, "rating cursor"),
        check.integer(cursor.preference_id, "preference cursor"),
    )


def _generation_fields(new: NewGeneration) -> dict[str, Any]:
    if not isinstance(new, NewGeneration):
        raise StoreError(f"Expected a NewGeneration, not {type(new).__name__}.")
    token_ids = check.integers(new.token_ids, "token id")
    logprobs = check.floats(new.logprobs, "logprob")
    if token_ids and logprobs and len(token_ids) != len(logprobs):
        raise StoreError(f"{len(token_ids)} token ids but {len(logprobs)} logprobs.")
    return {
        "text": check.text(new.text, "generated text"),
        "token_ids": token_ids,
        "logprobs": logprobs,
        "sampling": check.json_object(new.sampling, "sampling parameters"),
    }


def _version_fields(record: VersionRecord) -> dict[str, Any]:
    if not isinstance(record, VersionRecord):
        raise StoreError(f"Expected a VersionRecord, not {type(record).__name__}.")
    cursor = _cursor(record.cursor)
    return {
        "parent": check.integer(record.parent, "parent version"),
        "n_ratings": check.integer(record.n_ratings, "number of ratings"),
        "n_preferences": check.integer(record.n_preferences, "number of preferences"),
        "rating_cursor": cursor.rating_id,
        "preference_cursor": cursor.preference_id,
        "metrics": check.json_object(record.metrics, "metrics"),
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _prompt(row: m.Prompt) -> Prompt:
    return Prompt(row.id, row.text, row.source, row.active, row.created_at, row.admission, row.added_by)


def _page(row: m.Page) -> Page:
    return Page(row.id, row.prompt_id, row.rater, row.adapter_version, row.created_at)


def _generation(row: m.Generation) -> Generation:
    return Generation(
        row.id,
        row.prompt_id,
        row.page_id,
        row.adapter_version,
        row.text,
        tuple(row.token_ids),
        tuple(row.logprobs),
        dict(row.sampling),
        row.created_at,
    )


def _rating(row: m.Rating) -> Rating:
    return Rating(
        row.id, row.generation_id, row.rater, row.score, row.comment, row.is_current, row.created_at,
        row.submission_id, row.guideline_version,
    )


def _preference(row: m.Preference) -> Preference:
    return Preference(row.id, row.chosen_generation_id, row.rejected_generation_id, row.rater, row.created_at)


def _version(row: m.AdapterVersion) -> AdapterVersion:
    return AdapterVersion(
        row.version,
        row.path,
        row.parent,
        row.status,
        row.n_ratings,
        row.n_preferences,
        Cursor(row.rating_cursor, row.preference_cursor),
        dict(row.metrics),
        row.created_at,
        row.status_changed_at,
        row.exported_at,
        row.pruned_at,
    )
