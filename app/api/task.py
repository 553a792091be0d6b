"""Grid tasks over JSON: get the next task, fetch its tiles, submit or skip it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Cookie, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.dbapi import Copies
from app.deps import (
    VOLUNTEER_COOKIE,
    KnownVolunteerDep,
    PicturesDep,
    RowId,
    SessionDep,
    SettingsDep,
    SignerDep,
    TaskCaller,
    TaskCallerDep,
    unit_of_work,
)
from app.models import Cell, Image, Project, Target, Task, TaskKind, TaskTile, Volunteer, Window
from app.schemas.task import (
    AnswerCreate,
    AnswerRead,
    SkipCreate,
    SubmissionCreate,
    SubmissionRead,
    TagView,
    TaskOffer,
    TaskRead,
    TileView,
)
from app.security import Signer, TaskClaims
from app.services.crowd.answer import skip, submit
from app.services.crowd.picker import Offer, TaskKindRequest, TooManyOpenTasks, next_task
from app.services.errors import ForbiddenError, NotFoundError
from app.services.project import get_project, square_cells
from app.services.tag import TagResolver
from app.services.tile import (
    DEFAULT_AUGMENTATION,
    PLAIN,
    render_context,
    render_tile,
    source_size,
    tile_seed,
    tile_size,
)
from ml.aggregation import grid

router = APIRouter(tags=["tasks"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The token is not one this server issued"},
    403: {"description": "The task belongs to another volunteer, or the volunteer is banned"},
    404: {"description": "No such project, tag or task"},
    410: {"description": "The task expired or was skipped"},
    422: {"description": "Malformed answers (e.g. tile positions out of range)"},
}


# Each target's image, as copies of their rows (``app.dbapi``), each with its target's id.
IMAGES = Copies(
    Image,
    select(*Image.__table__.c, Target.id)
    .join(Target, Target.image_id == Image.id)
    .where(Target.id.in_(bindparam("target_ids", expanding=True))),
)


def _images(session: SessionDep, cells: list[Cell]) -> dict[int, Image]:
    """Each cell's image, by target id, in one query (a statement built once)."""
    rows = IMAGES.with_extras(session, {"target_ids": sorted({c.target_id for c in cells})})
    return {target_id: image for image, (target_id,) in rows}


@dataclass(frozen=True)
class _Leased:
    """A leased task and the rows its response shows, read in the request's transaction; the
    response itself (tile geometry, the signed token, the models) is built after the commit, so
    that on SQLite the writer's turn is not held for work that needs no database."""

    offer: Offer
    images: dict[int, Image]  # by target id
    window: Window | None  # the context picture's window (``_context_window``)
    public_id: str
    square: bool

    def read(self, signer: Signer) -> TaskRead:
        return _task_read(signer, self)


def _leased(session: SessionDep, offer: Offer, public_id: str, *, square: bool) -> _Leased:
    return _Leased(
        offer=offer,
        images=_images(session, offer.cells),
        window=_context_window(session, offer.task, offer.window),
        public_id=public_id,
        square=square,
    )


def _task_read(signer: Signer, leased: _Leased) -> TaskRead:
    offer, images, window, square = leased.offer, leased.images, leased.window, leased.square
    task = offer.task
    tiles = []
    for position, cell in enumerate(offer.cells):
        width, height = tile_size(images[cell.target_id], cell, square=square)
        source_width, source_height = source_size(images[cell.target_id], cell, square=square)
        url = f"/api/tasks/{task.id}/tiles/{position}"
        tiles.append(
            TileView(
                position=position,
                url=url,
                width=width,
                height=height,
                source_width=source_width,
                source_height=source_height,
            )
        )
    return TaskRead(
        id=task.id,
        kind=task.kind.value,
        token=signer.task_token(
            TaskClaims(task.id, task.nonce, leased.public_id, len(offer.cells))
        ),
        expires_at=task.expires_at,
        tag=TagView(
            name=offer.tag.name,
            display_name=offer.tag.display_name,
            description=offer.tag.description,
        ),
        prompt=f"Select all squares with {offer.tag.display_name}",
        tiles=tiles,
        context_url=f"/api/tasks/{task.id}/context" if window is not None else None,
        # The area around a window a ninth of the image or less: the whole image shows it small.
        around_url=(
            f"/api/tasks/{task.id}/context?view=around"
            if window is not None and window.level >= AROUND_FROM_LEVEL
            else None
        ),
        fallback_reason=offer.fallback_reason,
    )


AROUND_FROM_LEVEL = 2


def _square(session: SessionDep, task: Task) -> bool:
    """Whether the task's project lays square cells (``project.square_cells``)."""
    project = session.get(Project, task.project_id)
    assert project is not None
    return square_cells(project)


def _context_window(session: SessionDep, task: Task, leased: Window | None = None) -> Window | None:
    """The window a task shows, when it has a context picture: a window task finer than the
    whole image (a mosaic's tiles come from many images; the first window is the image).
    ``leased``: the task's window, when the caller holds it already."""
    if task.kind != TaskKind.WINDOW or task.window_id is None:
        return None
    window = leased if leased is not None else session.get(Window, task.window_id)
    return window if window is not None and window.level > 0 else None


