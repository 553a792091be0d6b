"""tasks.fused_at: fusion runs off the request path

A submission is acknowledged once its votes are stored; the fuser folds them into the consensus
afterwards, in batches, and marks each task it fused in the same transaction, so that it resumes
from the first unfused task after a crash. Tasks submitted before this revision were fused as
they were taken.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 02:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

tasks = sa.table(
    "tasks",
    sa.column("state", sa.String()),
    sa.column("submitted_at", sa.DateTime(timezone=True)),
    sa.column("fused_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("fused_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f("ix_tasks_fused_at"), ["fused_at"], unique=False)
    op.execute(
        tasks.update().where(tasks.c.state == "submitted").values(fused_at=tasks.c.submitted_at)
    )


def downgrade() -> None:
    # Older code fuses as it takes an answer: votes still waiting for the fuser would never be.
    waiting = op.get_bind().execute(
        sa.select(sa.func.count())
        .select_from(tasks)
        .where(tasks.c.state == "submitted", tasks.c.fused_at.is_(None))
    )
    if waiting.scalar_one():
        raise RuntimeError("some answers are not fused yet: run the server until they are")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index(batch.f("ix_tasks_fused_at"))
        batch.drop_column("fused_at")
