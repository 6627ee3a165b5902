"""A fencing token on the training lease; exported and pruned adapter versions.

- `training_lease.token`: incremented on every acquisition of the lease; every write a worker makes
  (round start, metrics, publish, failed version, heartbeat) names the token it acquired, and the
  store refuses it once another acquisition took the lease, even under the same worker id. Existing
  databases start at 0.
- `adapter_versions.exported_at`: when the version was last exported (`--keep-versions` keeps its files).
- `adapter_versions.pruned_at`: when `--keep-versions` removed its files (the row and metrics stay; it can no
  longer be rolled back to).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_lease") as batch:
        batch.add_column(sa.Column("token", sa.Integer(), nullable=False, server_default=sa.text("0")))
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("exported_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("pruned_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("pruned_at")
        batch.drop_column("exported_at")
    with op.batch_alter_table("training_lease") as batch:
        batch.drop_column("token")
