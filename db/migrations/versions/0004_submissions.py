"""Submissions: one rater's judgement of one page as a unit (undo, change, ties, none-is-good, flags),
skipped prompts, versioned rating guidelines, and when the newest training round began.

- `guidelines`: versioned plain text written by admins (none yet: version 0).
- `submissions`: one page's judgement by one rater, with the client's idempotency key, the guideline
  version it was given under, none-is-good, the comment, and its status (current, superseded,
  undone); `ties` and `flags` hang off it.
- `ratings` gain `submission_id` (NULL: rated alone, as every existing rating was) and
  `guideline_version` (0 for existing rows: no guidelines existed).
- `preferences` gain `submission_id` (NULL for existing rows) and `is_current` (true for existing
  rows); the one-row-per-(pair, rater) constraint becomes one current row per (pair, rater), so a
  pick undone or superseded stays stored and the same pick can be given again.
- `skips`: prompts a rater skipped.
- `training_lease.round_started_at`: when the newest round began (closes the undo window).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NAME = 200


def upgrade() -> None:
    op.create_table(
        "guidelines",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("author", sa.String(NAME), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_guidelines"),
        sa.CheckConstraint("version >= 1", name="ck_guidelines_version"),
    )
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("page_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(NAME), nullable=False),
        sa.Column("client_key", sa.String(NAME), nullable=True),
        sa.Column("guideline_version", sa.Integer(), nullable=False),
        sa.Column("none_good", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_submissions"),
        sa.ForeignKeyConstraint(["page_id"], ["pages.id"], name="fk_submissions_page_id_pages"),
        sa.CheckConstraint("status IN ('current', 'superseded', 'undone')", name="ck_submissions_status"),
        sa.CheckConstraint("guideline_version >= 0", name="ck_submissions_guideline_version"),
        sa.UniqueConstraint("rater", "client_key", name="uq_submissions_rater_client_key"),
    )
    for column in ("page_id", "rater", "status"):
        op.create_index(f"ix_submissions_{column}", "submissions", [column])
    for table, extra in (
        ("ties", []),
        (
            "flags",
            [
                sa.Column("kind", sa.String(16), nullable=False),
                sa.Column("reason", sa.Text(), nullable=True),
                sa.CheckConstraint(
                    "kind IN ('offensive', 'broken', 'off_prompt', 'other')", name="ck_flags_kind"
                ),
            ],
        ),
    ):
        op.create_table(
            table,
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("submission_id", sa.Integer(), nullable=False),
            sa.Column("generation_id", sa.Integer(), nullable=False),
            *extra,
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
            sa.ForeignKeyConstraint(
                ["submission_id"], ["submissions.id"], name=f"fk_{table}_submission_id_submissions"
            ),
            sa.ForeignKeyConstraint(
                ["generation_id"], ["generations.id"], name=f"fk_{table}_generation_id_generations"
            ),
            sa.UniqueConstraint("submission_id", "generation_id", name=f"uq_{table}_submission_generation"),
        )
        op.create_index(f"ix_{table}_submission_id", table, ["submission_id"])
        op.create_index(f"ix_{table}_generation_id", table, ["generation_id"])
    op.create_table(
        "skips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(NAME), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_skips"),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], name="fk_skips_prompt_id_prompts"),
        sa.UniqueConstraint("rater", "prompt_id", name="uq_skips_rater_prompt"),
    )
    op.create_index("ix_skips_prompt_id", "skips", ["prompt_id"])
    op.create_index("ix_skips_rater", "skips", ["rater"])

    # Partial unique indexes are dropped around the batch rebuilds and made again after them, so
    # their WHERE clause never depends on how a rebuild reflects an index.
    op.drop_index("uq_ratings_current", table_name="ratings")
    with op.batch_alter_table("ratings") as batch:
        batch.add_column(sa.Column("submission_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("guideline_version", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.create_foreign_key("fk_ratings_submission_id_submissions", "submissions", ["submission_id"], ["id"])
        batch.create_index("ix_ratings_submission_id", ["submission_id"])
    _current_index("ratings", ["generation_id", "rater"], "uq_ratings_current")
    with op.batch_alter_table("preferences") as batch:
        batch.drop_constraint("uq_preferences_pair_rater", type_="unique")
        batch.add_column(sa.Column("is_current", sa.Boolean(), server_default=sa.true(), nullable=False))
        batch.add_column(sa.Column("submission_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_preferences_submission_id_submissions", "submissions", ["submission_id"], ["id"]
        )
        batch.create_index("ix_preferences_submission_id", ["submission_id"])
    _current_index("preferences", ["chosen_generation_id", "rejected_generation_id", "rater"],
                   "uq_preferences_current")
    with op.batch_alter_table("training_lease") as batch:
        batch.add_column(sa.Column("round_started_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    """Back to 0003: what 0004 added is dropped (submissions, ties, flags, skips, guidelines, the new
    columns). Preferences no longer in force (undone or superseded) are deleted: 0003 would count them
    as given, and it allows one row per (pair, rater)."""
    with op.batch_alter_table("training_lease") as batch:
        batch.drop_column("round_started_at")
    op.drop_index("uq_preferences_current", table_name="preferences")
    op.execute("DELETE FROM preferences WHERE NOT is_current")
    with op.batch_alter_table("preferences") as batch:
        batch.drop_index("ix_preferences_submission_id")
        batch.drop_constraint("fk_preferences_submission_id_submissions", type_="foreignkey")
        batch.drop_column("submission_id")
        batch.drop_column("is_current")
        batch.create_unique_constraint(
            "uq_preferences_pair_rater", ["chosen_generation_id", "rejected_generation_id", "rater"]
        )
    op.drop_index("uq_ratings_current", table_name="ratings")
    with op.batch_alter_table("ratings") as batch:
        batch.drop_index("ix_ratings_submission_id")
        batch.drop_constraint("fk_ratings_submission_id_submissions", type_="foreignkey")
        batch.drop_column("guideline_version")
        batch.drop_column("submission_id")
    _current_index("ratings", ["generation_id", "rater"], "uq_ratings_current")
    for table in ("skips", "flags", "ties", "submissions", "guidelines"):
        op.drop_table(table)


def _current_index(table: str, columns: list[str], name: str) -> None:
    """Create the unique index over `columns` of the rows whose is_current is true; returns nothing."""
    op.create_index(
        name,
        table,
        columns,
        unique=True,
        sqlite_where=sa.text("is_current"),
        postgresql_where=sa.text("is_current"),
    )
