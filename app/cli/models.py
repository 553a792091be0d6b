"""Model commands: ``train``, ``seed``, ``predict``, ``retrain``, ``schedule``, ``model`` and
``export-model``. Torch-side modules are imported inside the commands, so that the rest of the
CLI starts without them.

``train`` and ``retrain`` also run under ``torchrun --nproc-per-node N`` (``ml.distributed``):
rank 0 opens the database, shows the progress and reports; the other ranks train with it
silently and exit with its exit code."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.table import Table

from app.cli.common import (
    DEMO_PROJECT,
    EXIT_BAD_INPUT,
    Device,
    ProjectOption,
    app,
    console,
    fail,
    load_settings,
    sessions,
)

if TYPE_CHECKING:  # torch-side: imported inside the commands
    from sqlalchemy.orm import Session, sessionmaker

    from app.config import Settings
    from app.jobs.train import TrainOptions

train_app = typer.Typer(help="Train the project's models (CPU works; a GPU is used when present).")
model_app = typer.Typer(help="Model versions.")
objects_app = typer.Typer(help="Objects cut from the masks, for search at the object level.")
app.add_typer(train_app, name="train")
app.add_typer(model_app, name="model")
app.add_typer(objects_app, name="objects")

T = TypeVar("T")

InitWeights = Annotated[
    Path | None,
    typer.Option(
        "--init-weights",
        exists=True,
        dir_okay=False,
        help="local weights for the backbone (ImageNet state_dict or a Tessera checkpoint)",
    ),
]


Steps = Annotated[
    int,
    typer.Option(min=1, help="optimizer steps (the data is cycled, reshuffled and re-augmented)"),
]
Epochs = Annotated[
    int | None,
    typer.Option(min=1, help="instead of --steps: this many passes over the training data"),
]
Size = Annotated[
    int | None,
    typer.Option(
        min=32, help="square input side, a multiple of 32 (default: 128 px on a CPU, else 256)"
    ),
]
Seed = Annotated[int, typer.Option(help="seeds every random generator training draws from")]


def _job_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions for a model job; on the other ranks of a torchrun launch, sessions bound to
    nothing: rank 0 alone opens (and, on SQLite, upgrades) the database."""
    from sqlalchemy.orm import sessionmaker

    from ml import distributed

    return sessions(settings) if distributed.is_main() else sessionmaker()


def _job_failed(exc: Exception) -> typer.Exit:
    """``fail``; on the other ranks of a torchrun launch the same exit code, silently (rank 0
    has said what was wrong)."""
    from ml import distributed

    return fail(str(exc)) if distributed.is_main() else typer.Exit(EXIT_BAD_INPUT)


def _train(kind: str, slug: str, options: TrainOptions) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from app.jobs import train
    from app.jobs.lock import JobBusyError
    from app.services.errors import NotFoundError
    from ml import distributed
    from ml.train import Progress as TrainProgress

    settings = load_settings()
    factory = _job_sessions(settings)
    runner = train.run_train_tagger if kind == "tagger" else train.run_train_segmenter
    errors = (train.NotEnoughDataError, NotFoundError, train.PretrainedWeightsError, JobBusyError)
    if not distributed.is_main():  # another rank of a torchrun launch: rank 0 reports
        try:
            runner(factory, settings, slug=slug, options=options)
        except errors as exc:
            raise _job_failed(exc) from exc
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total} loss {task.fields[loss]}"),
    ]
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"training the {kind}", total=None, loss="-")

        def on_progress(p: TrainProgress) -> None:
            bar.update(task, total=p.steps, completed=p.step, loss=f"{p.loss:.4f}")

        try:
            outcome = runner(factory, settings, slug=slug, options=options, on_progress=on_progress)
        except errors as exc:
            raise fail(str(exc)) from exc
    verdict = "promoted" if outcome.promoted else f"kept the active one ({outcome.active_score})"
    console.print(
        f"{kind} version {outcome.version}: {outcome.steps} steps from {outcome.start} in "
        f"{outcome.seconds:.1f} s, {outcome.metric} {outcome.score} -> {verdict} "
        f"(job {outcome.job_id})"
    )


