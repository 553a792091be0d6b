"""Serving commands: ``serve`` and ``demo`` (generate a demo project, then serve it)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli.common import DEMO_PROJECT, app, console, load_settings, ready_engine, sessions
from app.cli.data import print_report

if TYPE_CHECKING:
    from app.config import Settings
    from app.services.importer import ImportReport

DEMO_SETTINGS = {"min_cell_px": 16, "max_level": 4}


def _serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    from app.main import create_app

    ready_engine(settings)
    console.print(f"Tessera is serving on [bold]http://{host}:{port}/[/]  (Ctrl+C stops it)")
    # Forwarded headers only from the proxies named (uvicorn believes 127.0.0.1 by default:
    # anything on this machine could then pick its own address for the rate limits).
    proxies = settings.trusted_proxies.strip()
    uvicorn.run(
        create_app(settings) if workers == 1 else "app.main:create_app",
        factory=workers > 1,  # each worker process builds its app from the same environment
        workers=workers if workers > 1 else None,
        host=host,
        port=port,
        log_level="info",
        access_log=settings.access_log,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
    )


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port to bind")] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="worker processes (PostgreSQL scales with them)")
    ] = 1,
    scheduler: Annotated[
        bool, typer.Option("--scheduler", help="also run `tessera schedule` as a child process")
    ] = False,
) -> None:
    """Run the web service (an embedded SQLite database is upgraded first)."""
    settings = load_settings()
    child = subprocess.Popen([sys.executable, "-m", "app.cli", "schedule"]) if scheduler else None
    try:
        _serve(settings, host or settings.host, port or settings.port, workers)
    finally:
        if child is not None:
            child.terminate()
            child.wait(timeout=30)


@app.command("fuse")
def fuse(
    poll: Annotated[
        float,
        typer.Option(
            min=0.01,
            help="seconds between looks for waiting answers (longer: larger batches, less CPU "
            "per answer, more lag)",
        ),
    ] = 0.2,
) -> None:
    """Fuse answers into the consensus in the foreground, for servers run with
    TESSERA_FUSION=external (several of these may run: each takes its own batches)."""
    from app.services.crowd.fuser import Fuser

    settings = load_settings()
    fuser = Fuser(settings, sessions(settings, writer=True), poll)
    stop = threading.Event()
    # Ctrl+C, and SIGTERM from a service manager, end it after the batch under way (set here:
    # a process started in the background inherits SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"Fusing answers (a look every {poll:g} s; Ctrl+C stops)")
    fuser.thread.start()
    while fuser.thread.is_alive() and not stop.wait(1.0):
        pass
    fuser.close()
    console.print(f"{fuser.fused} answers fused")


def build_demo(settings: Settings, *, seed: int, n_images: int) -> ImportReport | None:
    """Generate the demo dataset and import it as project 'demo', unless it is there already."""
    from app.services.importer import run_import
    from app.services.project import create_project, find_project
    from ml.demo.dataset import write_demo_dataset

    factory = sessions(settings)
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
        project.settings = {**project.settings, **DEMO_SETTINGS}
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
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port to bind")] = None,
) -> None:
    """Generate a demo project of procedural scenes with exact masks, then serve it."""
    settings = load_settings()
    with console.status(f"Generating {images} demo scenes and importing them (about a minute)"):
        report = build_demo(settings, seed=seed, n_images=images)
    if report is None:
        console.print(f"project {DEMO_PROJECT!r} exists already; serving it as it is")
    else:
        print_report(report)
    if serve_after:
        _serve(settings, host or settings.host, port or settings.port)
