"""tasks: an index of the fuser's queue (submitted, not fused yet), by project and in order

``ix_tasks_fused_at`` also held every task that will never be fused (leased, skipped, expired:
each abandoned lease stays there) among the waiting ones, so the fuser's and the backpressure's
looks at the queue grew with the project's history. In ``ix_tasks_waiting`` the waiting tasks
are side by side (state, then fused_at), by project, in order.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 07:05:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index(batch.f("ix_tasks_fused_at"))
        batch.create_index(
            "ix_tasks_waiting", ["state", "fused_at", "project_id", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_waiting")
        batch.create_index(batch.f("ix_tasks_fused_at"), ["fused_at"], unique=False)
