"""Record when a version's status last changed (rollbacks); index ratings by rater and
generations by adapter version for the next-prompt and per-version summary queries.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("status_changed_at", sa.DateTime(), nullable=True))
    op.execute("UPDATE adapter_versions SET status_changed_at = created_at")
    op.create_index("ix_ratings_rater", "ratings", ["rater"])
    op.create_index("ix_generations_adapter_version", "generations", ["adapter_version"])


def downgrade() -> None:
    op.drop_index("ix_generations_adapter_version", table_name="generations")
    op.drop_index("ix_ratings_rater", table_name="ratings")
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("status_changed_at")
