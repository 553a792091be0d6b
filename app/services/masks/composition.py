"""A target's mask as it stands: its finest cells composed per pixel with its image.

One composition serves everything that shows or uses a mask: the mask a target completes with,
a curator's accept, the current mask of an unfinished target (curator overlay, export of work
in progress) and the campaign benchmark. The numbers are ``ml.composition``'s; this module loads
what they need: the finest cells and their posteriors (gold and curator answers as 0/1), the
image's pixels, and the segmenter's latest prediction for the target, if there is one. A
target whose tag's mask is the union of its children's (``is_union``) is composed as that union.
A target whose tag people gave (``tag_is_known``) holds its object: where no cell claims it
yet, the cells its votes lean to do (``ml.composition.claim_known_object``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import (
    SETTLED_BY,
    Cell,
    CellStatus,
    Consensus,
    Image,
    MaskSource,
    Project,
    RetireReason,
    Target,
)
from app.services.files import mask_store, read_mask
from app.services.image import image_path
from app.services.project import square_cells
from app.services.target import (
    add_mask_version,
    child_targets,
    find_latest_mask,
    is_union,
    tag_is_known,
)
from ml.aggregation import grid
from ml.aggregation.rules import leaf_cells
from ml.aggregation.votes import logit
from ml.composition import Composed, claim_known_object, compose_mask


def has_evidence(
    level: int, status: CellStatus | str, n_votes: int, retire_reason: RetireReason | str | None
) -> bool:
    """Whether a cell speaks for its pixels in a target's mask (``leaf_posteriors``): a first
    cell, a retired one, or one somebody answered. A refined cell's unanswered children carry
    only the prior they inherited and leave their parent's answer standing; a cell wholly
    outside the image has no pixel and must not hide its parent."""
    if retire_reason == RetireReason.OUTSIDE:
        return False
    return level <= 1 or status != CellStatus.OPEN or n_votes > 0


def cell_probability(
    label: bool | None, retire_reason: RetireReason | str | None, posterior: float
) -> float:
    """How likely a cell shows the object: a gold or curator answer as 0/1, else its
    posterior."""
    if retire_reason in (RetireReason.GOLD, RetireReason.CURATOR):
        return float(bool(label))
    return float(posterior)


def leaf_posteriors(session: Session, *, cells: list[Cell]) -> tuple[list[grid.Cell], list[float]]:
    """The finest cells with evidence and their probabilities: gold and curator answers as 0/1,
    every other cell its posterior.

    A refined cell's children that nobody has answered yet carry only the prior they inherited
    from it: they are left out (and so are children wholly outside the image), so that their
    parent's answer stands (an inherited 0.8 is not an
    answer, and would otherwise turn their pixels into sure foreground). The first nine cells
    stay in whatever their evidence (their prior is the tagger's or the model's).
    """
    leaves = _leaves(session, cells=cells)
    return leaves.cells, leaves.probs


@dataclass(frozen=True)
class _Leaves:
    """``leaf_posteriors``, each leaf's votes' log-likelihood ratio (its posterior's log-odds
    less its prior's; 0 for a gold or curator answer: nobody voted), and whether its votes all
    say *no* (``ml.composition.trimap``'s ``no_only``)."""

    cells: list[grid.Cell]
    probs: list[float]
    evidence: list[float]
    no_only: list[bool]
    settled: list[bool]  # retired by people's votes, gold or a curator


def _leaves(session: Session, *, cells: list[Cell]) -> _Leaves:
    consensus = {
        cell_id: (n, q, n_yes)
        for cell_id, n, q, n_yes in session.execute(
            select(
                Consensus.cell_id, Consensus.n_votes, Consensus.posterior, Consensus.n_yes
            ).where(Consensus.cell_id.in_([c.id for c in cells]))
        )
    }
    cells = [
        c
        for c in cells
        if has_evidence(c.level, c.status, consensus.get(c.id, (0, 0.5, 0))[0], c.retire_reason)
    ]
    addresses = [grid.Cell(c.level, c.row, c.col) for c in cells]
    leaves = [c for c, leaf in zip(cells, leaf_cells(addresses), strict=True) if leaf]
    probs = [cell_probability(c.label, c.retire_reason, consensus[c.id][1]) for c in leaves]
    evidence = [
        0.0
        if c.retire_reason in (RetireReason.GOLD, RetireReason.CURATOR)
        else float(logit(consensus[c.id][1]) - c.prior_logodds)
        for c in leaves
    ]
    no_only = [consensus[c.id][0] > 0 and consensus[c.id][2] == 0 for c in leaves]
    settled = [c.status == CellStatus.RETIRED and c.retire_reason in SETTLED_BY for c in leaves]
    addresses = [grid.Cell(c.level, c.row, c.col) for c in leaves]
    return _Leaves(addresses, probs, evidence, no_only, settled)


def load_pixels(settings: Settings, image: Image) -> np.ndarray:
    """The image's pixels as RGB. Shape: ``(H, W, 3)`` uint8."""
    return read_pixels(image_path(settings, image))


def read_pixels(path: Path) -> np.ndarray:
    """An image file's pixels as RGB. Shape: ``(H, W, 3)`` uint8."""
    with PILImage.open(path) as img:
        return np.asarray(img.convert("RGB"))


def model_probability(session: Session, settings: Settings, target: Target) -> np.ndarray | None:
    """The segmenter's latest per-pixel probability for the target, if it has predicted it."""
    version = find_latest_mask(session, target=target, source=MaskSource.MODEL)
    if version is None:
        return None
    mask = read_mask(settings, version.soft_path or version.hard_path)
    return mask.astype(np.float32)


def compose_target(
    session: Session,
    *,
    settings: Settings,
    target: Target,
    image: Image | None = None,
    cells: list[Cell] | None = None,
    pixels: np.ndarray | None = None,
    composed: dict[int, Composed] | None = None,
) -> Composed:
    """The target's soft and hard mask now (see the module docstring).

    ``image``, ``cells`` and ``pixels`` are loaded when not given. The method is the project's
    ``composition`` setting. ``composed`` keeps the masks composed so far by target id, so that
    one pass over an image's targets composes each once (a union's parts are targets too, and
    a union may be another union's part).
    """
    if composed is not None and target.id in composed:
        return composed[target.id]
    result = _compose(session, settings, target, image, cells, pixels, composed)
    if composed is not None:
        composed[target.id] = result
    return result


def _compose(
    session: Session,
    settings: Settings,
    target: Target,
    image: Image | None,
    cells: list[Cell] | None,
    pixels: np.ndarray | None,
    composed: dict[int, Composed] | None,
) -> Composed:
    image = image or session.get(Image, target.image_id)
    assert image is not None
    if is_union(session, target=target):
        return _union(
            session,
            settings=settings,
            children=child_targets(session, target=target),
            image=image,
            pixels=pixels,
            composed=composed,
        )
    inputs = mask_inputs(session, settings=settings, target=target, cells=cells)
    return inputs.compose(load_pixels(settings, image) if pixels is None else pixels)


@dataclass(frozen=True)
class MaskInputs:
    """What a target's own mask is composed from besides its image's pixels: its finest cells
    with evidence and their probabilities (``leaf_posteriors``), the segmenter's latest
    prediction, the project's method and the pyramid's frame, and which cells' votes all say
    *no* (None: not known). Plain values: another process can compose them (the campaign
    benchmark composes in a pool)."""

    cells: list[grid.Cell]
    probs: list[float]
    model: np.ndarray | None
    method: str
    square: bool
    no_only: list[bool] | None = None

    def compose(self, pixels: np.ndarray) -> Composed:
        """The mask on the image's ``pixels`` (``ml.composition.compose_mask``)."""
        model = self.model
        if model is not None and model.shape != pixels.shape[:2]:
            model = None  # a prediction of another size (a replaced file): not evidence here
        return compose_mask(
            pixels,
            self.cells,
            self.probs,
            model=model,
            method=self.method,
            square=self.square,
            no_only=self.no_only,
        )


def mask_inputs(
    session: Session,
    *,
    settings: Settings,
    target: Target,
    cells: list[Cell] | None = None,
    leaves: _Leaves | None = None,
) -> MaskInputs:
    """The ``MaskInputs`` of a target with cells of its own (not a union); ``cells`` are its
    cells, loaded when not given, and ``leaves`` their ``_leaves``, read when not given."""
    project = session.get(Project, target.project_id)
    assert project is not None
    if leaves is None:
        if cells is None:
            cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
        leaves = _leaves(session, cells=cells)
    probs = leaves.probs
    if leaves.cells and tag_is_known(session, target=target):
        # People tagged the image: the object is there, if nothing claims it yet.
        probs = claim_known_object(probs, leaves.evidence).tolist()
    model = model_probability(session, settings, target)
    method = str(project.setting("composition"))
    return MaskInputs(
        leaves.cells, probs, model, method, square_cells(project), no_only=leaves.no_only
    )


def settled_soft(
    session: Session, *, settings: Settings, target: Target, image: Image
) -> np.ndarray | None:
    """The target's current soft mask where its finest cells are settled (``SETTLED_BY``), and
    0.5 (no confidence: nothing to learn) where they are still open: work in progress a model
    may learn from without hearing an open cell's votes twice, once as its prior and once as
    votes (one careless or hostile vote on an open square would come back as the model's
    opinion of it). None for a union (its children are learned) or with nothing settled.
    Shape: ``(H, W)`` float32."""
    if is_union(session, target=target):
        return None
    cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
    leaves = _leaves(session, cells=cells)
    if not any(leaves.settled):
        return None
    project = session.get(Project, target.project_id)
    assert project is not None
    plane, _ = grid.compose(
        leaves.cells,
        np.asarray(leaves.settled, dtype=np.float64),
        image.height,
        image.width,
        fill=0.0,
        square=square_cells(project),
    )
    inputs = mask_inputs(session, settings=settings, target=target, leaves=leaves)
    soft = inputs.compose(load_pixels(settings, image)).soft
    return np.where(plane > 0.5, soft, np.float32(0.5)).astype(np.float32)


def record_consensus_mask(
    session: Session,
    *,
    settings: Settings,
    target: Target,
    image: Image | None = None,
    cells: list[Cell] | None = None,
) -> Composed:
    """Compose the target's mask (``compose_target``) and keep it as its consensus mask."""
    composed = compose_target(session, settings=settings, target=target, image=image, cells=cells)
    add_mask_version(
        session,
        target=target,
        mask=composed.hard,
        soft=composed.soft,
        source=MaskSource.CONSENSUS,
        store=mask_store(settings),
        written=[],
    )
    return composed


def _union(
    session: Session,
    *,
    settings: Settings,
    children: list[Target],
    image: Image,
    pixels: np.ndarray | None,
    composed: dict[int, Composed] | None,
) -> Composed:
    """The union of the children's masks: a pixel is in it if it is in any of theirs (the soft
    mask: the most probable child's probability)."""
    if pixels is None:
        pixels = load_pixels(settings, image)
    parts = [
        compose_target(
            session, settings=settings, target=c, image=image, pixels=pixels, composed=composed
        )
        for c in children
    ]
    soft = np.maximum.reduce([p.soft for p in parts])
    hard = np.logical_or.reduce([p.hard for p in parts])
    return Composed(soft.astype(np.float32), hard)
