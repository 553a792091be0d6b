"""The task picker: the most valuable open work for one volunteer, leased to them.

Value of a window = its target's priority x how sure we are its tag is there at all (1 unless the
tagger guessed it) x the expected gain in mask quality of one answer: the uncertainty of its open
cells x their area relative to the object's expected area (``opening.window_value``,
``ml.aggregation.acquisition``). A volunteer never sees a cell they already answered. Known
tiles keep at least a gold rate of what a volunteer answers, the project's for a newcomer, less
for one proven on gold, more for a doubtful one (``gold_rate_for``):
window tasks whose cells are all gold, or mosaics of known-true, known-false and unknown tiles of
one tag (3-5-1 by default, reCAPTCHA's mix), served only as known tiles that are due. An unknown
window is leased to one volunteer at a time by a compare-and-set on its lease (with ``SKIP LOCKED``
on PostgreSQL, serialised writers on SQLite); an abandoned lease simply runs out. A volunteer
holds at most ``open_tasks_per_volunteer`` window leases at once: a new lease gives the oldest
window back (its task may still be answered, for a page that kept answers while offline).
"""

from __future__ import annotations

import functools
import random
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import (
    BigInteger,
    Select,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from app.db import as_utc, utcnow
from app.dbapi import Copies, Prepared
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Credibility,
    Gold,
    Project,
    Tag,
    Target,
    Task,
    TaskKind,
    TaskState,
    TaskTile,
    Volunteer,
    Vote,
    Window,
    WindowState,
)
from app.services.crowd.opening import outside_image
from ml.aggregation.acquisition import best_block, uncertainty

TaskKindRequest = Literal["auto", "window", "mosaic"]
TILES = 9
CANDIDATE_TRIES = 5


# The task's tag, as a copy of its row (``app.dbapi``): shown, never changed here.
TAG = Copies(Tag).where(Tag.id == bindparam("tag_id"))


@dataclass
class Offer:
    task: Task
    tag: Tag
    cells: list[Cell]  # in tile order
    fallback_reason: str | None = None
    known: list[bool] = field(default_factory=list)
    window: Window | None = None  # the window leased (held here: the session keeps it weakly)


def _answered_by(volunteer: Volunteer, cell_id_column: object) -> object:
    return exists().where(Vote.volunteer_id == volunteer.id, Vote.cell_id == cell_id_column)


# The share of known tiles adapts to what a volunteer's gold answers have shown: a proven
# volunteer (PROVEN_GOLD gold answers, Youden's J on them at least PROVEN_J) sees a quarter of
# the project's gold rate (enough to notice one who turns careless), a doubtful one (J under
# DOUBTFUL_J after DOUBTFUL_GOLD answers) twice it, a newcomer the rate itself.
PROVEN_GOLD, PROVEN_J, PROVEN_SHARE = 30, 0.8, 0.25
DOUBTFUL_GOLD, DOUBTFUL_J, DOUBTFUL_SHARE = 10, 0.5, 2.0


GOLD_COUNTS = Prepared(
    select(
        Credibility.gold_tp, Credibility.gold_fn, Credibility.gold_tn, Credibility.gold_fp
    ).where(Credibility.volunteer_id == bindparam("volunteer_id"), Credibility.category == "")
)


def gold_rate_for(session: Session, volunteer: Volunteer, gold_rate: float) -> float:
    """The share of known tiles this volunteer should see now (see ``PROVEN_GOLD``)."""
    row = GOLD_COUNTS.run(session, {"volunteer_id": volunteer.id}).first()
    if row is None:
        return gold_rate
    tp, fn, tn, fp = row
    answers = tp + fn + tn + fp
    # Beta(1, 1) posterior means of sensitivity and specificity on gold alone.
    j = (1 + tp) / (2 + tp + fn) + (1 + tn) / (2 + tn + fp) - 1.0
    if answers >= PROVEN_GOLD and j >= PROVEN_J:
        return gold_rate * PROVEN_SHARE
    if answers >= DOUBTFUL_GOLD and j < DOUBTFUL_J:
        return min(1.0, gold_rate * DOUBTFUL_SHARE)
    return gold_rate


SHUFFLE_MODULUS = 1_000_003