@router.get(
    "/projects/{slug}/tasks/next",
    response_model=TaskOffer,
    summary="Lease the most valuable task for the current volunteer",
    responses={404: ERRORS[404], 403: ERRORS[403]},
)
async def get_next_task(
    slug: str,
    caller: TaskCallerDep,
    tag: Annotated[str | None, Query(description="only this tag (name or alias)")] = None,
    kind: Annotated[Literal["auto", "window", "mosaic"], Query()] = "auto",
) -> TaskOffer:
    def lease() -> TaskOffer:
        with caller.unit() as session:
            volunteer = caller.volunteer(session)
            project = get_project(session, slug=slug, read_only=True)
            leased = _lease_next(session, caller, project, volunteer, tag, kind)
            session.commit()
        return _offered(caller.signer, leased)

    return await run_in_threadpool(lease)


NOTHING_LEFT = "Nothing left to ask right now. Thank you!"


def _lease_next(
    session: SessionDep,
    caller: TaskCaller,
    project: Project,
    volunteer: Volunteer,
    tag: str | None,
    kind: TaskKindRequest,
) -> _Leased | None:
    """Lease the most valuable task for ``volunteer`` (flushed, not committed; None: nothing
    left). Raises ``TooManyOpenTasks`` when the caller's address holds its cap of open tasks."""
    if volunteer.banned:
        raise ForbiddenError("this volunteer can no longer take part")
    tag_row = None
    if tag is not None:
        tag_row = TagResolver(session, project).find(tag)
        if tag_row is None:
            raise NotFoundError(f"no tag {tag!r} in project {project.slug!r}")
    offer = next_task(
        session,
        project=project,
        volunteer=volunteer,
        tag=tag_row,
        kind=kind,
        client=caller.client(),
    )
    if offer is None:
        return None
    return _leased(session, offer, volunteer.public_id, square=square_cells(project))


def _offered(signer: Signer, leased: _Leased | None) -> TaskOffer:
    """The response to a lease, built outside the transaction."""
    if leased is None:
        return TaskOffer(task=None, message=NOTHING_LEFT)
    return TaskOffer(task=leased.read(signer))


@router.post(
    "/projects/{slug}/tasks/answer",
    response_model=AnswerRead,
    summary="One request per grid: submit (or skip) the task in hand and lease the next",
    responses=ERRORS,
)
async def post_answer(slug: str, body: AnswerCreate, caller: TaskCallerDep) -> AnswerRead:
    """The answer and the next lease in one transaction: acknowledged once both are committed.
    A refused answer (expired, not this volunteer's, malformed) fails the whole request and
    leases nothing."""

    def answer() -> AnswerRead:
        with caller.unit() as session:
            volunteer = caller.volunteer(session)
            project = get_project(session, slug=slug, read_only=True)
            read = AnswerRead()
            if body.submit is not None:
                read.submission = _submit(session, caller, project, volunteer, body.submit)
            elif body.skip is not None:
                skip(
                    session,
                    signer=caller.signer,
                    project=project,
                    volunteer=volunteer,
                    token=body.skip.token,
                )
            leased: _Leased | None = None
            if body.next:
                try:
                    leased = _lease_next(session, caller, project, volunteer, body.tag, body.kind)
                    if leased is None:
                        read.message = NOTHING_LEFT
                except TooManyOpenTasks as exc:  # the answer stands; the next lease waits
                    read.message = str(exc)
            session.commit()
        if leased is not None:  # the response, once the transaction is over
            read.task = leased.read(caller.signer)
        return read

    read = await run_in_threadpool(answer)
    if read.submission is not None:
        await caller.fuser.answered()
    return read


def _submit(
    session: Session,
    caller: TaskCaller,
    project: Project,
    volunteer: Volunteer,
    body: SubmissionCreate,
) -> SubmissionRead:
    """Store one task's answers (flushed, not committed)."""
    result = submit(
        session,
        settings=caller.settings,
        signer=caller.signer,
        project=project,
        volunteer=volunteer,
        token=body.token,
        selected=body.selected,
        elapsed_ms=body.elapsed_ms,
    )
    return SubmissionRead.model_validate(result)


# A tile's source in one statement, the owner check part of it: the cell and image of the
# task's tile, the task's nonce and its project, if the task is this volunteer's.
TILE_SOURCE = (
    select(Cell, Image, Task.nonce, Project)
    .select_from(TaskTile)
    .join(Task, Task.id == TaskTile.task_id)
    .join(Volunteer, Volunteer.id == Task.volunteer_id)
    .join(Cell, Cell.id == TaskTile.cell_id)
    .join(Target, Target.id == Cell.target_id)
    .join(Image, Image.id == Target.image_id)
    .join(Project, Project.id == Task.project_id)
    .where(
        TaskTile.task_id == bindparam("task_id"),
        TaskTile.position == bindparam("position"),
        Volunteer.public_id == bindparam("public_id"),
    )
)
NO_TILE = "no such task for this volunteer"


