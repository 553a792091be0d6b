"""Data commands: ``db``, ``import``, ``project``, ``consensus``, ``user``, ``export`` and
``aggregate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from app.cli.common import DEMO_PROJECT, app, console, err, fail, load_settings, sessions

if TYPE_CHECKING:
    from app.services.importer import ImportReport

db_app = typer.Typer(help="Database schema.")
project_app = typer.Typer(help="Projects.")
consensus_app = typer.Typer(help="Consensus.")
user_app = typer.Typer(help="Accounts of curators and admins.")
app.add_typer(db_app, name="db")
app.add_typer(project_app, name="project")
app.add_typer(consensus_app, name="consensus")
app.add_typer(user_app, name="user")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema to the newest revision."""
    from app.db import engine_for
    from app.migrate import current_revision, upgrade_to_head

    settings = load_settings()
    engine = engine_for(settings)
    upgrade_to_head(engine)
    console.print(f"database at revision [bold]{current_revision(engine)}[/]")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database."""
    from app.db import engine_for
    from app.migrate import current_revision

    engine = engine_for(load_settings(existing=True))
    console.print(current_revision(engine) or "empty (run `tessera db upgrade`)")


def print_report(report: ImportReport) -> None:
    table = Table(title=f"Import into {report.project!r}", show_header=False)
    for label, value in (
        ("images added", report.images_added),
        ("images already present", report.images_already_present),
        ("images skipped", len(report.skipped)),
        ("tags created", report.tags_created),
        ("image tags added", report.image_tags_added),
        ("targets created", report.targets_created),
        ("ground-truth masks", report.ground_truth_masks),
    ):
        table.add_row(label, str(value))
    console.print(table)
    for name, reason in report.skipped:
        err.print(f"[yellow]skipped[/] {name}: {reason}")
    for warning in report.warnings:
        err.print(f"[yellow]warning[/] {warning}")


@app.command("import")
def import_command(
    path: Annotated[
        Path, typer.Argument(help="a folder, a zip/tar of one, a tag file or a COCO JSON")
    ],
    project: Annotated[
        str | None,
        typer.Option(help="project slug (created if new); default: the folder's or archive's name"),
    ] = None,
    tags: Annotated[Path | None, typer.Option(help="tag file, if not tags.txt/csv/json")] = None,
) -> None:
    """Import images with their tags (Danbooru lines, CSV, JSON) and/or COCO masks."""
    from app.services.errors import ConflictError, InvalidInputError, NotFoundError
    from app.services.import_formats import ImportFormatError
    from app.services.importer import default_project_slug, run_import

    settings = load_settings()
    slug = project or default_project_slug(path)
    with sessions(settings)() as session:
        try:
            report = run_import(
                session, settings=settings, project_slug=slug, path=path, tag_file=tags
            )
        except (ImportFormatError, InvalidInputError, ConflictError, NotFoundError) as exc:
            raise fail(f"{exc}\nnothing was imported") from exc
    print_report(report)


@project_app.command("list")
def project_list() -> None:
    """List projects with their counts."""
    from app.services.project import list_project_summaries

    with sessions(load_settings(existing=True))() as session:
        summaries = list_project_summaries(session)
    table = Table("slug", "name", "images", "tags", "targets")
    for s in summaries:
        table.add_row(s.slug, s.name, str(s.images), str(s.tags), str(s.targets))
    console.print(table)


@project_app.command("set")
def project_set(
    slug: Annotated[str, typer.Argument(help="project slug")],
    key: Annotated[str, typer.Argument(help="setting name, e.g. acquisition or retrain")],
    value: Annotated[
        str, typer.Argument(help='JSON value, e.g. \'"random"\' or \'{"every": "6h"}\'')
    ],
) -> None:
    """Change one campaign setting of a project (checked before it is saved)."""
    from app.jobs.retrain import ACQUISITIONS
    from app.jobs.schedule import schedule_of
    from app.models.project import DEFAULT_PROJECT_SETTINGS
    from app.services.errors import NotFoundError
    from app.services.project import get_project, project_has_images
    from ml.composition import METHODS

    known = {*DEFAULT_PROJECT_SETTINGS, "retrain"}
    if key not in known:
        raise fail(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise fail(f"{value!r} is not JSON ({exc.msg}); quote strings: '\"random\"'") from exc
    if key == "acquisition" and parsed not in ACQUISITIONS:
        raise fail(f"acquisition must be one of {', '.join(ACQUISITIONS)}")
    if key == "composition" and parsed not in METHODS:
        raise fail(f"composition must be one of {', '.join(METHODS)}")
    with sessions(load_settings())() as session:
        try:
            project = get_project(session, slug=slug)
        except NotFoundError as exc:
            raise fail(str(exc)) from exc
        if key == "square_cells" and (
            not isinstance(parsed, bool) or project_has_images(session, project=project)
        ):
            raise fail(
                "square_cells is true or false, and is fixed once a project has images: "
                "its votes are stored by cell address, whose meaning it sets"
            )
        project.settings = {**(project.settings or {}), key: parsed}
        if key == "retrain":
            try:
                schedule_of(project)
            except ValueError as exc:
                raise fail(str(exc)) from exc
        session.commit()
    console.print(f"{slug}: {key} = {json.dumps(parsed)}")


@consensus_app.command("recompute")
def consensus_recompute(
    project: Annotated[str | None, typer.Option(help="project slug; default: all")] = None,
) -> None:
    """Re-estimate every posterior and credibility by full EM (banned volunteers left out)."""
    from app.services.errors import NotFoundError
    from app.services.project import get_project, list_project_summaries
    from app.services.recompute import recompute_project

    settings = load_settings()
    factory = sessions(settings, writer=True)
    with factory() as session:
        slugs = [project] if project else [s.slug for s in list_project_summaries(session)]
    for slug in slugs:
        with factory() as session:
            try:
                target = get_project(session, slug=slug)
            except NotFoundError as exc:
                raise fail(str(exc)) from exc
            report = recompute_project(session, settings=settings, project=target)
            session.commit()
        console.print(
            f"{slug}: {report.votes:,} votes on {report.cells:,} cells by "
            f"{report.volunteers:,} volunteers, {report.iterations} EM iterations, "
            f"{report.labels_changed} retired labels changed"
        )


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="login name")],
    role: Annotated[str, typer.Option(help="volunteer, curator or admin")] = "curator",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
) -> None:
    """Add an account; the password is asked for (twice) unless given on standard input."""
    from app.models import Role
    from app.services.account import create_account
    from app.services.errors import ConflictError, InvalidInputError

    try:
        chosen = Role(role)
    except ValueError:
        raise fail(f"unknown role {role!r}: volunteer, curator or admin") from None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with sessions(load_settings(), writer=True)() as session:
        try:
            create_account(session, name=name, password=password, role=chosen)
        except (ConflictError, InvalidInputError) as exc:
            raise fail(str(exc)) from exc
        session.commit()
    console.print(f"account [bold]{name}[/] added as {chosen}")


@user_app.command("set")
def user_set(
    name: Annotated[str, typer.Argument(help="login name")],
    role: Annotated[str | None, typer.Option(help="volunteer, curator or admin")] = None,
    disabled: Annotated[
        bool | None, typer.Option("--disable/--enable", help="refuse or allow its logins")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="a new password from standard input")
    ] = False,
    logout: Annotated[bool, typer.Option("--logout", help="only end its login sessions")] = False,
) -> None:
    """Change an account's role, password or whether it may log in. Any change ends the
    account's login sessions on every browser (``--logout`` does only that)."""
    from app.models import Role
    from app.services.account import find_account, revoke_sessions, update_account
    from app.services.errors import InvalidInputError

    try:
        chosen = Role(role) if role is not None else None
    except ValueError:
        raise fail(f"unknown role {role!r}: volunteer, curator or admin") from None
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if chosen is None and disabled is None and password is None and not logout:
        raise fail(
            "nothing to change: give --role, --disable/--enable, --password-stdin or --logout"
        )
    with sessions(load_settings(existing=True), writer=True)() as session:
        account = find_account(session, name=name)
        if account is None:
            raise fail(f"no account {name!r} (tessera user list shows them)")
        try:
            update_account(account, password=password, role=chosen, disabled=disabled)
        except InvalidInputError as exc:
            raise fail(str(exc)) from exc
        if logout:
            revoke_sessions(account)
        session.commit()
    console.print(f"account [bold]{name}[/] changed; its login sessions have ended")