@train_app.command("tagger")
def train_tagger_command(
    project: ProjectOption = DEMO_PROJECT,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the training data")] = 10,
    size: Annotated[int, typer.Option(min=32, help="square input side in pixels")] = 256,
    backbone: Annotated[str, typer.Option(help="timm model name")] = "resnet18",
    device: Device = "auto",
    init_weights: InitWeights = None,
    seed: Seed = 0,
) -> None:
    """Train the multi-label tagger on confirmed tags; promote it if it beats the active one."""
    from app.jobs.train import TrainOptions

    options = TrainOptions(
        epochs=epochs,
        size=size,
        backbone=backbone,
        device=device,
        seed=seed,
        init_weights=str(init_weights) if init_weights else None,
    )
    _train("tagger", project, options)


@train_app.command("segmenter")
def train_segmenter_command(
    project: ProjectOption = DEMO_PROJECT,
    steps: Steps = 200,
    epochs: Epochs = None,
    size: Size = None,
    backbone: Annotated[str, typer.Option(help="smp encoder name")] = "resnet18",
    device: Device = "auto",
    init_weights: InitWeights = None,
    seed: Seed = 0,
) -> None:
    """Train the segmenter on complete masks; evaluate on the frozen gold set."""
    from app.jobs.train import TrainOptions

    options = TrainOptions(
        steps=steps,
        epochs=epochs,
        size=size,
        backbone=backbone,
        device=device,
        seed=seed,
        init_weights=str(init_weights) if init_weights else None,
    )
    _train("segmenter", project, options)


def _batches(description: str, run: Callable[[Callable[[int, int], None]], T]) -> T:
    from rich.progress import Progress

    with Progress(console=console) as bar:
        task = bar.add_task(description, total=None)
        return run(lambda done, total: bar.update(task, completed=done, total=total))


def _batch_job(description: str, runner: Callable[..., object], slug: str, device: str) -> None:
    """Run a batched model job (``run_seed``, ``run_predict``) with a progress bar."""
    from app.services.errors import NotFoundError

    settings = load_settings()
    factory = sessions(settings)
    try:
        report = _batches(
            description,
            lambda cb: runner(factory, settings, slug=slug, device=device, on_batch=cb),
        )
    except NotFoundError as exc:
        raise fail(str(exc)) from exc
    console.print(report)


@app.command("seed")
def seed(project: ProjectOption = DEMO_PROJECT, device: Device = "auto") -> None:
    """Tag unseen images with the active tagger and seed targets from its Grad-CAM."""
    from app.jobs.seed import run_seed

    _batch_job("tagging and Grad-CAM", run_seed, project, device)


@objects_app.command("index")
def index_objects(
    project: ProjectOption = DEMO_PROJECT,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps of the attribute model")] = 400,
    device: Device = "auto",
    seed: Seed = 0,
) -> None:
    """Cut every image's masks into objects, learn their attributes and store the index that
    "find similar, with one attribute changed" searches (the curator's object search)."""
    from app.jobs.objects import run_index_objects
    from app.services.errors import InvalidInputError, NotFoundError
    from ml.objects.attributes import AttributeOptions

    settings = load_settings()
    factory = sessions(settings)
    options = AttributeOptions(steps=steps, seed=seed)
    try:
        report = _batches(
            "cutting objects",
            lambda cb: run_index_objects(
                factory, settings, slug=project, device=device, options=options, on_batch=cb
            ),
        )
    except (NotFoundError, InvalidInputError) as exc:
        raise fail(str(exc)) from exc
    console.print(report)


@app.command("predict")
def predict(project: ProjectOption = DEMO_PROJECT, device: Device = "auto") -> None:
    """Draw a soft mask for every open target with the active segmenter."""
    from app.jobs.predict import run_predict

    _batch_job("predicting masks", run_predict, project, device)