@router.get(
    "/tasks/{task_id}/tiles/{position}",
    response_class=Response,
    summary="One tile of a task (JPEG), for the volunteer it was given to",
    responses={200: {"content": {"image/jpeg": {}}, "description": "The tile"}, 404: ERRORS[404]},
)
async def get_tile(
    task_id: RowId,
    position: Annotated[int, Path(ge=0, le=8, description="tile position, 0-8 row-major")],
    request: Request,
    settings: SettingsDep,
    signer: SignerDep,
    pictures: PicturesDep,
    cookie: Annotated[str | None, Cookie(alias=VOLUNTEER_COOKIE)] = None,
) -> Response:
    """Nine of these come with every grid, so the path is lean: the volunteer is the signed
    cookie's (checked without the database), a tile rendered before is served from memory, and
    a new one costs one statement and one hop to a worker thread."""
    public_id = signer.read_volunteer_cookie(cookie)
    if public_id is None:
        raise NotFoundError(NO_TILE)
    pictures.limiter.hit(public_id)
    key = ("tile", task_id, position, public_id)  # the owner in the key: a hit is theirs
    jpeg = pictures.cache.peek(key)
    if jpeg is None:
        factory = request.app.state.session_factory

        def render() -> bytes:
            with unit_of_work(factory) as session:
                params = {"task_id": task_id, "position": position, "public_id": public_id}
                row = session.execute(TILE_SOURCE, params).one_or_none()
                if row is None:
                    raise NotFoundError(NO_TILE)
                cell, image, nonce, project = row
                square = square_cells(project)
                session.expunge_all()  # kept as read; the connection goes back before rendering
            augmentation = DEFAULT_AUGMENTATION if settings.tile_augmentation else PLAIN
            return render_tile(
                settings,
                image,
                cell,
                seed=tile_seed(nonce, position, signer.tile_key),
                square=square,
                augmentation=augmentation,
            )

        jpeg = await run_in_threadpool(pictures.cache.get, key, render)
    return Response(
        jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"}
    )


@router.get(
    "/tasks/{task_id}/context",
    response_class=Response,
    summary="Where a task's window is in its image (JPEG), for the volunteer it was given to",
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "The picture"},
        404: ERRORS[404],
    },
)
def get_context(
    task_id: RowId,
    session: SessionDep,
    settings: SettingsDep,
    pictures: PicturesDep,
    volunteer: KnownVolunteerDep,
    view: Annotated[
        Literal["image", "around"],
        Query(description="the whole image, or the area around the window"),
    ] = "image",
) -> Response:
    task = session.get(Task, task_id)
    if task is None or volunteer is None or task.volunteer_id != volunteer.id:
        raise NotFoundError("no such task for this volunteer")
    pictures.limit(volunteer)
    jpeg = pictures.cache.get(
        ("context", task_id, view), lambda: _render_context(session, settings, task, view)
    )
    return Response(
        jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"}
    )


def _render_context(session: SessionDep, settings: SettingsDep, task: Task, view: str) -> bytes:
    task_id = task.id
    window = _context_window(session, task)
    image = None
    if window is not None:
        image = session.scalar(
            select(Image)
            .join(Target, Target.image_id == Image.id)
            .where(Target.id == window.target_id)
        )
    if window is None or image is None:
        raise NotFoundError(f"task {task_id} shows no window within an image")
    # The nine squares shown: the window's children, or a block shifted over its neighbours.
    cells = session.scalars(
        select(Cell).join(TaskTile, TaskTile.cell_id == Cell.id).where(TaskTile.task_id == task.id)
    )
    area = grid.cells_rect(
        [grid.Cell(c.level, c.row, c.col) for c in cells],
        image.height,
        image.width,
        square=_square(session, task),
    )
    return render_context(settings, image, area, around=view == "around")


@router.post(
    "/projects/{slug}/tasks/submit",
    response_model=SubmissionRead,
    summary="Submit the squares the volunteer selected (idempotent per token)",
    responses=ERRORS,
)
async def post_submission(
    slug: str, body: SubmissionCreate, caller: TaskCallerDep
) -> SubmissionRead:
    def store() -> SubmissionRead:
        with caller.unit() as session:
            volunteer = caller.volunteer(session)
            read = _submit(session, caller, get_project(session, slug=slug), volunteer, body)
            session.commit()
            return read

    read = await run_in_threadpool(store)
    await caller.fuser.answered()
    return read


@router.post(
    "/projects/{slug}/tasks/skip",
    status_code=204,
    summary="Give a task back unanswered",
    responses=ERRORS,
)
async def post_skip(slug: str, body: SkipCreate, caller: TaskCallerDep) -> None:
    def give_back() -> None:
        with caller.unit() as session:
            volunteer = caller.volunteer(session)
            project = get_project(session, slug=slug)
            skip(
                session,
                signer=caller.signer,
                project=project,
                volunteer=volunteer,
                token=body.token,
            )
            session.commit()

    await run_in_threadpool(give_back)
