"""accounts.session_epoch: login sessions that can be revoked

A login cookie names its account and the account's session epoch when it was issued; logging
out, a password change, a role change or disabling the account moves the epoch on, and every
cookie issued before stops working at once (it used to work for its 12 hours whatever
happened). Cookies issued before this revision carry no epoch: their holders log in again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 09:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("session_epoch")