@app.command("retrain")
def retrain(
    project: ProjectOption = DEMO_PROJECT,
    steps: Steps = 200,
    epochs: Epochs = None,
    tagger_epochs: Annotated[int, typer.Option(min=1, help="tagger fine-tuning epochs")] = 5,
    size: Size = None,
    device: Device = "auto",
    seed: Seed = 0,
    quality_targets: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="evaluation targets composed for the round's mask-quality reading (an even "
            "sample; each costs about a second of GrabCut); default: the job's",
        ),
    ] = None,
) -> None:
    """One round of the learning loop: train (the segmenter from the active one when it fits),
    promote if better, model priors, re-tag, re-rank, read mask quality. --steps, --epochs and
    --size are the segmenter's; --size also sets the tagger's (default 256)."""
    from app.jobs.lock import JobBusyError
    from app.jobs.retrain import RetrainOptions, run_retrain
    from app.jobs.train import TrainOptions
    from app.services.errors import NotFoundError
    from ml import distributed

    settings = load_settings()
    factory = _job_sessions(settings)
    quiet = not distributed.is_main()  # another rank of a torchrun launch: rank 0 reports
    options = RetrainOptions(
        segmenter=TrainOptions(steps=steps, epochs=epochs, size=size, seed=seed),
        tagger=TrainOptions(epochs=tagger_epochs, size=size, seed=seed),
        device=device,
    )
    if quality_targets is not None:
        options = dataclasses.replace(options, quality_targets=quality_targets)
    try:
        report = run_retrain(
            factory, settings, slug=project, options=options, on_step=console.print
        )
    except (JobBusyError, NotFoundError) as exc:
        raise _job_failed(exc) from exc
    if not quiet:
        console.print(report)


@model_app.command("list")
def model_list(project: ProjectOption = DEMO_PROJECT) -> None:
    """Model versions with their metrics; * marks the active ones."""
    from app.services.errors import NotFoundError
    from app.services.model_version import list_model_versions
    from app.services.project import get_project

    with sessions(load_settings(existing=True))() as session:
        try:
            versions = list_model_versions(session, project=get_project(session, slug=project))
        except NotFoundError as exc:
            raise fail(str(exc)) from exc
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
    from app.services.errors import NotFoundError
    from app.services.model_version import rollback_model
    from app.services.project import get_project

    with sessions(load_settings(), writer=True)() as session:
        try:
            version = rollback_model(
                session, project=get_project(session, slug=project), kind=ModelKind(kind)
            )
        except (NotFoundError, ValueError) as exc:
            raise fail(str(exc)) from exc
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
    from app.services.errors import NotFoundError
    from app.services.files import model_file
    from app.services.model_version import active_model
    from app.services.project import get_project
    from ml.checkpoints import load_checkpoint
    from ml.export import export_onnx
    from ml.segmenter import Segmenter
    from ml.tagger import Tagger

    settings = load_settings(existing=True)
    with sessions(settings)() as session:
        try:
            version = active_model(
                session, project=get_project(session, slug=project), kind=ModelKind(kind)
            )
        except (NotFoundError, ValueError) as exc:
            raise fail(str(exc)) from exc
        if version is None:
            raise fail(f"no active {kind} in {project!r}: train one first")
        path = model_file(settings, version.path)
    model = load_checkpoint(path, kind=kind).model
    assert isinstance(model, Tagger | Segmenter)
    check = export_onnx(model, out)
    console.print(f"wrote {check.path}; largest difference from PyTorch {check.max_abs_diff}")


@app.command("schedule")
def schedule(
    project: Annotated[
        list[str] | None, typer.Option("--project", help="only these projects (repeatable)")
    ] = None,
) -> None:
    """Run the retraining schedule in the foreground (each retrain in its own process)."""
    from app.jobs.schedule import RetrainScheduler

    scheduler = RetrainScheduler(sessions(load_settings()))
    try:
        plans = scheduler.add_projects(project)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if not plans:
        raise fail(
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
