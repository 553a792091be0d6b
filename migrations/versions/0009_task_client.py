"""tasks.client: open leases counted per client address

A keyed hash of the address a task was leased to (never the address itself), so that the open
leases of one address can be capped: one client with many throwaway cookies could otherwise
hold every open window (each cookie may hold two). Tasks leased before this revision have none.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 09:35:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("client", sa.String(length=32), nullable=True))
        # By expiry too: abandoned leases stay "leased" after they run out, and a count of an
        # address's open tasks must not walk its whole history.
        batch.create_index(
            "ix_tasks_client_open", ["client", "state", "expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_client_open")
        batch.drop_column("client")
