"""Object-level search: the index job, the service, the curator's page and the command."""

from __future__ import annotations

import re
import subprocess

import pytest
from sqlalchemy import select

from app.jobs.objects import cut_objects, held_out_images, labels_of, run_index_objects
from app.models import (
    Image,
    ImageTag,
    Job,
    MaskSource,
    MaskVersion,
    ModelKind,
    ModelVersion,
    Project,
    Role,
    Tag,
    Target,
)
from app.services.curation.objects import (
    choices,
    index_key,
    load_object_index,
    search_objects,
)
from app.services.errors import InvalidInputError, NotFoundError
from app.storage import open_storage
from ml.objects.attributes import AttributeOptions
from ml.objects.instances import NONE, Group
from tests.app.conftest import SLUG, Live
from tests.app.test_cli import TESSERA, _env
from tests.app.test_curate import logged_in

FAST = AttributeOptions(steps=60)


def _project(live: Live) -> Project:
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        session.expunge(project)
        return project


def test_the_index_holds_every_object_of_the_masks(live: Live) -> None:
    report = run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    assert report.images == 4 and report.objects >= 8
    assert report.tagger_version is None and report.from_model == 0  # no tagger, no model
    assert any("red" in values for values in report.groups.values())
    index = load_object_index(live.settings, project=_project(live))
    assert len(index) == report.objects
    with live.factory() as session:
        images = set(session.scalars(select(Image.id)))
        cuts = list(cut_objects(session, live.settings, _project(live)))
        job = session.scalar(select(Job).where(Job.kind == "index-objects"))
        assert job is not None and job.result["objects"] == report.objects
    assert {int(i) for i in index.image_ids} <= images
    assert sum(len(c.objects) for c in cuts) == len(index)  # the same objects, in order
    for cut in cuts:
        rows = index.rows_of(cut.image.id)
        assert [index.boxes[r].tolist() for r in rows] == [list(o.box) for o in cut.objects]
    assert all(len(o) >= 3 for o in index.outlines)
    # read once per version of the file
    assert load_object_index(live.settings, project=_project(live)) is index
    run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    assert load_object_index(live.settings, project=_project(live)) is not index


def test_a_good_segmenter_s_prediction_stands_in_where_no_result_mask_is(live: Live) -> None:
    with live.factory() as session:
        # Every target's ground truth becomes a model's prediction.
        for version in session.scalars(select(MaskVersion)):
            version.source = MaskSource.MODEL
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        segmenter = ModelVersion(
            project_id=project.id,
            kind=ModelKind.SEGMENTER,
            version=1,
            path="segmenter-v1.pt",
            metrics={"miou": 0.3},
            active=True,
        )
        session.add(segmenter)
        session.commit()
    # An early segmenter's masks are not taken for objects.
    with pytest.raises(InvalidInputError, match="object"):
        run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    with live.factory() as session:
        session.get_one(ModelVersion, segmenter.id).metrics = {"miou": 0.7}
        session.commit()
    report = run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    assert report.objects >= 8 and report.from_model == report.objects


def test_indexing_without_masks_or_groups_says_why(live: Live) -> None:
    with live.factory() as session:
        for version in session.scalars(select(MaskVersion)):
            session.delete(version)
        session.commit()
    with pytest.raises(InvalidInputError, match="object"):
        run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    with pytest.raises(InvalidInputError, match="holdout"):
        run_index_objects(live.factory, live.settings, slug=SLUG, holdout=1.0)
    with live.factory() as session:
        job = session.scalar(select(Job).where(Job.kind == "index-objects"))
        assert job is not None and job.status == "failed" and "object" in job.log
    assert not open_storage(live.settings).exists(index_key(SLUG))  # nothing half-written


def test_held_out_images_are_a_fixed_share() -> None:
    ids = list(range(1, 2001))
    held = held_out_images(ids, 0.3)
    assert held == held_out_images(ids, 0.3) and 0.25 < len(held) / len(ids) < 0.35
    assert held_out_images(ids, 0.0) == set()


def test_search_changes_one_attribute_of_the_chosen_object(live: Live) -> None:
    run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    project = _project(live)
    index = load_object_index(live.settings, project=project)
    row = 0
    image_id = int(index.image_ids[row])
    offered = choices(index, row=row)
    assert offered and all(c.new and c.old not in c.new for c in offered)
    with live.factory() as session:
        chosen, plain = search_objects(
            session, live.settings, project=project, image_id=image_id, row=row
        )
        assert chosen.row == row and image_id not in {h.image.id for h in plain}
        assert len({h.image.id for h in plain}) == len(plain) == len(set(index.image_ids)) - 1
        change = offered[0]
        for method in ("learned", "prototype"):
            _, changed = search_objects(
                session,
                live.settings,
                project=project,
                image_id=image_id,
                row=row,
                to=change.new[0],
                method=method,
            )
            assert changed and image_id not in {h.image.id for h in changed}
        with pytest.raises(InvalidInputError, match="not a value this object"):
            search_objects(
                session, live.settings, project=project, image_id=image_id, row=row, to="nope"
            )
        with pytest.raises(InvalidInputError, match="method"):
            search_objects(
                session, live.settings, project=project, image_id=image_id, row=row, method="x"
            )
        with pytest.raises(NotFoundError, match="no object"):
            search_objects(
                session, live.settings, project=project, image_id=image_id + 1000, row=row
            )


