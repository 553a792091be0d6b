"""What the segmenter learns from: complete masks, control truth, and work in progress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import delete, select, update

from app.jobs.datasets import segmenter_items, vocabulary
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Image,
    MaskSource,
    MaskVersion,
    Project,
    Target,
)
from app.storage import decode_mask_png
from ml.aggregation import grid
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def test_the_settled_squares_of_targets_still_collecting_are_learned(
    live: Live, tmp_path: Path
) -> None:
    """An image without frozen truth whose target has a settled square is a training image:
    its current mask where its squares are settled is composed into the folder (0.5, no
    weight, where they are open), a plane for that tag only; an image with frozen truth is
    never trained on, and the project's ``train_on_progress`` turns it off."""
    progress = tmp_path / "progress"
    progress.mkdir()
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        target = session.scalars(
            select(Target).where(Target.control.is_(False), HAS_PYRAMID).order_by(Target.id)
        ).first()
        assert project is not None and target is not None
        vocab = vocabulary(session, project=project)
        before, _, _ = segmenter_items(
            session, settings=live.settings, project=project, vocab=vocab, progress_dir=progress
        )
        # The image's truth held frozen: never trained on, answered or not.
        on_image = select(Target.id).where(Target.image_id == target.image_id)
        cells = session.scalars(
            select(Cell).where(Cell.target_id == target.id, Cell.level == 1).order_by(Cell.id)
        ).all()
        # Its first square settled "no" by three votes; its second still open on one "yes".
        for cell, (n, yes, q) in zip(cells[:2], [(3, 0, 0.001), (1, 1, 0.8)], strict=True):
            votes = update(Consensus).where(Consensus.cell_id == cell.id)
            session.execute(votes.values(n_votes=n, n_yes=yes, posterior=q))
        settle = update(Cell).where(Cell.id == cells[0].id)
        session.execute(
            settle.values(status=CellStatus.RETIRED, label=False, retire_reason="confident")
        )
        session.flush()
        held, _, _ = segmenter_items(
            session, settings=live.settings, project=project, vocab=vocab, progress_dir=progress
        )
        assert len(held) == len(before) and not list(progress.iterdir())
        # Without frozen truth on the image (a project whose truth is elsewhere), it is learned.
        session.execute(
            delete(MaskVersion).where(
                MaskVersion.target_id.in_(on_image),
                MaskVersion.source == MaskSource.GROUND_TRUTH,
            )
        )
        session.flush()
        train, _, snapshot = segmenter_items(
            session, settings=live.settings, project=project, vocab=vocab, progress_dir=progress
        )
        assert len(train) == len(before) + 1
        item = next(i for i in train if str(progress) in str(i.masks))
        planes = [p for p in item.masks if p is not None]
        mine = progress / f"target-{target.id}.png"
        assert mine in planes and all(p.parent == progress for p in planes)
        assert snapshot["in_progress_masks"] == len(planes) == 1  # a union's are its children's
        soft = decode_mask_png(mine)
        image = session.get(Image, target.image_id)
        assert image is not None
        first, second = (
            grid.cell_rect(grid.Cell(1, c.row, c.col), image.height, image.width, square=True)
            for c in cells[:2]
        )
        assert soft[first.top : first.bottom, first.left : first.right].max() <= 0.02
        # An open square is not learned, whatever its votes say (they would come back as the
        # model's prior): 0.5, no confidence; nor is any other open square.
        inside = soft[second.top : second.bottom, second.left : second.right]
        assert np.allclose(inside, 0.5, atol=0.01)
        assert np.isclose(soft, 0.5, atol=0.01).mean() > 0.5
        project.settings = {**project.settings, "train_on_progress": False}
        session.flush()
        off, _, _ = segmenter_items(
            session, settings=live.settings, project=project, vocab=vocab, progress_dir=progress
        )
        assert len(off) == len(before)
