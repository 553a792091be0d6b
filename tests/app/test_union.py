"""A tag whose every instance is one of its children's costs no pyramid: its mask is theirs."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from app.models import MaskSource, Project, Role, Tag, Target, TargetState, Window
from app.services.curation.triage import accept_target
from app.services.masks.composition import compose_target
from app.services.masks.union import finish_unions
from app.services.target import (
    child_targets,
    find_latest_mask,
    is_union,
    reopen_unions_above,
)
from app.storage import decode_mask_png
from tests.app.conftest import Live
from tests.app.test_curate import logged_in

SLUG = "demo"


def _unions(live: Live) -> list[int]:
    with live.factory() as session:
        return [
            t.id
            for t in session.scalars(select(Target).order_by(Target.id))
            if is_union(session, target=t)
        ]


def test_an_exhaustive_tag_with_children_on_the_image_opens_no_window(live: Live) -> None:
    unions = _unions(live)
    assert unions, "the demo tags shapes, polygons and patterns along with their children"
    with live.factory() as session:
        for target_id in unions:
            target = session.get(Target, target_id)
            assert target is not None and target.state == TargetState.COLLECTING
            tag = session.get(Tag, target.tag_id)
            assert tag is not None and tag.exhaustive
            assert not session.scalars(select(Window).where(Window.target_id == target_id)).all()
        # A control target keeps its pyramid: its known tiles check volunteers.
        controls = session.scalars(
            select(Target).join(Tag).where(Tag.exhaustive.is_(True), Target.control.is_(True))
        ).all()
        assert all(
            session.scalars(select(Window).where(Window.target_id == t.id)).first()
            for t in controls
        )


def test_the_union_finishes_with_its_last_child_and_its_mask_is_theirs(live: Live) -> None:
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        union = session.get(Target, _unions(live)[0])
        assert union is not None
        children = child_targets(session, target=union)
        masks = []
        for k, child in enumerate(children):
            if is_union(session, target=child):  # a polygon under a shape: its own children
                for grandchild in child_targets(session, target=child):
                    accept_target(
                        session,
                        settings=live.settings,
                        project=project,
                        target=grandchild,
                        curator="c",
                    )
            elif child.state == TargetState.COLLECTING:
                accept_target(
                    session, settings=live.settings, project=project, target=child, curator="c"
                )
            masks.append(compose_target(session, settings=live.settings, target=child).hard)
            session.refresh(union)
            if k < len(children) - 1:
                assert union.state == TargetState.COLLECTING
        assert union.state == TargetState.COMPLETE
        version = find_latest_mask(session, target=union, source=MaskSource.CONSENSUS)
        assert version is not None
        mask = decode_mask_png(live.settings.data_dir / version.hard_path) > 0.5
        assert np.array_equal(mask, np.logical_or.reduce(masks))

        # Late evidence opens a part again (the consensus's own decisions follow their votes):
        # the union collects again, and finishes again, with a new mask, when the part does.
        part = next(c for c in children if not is_union(session, target=c))
        part.state = TargetState.COLLECTING
        reopen_unions_above(session, target=part)
        assert union.state == TargetState.COLLECTING
        part.state = TargetState.COMPLETE
        assert finish_unions(session, settings=live.settings, target=part) >= 1
        assert union.state == TargetState.COMPLETE
        again = find_latest_mask(session, target=union, source=MaskSource.CONSENSUS)
        assert again is not None and again.version > version.version


def test_a_curator_sees_what_a_union_is_made_of_and_its_current_mask(live: Live) -> None:
    union_id = _unions(live)[0]
    with live.factory() as session:
        union = session.get(Target, union_id)
        assert union is not None
        parts = child_targets(session, target=union)
    client = logged_in(live, Role.CURATOR)
    page = client.get(f"/curate/targets/{union_id}")
    assert page.status_code == 200
    assert "the union of theirs and the crowd is not asked about it" in page.text
    assert all(f'href="/curate/targets/{p.id}"' in page.text for p in parts)
    current = client.get(f"/curate/targets/{union_id}/current.png")
    assert current.status_code == 200 and current.headers["content-type"] == "image/png"