def shuffled(column: Any, salt: Any = None) -> Any:
    """An ORDER BY key that shuffles rows by their integer ``column``: a multiplicative hash
    salted from Python's ``random``, where the database's ``random()`` cannot be seeded (a
    simulated campaign with a seed runs the same twice). ``salt``: a bound parameter for a
    statement built once (its caller binds ``random.randrange(SHUFFLE_MODULUS)``); by default
    a salt drawn now."""
    if salt is None:
        salt = literal(random.randrange(SHUFFLE_MODULUS), BigInteger)
    # 64-bit arithmetic: PostgreSQL would overflow an integer column times the multiplier.
    return (cast(column, BigInteger) * literal(2654435761, BigInteger) + salt) % SHUFFLE_MODULUS


def needs_known(volunteer: Volunteer, gold_rate: float) -> bool:
    """Whether the next task must be known, so that the volunteer's share of known tiles stays
    at or above ``gold_rate`` even after it: looking one task ahead, not only at the past."""
    return volunteer.known_served < gold_rate * (volunteer.tiles_served + TILES)


@functools.cache
def _window_candidates(*, known: bool, with_tag: bool) -> Select[Any]:
    """Open windows of one kind that the volunteer answered no square of (and, unknown ones,
    not leased to someone else now): a statement built once per kind, its values bound per call
    (``_candidate_values``)."""
    # Window's nine cells first, then a vote of this volunteer on each (an index probe): the
    # join the other way round walked all of the volunteer's votes for every open window
    # (40-80 ms at 2,000 votes each in the soak; 0.5 ms this way).
    voted = select(Vote.id).where(
        Vote.volunteer_id == bindparam("volunteer_id"), Vote.cell_id == Cell.id
    )
    answered = select(Cell.id).where(Cell.window_id == Window.id, voted.exists()).exists()
    query = select(Window.id).where(
        Window.project_id == bindparam("project_id"),
        Window.state == WindowState.OPEN,
        Window.known == known,
        ~answered,
    )
    if with_tag:
        query = query.where(Window.tag_id == bindparam("tag_id"))
    if not known:
        query = query.where(
            or_(Window.leased_until.is_(None), Window.leased_until < bindparam("now"))
        )
    return query


def _candidate_values(
    project: Project, volunteer: Volunteer, tag: Tag | None, now: datetime
) -> dict[str, Any]:
    values: dict[str, Any] = {"project_id": project.id, "volunteer_id": volunteer.id, "now": now}
    if tag is not None:
        values["tag_id"] = tag.id
    return values


LEASE = Prepared(
    update(Window)
    .where(
        Window.id == bindparam("window_id"),
        Window.state == WindowState.OPEN,
        or_(Window.leased_until.is_(None), Window.leased_until < bindparam("now")),
    )
    .values(leased_until=bindparam("until"), leased_by=bindparam("volunteer_id"))
)


def _lease(
    session: Session, window: Window, volunteer: Volunteer, now: datetime, until: datetime
) -> Window | None:
    """Lease one open window to ``volunteer`` by a compare-and-set on its lease."""
    leased = LEASE.run(
        session, {"window_id": window.id, "now": now, "until": until, "volunteer_id": volunteer.id}
    )
    if leased.rowcount != 1:
        return None
    # The row as this statement left it, without reading it again.
    set_committed_value(window, "leased_until", until)
    set_committed_value(window, "leased_by", volunteer.id)
    return window


def _lease_until(project: Project, now: datetime) -> datetime:
    return now + timedelta(seconds=int(project.setting("lease_seconds")))


@functools.cache
def _unknown_candidate(*, with_tag: bool) -> Copies[Window]:
    """The most valuable free window, as a copy of its row (its lease is set after the CAS,
    unread)."""
    return Copies(
        Window,
        _window_candidates(known=False, with_tag=with_tag)
        .with_only_columns(*Window.__table__.c)
        # Both descending: the picker index hands windows over in this order (SQLite keeps the
        # rowid last in an index), so the walk stops at the first free window instead of
        # testing every open one and sorting them (8.6 -> 0.9 ms on a 20-image demo).
        .order_by(Window.value.desc(), Window.id.desc())
        .limit(1)
        .with_for_update(skip_locked=True, of=Window),
    )


