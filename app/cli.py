"""The ``tessera`` command."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from app.config import Settings, SettingsError, get_settings
from app.db import engine_for, make_session_factory
from app.migrate import current_revision, head_revision, is_at_head, upgrade_to_head
from app.services.errors import ConflictError, InvalidInputError, NotFoundError
from app.services.import_formats import ImportFormatError
from app.services.importer import ImportReport, default_project_slug, run_import
from app.services.project import (
    create_project,
    find_project,
    get_project,
    list_project_summaries,
)

app = typer.Typer(help="Tessera: tagged images to segmentation masks, with a crowd in the loop.")
db_app = typer.Typer(help="Database schema.")
project_app = typer.Typer(help="Projects.")
consensus_app = typer.Typer(help="Consensus.")
train_app = typer.Typer(help="Train the project's models (CPU works; a GPU is used when present).")
model_app = typer.Typer(help="Model versions.")
app.add_typer(db_app, name="db")
app.add_typer(project_app, name="project")
app.add_typer(consensus_app, name="consensus")
app.add_typer(train_app, name="train")
app.add_typer(model_app, name="model")
user_app = typer.Typer(help="Accounts of curators and admins.")
app.add_typer(user_app, name="user")

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT = 2
T = TypeVar("T")
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
    settings = _settings()
    engine = _ready_engine(settings)
    slug = project or default_project_slug(path)
    with make_session_factory(engine)() as session:
        try:
            report = run_import(
                session, settings=settings, project_slug=slug, path=path, tag_file=tags
            )
        except (ImportFormatError, InvalidInputError, ConflictError, NotFoundError) as exc:
            raise _fail(f"{exc}\nnothing was imported") from exc
    _print_report(report)


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

    known = {*DEFAULT_PROJECT_SETTINGS, "retrain"}
    if key not in known:
        raise _fail(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _fail(f"{value!r} is not JSON ({exc.msg}); quote strings: '\"random\"'") from exc
    if key == "acquisition" and parsed not in ACQUISITIONS:
        raise _fail(f"acquisition must be one of {', '.join(ACQUISITIONS)}")
    with make_session_factory(_ready_engine(_settings()))() as session:
        try:
            project = get_project(session, slug=slug)
        except NotFoundError as exc:
            raise _fail(str(exc)) from exc
        project.settings = {**(project.settings or {}), key: parsed}
        if key == "retrain":
            try:
                schedule_of(project)
            except ValueError as exc:
                raise _fail(str(exc)) from exc
        session.commit()
    console.print(f"{slug}: {key} = {json.dumps(parsed)}")


@app.command("schedule")
def schedule(
    project: Annotated[
        list[str] | None, typer.Option("--project", help="only these projects (repeatable)")
    ] = None,
) -> None:
    """Run the retraining schedule in the foreground (each retrain in its own process)."""
    from app.jobs.schedule import RetrainScheduler

    scheduler = RetrainScheduler(make_session_factory(_ready_engine(_settings())))
    try:
        plans = scheduler.add_projects(project)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if not plans:
        raise _fail(
            "no project has a retrain schedule: set one, e.g. "
            '`tessera project set demo retrain \'{"every": "6h"}\'`'
        )
    for slug, plan in plans.items():
        console.print(f"{slug}: {plan}")
    scheduler.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.shutdown()


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

    try:
        chosen = Role(role)
    except ValueError:
        raise _fail(f"unknown role {role!r}: volunteer, curator or admin") from None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = _settings()
    factory = make_session_factory(_ready_engine(settings), writer=True)
    with factory() as session:
        try:
            create_account(session, name=name, password=password, role=chosen)
        except (ConflictError, InvalidInputError) as exc:
            raise _fail(str(exc)) from exc
        session.commit()
    console.print(f"account [bold]{name}[/] added as {chosen}")


@user_app.command("list")
def user_list() -> None:
    """List the accounts and their roles."""
    from app.services.account import list_accounts

    settings = _settings()
    with make_session_factory(_ready_engine(settings))() as session:
        table = Table("name", "role", "last login")
        for account in list_accounts(session):
            table.add_row(account.name, account.role, str(account.last_login_at or "never"))
    console.print(table)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="the .zip archive to write")],
    project: Annotated[str, typer.Option("--project", help="project slug")] = DEMO_PROJECT,
    tag: Annotated[str | None, typer.Option(help="only this tag")] = None,
) -> None:
    """Write finished masks: COCO instances (RLE), PNG masks and soft masks, in one zip."""
    from app.services.export import export_project

    settings = _settings()
    with make_session_factory(_ready_engine(settings))() as session:
        try:
            target = get_project(session, slug=project)
        except NotFoundError as exc:
            raise _fail(str(exc)) from exc
        report = export_project(session, settings=settings, project=target, out=out, tag=tag)
    console.print(
        f"wrote {report.path}: {report.images} images, {report.annotations} annotations, "
        f"{report.masks} masks"
    )


Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
ProjectOption = Annotated[str, typer.Option("--project", help="project slug")]


InitWeights = Annotated[
    Path | None,
    typer.Option(
        "--init-weights",
        exists=True,
        dir_okay=False,
        help="local weights for the backbone (ImageNet state_dict or a Tessera checkpoint)",
    ),
]


def _train(
    kind: str,
    slug: str,
    epochs: int,
    size: int,
    backbone: str,
    device: str,
    init_weights: Path | None,
) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from app.jobs import train
    from app.jobs.lock import JobBusyError
    from ml.train import Progress as TrainProgress

    settings = _settings()
    factory = make_session_factory(_ready_engine(settings))
    options = train.TrainOptions(
        epochs=epochs,
        size=size,
        backbone=backbone,
        device=device,
        init_weights=str(init_weights) if init_weights else None,
    )
    runner = train.run_train_tagger if kind == "tagger" else train.run_train_segmenter
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}"),
    ]
    with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"training the {kind}", total=None, loss="-")

        def on_progress(p: TrainProgress) -> None:
            done = (p.epoch - 1) * p.steps + p.step
            bar.update(task, total=p.epochs * p.steps, completed=done, loss=f"{p.loss:.4f}")

        try:
            outcome = runner(factory, settings, slug=slug, options=options, on_progress=on_progress)
        except (
            train.NotEnoughDataError,
            NotFoundError,
            train.PretrainedWeightsError,
            JobBusyError,
        ) as exc:
            raise _fail(str(exc)) from exc
    verdict = "promoted" if outcome.promoted else f"kept the active one ({outcome.active_score})"
    console.print(
        f"{kind} version {outcome.version}: {outcome.metric} {outcome.score} -> {verdict} "
        f"(job {outcome.job_id})"
    )


@train_app.command("tagger")
def train_tagger_command(
    project: ProjectOption = DEMO_PROJECT,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    size: Annotated[int, typer.Option(min=32, help="square input side in pixels")] = 256,
    backbone: Annotated[str, typer.Option(help="timm model name")] = "resnet18",
    device: Device = "auto",
    init_weights: InitWeights = None,
) -> None:
    """Train the multi-label tagger on confirmed tags; promote it if it beats the active one."""
    _train("tagger", project, epochs, size, backbone, device, init_weights)


@train_app.command("segmenter")
def train_segmenter_command(
    project: ProjectOption = DEMO_PROJECT,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    size: Annotated[int, typer.Option(min=32, help="square input side, a multiple of 32")] = 256,
    backbone: Annotated[str, typer.Option(help="smp encoder name")] = "resnet18",
    device: Device = "auto",
    init_weights: InitWeights = None,
) -> None:
    """Train the segmenter on complete masks; evaluate on the frozen gold set."""
    _train("segmenter", project, epochs, size, backbone, device, init_weights)


def _batches(description: str, run: Callable[[Callable[[int, int], None]], T]) -> T:
    from rich.progress import Progress

    with Progress(console=console) as bar:
        task = bar.add_task(description, total=None)
        return run(lambda done, total: bar.update(task, completed=done, total=total))


def _batch_job(description: str, runner: Callable[..., object], slug: str, device: str) -> None:
    """Run a batched model job (``run_seed``, ``run_predict``) with a progress bar."""
    settings = _settings()
    factory = make_session_factory(_ready_engine(settings))
    try:
        report = _batches(
            description,
            lambda cb: runner(factory, settings, slug=slug, device=device, on_batch=cb),
        )
    except NotFoundError as exc:
        raise _fail(str(exc)) from exc
    console.print(report)


@app.command("seed")
def seed(project: ProjectOption = DEMO_PROJECT, device: Device = "auto") -> None:
    """Tag unseen images with the active tagger and seed targets from its Grad-CAM."""
    from app.jobs.seed import run_seed

    _batch_job("tagging and Grad-CAM", run_seed, project, device)


@app.command("predict")
def predict(project: ProjectOption = DEMO_PROJECT, device: Device = "auto") -> None:
    """Draw a soft mask for every open target with the active segmenter."""
    from app.jobs.predict import run_predict

    _batch_job("predicting masks", run_predict, project, device)


@app.command("retrain")
def retrain(
    project: ProjectOption = DEMO_PROJECT,
    epochs: Annotated[int, typer.Option(min=1, help="segmenter epochs")] = 20,
    tagger_epochs: Annotated[int, typer.Option(min=1, help="tagger fine-tuning epochs")] = 5,
    size: Annotated[int, typer.Option(min=32, help="input side, a multiple of 32")] = 256,
    device: Device = "auto",
) -> None:
    """One round of the learning loop: train, promote if better, model priors, re-tag, re-rank."""
    from app.jobs.lock import JobBusyError
    from app.jobs.retrain import RetrainOptions, run_retrain
    from app.jobs.train import TrainOptions

    settings = _settings()
    factory = make_session_factory(_ready_engine(settings))
    options = RetrainOptions(
        segmenter=TrainOptions(epochs=epochs, size=size),
        tagger=TrainOptions(epochs=tagger_epochs, size=size),
        device=device,
    )
    try:
        report = run_retrain(
            factory, settings, slug=project, options=options, on_step=console.print
        )
    except (JobBusyError, NotFoundError) as exc:
        raise _fail(str(exc)) from exc
    console.print(report)


@model_app.command("list")
def model_list(project: ProjectOption = DEMO_PROJECT) -> None:
    """Model versions with their metrics; * marks the active ones."""
    from app.services.model_version import list_model_versions

    with make_session_factory(_ready_engine(_settings()))() as session:
        try:
            versions = list_model_versions(session, project=get_project(session, slug=project))
        except NotFoundError as exc:
            raise _fail(str(exc)) from exc
        table = Table("", "kind", "version", "metrics", "created")
        for v in versions:
            shown = {k: val for k, val in v.metrics.items() if not isinstance(val, list)}
            table.add_row(
                "*" if v.active else "",
                v.kind.value,
                str(v.version),
                str(shown),
                f"{v.created_at:%Y-%m-%d %H:%M}",
            )
    console.print(table)


@model_app.command("rollback")
def model_rollback(
    kind: Annotated[str, typer.Argument(help="tagger or segmenter")],
    project: ProjectOption = DEMO_PROJECT,
) -> None:
    """Re-activate the previously promoted version."""
    from app.models import ModelKind
    from app.services.model_version import rollback_model

    with make_session_factory(_ready_engine(_settings()), writer=True)() as session:
        try:
            version = rollback_model(
                session, project=get_project(session, slug=project), kind=ModelKind(kind)
            )
        except (NotFoundError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        session.commit()
        console.print(f"{kind} version {version.version} is active again")


@app.command("export-model")
def export_model(
    kind: Annotated[str, typer.Argument(help="tagger or segmenter")],
    out: Annotated[Path, typer.Option(help="the .onnx file to write")],
    project: ProjectOption = DEMO_PROJECT,
) -> None:
    """Export the active model to ONNX, checked against PyTorch with onnxruntime."""
    from app.models import ModelKind
    from app.services.model_version import active_model
    from ml.checkpoints import load_checkpoint
    from ml.export import export_onnx
    from ml.segmenter import Segmenter
    from ml.tagger import Tagger

    with make_session_factory(_ready_engine(_settings()))() as session:
        try:
            version = active_model(
                session, project=get_project(session, slug=project), kind=ModelKind(kind)
            )
        except (NotFoundError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        if version is None:
            raise _fail(f"no active {kind} in {project!r}: train one first")
        path = version.path
    model = load_checkpoint(path, kind=kind).model
    assert isinstance(model, Tagger | Segmenter)
    check = export_onnx(model, out)
    console.print(f"wrote {check.path}; largest difference from PyTorch {check.max_abs_diff}")


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
    scheduler: Annotated[
        bool, typer.Option("--scheduler", help="also run `tessera schedule` as a child process")
    ] = False,
) -> None:
    """Run the web service (an embedded SQLite database is upgraded first)."""
    settings = _settings()
    child = subprocess.Popen([sys.executable, "-m", "app.cli", "schedule"]) if scheduler else None
    try:
        _serve(settings, host or settings.host, port or settings.port, workers)
    finally:
        if child is not None:
            child.terminate()
            child.wait(timeout=30)


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


from app import cli_maintenance  # noqa: E402, F401  (registers doctor, backup, restore)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    # `python -m app.cli` runs this file as __main__; the commands of app.cli_maintenance are
    # registered on the importable app.cli, so run that one.
    from app.cli import main as importable_main

    importable_main()
