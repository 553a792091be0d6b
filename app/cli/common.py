"""What every ``tessera`` command shares: the root app, consoles, settings, the engine, errors."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy import Engine

from app.config import Settings, SettingsError, get_settings
from app.db import engine_for
from app.migrate import current_revision, head_revision, is_at_head, upgrade_to_head

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


def load_settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        raise fail(str(exc)) from exc


def ready_engine(settings: Settings) -> Engine:
    """An engine on an up-to-date schema: SQLite is upgraded in place, others must be."""
    engine = engine_for(settings)
    if settings.is_sqlite:
        upgrade_to_head(engine)
    elif not is_at_head(engine):
        raise fail(
            f"the database is at revision {current_revision(engine)!r}, not the newest "
            f"{head_revision(settings.resolved_database_url)!r}: run `tessera db upgrade` first"
        )
    return engine
