"""Maintenance commands: ``tessera doctor``, ``tessera backup`` and ``tessera restore``.

Registered on the root ``tessera`` app (``app.cli.common.app``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import app, console, err, fail, load_settings, sessions

EXIT_UNHEALTHY = 1


@app.command("doctor")
def doctor_command(
    fix: Annotated[
        bool, typer.Option("--repair", help="remove crash debris older than --grace")
    ] = False,
    grace: Annotated[
        float | None,
        typer.Option(help="seconds a file must be old to count as debris (an hour)", min=0),
    ] = None,
) -> None:
    """Check that the database and the data folder agree; exit 1 when something is wrong."""
    from app.services.doctor import DEFAULT_GRACE_S, check, repair

    grace = DEFAULT_GRACE_S if grace is None else grace
    settings = load_settings(existing=True)
    with sessions(settings)() as session:
        result = check(session, settings=settings)
    if fix:
        repair(result, settings=settings, grace_s=grace)
    removed = set(result.repaired)
    for label, paths in (("temporary", result.temporary), ("orphan", result.orphans)):
        for debris in paths:
            state = "removed" if debris in removed else "found"
            (console if debris in removed else err).print(f"{state} {label} file {debris}")
    for line in (*result.missing, *result.database):
        err.print(f"[bold red]damaged[/] {line}")
    console.print(
        f"{len(result.temporary)} temporary and {len(result.orphans)} orphan files "
        f"({len(removed)} removed, {result.young} younger than {grace:.0f} s kept), "
        f"{len(result.missing)} missing files, database check "
        f"{'ok' if not result.database else 'FAILED'}"
    )
    if not result.healthy:
        hint = "" if fix else "; `tessera doctor --repair` removes debris"
        err.print(f"not healthy{hint}; missing files need a restore from backup")
        raise typer.Exit(EXIT_UNHEALTHY)


@app.command("backup")
def backup_command(
    out: Annotated[Path, typer.Argument(help="the backup to write: .tar, .tar.gz or .tgz")],
) -> None:
    """Back up the database and the files it names into one archive (safe while serving)."""
    from app.services.backup import create_backup
    from app.services.errors import ConflictError

    settings = load_settings(existing=True)
    if not out.name.endswith((".tar", ".tar.gz", ".tgz")):
        raise fail(f"{out}: name the backup .tar, .tar.gz or .tgz")
    with sessions(settings)() as session:
        try:
            report = create_backup(session, settings=settings, out=out)
        except ConflictError as exc:
            raise fail(str(exc), code=EXIT_UNHEALTHY) from exc
    console.print(
        f"backed up {sum(report.rows.values()):,} rows of {len(report.rows)} tables and "
        f"{report.files:,} files ({report.bytes / 1e6:.1f} MB) to {report.path}"
    )


@app.command("restore")
def restore_command(
    archive: Annotated[Path, typer.Argument(help="a backup written by `tessera backup`")],
) -> None:
    """Restore a backup into an empty database and data folder (all or nothing)."""
    from app.services.backup import restore_backup
    from app.services.errors import ConflictError, InvalidInputError

    settings = load_settings()
    if not archive.is_file():
        raise fail(f"{archive} does not exist")
    factory = sessions(settings)
    settings.ensure_dirs()
    with factory() as session:
        try:
            counts = restore_backup(session, settings=settings, archive=archive)
        except (InvalidInputError, ConflictError) as exc:
            raise fail(f"{exc}\nnothing was restored") from exc
    console.print(f"restored {sum(counts.values()):,} rows of {len(counts)} tables")
