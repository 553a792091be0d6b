"""model evidence: a cell keeps the segmenter's log-likelihood ratio apart from its prior

A learning-loop round set a cell's prior to the segmenter's calibrated probability, replacing
the rate the cell had without it (its parent's probability times the share of children that hold
the object, a small-object search's 5%, the tagger's Grad-CAM): a weak model flattened sure
priors toward one half. The model's evidence is now added to that rate, and kept in a column of
its own so that the next round replaces it instead of adding to it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Priors a model set before keep their value (the model's part of them is not known): 0 here
    # says none of it is, so the next round adds its evidence to them.
    with op.batch_alter_table("cells") as batch:
        batch.add_column(
            sa.Column("model_logodds", sa.Float(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("cells") as batch:
        batch.drop_column("model_logodds")