def _random_candidate(*, with_tag: bool) -> Select[Any]:
    """Any open window of a target being collected, drawn uniformly (``acquisition``
    ``random``: the baseline that tells what choosing the questions is worth), a control
    target's only when none is left, as by value (``opening.CONTROL_WINDOW_WEIGHT``: drawn
    among them, 72% of a campaign's grids went to control squares whose truth is known). Not
    cached: each call draws its own shuffle. A scan of the open windows, not the index walk: a
    baseline for experiments, not for a crowd."""
    return (
        _window_candidates(known=False, with_tag=with_tag)
        .with_only_columns(Window)
        .join(Target, Target.id == Window.target_id)
        .order_by(Target.control, shuffled(Window.id))
        .limit(1)
        .with_for_update(skip_locked=True, of=Window)
        .execution_options(populate_existing=True)
    )


def _lease_unknown_window(
    session: Session, project: Project, volunteer: Volunteer, tag: Tag | None, now: datetime
) -> Window | None:
    """The open window worth most (``Window.value``), or a random one where the project's
    acquisition is ``random``, leased to ``volunteer``."""
    random_order = project.setting("acquisition") == "random"
    values = _candidate_values(project, volunteer, tag, now)
    for _ in range(CANDIDATE_TRIES):
        if random_order:
            window = session.scalar(_random_candidate(with_tag=tag is not None), values)
        else:
            window = _unknown_candidate(with_tag=tag is not None).first(session, values)
        if window is None:
            return None
        if _lease(session, window, volunteer, now, _lease_until(project, now)) is not None:
            return window
    return None


def _known_window(
    session: Session, project: Project, volunteer: Volunteer, tag: Tag | None, now: datetime
) -> Window | None:
    """A random known window this volunteer has not seen, one that holds both known-true and
    known-false cells first: an answer to it checks both of their error rates. (An all-object
    window says nothing of a volunteer's specificity, an all-background one nothing of their
    sensitivity; measured, a volunteer's first known task was often a window of nine known-true
    cells, and their specificity stayed at the prior.)"""
    values = _candidate_values(project, volunteer, tag, now)
    values.pop("now")
    values["salt"] = random.randrange(SHUFFLE_MODULUS)
    return _known_candidate(with_tag=tag is not None).first(session, values)


@functools.cache
def _known_candidate(*, with_tag: bool) -> Copies[Window]:
    """The statement of ``_known_window``, built once (its shuffle's salt bound per call)."""

    def holds(label: bool) -> Any:
        return (
            select(Gold.id)
            .join(Cell, Cell.id == Gold.cell_id)
            .where(Cell.window_id == Window.id, Gold.label.is_(label), Gold.frozen.is_(False))
            .exists()
        )

    mixed = case((holds(True) & holds(False), 0), else_=1)
    return Copies(
        Window,
        _window_candidates(known=True, with_tag=with_tag)
        .with_only_columns(*Window.__table__.c)
        .order_by(mixed, shuffled(Window.id, salt=bindparam("salt")))
        .limit(1),
    )


# A window's cells as copies of their rows (``app.dbapi``): the picker only reads them.
WINDOW_CELLS = Copies(
    Cell,
    select(*Cell.__table__.c)
    .where(Cell.window_id == bindparam("window_id"))
    .order_by(Cell.row, Cell.col),
)
GOLD_IDS = Prepared(
    select(Gold.cell_id).where(
        Gold.cell_id.in_(bindparam("cell_ids", expanding=True)), Gold.frozen.is_(False)
    )
)


def _window_cells(session: Session, window: Window) -> list[Cell]:
    return WINDOW_CELLS.run(session, {"window_id": window.id})


def _gold_ids(session: Session, *, window_cells: list[int]) -> set[int]:
    return set(GOLD_IDS.run(session, {"cell_ids": window_cells}).scalars())


TASK_COLUMNS = (
    "project_id",
    "volunteer_id",
    "tag_id",
    "kind",
    "window_id",
    "nonce",
    "state",
    "issued_at",
    "expires_at",
    "client",
)
INSERT_TASK = Prepared(insert(Task).returning(Task.id), columns=TASK_COLUMNS)
INSERT_TILES = Prepared(
    insert(TaskTile.metadata.tables[TaskTile.__tablename__]),
    columns=("task_id", "position", "cell_id", "known"),
)
COUNT_SERVED = Prepared(
    update(Volunteer)
    .where(Volunteer.id == bindparam("volunteer_id"))
    .values(
        tiles_served=Volunteer.tiles_served + bindparam("tiles"),
        known_served=Volunteer.known_served + bindparam("known"),
    )
)


