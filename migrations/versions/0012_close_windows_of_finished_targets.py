"""close the windows of targets that stopped collecting

A learning-loop round that sent a target to triage (the tagger no longer predicts its tag, or
its mask came out empty) left the target's open windows open. They kept their value and were
served, and nothing closed them: settling skips a target that is not collecting. Every open
window of a target in triage or complete is closed here, its lease given back; from now on a
target that stops collecting closes its windows (``app.services.target.stop_collecting``).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 19:20:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    windows = sa.table(
        "windows",
        sa.column("state", sa.String),
        sa.column("target_id", sa.Integer),
        sa.column("closed_at", sa.DateTime),
        sa.column("value", sa.Float),
        sa.column("leased_until", sa.DateTime),
        sa.column("leased_by", sa.Integer),
    )
    targets = sa.table("targets", sa.column("id", sa.Integer), sa.column("state", sa.String))
    finished = sa.select(targets.c.id).where(targets.c.state.in_(["triage", "complete"]))
    op.execute(
        windows.update()
        .where(windows.c.state == "open", windows.c.target_id.in_(finished))
        .values(
            state="closed",
            closed_at=datetime.now(UTC).replace(tzinfo=None),
            value=0.0,
            leased_until=None,
            leased_by=None,
        )
    )


def downgrade() -> None:
    # Which windows this closed is not recorded, and none of them should be open.
    pass