def test_the_objects_page_offers_objects_and_shows_matches_outlined(live: Live) -> None:
    client = logged_in(live, Role.CURATOR)
    with live.factory() as session:
        image_id = session.scalar(select(Image.id).order_by(Image.id))
    missing = client.get(f"/curate/objects/{image_id}")
    assert missing.status_code == 404 and "tessera objects index" in missing.text
    run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    page = client.get(f"/curate/objects/{image_id}")
    assert page.status_code == 200
    rows = [int(r) for r in re.findall(r'data-object="(\d+)"', page.text)]
    assert rows and f'href="/curate/objects/{image_id}?object={rows[0]}"' in page.text
    chosen = client.get(f"/curate/objects/{image_id}", params={"object": rows[0]})
    assert chosen.status_code == 200 and 'class="object chosen"' in chosen.text
    new = re.findall(r'<option value="([^"]+)"', chosen.text)
    assert new, "the form offers the object's other values"
    changed = client.get(f"/curate/objects/{image_id}", params={"object": rows[0], "to": new[0]})
    assert changed.status_code == 200
    shown = [int(i) for i in re.findall(r'<li data-image="(\d+)"', changed.text)]
    assert shown and image_id not in shown
    assert changed.text.count('class="object matched"') == len(shown)
    refused = client.get(f"/curate/objects/{image_id}", params={"object": rows[0], "to": "nope"})
    assert refused.status_code == 422 and "not a value this object" in refused.text
    assert client.get(f"/curate/objects/{image_id}", params={"object": -1}).status_code == 422
    assert client.get(f"/curate/objects/{image_id}", params={"object": 10_000}).status_code == 404
    assert logged_in(live, Role.VOLUNTEER).get(f"/curate/objects/{image_id}").status_code in (
        303,
        403,
    )


def test_the_command_indexes_and_refuses_a_project_without_masks(live: Live) -> None:
    env = _env(live.settings.data_dir) | {
        "TESSERA_DATABASE_URL": live.settings.resolved_database_url
    }

    def tessera(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TESSERA, *args], env=env, capture_output=True, text=True, timeout=300
        )

    ok = tessera("objects", "index", "--project", SLUG, "--steps", "20", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert "objects=" in ok.stdout
    unknown = tessera("objects", "index", "--project", "nope")
    assert unknown.returncode != 0 and "nope" in unknown.stderr
    with live.factory() as session:
        for version in session.scalars(select(MaskVersion)):
            session.delete(version)
        session.commit()
    empty = tessera("objects", "index", "--project", SLUG, "--steps", "20")
    assert empty.returncode == 2 and "object" in empty.stderr, empty.stderr


def test_a_value_is_unknown_where_the_image_has_a_tag_of_its_kind_without_a_mask() -> None:
    colour = Group("colour", ("red", "green"))
    texture = Group("patterned", ("striped", NONE))
    shape = Group("shape", ("circle", "star"))
    categories = {"red": "attribute", "green": "attribute", "striped": "attribute"}
    categories |= {"blue": "attribute", "circle": "general", "star": "general"}
    groups = [colour, texture, shape]
    circle, red = {"circle"}, {"circle", "red"}
    assert labels_of(groups, circle, set(), categories) == [-1, 1, 0]  # no colour: none known
    assert labels_of(groups, red, set(), categories) == [0, 1, 0]
    # a tag of the attributes' category without a mask: any attribute may be it
    assert labels_of(groups, circle, {"striped"}, categories) == [-1, -1, 0]
    assert labels_of(groups, red, {"blue"}, categories) == [0, -1, 0]


def test_objects_of_images_with_unmasked_attribute_tags_learn_nothing_of_them(live: Live) -> None:
    with live.factory() as session:
        red = session.scalar(select(Tag.id).where(Tag.name == "red"))
        reddish = set(session.scalars(select(ImageTag.image_id).where(ImageTag.tag_id == red)))
        for version in session.scalars(
            select(MaskVersion).join(Target).where(Target.tag_id == red)
        ):
            session.delete(version)  # the image still carries "red", its mask is gone
        session.commit()
    assert reddish
    run_index_objects(live.factory, live.settings, slug=SLUG, options=FAST, device="cpu")
    index = load_object_index(live.settings, project=_project(live))
    g = next(i for i, group in enumerate(index.groups) if "blue" in group.values)
    colours = set(index.groups[g].values)
    assert "red" not in colours
    unknown = [
        r
        for r in range(len(index))
        if int(index.image_ids[r]) in reddish and not colours & set(index.tags[r])
    ]
    assert unknown, "a red object, whose colour has no mask now"
    assert all(index.labels[r, g] == -1 for r in unknown)
    known = [r for r in range(len(index)) if colours & set(index.tags[r])]
    assert all(index.labels[r, g] >= 0 for r in known)
