"""quality_snapshots: mask IoU on the evaluation targets against human-seconds, per tag

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quality_snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("tag_id", sa.Integer(), nullable=True),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("human_seconds", sa.Float(), nullable=False),
        sa.Column("mean_iou", sa.Float(), nullable=False),
        sa.Column("targets", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_quality_snapshots_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tag_id"], ["tags.id"], name=op.f("fk_quality_snapshots_tag_id_tags"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quality_snapshots")),
    )
    op.create_index(
        op.f("ix_quality_snapshots_project_id"), "quality_snapshots", ["project_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_quality_snapshots_project_id"), table_name="quality_snapshots")
    op.drop_table("quality_snapshots")