@user_app.command("list")
def user_list() -> None:
    """List the accounts and their roles."""
    from app.services.account import list_accounts

    with sessions(load_settings(existing=True))() as session:
        table = Table("name", "role", "last login")
        for account in list_accounts(session):
            table.add_row(account.name, account.role, str(account.last_login_at or "never"))
    console.print(table)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="the .zip archive to write")],
    project: Annotated[str, typer.Option("--project", help="project slug")] = DEMO_PROJECT,
    tag: Annotated[str | None, typer.Option(help="only this tag")] = None,
    include_unfinished: Annotated[
        bool,
        typer.Option(
            "--include-unfinished",
            help="also the current masks of collecting and triage targets, under unfinished/ "
            'and marked "finished": false in annotations.json',
        ),
    ] = False,
) -> None:
    """Write finished masks: COCO instances (RLE), PNG masks and soft masks, in one zip.

    Fails (exit 2, nothing written) when there is no mask to export.
    """
    from app.services.errors import NotFoundError
    from app.services.masks.export import NothingToExportError, export_project
    from app.services.project import get_project

    settings = load_settings(existing=True)
    with sessions(settings)() as session:
        try:
            target = get_project(session, slug=project)
            report = export_project(
                session,
                settings=settings,
                project=target,
                out=out,
                tag=tag,
                include_unfinished=include_unfinished,
                allow_empty=False,
            )
        except NotFoundError as exc:
            raise fail(str(exc)) from exc
        except NothingToExportError as exc:
            hint = "" if include_unfinished else " (--include-unfinished exports work in progress)"
            raise fail(f"{exc}; nothing was written to {out}{hint}") from exc
    unfinished = f", {report.unfinished} of them unfinished" if include_unfinished else ""
    console.print(
        f"wrote {report.path}: {report.images} images, {report.annotations} annotations, "
        f"{report.masks} masks{unfinished}"
    )


@app.command(
    "aggregate",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def aggregate(ctx: typer.Context) -> None:
    """Aggregate a file of votes offline, or fuse several masks of one object (tessera aggregate
    --help lists the options)."""
    from app.cli.aggregate import run

    raise typer.Exit(run(list(ctx.args)))
