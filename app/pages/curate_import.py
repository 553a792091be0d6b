"""The curator's import page: upload a zip or tar of a folder of images with its tag file.

The upload is refused by its declared length before its body is read (413), then copied into a
private scratch folder and imported exactly as ``tessera import`` would: one transaction, and
on any refusal nothing stored (no rows, no files). The page shows the import's report.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.config import Settings
from app.deps import (
    CsrfChecked,
    CsrfTokenDep,
    CuratorChecked,
    CuratorDep,
    SessionDep,
    SettingsDep,
    UploadLengthChecked,
    WriteSessionDep,
    with_csrf_cookie,
)
from app.pages import templates
from app.services.archive import ARCHIVE_SUFFIXES, archive_suffix
from app.services.errors import ConflictError, InvalidInputError, NotFoundError
from app.services.import_formats import ImportFormatError
from app.services.importer import ImportReport, run_import
from app.services.project import list_project_summaries, slugify

router = APIRouter(include_in_schema=False)
# The role is checked before the upload's length, and both before its body is read.


def _render(
    request: Request,
    session: SessionDep,
    context: dict[str, Any],
    status_code: int = 200,
) -> HTMLResponse:
    context = {"projects": list_project_summaries(session), "suffixes": ARCHIVE_SUFFIXES, **context}
    response = templates.TemplateResponse(
        request, "curate_import.html", context, status_code=status_code
    )
    return with_csrf_cookie(request, response)


@router.get("/curate/import", response_class=HTMLResponse)
def import_page(
    request: Request, session: SessionDep, curator: CuratorDep, csrf: CsrfTokenDep
) -> HTMLResponse:
    return _render(request, session, {"account": curator, "csrf": csrf})


async def _save_upload(upload: UploadFile, settings: Settings, folder: Path) -> Path:
    name = Path(upload.filename or "").name
    suffix = archive_suffix(name)
    if not suffix:
        raise InvalidInputError(
            f"{name or 'the upload'} is not an archive: upload a {', '.join(ARCHIVE_SUFFIXES)} "
            "of a folder of images with its tag file or COCO annotations"
        )
    path = folder / f"upload{suffix}"
    with path.open("xb") as out:
        while chunk := await upload.read(1024 * 1024):
            out.write(chunk)
    return path


def _project_slug(form_value: object, new_value: object) -> str:
    raw = new_value if isinstance(new_value, str) and new_value.strip() else form_value
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInputError("choose a project or name a new one")
    slug = slugify(raw)
    if not slug:
        raise InvalidInputError(f"{raw!r} makes no project name: use letters or digits")
    return slug


@router.post(
    "/curate/import",
    response_class=HTMLResponse,
    dependencies=[CuratorChecked, UploadLengthChecked, CsrfChecked],
)
async def import_upload(
    request: Request,
    session: WriteSessionDep,
    settings: SettingsDep,
    curator: CuratorDep,
    csrf: CsrfTokenDep,
) -> HTMLResponse:
    form = await request.form(max_files=1, max_fields=8)
    context: dict[str, Any] = {"account": curator, "csrf": csrf}
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.scratch_dir))
    try:
        upload = form.get("archive")
        if not isinstance(upload, UploadFile):
            raise InvalidInputError("no archive was uploaded: choose a file")
        slug = _project_slug(form.get("project"), form.get("new_project"))
        path = await _save_upload(upload, settings, folder)
        # Unpacking, decoding and writing take seconds to minutes: in a worker thread, so that
        # the event loop goes on serving everyone else (run here, a 16 s import held /healthz
        # for 13.7 s).
        report: ImportReport = await run_in_threadpool(
            run_import, session, settings=settings, project_slug=slug, path=path, tag_file=None
        )
    except (ImportFormatError, InvalidInputError, ConflictError, NotFoundError) as exc:
        context["error"] = f"{exc}. Nothing was imported."
        return _render(request, session, context, status_code=_status(exc))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        await form.close()
    context["report"] = report
    return _render(request, session, context)


def _status(exc: Exception) -> int:
    return 409 if isinstance(exc, ConflictError) else 404 if isinstance(exc, NotFoundError) else 422
