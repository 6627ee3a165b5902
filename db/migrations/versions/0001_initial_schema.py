"""Initial schema: prompts, generations, ratings, preferences, adapter versions, metrics, lease.

Revision ID: 0001
Revises:
Create Date: 2025-11-28
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NAME = 200


def _created_at() -> sa.Column[datetime]:
    return sa.Column("created_at", sa.DateTime(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_sha256", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_prompts"),
        sa.UniqueConstraint("text_sha256", name="uq_prompts_text_sha256"),
        sa.CheckConstraint("source IN ('builtin', 'uploaded', 'rater')", name="ck_prompts_source"),
    )
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("adapter_version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("logprobs", sa.JSON(), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_generations"),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], name="fk_generations_prompt_id_prompts"),
        sa.CheckConstraint("adapter_version >= 0", name="ck_generations_adapter_version"),
    )
    op.create_index("ix_generations_prompt_id", "generations", ["prompt_id"])
    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(NAME), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_ratings"),
        sa.ForeignKeyConstraint(
            ["generation_id"], ["generations.id"], name="fk_ratings_generation_id_generations"
        ),
        sa.CheckConstraint("score BETWEEN 1 AND 5", name="ck_ratings_score"),
    )
    op.create_index("ix_ratings_generation_id", "ratings", ["generation_id"])
    op.create_index(
        "uq_ratings_current",
        "ratings",
        ["generation_id", "rater"],
        unique=True,
        sqlite_where=sa.text("is_current"),
        postgresql_where=sa.text("is_current"),
    )
    op.create_table(
        "preferences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("chosen_generation_id", sa.Integer(), nullable=False),
        sa.Column("rejected_generation_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(NAME), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_preferences"),
        sa.ForeignKeyConstraint(
            ["chosen_generation_id"],
            ["generations.id"],
            name="fk_preferences_chosen_generation_id_generations",
        ),
        sa.ForeignKeyConstraint(
            ["rejected_generation_id"],
            ["generations.id"],
            name="fk_preferences_rejected_generation_id_generations",
        ),
        sa.CheckConstraint("chosen_generation_id <> rejected_generation_id", name="ck_preferences_distinct"),
        sa.UniqueConstraint(
            "chosen_generation_id",
            "rejected_generation_id",
            "rater",
            name="uq_preferences_pair_rater",
        ),
    )
    for column in ("chosen_generation_id", "rejected_generation_id", "rater"):
        op.create_index(f"ix_preferences_{column}", "preferences", [column])
    op.create_table(
        "adapter_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("parent", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n_ratings", sa.Integer(), nullable=False),
        sa.Column("n_preferences", sa.Integer(), nullable=False),
        sa.Column("rating_cursor", sa.Integer(), nullable=False),
        sa.Column("preference_cursor", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("version", name="pk_adapter_versions"),
        sa.CheckConstraint("version >= 1", name="ck_adapter_versions_version"),
        sa.CheckConstraint(
            "status IN ('published', 'failed', 'rolled_back')", name="ck_adapter_versions_status"
        ),
    )
    op.create_index("ix_adapter_versions_status", "adapter_versions", ["status"])
    op.create_table(
        "training_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_training_metrics"),
    )
    op.create_index("ix_training_metrics_version", "training_metrics", ["version"])
    lease = op.create_table(
        "training_lease",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("holder", sa.String(NAME), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_training_lease"),
        sa.CheckConstraint("id = 1", name="ck_training_lease_single_row"),
    )
    op.bulk_insert(lease, [{"id": 1, "holder": None, "state": "no worker yet"}])


def downgrade() -> None:
    for table in (
        "training_lease",
        "training_metrics",
        "adapter_versions",
        "preferences",
        "ratings",
        "generations",
        "prompts",
    ):
        op.drop_table(table)
