"""A target's ground truth as the settler reads it: decoded once per file, the newest version."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

import app.services.crowd.opening as opening
from app.models import MaskSource, MaskVersion, Target
from app.services.crowd.opening import load_truth
from app.services.files import mask_store
from app.services.target import add_mask_version
from tests.app.conftest import World


def test_truth_is_decoded_once_per_file_and_a_new_version_is_read(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    read_mask = opening.read_mask

    def counting(settings: object, key: str) -> np.ndarray:
        decoded.append(key)
        return read_mask(settings, key)  # type: ignore[arg-type]

    monkeypatch.setattr(opening, "read_mask", counting)
    with world.factory() as session:
        target = session.scalars(
            select(Target)
            .join(MaskVersion, MaskVersion.target_id == Target.id)
            .where(MaskVersion.source == MaskSource.GROUND_TRUTH)
            .order_by(Target.id)
        ).first()
        assert target is not None
        first = load_truth(session, world.settings, target)
        again = load_truth(session, world.settings, target)
        assert first is not None and again is not None
        assert first.dtype == bool and first.any()
        assert again is first and len(decoded) == 1  # the second read came from memory
        with pytest.raises(ValueError):  # shared by every reader: nobody may write into it
            first[0, 0] = not first[0, 0]

        # A corrected truth is a new version with other content: read, not the old one.
        corrected = np.zeros_like(first)
        corrected[: first.shape[0] // 2] = True
        add_mask_version(
            session,
            target=target,
            mask=corrected,
            source=MaskSource.GROUND_TRUTH,
            store=mask_store(world.settings),
            written=[],
        )
        session.flush()
        newest = load_truth(session, world.settings, target)
        assert newest is not None and np.array_equal(newest, corrected)
        assert len(decoded) == 2
        assert not np.array_equal(newest, first)

        other = session.scalar(select(Target).where(Target.id != target.id).limit(1))
        assert other is not None
        session.query(MaskVersion).filter(MaskVersion.target_id == other.id).delete()
        assert load_truth(session, world.settings, other) is None
