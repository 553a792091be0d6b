"""Time from Verify to the next grid being visible, in a real headless Chromium on localhost.

Usage: ``python bench/browser_latency.py [--tasks 40] [--think-ms 800] [--images 30]
[--database-url URL]``. A fresh demo project (SQLite in a temp dir by default) is served by
``tessera serve``; one Chromium volunteer opens ``/p/demo``. Per task, once the grid is shown
with every tile loaded, the volunteer thinks for ``--think-ms`` (the page prefetches the next
task and its tiles meanwhile), then the page itself stores ``t0 = performance.now()`` and clicks
``#verify``, so no Python/CDP round trip is inside the measure. It stops in the first
``requestAnimationFrame`` callback after the new task id is set and every tile ``img`` is
complete with ``naturalWidth > 0``: the frame that paints the new grid. A second phase repeats
it with no think time. Target (the issue): median under 150 ms. ``WARMUP`` Verifies go first.

Not ``tests.app.browser.demo_server``: it pipes the server's log and never reads the pipe, so
the server hangs once ~64 KiB of access log is written (~75 Verifies). Here it goes to a file.
Non-local requests go to a proxy that does not exist (the server's host bypasses it), not to
``context.route``: any route makes Playwright pause *every* request (``Fetch.enable`` on ``*``)
and disable the HTTP cache, which would put a CDP round trip into the very path measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from playwright.sync_api import Page, Request, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app.browser import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402

TARGET_MS = 150.0
WARMUP = 2
TIMEOUT_MS = 15_000

# All tiles loaded: the state the volunteer waits for before thinking.
GRID_READY_JS = """() => {
  const id = document.getElementById("play").dataset.taskId;
  const imgs = [...document.querySelectorAll("#grid .tile img")];
  return Boolean(id) && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""

# Click Verify from the page and resolve with the milliseconds until the next grid is painted.
VERIFY_JS = """async (timeoutMs) => {
  const root = document.getElementById("play");
  const before = root.dataset.taskId;
  const imgs = [...document.querySelectorAll("#grid .tile img")];
  const loaded = (img) => img.complete && img.naturalWidth > 0;
  const shown = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      const why = root.classList.contains("finished") ? "the project ran out of tasks" : "timeout";
      reject(new Error(`no next grid after ${timeoutMs} ms (${why})`));
    }, timeoutMs);
    window.addEventListener("tessera:shown", function on(event) {
      if (String(event.detail.id) === before) return;
      window.removeEventListener("tessera:shown", on);
      clearTimeout(timer);
      resolve();
    });
  });
  const t0 = performance.now();
  document.getElementById("verify").click();
  await shown;
  await Promise.all(imgs.filter((img) => !loaded(img)).map((img) => new Promise((ok, fail) => {
    img.addEventListener("load", ok, { once: true });
    img.addEventListener("error", () => fail(new Error(`tile ${img.src} failed`)), { once: true });
  })));
  if (root.dataset.taskId === before || !imgs.every(loaded)) throw new Error("grid not ready");
  const t1 = await new Promise((ok) => requestAnimationFrame(() => ok(performance.now())));
  return t1 - t0;
}"""


def tessera(env: dict[str, str], *args: str) -> None:
    cli = [sys.executable, "-m", "app.cli", *args]
    result = subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)} failed:\n{result.stderr}")


@contextmanager
def demo_server(data_dir: Path, database_url: str, *, images: int) -> Iterator[str]:
    """A demo project served by ``tessera serve`` (log: ``data_dir/serve.log``); yields its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {
        "TESSERA_DATA_DIR": str(data_dir),
        "TESSERA_DATABASE_URL": database_url,
        "TESSERA_CONSENSUS_INTERVAL_S": "0",  # no background pass in the middle of a phase
        "TESSERA_RATE_LIMIT_VOLUNTEER_PER_MINUTE": "0",
        "TESSERA_RATE_LIMIT_NEW_VOLUNTEERS_PER_HOUR": "0",  # the no-think phase outpaces a person
    }
    tessera(env, "db", "upgrade")
    tessera(env, "demo", "--no-serve", "--images", str(images), "--seed", "5")
    url = f"http://127.0.0.1:{free_port()}"
    log_path = data_dir / "serve.log"
    with open(log_path, "wb") as log:
        cli = [sys.executable, "-m", "app.cli", "serve", "--port", url.rsplit(":", 1)[1]]
        proc = subprocess.Popen(cli, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"the server did not start:\n{tail}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).is_success
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Phase:
    think_ms: int
    durations_ms: list[float]

    def summary(self) -> str:
        d = np.asarray(self.durations_ms)  # (N,)
        p50, p90, p99 = np.percentile(d, [50, 90, 99])
        over = int((d > TARGET_MS).sum())
        verdict = "PASS" if p50 < TARGET_MS else "FAIL"
        return (
            f"think {self.think_ms:>4} ms: n={d.size}  median {p50:.1f} ms  p90 {p90:.1f}  "
            f"p99 {p99:.1f}  max {d.max():.1f}  over {TARGET_MS:.0f} ms: {over}  [{verdict}]"
        )


def run_phase(page: Page, *, tasks: int, think_ms: int) -> Phase:
    durations: list[float] = []
    for _ in range(tasks):
        time.sleep(think_ms / 1000)
        durations.append(float(page.evaluate(VERIFY_JS, TIMEOUT_MS)))
    return Phase(think_ms=think_ms, durations_ms=durations)


def measure(url: str, *, tasks: int, think_ms: int) -> tuple[list[Phase], list[str]]:
    """Both phases in one browser session; returns them and the non-local URLs refused."""
    host = urlsplit(url).hostname or "127.0.0.1"
    foreign: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            proxy={"server": f"http://127.0.0.1:{free_port()}", "bypass": host},
        )
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()

            def note(request: Request) -> None:
                if not request.url.startswith((url, "data:", "blob:")):
                    foreign.append(request.url)

            page.on("request", note)
            print(f"chromium {browser.version} headless, viewport 1280x900")
            page.goto(f"{url}/p/demo")
            page.wait_for_function(GRID_READY_JS, timeout=TIMEOUT_MS)
            run_phase(page, tasks=WARMUP, think_ms=think_ms)
            phases = [run_phase(page, tasks=tasks, think_ms=t) for t in (think_ms, 0)]
        finally:
            browser.close()
    return phases, foreign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="measured Verifies per phase")
    parser.add_argument("--think-ms", type=int, default=800, help="pause before each Verify")
    parser.add_argument("--images", type=int, default=30, help="demo scenes (tasks to serve)")
    parser.add_argument("--database-url", help="default: SQLite in a temp dir")
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-bench-")))
        database_url = args.database_url or f"sqlite:///{tmp / 'tessera.db'}"
        url = stack.enter_context(demo_server(tmp, database_url, images=args.images))
        backend = database_url.split(":", 1)[0]
        print(f"server {url} ({backend}), demo {args.images} images, warm-up {WARMUP}")
        phases, foreign = measure(url, tasks=args.tasks, think_ms=args.think_ms)
    print(f"Verify -> next grid painted, target median < {TARGET_MS:.0f} ms")
    for phase in phases:
        print(phase.summary())
    print(f"non-local requests refused: {len(foreign)} {sorted(set(foreign))[:5]}")


if __name__ == "__main__":
    main()
