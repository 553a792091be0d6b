"""The ``tessera`` command."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.config import Settings, SettingsError, get_settings
from app.db import engine_for, make_session_factory
from app.migrate import current_revision, head_revision, is_at_head, upgrade_to_head
from app.services.errors import ConflictError, InvalidInputError, NotFoundError
from app.services.import_formats import ImportFormatError
from app.services.importer import ImportReport, import_path, remove_files
from app.services.project import (
    create_project,
    find_project,
    get_or_create_project,
    get_project,
    list_project_summaries,
    slugify,
)

app = typer.Typer(help="Tessera: tagged images to segmentation masks, with a crowd in the loop.")
db_app = typer.Typer(help="Database schema.")
project_app = typer.Typer(help="Projects.")
consensus_app = typer.Typer(help="Consensus.")
app.add_typer(db_app, name="db")
app.add_typer(project_app, name="project")
app.add_typer(consensus_app, name="consensus")

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT = 2
DEMO_PROJECT = "demo"
DEMO_SETTINGS = {"min_cell_px": 5, "max_level": 4}


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        raise _fail(str(exc)) from exc


def _ready_engine(settings: Settings) -> Engine:
    """An engine on an up-to-date schema: SQLite is upgraded in place, others must be."""
    engine = engine_for(settings)
    if settings.is_sqlite:
        upgrade_to_head(engine)
    elif not is_at_head(engine):
        raise _fail(
            f"the database is at revision {current_revision(engine)!r}, not the newest "
            f"{head_revision(settings.resolved_database_url)!r}: run `tessera db upgrade` first"
        )
    return engine


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema to the newest revision."""
    settings = _settings()
    engine = engine_for(settings)
    upgrade_to_head(engine)
    console.print(f"database at revision [bold]{current_revision(engine)}[/]")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database."""
    engine = engine_for(_settings())
    console.print(current_revision(engine) or "empty (run `tessera db upgrade`)")


def _print_report(report: ImportReport) -> None:
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


def run_import(
    session: Session, *, settings: Settings, project_slug: str, path: Path, tag_file: Path | None
) -> ImportReport:
    """Import and commit once; on any failure nothing stays: rows rolled back, files removed."""
    report: ImportReport | None = None
    try:
        project = get_or_create_project(session, slug=project_slug)
        report = import_path(
            session, settings=settings, project=project, path=path, tag_file=tag_file
        )
        session.commit()
    except BaseException:
        session.rollback()
        if report is not None:
            remove_files(report.files_written)
        raise
    return report


@app.command("import")
def import_command(
    path: Annotated[Path, typer.Argument(help="a folder, a tag file or a COCO instances JSON")],
    project: Annotated[
        str | None, typer.Option(help="project slug (created if new); default: folder name")
    ] = None,
    tags: Annotated[Path | None, typer.Option(help="tag file, if not tags.txt/csv/json")] = None,
) -> None:
    """Import images with their tags (Danbooru lines, CSV, JSON) and/or COCO masks."""
    settings = _settings()
    engine = _ready_engine(settings)
    slug = project or slugify(path.resolve().name if path.is_dir() else path.resolve().parent.name)
    with make_session_factory(engine)() as session:
        try:
            report = run_import(
                session, settings=settings, project_slug=slug, path=path, tag_file=tags
            )
        except (ImportFormatError, InvalidInputError, ConflictError, NotFoundError) as exc:
            raise _fail(f"{exc}\nnothing was imported") from exc
    _print_report(report)
    if report.images_added + report.images_already_present == 0:
        raise _fail("no image could be imported", code=1)


@project_app.command("list")
def project_list() -> None:
    """List projects with their counts."""
    engine = _ready_engine(_settings())
    with make_session_factory(engine)() as session:
        summaries = list_project_summaries(session)
    table = Table("slug", "name", "images", "tags", "targets")
    for s in summaries:
        table.add_row(s.slug, s.name, str(s.images), str(s.tags), str(s.targets))
    console.print(table)


@consensus_app.command("recompute")
def consensus_recompute(
    project: Annotated[str | None, typer.Option(help="project slug; default: all")] = None,
) -> None:
    """Re-estimate every posterior and credibility by full EM (banned volunteers left out)."""
    from app.services.recompute import recompute_project

    settings = _settings()
    factory = make_session_factory(_ready_engine(settings), writer=True)
    with factory() as session:
        slugs = [project] if project else [s.slug for s in list_project_summaries(session)]
    for slug in slugs:
        with factory() as session:
            try:
                target = get_project(session, slug=slug)
            except NotFoundError as exc:
                raise _fail(str(exc)) from exc
            report = recompute_project(session, settings=settings, project=target)
            session.commit()
        console.print(
            f"{slug}: {report.votes:,} votes on {report.cells:,} cells by "
            f"{report.volunteers:,} volunteers, {report.iterations} EM iterations, "
            f"{report.labels_changed} retired labels changed"
        )


def _serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    from app.main import create_app

    _ready_engine(settings)
    console.print(f"Tessera is serving on [bold]http://{host}:{port}/[/]  (Ctrl+C stops it)")
    if workers > 1:  # each worker process builds its app from the same environment
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
        )
        return
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind")] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="worker processes (PostgreSQL scales with them)")
    ] = 1,
) -> None:
    """Run the web service (an embedded SQLite database is upgraded first)."""
    settings = _settings()
    _serve(settings, host or settings.host, port or settings.port, workers)


def build_demo(settings: Settings, *, seed: int, n_images: int) -> ImportReport | None:
    """Generate the demo dataset and import it as project 'demo', unless it is there already."""
    from ml.demo.dataset import write_demo_dataset

    engine = _ready_engine(settings)
    factory = make_session_factory(engine)
    with factory() as session:
        if find_project(session, slug=DEMO_PROJECT) is not None:
            return None
    source = settings.data_dir / "demo-source"
    if source.exists():
        shutil.rmtree(source)
    write_demo_dataset(source, seed=seed, n_images=n_images)
    with factory() as session:
        project = create_project(
            session,
            slug=DEMO_PROJECT,
            name="Demo: shapes, colours and textures",
            description=f"{n_images} generated scenes (seed {seed}) with exact masks.",
        )
        # The scenes are small (128-512 px) and flat-coloured: small cells still read well.
        project.settings = dict(DEMO_SETTINGS)
        report = run_import(
            session, settings=settings, project_slug=DEMO_PROJECT, path=source, tag_file=None
        )
    return report


@app.command("demo")
def demo(
    seed: Annotated[int, typer.Option(help="generator seed (same seed, same project)")] = 7,
    images: Annotated[int, typer.Option(min=1, max=10_000, help="number of scenes")] = 60,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="start the server")
    ] = True,
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind")] = None,
) -> None:
    """Generate a demo project of procedural scenes with exact masks, then serve it."""
    settings = _settings()
    with console.status(f"Generating {images} demo scenes and importing them (about a minute)"):
        report = build_demo(settings, seed=seed, n_images=images)
    if report is None:
        console.print(f"project {DEMO_PROJECT!r} exists already; serving it as it is")
    else:
        _print_report(report)
    if serve_after:
        _serve(settings, host or settings.host, port or settings.port)


@app.command("aggregate")
def aggregate(
    votes: Annotated[Path, typer.Argument(help="CSV worker,task,label or NPZ votes/masks")],
    out: Annotated[Path, typer.Option(help="output .csv or .npz")],
    gold: Annotated[Path | None, typer.Option(help="CSV task,label or NPZ gold")] = None,
    prior: Annotated[Path | None, typer.Option(help="CSV task,prior or NPZ prior")] = None,
    method: Annotated[str, typer.Option(help="majority_vote, weighted_majority or dawid_skene")] = (
        "dawid_skene"
    ),
) -> None:
    """Aggregate a file of votes offline: posteriors per item, credibility per worker."""
    from ml.aggregation.io import AggregationInputError, aggregate_file

    try:
        summary = aggregate_file(votes, out=out, gold=gold, prior=prior, method=method)
    except (AggregationInputError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise _fail(str(message)) from exc
    kind = "masks" if summary.dense else "items"
    console.print(
        f"{summary.method}: {summary.n_votes:,} votes by {summary.n_workers:,} workers on "
        f"{summary.n_items:,} {kind} ({summary.n_gold:,} gold), {summary.iterations} iterations"
        f"{'' if summary.converged else ' (not converged)'} -> {summary.out}"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
