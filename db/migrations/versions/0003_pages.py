"""Pages: each generation records the page it was shown on (one request, one rater, its candidates
side by side), so siblings, pairs and baselines come from what one rater saw together.

Earlier databases did not record pages; the upgrade gives every existing generation one, as best
the rows tell. The rule:

1. A generation's rater is the rater of its first rating (lowest rating id, superseded ratings
   included); a generation nobody rated gets the rater of the first preference naming it, and one
   with neither gets none (NULL). Its judged time is that rating's (or preference's) time.
2. Generations are grouped by (prompt, adapter version, rater) and taken in order of creation
   time (then id). Each group is cut into pages: a generation starts a new page when it was
   created more than `BURST` after the previous one, or after its rater had already judged a
   generation of the current page (raters submit a page after seeing all of its candidates, so a
   later candidate belongs to a later page).
3. A page's rater is its group's, its adapter version the group's, its time its first
   generation's; page ids follow the order of their first generation's id.

So candidates the same rater judged together stay siblings, and generations of the same prompt
and version that different raters judged are on separate pages. A page the old app showed one
candidate at a time across a version swap becomes one page per version.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NAME = 200
BURST = timedelta(minutes=10)
"""Largest gap between two generations of one backfilled page (one request, or a page that was
filled one candidate at a time)."""

_GENERATIONS = sa.table(
    "generations",
    sa.column("id", sa.Integer),
    sa.column("prompt_id", sa.Integer),
    sa.column("adapter_version", sa.Integer),
    sa.column("created_at", sa.DateTime),
    sa.column("page_id", sa.Integer),
)
_PAGES = sa.table(
    "pages",
    sa.column("id", sa.Integer),
    sa.column("prompt_id", sa.Integer),
    sa.column("rater", sa.String),
    sa.column("adapter_version", sa.Integer),
    sa.column("created_at", sa.DateTime),
)


class _Page:
    """A backfilled page while it is being filled: its key, its generation ids, its time bounds.

    (A plain class: Alembic loads migrations outside `sys.modules`, where dataclasses fail.)
    """

    def __init__(self, prompt_id: int, adapter_version: int, rater: str | None, created_at: datetime) -> None:
        self.prompt_id = prompt_id
        self.adapter_version = adapter_version
        self.rater = rater
        self.created_at = created_at
        self.last_created_at = created_at
        self.judged_at: datetime | None = None
        self.generation_ids: list[int] = []


def upgrade() -> None:
    op.create_table(
        "pages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(NAME), nullable=True),
        sa.Column("adapter_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pages"),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], name="fk_pages_prompt_id_prompts"),
        sa.CheckConstraint("adapter_version >= 0", name="adapter_version"),  # ck_pages_adapter_version
    )
    op.create_index("ix_pages_prompt_id", "pages", ["prompt_id"])
    op.create_index("ix_pages_rater", "pages", ["rater"])
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("page_id", sa.Integer(), nullable=True))
    _backfill(op.get_bind())
    # On SQLite this rebuilds `generations`, which ratings and preferences refer to: run it through
    # db.migrate, which checks foreign keys once at the end instead of per row.
    with op.batch_alter_table("generations") as batch:
        batch.alter_column("page_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_generations_page_id_pages", "pages", ["page_id"], ["id"])
        batch.create_index("ix_generations_page_id", ["page_id"])


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_index("ix_generations_page_id")
        batch.drop_constraint("fk_generations_page_id_pages", type_="foreignkey")
        batch.drop_column("page_id")
    op.drop_index("ix_pages_rater", table_name="pages")
    op.drop_index("ix_pages_prompt_id", table_name="pages")
    op.drop_table("pages")


def _backfill(connection: sa.Connection) -> None:
    """Give every generation a page by the rule in the module docstring; returns nothing."""
    pages = backfilled_pages(connection)
    if not pages:
        return
    connection.execute(
        sa.insert(_PAGES),
        [
            {
                "id": page_id,
                "prompt_id": page.prompt_id,
                "rater": page.rater,
                "adapter_version": page.adapter_version,
                "created_at": page.created_at,
            }
            for page_id, page in enumerate(pages, start=1)
        ],
    )
    connection.execute(
        sa.update(_GENERATIONS).where(_GENERATIONS.c.id == sa.bindparam("generation")),
        [
            {"generation": generation_id, "page_id": page_id}
            for page_id, page in enumerate(pages, start=1)
            for generation_id in page.generation_ids
        ],
    )
    if connection.dialect.name == "postgresql":  # explicit ids do not advance the id sequence
        connection.exec_driver_sql("SELECT setval(pg_get_serial_sequence('pages', 'id'), MAX(id)) FROM pages")


def backfilled_pages(connection: sa.Connection) -> list[_Page]:
    """Return the pages the existing generations were shown on, as best the rows tell, in the
    order of their first generation's id (see the module docstring)."""
    judged = _first_judgements(connection)
    g = _GENERATIONS.c
    rows = connection.execute(
        sa.select(g.id, g.prompt_id, g.adapter_version, g.created_at).order_by(g.created_at, g.id)
    ).tuples()
    open_pages: dict[tuple[int, int, str | None], _Page] = {}
    pages: list[_Page] = []
    for generation_id, prompt_id, version, created_at in rows:
        rater, judged_at = judged.get(generation_id, (None, None))
        key = (prompt_id, version, rater)
        page = open_pages.get(key)
        if page is None or _starts_new_page(page, created_at):
            page = _Page(prompt_id, version, rater, created_at)
            open_pages[key] = page
            pages.append(page)
        page.generation_ids.append(generation_id)
        page.last_created_at = created_at
        if judged_at is not None and (page.judged_at is None or judged_at < page.judged_at):
            page.judged_at = judged_at
    return sorted(pages, key=lambda p: min(p.generation_ids))


def _starts_new_page(page: _Page, created_at: datetime) -> bool:
    """Whether a generation created at `created_at` is too late for `page`: a burst apart, or
    made after the page's rater had already judged one of its candidates."""
    if created_at - page.last_created_at > BURST:
        return True
    return page.judged_at is not None and page.judged_at < created_at


def _first_judgements(connection: sa.Connection) -> dict[int, tuple[str, datetime]]:
    """Return {generation id: (rater, time)} of each generation's first rating, or for one never
    rated, of the first preference naming it."""
    ratings = sa.table(
        "ratings",
        sa.column("id", sa.Integer),
        sa.column("generation_id", sa.Integer),
        sa.column("rater", sa.String),
        sa.column("created_at", sa.DateTime),
    )
    preferences = sa.table(
        "preferences",
        sa.column("id", sa.Integer),
        sa.column("chosen_generation_id", sa.Integer),
        sa.column("rejected_generation_id", sa.Integer),
        sa.column("rater", sa.String),
        sa.column("created_at", sa.DateTime),
    )
    first: dict[int, tuple[str, datetime]] = {}
    stmt = sa.select(ratings.c.generation_id, ratings.c.rater, ratings.c.created_at).order_by(ratings.c.id)
    for generation_id, rater, created_at in connection.execute(stmt).tuples():
        first.setdefault(generation_id, (rater, created_at))
    stmt = sa.select(
        preferences.c.chosen_generation_id,
        preferences.c.rejected_generation_id,
        preferences.c.rater,
        preferences.c.created_at,
    ).order_by(preferences.c.id)
    for chosen, rejected, rater, created_at in connection.execute(stmt).tuples():
        for generation_id in (chosen, rejected):  # every rated generation is in `first` already
            first.setdefault(generation_id, (rater, created_at))
    return first