def _new_task(
    session: Session,
    *,
    project: Project,
    volunteer: Volunteer,
    tag_id: int,
    kind: TaskKind,
    window: Window | None,
    cells: list[Cell],
    known: list[bool],
    now: datetime,
    client: str | None,
) -> Task:
    values = {
        "project_id": project.id,
        "volunteer_id": volunteer.id,
        "tag_id": tag_id,
        "kind": kind,
        "window_id": window.id if window is not None else None,
        "nonce": secrets.token_hex(16),
        "state": TaskState.LEASED,
        "issued_at": now,
        "expires_at": _lease_until(project, now),
        "client": client,
    }
    # Rows written as rows (no unit of work to flush); the task handed back is a plain copy.
    task_id = INSERT_TASK.run(session, values).scalar()
    INSERT_TILES.run(
        session,
        [
            {"task_id": task_id, "position": i, "cell_id": c.id, "known": k}
            for i, (c, k) in enumerate(zip(cells, known, strict=True))
        ],
    )
    served, known_served = volunteer.tiles_served + len(cells), volunteer.known_served + sum(known)
    COUNT_SERVED.run(
        session, {"volunteer_id": volunteer.id, "tiles": len(cells), "known": sum(known)}
    )
    set_committed_value(volunteer, "tiles_served", served)
    set_committed_value(volunteer, "known_served", known_served)
    return Task(id=task_id, **values)


def _window_offer(
    session: Session,
    project: Project,
    volunteer: Volunteer,
    tag: Tag | None,
    now: datetime,
    *,
    want_known: bool,
    client: str | None = None,
    pack: bool = False,
) -> Offer | None:
    """A window task (a known window when ``want_known``), or with ``pack`` a mosaic of its
    open squares and other windows' last ones where it has few open (``_packed``)."""
    window = _known_window(session, project, volunteer, tag, now) if want_known else None
    window = window or _lease_unknown_window(session, project, volunteer, tag, now)
    if window is None and not want_known:
        window = _known_window(session, project, volunteer, tag, now)
    if window is None:
        return None
    cells = _window_cells(session, window)
    kind = TaskKind.WINDOW
    if not window.known and window.level > 0:
        cells = _shifted_block(session, window, cells, volunteer, now)
    if pack and not window.known:
        packed = _packed(
            session,
            window,
            cells,
            volunteer,
            now,
            int(project.setting("pack_below")),
            by_value=project.setting("acquisition") != "random",
        )
        if packed is not None:
            cells, kind = packed, TaskKind.MOSAIC
    gold = _gold_ids(session, window_cells=[c.id for c in cells])
    known = [c.id in gold for c in cells]
    task = _new_task(
        session,
        project=project,
        volunteer=volunteer,
        tag_id=window.tag_id,
        kind=kind,
        window=window,
        cells=cells,
        known=known,
        now=now,
        client=client,
    )
    tag_row = TAG.first(session, {"tag_id": window.tag_id})
    assert tag_row is not None
    return Offer(task=task, tag=tag_row, cells=cells, known=known, window=window)


# The cells of a window and the eight around it (``_shifted_block``): each with whether the
# volunteer answered it, its posterior, and its window's kind and lease.
NEIGHBOURHOOD = Copies(
    Cell,
    select(
        *Cell.__table__.c,
        select(Vote.id)
        .where(Vote.volunteer_id == bindparam("volunteer_id"), Vote.cell_id == Cell.id)
        .exists(),
        Consensus.posterior,
        Window.known,
        Window.leased_by,
        Window.leased_until,
    )
    .join(Window, Window.id == Cell.window_id)
    .outerjoin(Consensus, Consensus.cell_id == Cell.id)
    .where(
        Cell.target_id == bindparam("target_id"),
        Cell.level == bindparam("level"),
        Cell.row.between(bindparam("top"), bindparam("bottom")),
        Cell.col.between(bindparam("left"), bindparam("right")),
    ),
)


