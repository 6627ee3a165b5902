"""Prompt admission and page viewers: what one rater can do to everyone else.

- `prompts.admission`: pending, admitted or rejected. A rater's own typed prompt is pending until an
  admin admits it: until then it is offered to no other rater and never enters the training pool
  (its author's ratings of it still count as feedback). Every existing prompt is admitted.
  `added_by` (the rater who typed it), `reviewed_by` and `reviewed_at` (the admin's decision) go with it.
- `page_viewers`: a rater a page was shown to besides the rater who asked for it (an --overlap page
  shown for agreement). Ratings, picks and submissions are accepted only from the rater who asked for
  a page and its viewers. The upgrade records as a viewer everyone who already judged a page someone
  else asked for, so nobody loses the right to change a judgement they gave.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NAME = 200

_PAGES = sa.table("pages", sa.column("id", sa.Integer), sa.column("rater", sa.String))
_GENERATIONS = sa.table("generations", sa.column("id", sa.Integer), sa.column("page_id", sa.Integer))
_RATINGS = sa.table("ratings", sa.column("generation_id", sa.Integer), sa.column("rater", sa.String),
                    sa.column("created_at", sa.DateTime))
_PREFERENCES = sa.table("preferences", sa.column("chosen_generation_id", sa.Integer),
                        sa.column("rater", sa.String), sa.column("created_at", sa.DateTime))
_SUBMISSIONS = sa.table("submissions", sa.column("page_id", sa.Integer), sa.column("rater", sa.String),
                        sa.column("created_at", sa.DateTime))
_VIEWERS = sa.table("page_viewers", sa.column("page_id", sa.Integer), sa.column("rater", sa.String),
                    sa.column("created_at", sa.DateTime))


def upgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("admission", sa.String(16), server_default="admitted", nullable=False))
        batch.add_column(sa.Column("added_by", sa.String(NAME), nullable=True))
        batch.add_column(sa.Column("reviewed_by", sa.String(NAME), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(), nullable=True))
        batch.create_check_constraint("ck_prompts_admission", "admission IN ('pending', 'admitted', 'rejected')")
        batch.create_index("ix_prompts_admission", ["admission"])
    op.create_table(
        "page_viewers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("page_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(NAME), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_page_viewers"),
        sa.ForeignKeyConstraint(["page_id"], ["pages.id"], name="fk_page_viewers_page_id_pages"),
        sa.UniqueConstraint("page_id", "rater", name="uq_page_viewers_page_rater"),
    )
    op.create_index("ix_page_viewers_page_id", "page_viewers", ["page_id"])
    op.create_index("ix_page_viewers_rater", "page_viewers", ["rater"])
    _record_earlier_viewers()


def _record_earlier_viewers() -> None:
    """Insert one viewer row per (page, rater) where the rater judged (rated, picked on, submitted) a page
    someone else asked for (or nobody, NULL), at the time of their first judgement there."""
    judged = sa.union_all(
        sa.select(_GENERATIONS.c.page_id, _RATINGS.c.rater, _RATINGS.c.created_at)
        .join(_GENERATIONS, _GENERATIONS.c.id == _RATINGS.c.generation_id),
        sa.select(_GENERATIONS.c.page_id, _PREFERENCES.c.rater, _PREFERENCES.c.created_at)
        .join(_GENERATIONS, _GENERATIONS.c.id == _PREFERENCES.c.chosen_generation_id),
        sa.select(_SUBMISSIONS.c.page_id, _SUBMISSIONS.c.rater, _SUBMISSIONS.c.created_at),
    ).subquery()
    first = (
        sa.select(judged.c.page_id, judged.c.rater, sa.func.min(judged.c.created_at))
        .join(_PAGES, _PAGES.c.id == judged.c.page_id)
        .where(sa.or_(_PAGES.c.rater.is_(None), _PAGES.c.rater != judged.c.rater))
        .group_by(judged.c.page_id, judged.c.rater)
    )
    op.execute(sa.insert(_VIEWERS).from_select(["page_id", "rater", "created_at"], first))


def downgrade() -> None:
    """Back to 0004: the viewers table and the admission columns are dropped. Prompts not admitted
    (pending or rejected) are made inactive first: 0004 would put them in every rater's pool."""
    op.execute("UPDATE prompts SET active = false WHERE admission <> 'admitted'")
    op.drop_table("page_viewers")
    with op.batch_alter_table("prompts") as batch:
        batch.drop_index("ix_prompts_admission")
        batch.drop_constraint("ck_prompts_admission", type_="check")
        batch.drop_column("reviewed_at")
        batch.drop_column("reviewed_by")
        batch.drop_column("added_by")
        batch.drop_column("admission")
