"""What every ``tessera`` command shares: the root app, consoles, settings, the engine, errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:  # a command imports what it uses when it runs: `tessera --help` stays quick
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from app.config import Settings

app = typer.Typer(help="Tessera: tagged images to segmentation masks, with a crowd in the loop.")

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT = 2
DEMO_PROJECT = "demo"

Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
ProjectOption = Annotated[str, typer.Option("--project", help="project slug")]


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print ``message`` as an error; the caller raises what this returns."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.callback()
def main_options(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="the data folder (images, masks, models; the SQLite database by default); "
            "else TESSERA_DATA_DIR, else ./tessera-data",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="the database (e.g. postgresql+psycopg://...); else TESSERA_DATABASE_URL, "
            "else SQLite in the data folder",
        ),
    ] = None,
) -> None:
    """Tessera: tagged images to segmentation masks, with a crowd in the loop."""
    # Through the environment: the settings read it, and so do the processes a command starts
    # (the scheduler's retrains, `serve --scheduler`).
    if data_dir is not None:
        os.environ["TESSERA_DATA_DIR"] = str(data_dir)
    if database_url is not None:
        os.environ["TESSERA_DATABASE_URL"] = database_url


def load_settings(*, existing: bool = False) -> Settings:
    """The settings, after a line on stderr saying which data folder and database a command
    uses. ``existing``: a command that only reads refuses a data folder or SQLite database that
    is not there, instead of creating an empty one (a mistyped --data-dir)."""
    from sqlalchemy.engine import make_url

    from app.config import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        raise fail(str(exc)) from exc
    database = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    err.print(f"[dim]data folder {settings.data_dir.resolve()} · database {database}[/]")
    if existing:
        missing = not settings.data_dir.is_dir()
        if settings.is_sqlite:
            database_file = Path(make_url(settings.resolved_database_url).database or "")
            missing = missing or not database_file.is_file()
        if missing:
            raise fail(
                f"there is no Tessera data in {settings.data_dir.resolve()}: give the right "
                "--data-dir (or TESSERA_DATA_DIR); this command reads only, so it created nothing"
            )
    return settings


def ready_engine(settings: Settings) -> Engine:
    """An engine on an up-to-date schema: SQLite is upgraded in place, others must be."""
    from app.db import engine_for
    from app.migrate import current_revision, head_revision, is_at_head, upgrade_to_head

    engine = engine_for(settings)
    if settings.is_sqlite:
        upgrade_to_head(engine)
    elif not is_at_head(engine):
        raise fail(
            f"the database is at revision {current_revision(engine)!r}, not the newest "
            f"{head_revision(settings.resolved_database_url)!r}: run `tessera db upgrade` first"
        )
    return engine


def sessions(settings: Settings, *, writer: bool = False) -> sessionmaker[Session]:
    """Sessions on ``ready_engine`` (``writer``: serialised writers on SQLite)."""
    from app.db import make_session_factory

    return make_session_factory(ready_engine(settings), writer=writer)
