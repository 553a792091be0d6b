"""What the segmenter learns from: complete masks, control truth, and work in progress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import delete, select, update

from app.jobs.datasets import segmenter_items, vocabulary
from app.models import Cell, Consensus, MaskSource, MaskVersion, Project, Target
from app.storage import decode_mask_png
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def test_answered_targets_still_collecting_are_learned_with_their_confidence(
    live: Live, tmp_path: Path
) -> None:
    progress = tmp_path / "progress"
    progress.mkdir()
    """An image without frozen truth whose target somebody answered is a training image: its
    current mask is composed into the folder, a plane for that tag only; an image with frozen
    truth is never trained on, and the project's ``train_on_progress`` turns it off."""
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
        votes = update(Consensus).where(Consensus.cell_id == cells[0].id)
        session.execute(votes.values(n_votes=2, n_yes=0, posterior=0.01))
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
        # The target's plane, and its tag's parent's where that is a union of its children.
        mine = progress / f"target-{target.id}.png"
        assert mine in planes and all(p.parent == progress for p in planes)
        assert snapshot["in_progress_masks"] == len(planes) <= 2
        soft = decode_mask_png(mine)
        assert soft.dtype == np.float32 and soft.min() <= 0.02  # its square: "no", and sure
        assert np.isclose(soft, 0.5, atol=0.01).mean() > 0.5  # the rest unknown: no weight
        project.settings = {**project.settings, "train_on_progress": False}
        session.flush()
        off, _, _ = segmenter_items(
            session, settings=live.settings, project=project, vocab=vocab, progress_dir=progress
        )
        assert len(off) == len(before)