def _shifted_block(
    session: Session, window: Window, cells: list[Cell], volunteer: Volunteer, now: datetime
) -> list[Cell]:
    """The window's nine cells, or the block of nine same-level cells shifted over its
    neighbours that answers every open square of the windows it touches and is worth more
    (``acquisition.best_block``): once some of a window's squares are settled, a grid of it
    spends a volunteer's ten seconds on fewer open squares (often one or two). Cells of another
    volunteer's leased window, of a known window, or that this volunteer answered are not
    shown; the task keeps the window's lease."""
    if all(c.status == CellStatus.OPEN or outside_image(c) for c in cells):
        return cells  # nothing settled yet: the window is the best grid there
    # The window and the eight around it, on their own 9x9 lattice (the window at 3..5).
    level, top, left = window.level + 1, window.row * 3 - 3, window.col * 3 - 3
    values = {
        "target_id": window.target_id,
        "level": level,
        "top": top,
        "bottom": top + 8,
        "left": left,
        "right": left + 8,
        "volunteer_id": volunteer.id,
    }
    gain, usable = np.zeros((9, 9)), np.zeros((9, 9), dtype=bool)
    owner = np.full((9, 9), -1, dtype=np.int64)
    by_place: dict[tuple[int, int], Cell] = {}
    for cell, (answered, posterior, known, leased_by, leased_until) in NEIGHBOURHOOD.with_extras(
        session, values
    ):
        r, c = cell.row - top, cell.col - left
        by_place[(r, c)], owner[r, c] = cell, cell.window_id or -1
        if cell.status == CellStatus.OPEN:
            gain[r, c] = max(float(uncertainty([0.5 if posterior is None else posterior])[0]), 1e-9)
        leased = leased_until is not None and as_utc(leased_until) > as_utc(now)
        usable[r, c] = not (
            answered or known or outside_image(cell) or (leased and leased_by != volunteer.id)
        )
    r0, c0 = best_block(gain, usable, owner, (3, 3))
    if (r0, c0) == (3, 3):
        return cells
    return [by_place[(r0 + i, c0 + j)] for i in range(3) for j in range(3)]


def _packed(
    session: Session,
    window: Window,
    cells: list[Cell],
    volunteer: Volunteer,
    now: datetime,
    below: int,
    *,
    by_value: bool = True,
) -> list[Cell] | None:
    """The open squares of this grid and the last open squares of other windows of its tag, as
    one grid of nine (a mosaic), when the grid has fewer than ``below`` open squares (the
    project's ``pack_below``); None when it has more, or when no other window has a square to
    add.

    A window is served until its last square settles, and a first window (the whole image)
    cannot shift over its neighbours as a finer one does (``_shifted_block``): on a demo crowd
    campaign 18% of the votes on first squares came after the square had settled, a whole
    grid of ten seconds bought for the one or two squares still split. Other windows' stragglers
    are squares of windows nearly done (fewer than ``below`` open), not leased to someone
    else, that this volunteer has not answered, worth most first; where there are too few, the
    grid's own settled squares fill the nine places, as its window showed them."""
    pending = [c for c in cells if c.status == CellStatus.OPEN and not outside_image(c)]
    if not pending or len(pending) >= below:
        return None
    values = {
        "tag_id": window.tag_id,
        "project_id": window.project_id,
        "volunteer_id": volunteer.id,
        "now": now,
        "shown": [c.id for c in cells],
        "below": below,
        "limit": TILES,
    }
    extra = list(session.scalars(_stragglers(by_value=by_value), values))
    if not extra:
        return None
    packed = pending + extra[: TILES - len(pending)]
    # Short of stragglers: the grid's own settled squares fill it, as the window showed them.
    packed += [c for c in cells if c not in pending][: TILES - len(packed)]
    random.shuffle(packed)
    return packed


def _stragglers(*, by_value: bool) -> Select[Any]:
    """Other windows' last open squares (``_packed``): worth most first, or ``by_value``
    False in a random order (the ``random`` acquisition baseline chooses nothing by value).
    The first is built once; the random order draws a fresh shuffle per call."""
    if by_value:
        return _STRAGGLERS_BY_VALUE
    return _straggler_query().order_by(shuffled(Cell.id)).limit(bindparam("limit"))


