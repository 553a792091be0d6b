"""A real Tessera server on a demo project, and a real headless Chromium, for page tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=MediaRouter,OptimizationHints",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    url: str
    database_url: str
    data_dir: Path


def _tessera(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)} failed:\n{result.stderr}")


def tessera_env(data_dir: Path, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a `tessera` process on this data folder and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {
        "TESSERA_DATA_DIR": str(data_dir),
        "TESSERA_DATABASE_URL": database_url,
        "TESSERA_CONSENSUS_INTERVAL_S": "0",
    }
    return env | {f"TESSERA_{k.upper()}": v for k, v in settings.items()}


def demo_env(data_dir: Path, database_url: str, *, images: int, **settings: str) -> dict[str, str]:
    """A demo project of ``images`` scenes made by `tessera demo`; the environment to serve it."""
    env = tessera_env(data_dir, database_url, **settings)
    _tessera(env, "db", "upgrade")
    _tessera(env, "demo", "--no-serve", "--images", str(images), "--seed", "5")
    return env


UNLIMITED = {
    "rate_limit_volunteer_per_minute": "0",
    "rate_limit_address_per_minute": "0",
    "rate_limit_new_volunteers_per_hour": "0",
}


@contextmanager
def demo_server(data_dir: Path, database_url: str, *, images: int = 4) -> Iterator[Server]:
    """`tessera demo` then `tessera serve` in real processes; stopped on exit."""
    with serve(demo_env(data_dir, database_url, images=images)) as (server, _proc):
        yield server


@contextmanager
def serve(env: dict[str, str]) -> Iterator[tuple[Server, subprocess.Popen[str]]]:
    """`tessera serve` in a real process on ENV's data; stopped on exit unless already dead."""
    data_dir = Path(env["TESSERA_DATA_DIR"])
    port = free_port()
    log_path = data_dir / f"serve-{port}.log"
    # A file, not a pipe: an unread pipe fills up and blocks the server.
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    output = log_path.read_text()
                    raise RuntimeError(f"the server did not start:\n{output}") from None
                time.sleep(0.2)
        server = Server(url=url, database_url=env["TESSERA_DATABASE_URL"], data_dir=data_dir)
        yield server, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium, headless, through Playwright (never a downloaded browser)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    # Every page of the module ran under the server's Content-Security-Policy: nothing it
    # loads or runs may be refused by it (an inline script, a style from elsewhere).
    refused, CSP_REFUSALS[:] = list(CSP_REFUSALS), []
    assert not refused, f"the Content-Security-Policy refused: {refused}"


CSP_REFUSALS: list[str] = []  # console messages of CSP refusals, from every page made here


def _csp_refusal(message: object) -> None:
    text = str(message.text)  # type: ignore[attr-defined]
    if "Content Security Policy" in text:
        CSP_REFUSALS.append(text)


def new_page(browser: object, server: Server, **options: object) -> object:
    context = browser.new_context(**options)  # type: ignore[attr-defined]
    # Nothing leaves localhost.
    context.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith(server.url) else route.abort()
        ),
    )
    page = context.new_page()
    page.on("console", _csp_refusal)
    return page


def screenshot(page: object, name: str) -> None:
    """Save a full-page screenshot under artifacts/ (git ignores it) to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)  # type: ignore[attr-defined]
