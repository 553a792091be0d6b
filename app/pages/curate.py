"""The curator's workspace: login, the triage queue, one target, volunteers, export.

Every route checks the role (``CuratorDep``/``AdminDep``: 401 without a login, 403 with too
small a role), and every state-changing form is CSRF-checked. Forms post and redirect back
(post/redirect/get), so the pages work without JavaScript.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.deps import (
    AccountDep,
    AdminDep,
    CsrfChecked,
    CsrfTokenDep,
    CuratorChecked,
    CuratorDep,
    RowId,
    SessionDep,
    SettingsDep,
    SignerDep,
    WriteSessionDep,
    client_address,
    set_private_cookie,
    unit_of_work,
    with_csrf_cookie,
)
from app.models import Account, Image, MaskVersion, Project, Role, Tag, Target, TargetState
from app.pages import templates
from app.pages.charts import line_chart
from app.ratelimit import LoginLimits, RateLimitExceeded
from app.security import SESSION_COOKIE, SESSION_MAX_AGE_S
from app.services.account import (
    check_password,
    create_account,
    credentials_of,
    list_accounts,
    record_login,
    rehashed,
    revoke_sessions,
)
from app.services.curation.browse import SORTS, browse_targets
from app.services.curation.mask_edit import (
    MAX_MASK_BYTES,
    add_curator_tag,
    decode_painted_mask,
    save_painted_mask,
)
from app.services.curation.objects import (
    METHODS,
    choices,
    load_object_index,
    objects_of_image,
    search_objects,
)
from app.services.curation.quality import quality_series
from app.services.curation.triage import (
    accept_target,
    get_target,
    reject_target,
    set_cell,
    target_view,
    triage_queue,
    triage_reasons,
)
from app.services.curation.volunteer_review import (
    get_volunteer_by_id,
    projects_of_volunteer,
    review_volunteers,
    unban_volunteer,
)
from app.services.dashboard import project_dashboard
from app.services.errors import InvalidInputError, NotFoundError, UnauthorizedError
from app.services.files import mask_file
from app.services.image import image_path
from app.services.masks.composition import compose_target
from app.services.masks.export import export_project
from app.services.project import get_project, list_project_summaries
from app.services.recompute import recompute_project
from app.services.similar import similar_images
from app.services.volunteer import ban_volunteer
from app.storage import encode_mask_png

router = APIRouter(include_in_schema=False)


def _page(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    return with_csrf_cookie(request, response)


def _safe_next(target: str | None) -> str:
    """Only local paths: a login form must not bounce the curator to another site."""
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/curate"


def _back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request, csrf: CsrfTokenDep, account: AccountDep, next: str | None = None
) -> HTMLResponse:
    return _page(
        request,
        "login.html",
        {"csrf": csrf, "next": _safe_next(next), "account": account, "error": None},
    )


@router.post("/login", dependencies=[CsrfChecked], response_model=None)
def login(
    request: Request,
    signer: SignerDep,
    csrf: CsrfTokenDep,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str | None, Form()] = None,
) -> HTMLResponse | RedirectResponse:
    """Within the login limits (``LoginLimits``): the account read in a short transaction, the
    password checked with no database connection held (argon2: 64 MiB and both cores for a
    tenth of a second, one login at a time), then the login written in a short transaction."""
    limits: LoginLimits = request.app.state.login_limits
    name = name.strip()
    try:
        limits.attempts.hit(client_address(request))
        limits.failures.check(name.lower())
        with unit_of_work(request.app.state.session_factory) as read:
            credentials = credentials_of(read, name=name)
        try:
            account_id = check_password(credentials, password)
        except UnauthorizedError:
            limits.failures.hit(name.lower())
            raise
    except (UnauthorizedError, RateLimitExceeded) as exc:
        refused = _page(
            request,
            "login.html",
            {"csrf": csrf, "next": _safe_next(next), "account": None, "error": str(exc)},
            status_code=401 if isinstance(exc, UnauthorizedError) else 429,
        )
        if isinstance(exc, RateLimitExceeded):
            refused.headers["Retry-After"] = str(exc.retry_after_s)
        return refused
    new_hash = rehashed(credentials, password)
    with unit_of_work(request.app.state.write_session_factory) as write:
        account = record_login(write, account_id=account_id, new_hash=new_hash)
        write.commit()
    response = _back(_safe_next(next) if account.role != Role.VOLUNTEER else "/")
    set_private_cookie(
        request,
        response,
        SESSION_COOKIE,
        signer.session_cookie(account.id, account.session_epoch),
        max_age=SESSION_MAX_AGE_S,
    )
    return response


@router.post("/logout", dependencies=[CsrfChecked])
def logout(session: WriteSessionDep, account: AccountDep) -> RedirectResponse:
    """Log out: the account's login sessions end on the server too (a copy of the cookie stops
    working), not only in this browser."""
    if account is not None:
        row = session.get(Account, account.id)  # the write session's copy
        if row is not None:
            revoke_sessions(row)
            session.commit()
    response = _back("/login")
    response.delete_cookie(SESSION_COOKIE)
    return response


def _project(session: SessionDep, slug: str | None) -> Project | None:
    if slug:
        return get_project(session, slug=slug)
    summaries = list_project_summaries(session)
    return get_project(session, slug=summaries[0].slug) if summaries else None


@router.get("/curate", response_class=HTMLResponse)
def queue(
    request: Request,
    session: SessionDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    project: str | None = None,
    tag: str | None = None,
    reason: str | None = None,
) -> HTMLResponse:
    current = _project(session, project)
    items = triage_queue(session, project=current, tag=tag, reason=reason) if current else []
    return _page(
        request,
        "curate.html",
        {
            "account": curator,
            "csrf": csrf,
            "projects": list_project_summaries(session),
            "project": current,
            "items": items,
            "reasons": triage_reasons(session, project=current) if current else [],
            "tag": tag or "",
            "reason": reason or "",
        },
    )


@router.get("/curate/targets", response_class=HTMLResponse)
def targets_page(
    request: Request,
    session: SessionDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    project: str | None = None,
    tag: str | None = None,
    state: str | None = None,
    image: str | None = None,
    sort: str = "uncertainty",
    page: int = 1,
) -> HTMLResponse:
    current = _project(session, project)
    found = (
        browse_targets(
            session, project=current, tag=tag, state=state, image=image, sort=sort, page=page
        )
        if current
        else None
    )
    tags = (
        list(
            session.scalars(select(Tag.name).where(Tag.project_id == current.id).order_by(Tag.name))
        )
        if current
        else []
    )
    filters = {"project": current.slug if current else "", "tag": tag or "", "state": state or ""}
    filters |= {"image": image or "", "sort": sort}
    return _page(
        request,
        "curate_targets.html",
        {
            "account": curator,
            "csrf": csrf,
            "projects": list_project_summaries(session),
            "project": current,
            "found": found,
            "tags": tags,
            "states": [s.value for s in TargetState],
            "sorts": SORTS,
            "filters": filters,
            "query": lambda **changes: urlencode({**filters, **changes}),
        },
    )


@router.get("/curate/targets/{target_id}", response_class=HTMLResponse)
def target_page(
    request: Request,
    target_id: RowId,
    session: SessionDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    level: int | None = None,
) -> HTMLResponse:
    view = target_view(session, target=get_target(session, target_id=target_id), level=level)
    return _page(request, "curate_target.html", {"account": curator, "csrf": csrf, "view": view})


@router.get("/curate/images/{target_id}")
def target_image(
    target_id: RowId, session: SessionDep, settings: SettingsDep, _curator: CuratorDep
) -> FileResponse:
    view = target_view(session, target=get_target(session, target_id=target_id))
    return FileResponse(
        image_path(settings, view.image), headers={"Cache-Control": "private, max-age=3600"}
    )


@router.get("/curate/files/{image_id}")
def image_file(
    image_id: RowId, session: SessionDep, settings: SettingsDep, _curator: CuratorDep
) -> FileResponse:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"no image {image_id}")
    return FileResponse(
        image_path(settings, image), headers={"Cache-Control": "private, max-age=3600"}
    )


@router.get("/curate/objects/{image_id}", response_class=HTMLResponse)
def objects_page(
    request: Request,
    image_id: RowId,
    session: SessionDep,
    settings: SettingsDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    row: Annotated[int | None, Query(ge=0, alias="object")] = None,
    to: str | None = None,
    method: str = "learned",
) -> HTMLResponse:
    """Search at the object level: click an object of the image, then find images with an
    object like it, optionally with one attribute changed ("this star, but in blue")."""
    image = session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"no image {image_id}")
    project = session.get(Project, image.project_id)
    assert project is not None
    context: dict[str, Any] = {
        "account": curator,
        "csrf": csrf,
        "image": image,
        "chosen": None,
        "hits": [],
        "choices": [],
        "to": to or "",
        "method": method,
        "methods": METHODS,
        "objects": [],
        "missing": None,
    }
    try:
        index = load_object_index(settings, project=project)
    except NotFoundError as exc:
        context["missing"] = str(exc)
        return _page(request, "curate_objects.html", context, status_code=404)
    context["objects"] = objects_of_image(index, image_id=image_id)
    if row is not None:
        chosen, hits = search_objects(
            session, settings, project=project, image_id=image_id, row=row, to=to, method=method
        )
        context.update(chosen=chosen, hits=hits, choices=choices(index, row=row))
    return _page(request, "curate_objects.html", context)


@router.get("/curate/similar/{image_id}", response_class=HTMLResponse)
def similar_page(
    request: Request,
    image_id: RowId,
    session: SessionDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    swap_from: str | None = None,
    swap_to: str | None = None,
) -> HTMLResponse:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"no image {image_id}")
    project = session.get(Project, image.project_id)
    assert project is not None
    swap = (swap_from, swap_to) if swap_from and swap_to else None  # both, or a plain search
    hits = similar_images(session, project=project, image_id=image_id, swap=swap)
    tags = sorted(
        session.scalars(select(Tag.name).where(Tag.project_id == project.id)), key=str.lower
    )
    return _page(
        request,
        "curate_similar.html",
        {
            "account": curator,
            "csrf": csrf,
            "image": image,
            "hits": hits,
            "tags": tags,
            "swap_from": swap_from or "",
            "swap_to": swap_to or "",
        },
    )


@router.get("/curate/masks/{version_id}.png")
def mask_png(
    version_id: RowId, session: SessionDep, settings: SettingsDep, _curator: CuratorDep
) -> FileResponse:
    version = session.get(MaskVersion, version_id)
    if version is None:
        raise NotFoundError(f"no mask version {version_id}")
    return FileResponse(
        mask_file(settings, version.hard_path),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=86400"},  # versions never change
    )


@router.get("/curate/targets/{target_id}/current.png")
def current_mask_png(
    target_id: RowId,
    session: SessionDep,
    settings: SettingsDep,
    _curator: CuratorDep,
    soft: bool = False,
) -> Response:
    """The target's mask composed now (hard, or ``?soft=true`` for the probability), in the
    format of ``mask_png``: the PNG ``encode_mask_png`` writes for stored versions."""
    target = get_target(session, target_id=target_id)
    composed = compose_target(session, settings=settings, target=target)
    return Response(
        encode_mask_png(composed.soft if soft else composed.hard),
        media_type="image/png",
        headers={"Cache-Control": "no-store"},  # it changes with every vote
    )


def _image_and_project(session: Session, target: Target) -> tuple[Image, Project]:
    image, project = session.get(Image, target.image_id), session.get(Project, target.project_id)
    assert image is not None and project is not None  # foreign keys
    return image, project


# The login first: the CSRF check reads a form without the header, and this one is an upload.
@router.post("/curate/targets/{target_id}/mask", dependencies=[CuratorChecked, CsrfChecked])
async def save_mask(
    target_id: RowId,
    session: WriteSessionDep,
    settings: SettingsDep,
    curator: CuratorDep,
    mask: Annotated[UploadFile, File(description="the painted mask, a PNG the image's size")],
) -> RedirectResponse:
    data = await mask.read(MAX_MASK_BYTES + 1)

    def save() -> None:  # decoding, composing and writing: off the event loop
        target = get_target(session, target_id=target_id)
        image, project = _image_and_project(session, target)
        pixels = decode_painted_mask(data, height=image.height, width=image.width)
        save_painted_mask(
            session,
            settings=settings,
            project=project,
            target=target,
            mask=pixels,
            curator=curator.name,
        )
        session.commit()

    await run_in_threadpool(save)
    return _back(f"/curate/targets/{target_id}")


@router.post("/curate/targets/{target_id}/tags", dependencies=[CsrfChecked])
def add_tag(
    target_id: RowId,
    session: WriteSessionDep,
    settings: SettingsDep,
    _curator: CuratorDep,
    tag: Annotated[str, Form()],
) -> RedirectResponse:
    target = get_target(session, target_id=target_id)
    image, project = _image_and_project(session, target)
    added = add_curator_tag(session, settings=settings, project=project, image=image, name=tag)
    session.commit()
    return _back(f"/curate/targets/{added.id}")


@router.post("/curate/targets/{target_id}/cells/{cell_id}", dependencies=[CsrfChecked])
def set_cell_route(
    target_id: RowId,
    cell_id: RowId,
    session: WriteSessionDep,
    curator: CuratorDep,
    label: Annotated[str, Form()],
    level: Annotated[int | None, Form()] = None,
) -> RedirectResponse:
    if label not in ("yes", "no"):
        raise InvalidInputError("label must be 'yes' or 'no'")
    target = get_target(session, target_id=target_id)
    set_cell(session, target=target, cell_id=cell_id, label=label == "yes", curator=curator.name)
    session.commit()
    back = f"/curate/targets/{target_id}"
    return _back(f"{back}?level={level}" if level is not None else back)


def _next_item(session: SessionDep, project: Project) -> str:
    items = triage_queue(session, project=project, limit=1)
    if items:
        return f"/curate/targets/{items[0].target_id}"
    return "/curate?" + urlencode({"project": project.slug})


@router.post("/curate/targets/{target_id}/{decision}", dependencies=[CsrfChecked])
def decide(
    target_id: RowId,
    decision: str,
    session: WriteSessionDep,
    settings: SettingsDep,
    curator: CuratorDep,
) -> RedirectResponse:
    if decision not in ("accept", "reject"):
        raise NotFoundError(f"no decision {decision!r}: accept or reject")
    target = get_target(session, target_id=target_id)
    project = session.get(Project, target.project_id)
    assert project is not None
    decide_fn = accept_target if decision == "accept" else reject_target
    decide_fn(session, settings=settings, project=project, target=target, curator=curator.name)
    session.commit()
    return _back(_next_item(session, project))


PRIMARY_METRICS = {"tagger": "map", "segmenter": "miou"}


@router.get("/curate/dashboard", response_class=HTMLResponse)
def dashboard_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    project: str | None = None,
) -> HTMLResponse:
    current = _project(session, project)
    board = project_dashboard(session, settings=settings, project=current) if current else None
    charts = []
    if board is not None and current is not None:
        charts.append(
            line_chart(
                quality_series(session, project=current),
                title="Mask quality against human effort (evaluation targets, per tag)",
                x_label="human-seconds per evaluation target (recorded by each retrain)",
                y_label="mean IoU",
                y_range=(0.0, 1.0),
            )
        )
        charts.append(
            line_chart(
                {"mean IoU": board.gold_iou},
                title="Mask IoU on gold",
                x_label="targets completed",
                y_label="mean IoU",
                y_range=(0.0, 1.0),
            )
        )
        charts.append(
            line_chart(
                {"human-seconds": [(t / 60, h) for t, h in board.effort]},
                title="Human-seconds spent",
                x_label="minutes since the first answer",
                y_label="human-seconds",
            )
        )
        by_kind: dict[str, list[tuple[float, float]]] = {}
        for m in board.models:
            metric = PRIMARY_METRICS.get(m.kind)
            if metric in m.metrics:
                by_kind.setdefault(f"{m.kind} {metric}", []).append((m.version, m.metrics[metric]))
        charts.append(
            line_chart(
                by_kind,
                title="Model metrics by version",
                x_label="version",
                y_label="score",
                y_range=(0.0, 1.0),
            )
        )
    return _page(
        request,
        "curate_dashboard.html",
        {
            "account": curator,
            "csrf": csrf,
            "projects": list_project_summaries(session),
            "project": current,
            "board": board,
            "charts": charts,
        },
    )


@router.get("/curate/volunteers", response_class=HTMLResponse)
def volunteers_page(
    request: Request,
    session: SessionDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
    project: str | None = None,
) -> HTMLResponse:
    current = get_project(session, slug=project) if project else None
    return _page(
        request,
        "curate_volunteers.html",
        {
            "account": curator,
            "csrf": csrf,
            "rows": review_volunteers(session, project=current),
            "projects": list_project_summaries(session),
            "project": current,
        },
    )


@router.post("/curate/volunteers/{volunteer_id}/{action}", dependencies=[CsrfChecked])
def ban_route(
    volunteer_id: RowId,
    action: str,
    session: WriteSessionDep,
    settings: SettingsDep,
    curator: CuratorDep,
    reason: Annotated[str, Form()] = "",
) -> RedirectResponse:
    volunteer = get_volunteer_by_id(session, volunteer_id=volunteer_id)
    if action == "ban":
        ban_volunteer(session, volunteer=volunteer, reason=reason or f"banned by {curator.name}")
    elif action == "unban":
        unban_volunteer(session, volunteer=volunteer)
    else:
        raise NotFoundError(f"no action {action!r}: ban or unban")
    session.flush()
    for project_id in projects_of_volunteer(session, volunteer=volunteer):
        project = session.get(Project, project_id)
        assert project is not None
        recompute_project(session, settings=settings, project=project)
    session.commit()
    return _back("/curate/volunteers")


@router.get("/curate/export/{slug}.zip")
def export_download(
    slug: str,
    session: SessionDep,
    settings: SettingsDep,
    _curator: CuratorDep,
    tag: str | None = None,
) -> FileResponse:
    project = get_project(session, slug=slug)
    folder = Path(tempfile.mkdtemp(prefix="tessera-export-"))
    out = folder / f"{slug}.zip"
    export_project(session, settings=settings, project=project, out=out, tag=tag or None)

    def cleanup() -> None:
        out.unlink(missing_ok=True)
        folder.rmdir()

    return FileResponse(
        out,
        media_type="application/zip",
        filename=f"tessera-{slug}{'-' + tag if tag else ''}.zip",
        background=BackgroundTask(cleanup),
    )


@router.get("/admin/accounts", response_class=HTMLResponse)
def accounts_page(
    request: Request, session: SessionDep, admin: AdminDep, csrf: CsrfTokenDep
) -> HTMLResponse:
    return _page(
        request,
        "admin_accounts.html",
        {"account": admin, "csrf": csrf, "accounts": list_accounts(session), "roles": list(Role)},
    )


@router.post("/admin/accounts", dependencies=[CsrfChecked])
def add_account(
    session: WriteSessionDep,
    _admin: AdminDep,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    role: Annotated[str, Form()],
) -> RedirectResponse:
    try:
        chosen = Role(role)
    except ValueError:
        raise InvalidInputError(f"unknown role {role!r}") from None
    create_account(session, name=name.strip(), password=password, role=chosen)
    session.commit()
    return _back("/admin/accounts")