def _straggler_query() -> Select[Any]:
    sibling = aliased(Cell)
    open_count = (
        select(func.count(sibling.id))
        .where(sibling.window_id == Window.id, sibling.status == CellStatus.OPEN)
        .correlate(Window)
        .scalar_subquery()
    )
    voted = select(Vote.id).where(
        Vote.volunteer_id == bindparam("volunteer_id"), Vote.cell_id == Cell.id
    )
    return (
        select(Cell)
        .join(Window, Window.id == Cell.window_id)
        .where(
            Window.project_id == bindparam("project_id"),
            Window.tag_id == bindparam("tag_id"),
            Window.state == WindowState.OPEN,
            Window.known.is_(False),
            or_(
                Window.leased_until.is_(None),
                Window.leased_until < bindparam("now"),
                Window.leased_by == bindparam("volunteer_id"),
            ),
            Cell.status == CellStatus.OPEN,
            Cell.id.not_in(bindparam("shown", expanding=True)),
            ~voted.exists(),
            open_count < bindparam("below"),
        )
    )


_STRAGGLERS_BY_VALUE = (
    _straggler_query().order_by(Window.value.desc(), Cell.id).limit(bindparam("limit"))
)


MOSAIC_SAMPLE = 8  # gold cells drawn per tile wanted, to find enough distinct targets


def _gold_cells(
    session: Session,
    project: Project,
    volunteer: Volunteer,
    tag: Tag,
    label: bool,
    n: int,
    used_targets: set[int],
) -> list[Cell]:
    """Known tiles for a mosaic, one per target not in ``used_targets`` (which grows) as far as
    the project allows, from fully known or closed windows first: a window that still has
    cells to ask becomes one this volunteer cannot be given once they saw a tile of it."""
    query = (
        select(Cell)
        .join(Gold, Gold.cell_id == Cell.id)
        .join(Window, Window.id == Cell.window_id)
        .where(
            Gold.project_id == project.id,
            Gold.tag_id == tag.id,
            Gold.label == label,
            Gold.frozen.is_(False),
            ~_answered_by(volunteer, Cell.id),  # type: ignore[operator]
        )
        .order_by(or_(Window.known, Window.state == WindowState.CLOSED).desc(), shuffled(Cell.id))
        .limit(n * MOSAIC_SAMPLE)
    )
    sample = list(session.scalars(query))
    chosen: list[Cell] = []
    for cell in sample:  # one tile per target while there are enough targets
        if cell.target_id not in used_targets and len(chosen) < n:
            used_targets.add(cell.target_id)
            chosen.append(cell)
    for cell in sample:  # a small project: more tiles of targets already shown
        if cell not in chosen and len(chosen) < n:
            chosen.append(cell)
    return chosen


def _mosaic_offer(
    session: Session,
    project: Project,
    volunteer: Volunteer,
    tag: Tag | None,
    now: datetime,
    client: str | None = None,
) -> tuple[Offer | None, str | None]:
    """A mosaic, or None and why not (then the caller falls back to a window task)."""
    mix = project.setting("mosaic_mix")
    window = _lease_unknown_window(session, project, volunteer, tag, now)
    if window is None:
        return None, "no open unknown cell to mix into a mosaic"
    tag_row = TAG.first(session, {"tag_id": window.tag_id})
    assert tag_row is not None
    used = {window.target_id}  # tiles from different targets, none from the unknown's
    true_cells = _gold_cells(
        session, project, volunteer, tag_row, True, int(mix["known_true"]), used
    )
    false_cells = _gold_cells(
        session, project, volunteer, tag_row, False, int(mix["known_false"]), used
    )
    # The window's cells are all new to this volunteer (the candidate query saw to it).
    unknown = [c for c in _window_cells(session, window) if c.status == CellStatus.OPEN]
    unknown = unknown[: max(1, TILES - len(true_cells) - len(false_cells))]
    if len(true_cells) < int(mix["known_true"]) or len(false_cells) < int(mix["known_false"]):
        RELEASE_WINDOWS.run(session, {"window_ids": [window.id], "volunteer_id": volunteer.id})
        return None, (
            f"not enough gold for {tag_row.name!r} yet: {len(true_cells)} known-true and "
            f"{len(false_cells)} known-false cells left for you, a mosaic needs "
            f"{mix['known_true']} and {mix['known_false']}; serving a window task instead"
        )
    tiles = [(c, True) for c in true_cells + false_cells] + [(c, False) for c in unknown]
    random.shuffle(tiles)
    cells, known = [c for c, _ in tiles], [k for _, k in tiles]
    task = _new_task(
        session,
        project=project,
        volunteer=volunteer,
        tag_id=tag_row.id,
        kind=TaskKind.MOSAIC,
        window=window,
        cells=cells,
        known=known,
        now=now,
        client=client,
    )
    return Offer(task=task, tag=tag_row, cells=cells, known=known, window=window), None


