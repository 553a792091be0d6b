"""square_cells: projects made before this revision keep cells that follow the image's aspect

New projects lay the grid pyramid on the square around each image (every cell a square in
image space); a project's cell addresses mean what its frame says, so every project that
exists already is marked ``square_cells: false`` in its settings. A cell wholly outside its
image (the square frame's margin) retires for a reason of its own: ``outside``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_REASONS = ("confident", "budget", "gold", "model", "curator")
NEW_REASONS = (*OLD_REASONS, "outside")


def _reasons(values: tuple[str, ...]) -> None:
    # The enum's CHECK constraint (``app.models._types.str_enum``); SQLite rebuilds the table.
    listed = ", ".join(f"'{v}'" for v in values)
    with op.batch_alter_table("cells") as batch:
        batch.drop_constraint(op.f("ck_cells_retirereason"), type_="check")
        batch.create_check_constraint(op.f("ck_cells_retirereason"), sa.text(f"retire_reason IN ({listed})"))


projects = sa.table(
    "projects", sa.column("id", sa.Integer()), sa.column("settings", sa.JSON())
)


def upgrade() -> None:
    _reasons(NEW_REASONS)
    connection = op.get_bind()
    for project_id, settings in connection.execute(sa.select(projects.c.id, projects.c.settings)):
        kept = dict(settings or {})
        if "square_cells" not in kept:
            kept["square_cells"] = False
            connection.execute(
                projects.update().where(projects.c.id == project_id).values(settings=kept)
            )


def downgrade() -> None:
    # Older code knows only the image frame: a project with square cells cannot go back.
    connection = op.get_bind()
    for _, settings in connection.execute(sa.select(projects.c.id, projects.c.settings)):
        if (settings or {}).get("square_cells"):
            raise RuntimeError(
                "a project lays square cells, which versions before 0005 cannot read"
            )
    _reasons(OLD_REASONS)
