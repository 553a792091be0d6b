"""split cells: a cell retires *split* when credible volunteers disagree on it

Volunteers are asked whether any of the object is in a square, and miss a sliver; a square that
credible people split on retires as holding the object, for its finer window to settle
(``ml.aggregation.rules``). Its reason is a value of its own, so that curators and the
retirement that follows the votes can tell it from a confident answer.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_REASONS = ("confident", "budget", "gold", "model", "curator", "outside")
NEW_REASONS = ("confident", "split", "budget", "gold", "model", "curator", "outside")

cells = sa.table("cells", sa.column("retire_reason", sa.String()))


def _reasons(values: tuple[str, ...]) -> None:
    # The enum's CHECK constraint (``app.models._types.str_enum``); SQLite rebuilds the table.
    listed = ", ".join(f"'{v}'" for v in values)
    with op.batch_alter_table("cells") as batch:
        batch.drop_constraint(op.f("ck_cells_retirereason"), type_="check")
        batch.create_check_constraint(
            op.f("ck_cells_retirereason"), sa.text(f"retire_reason IN ({listed})")
        )


def upgrade() -> None:
    _reasons(NEW_REASONS)


def downgrade() -> None:
    # Older code knows no split cell: it keeps its label (the object is there) as a confident
    # one, which that code decides again from its votes when they next move.
    op.get_bind().execute(
        cells.update().where(cells.c.retire_reason == "split").values(retire_reason="confident")
    )
    _reasons(OLD_REASONS)
