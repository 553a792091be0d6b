"""the tagger's guesses of a tag weigh what the crowd has found of its earlier guesses

A tag the tagger added to an image (not people) costs the crowd a first window before anyone
knows whether it is there. Its windows were valued at the tagger's own probability, which a
tagger trained on a handful of images overstates (0.5-0.9 for guesses the crowd turned down
every time): each tag keeps a log-odds correction, learned each loop round from the verdicts on
its earlier guesses, that its new guesses' probabilities get.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 21:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # 0: nothing judged yet (the next loop round learns it from the verdicts so far).
    with op.batch_alter_table("tags") as batch:
        batch.add_column(sa.Column("guess_logodds", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("tags") as batch:
        batch.drop_column("guess_logodds")