OPEN_LEASES = Prepared(
    select(Task.window_id)
    .where(
        Task.volunteer_id == bindparam("volunteer_id"),
        Task.state == TaskState.LEASED,
        Task.expires_at > bindparam("now"),
        Task.window_id.is_not(None),
    )
    .order_by(Task.issued_at.desc(), Task.id.desc())
)
RELEASE_WINDOWS = Prepared(
    update(Window)
    .where(
        Window.id.in_(bindparam("window_ids", expanding=True)),
        Window.leased_by == bindparam("volunteer_id"),
    )
    .values(leased_until=None, leased_by=None)
)


def release_older_leases(
    session: Session, *, volunteer: Volunteer, keep: int, now: datetime
) -> list[int]:
    """Give back the window leases of the volunteer's open tasks past the ``keep`` newest:
    others may be served those windows now. The tasks themselves stay answerable until they
    expire: a page that kept answers while offline sends them later, and they must count.
    Returns the windows given back (those still held)."""
    rows = OPEN_LEASES.run(session, {"volunteer_id": volunteer.id, "now": now}).scalars()
    windows = [w for w in rows if w is not None]
    older = [w for w in windows[max(keep, 0) :] if w not in windows[: max(keep, 0)]]
    if not older:
        return []
    RELEASE_WINDOWS.run(session, {"window_ids": older, "volunteer_id": volunteer.id})
    return older


OPEN_FROM_CLIENT = Prepared(
    select(func.count(Task.id)).where(
        Task.client == bindparam("client"),
        Task.state == TaskState.LEASED,
        Task.expires_at > bindparam("now"),
    )
)


class TooManyOpenTasks(Exception):
    """The volunteer's address holds as many open tasks as it may (``Client``)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Client:
    """Where a task request came from: a keyed hash of its address, and how many open tasks
    that address may hold (0: no cap)."""

    key: str
    open_tasks: int


def next_task(
    session: Session,
    *,
    project: Project,
    volunteer: Volunteer,
    tag: Tag | None = None,
    kind: TaskKindRequest = "auto",
    now: datetime | None = None,
    client: Client | None = None,
) -> Offer | None:
    """Lease the most valuable task for this volunteer, or None when nothing is left to ask.
    Raises ``TooManyOpenTasks`` when the ``client``'s address holds its cap of open tasks."""
    now = now or utcnow()
    # One task more is about to be leased: the volunteer keeps at most the cap in all.
    cap = int(project.setting("open_tasks_per_volunteer"))
    release_older_leases(session, volunteer=volunteer, keep=cap - 1, now=now)
    if client is not None and client.open_tasks > 0:
        held = OPEN_FROM_CLIENT.run(session, {"client": client.key, "now": now}).scalar() or 0
        if held >= client.open_tasks:
            raise TooManyOpenTasks(
                f"this address holds {held} tasks nobody has answered yet, the most it may: "
                "answer or skip one first",
                int(project.setting("lease_seconds")),
            )
    key = client.key if client is not None else None
    # A mosaic spends eight known tiles on one unknown: in "auto" it is one way of serving the
    # known tiles a volunteer is due (the other is a known window), never a task of its own.
    due = needs_known(
        volunteer, gold_rate_for(session, volunteer, float(project.setting("gold_rate")))
    )
    want_mosaic = kind == "mosaic" or (
        kind == "auto" and due and random.random() < float(project.setting("mosaic_share"))
    )
    reason = None
    if want_mosaic:
        offer, reason = _mosaic_offer(session, project, volunteer, tag, now, key)
        if offer is not None:
            return offer
    # A client that asks for a window gets one; "auto" may pack a nearly done window's last
    # squares with others' into a mosaic.
    offer = _window_offer(
        session, project, volunteer, tag, now, want_known=due, client=key, pack=kind == "auto"
    )
    if offer is not None and kind == "mosaic":
        offer.fallback_reason = reason
    return offer
