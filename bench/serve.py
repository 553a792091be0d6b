"""Load-test a real ``tessera serve`` with simulated volunteers, next to a bare FastAPI baseline.

Usage: ``python bench/serve.py [--backend sqlite|postgres|both] [--seconds 20] [--volunteers 16]
[--images 20] [--tiles] [--quick]``

Per backend: a fresh demo project in a temp dir (PostgreSQL from ``.ci/postgres``), ``tessera
serve`` (uvicorn, one worker) as a subprocess, then N volunteers from this process, each an
``httpx.AsyncClient`` with its own cookie jar, in a closed loop without think time: next task ->
(tiles, with ``--tiles``) -> submit each tile with p=0.3. Rates and latencies count only calls
that finish after the warm-up; errors (non-2xx or transport) and acknowledged votes count all.
After the server stops, the stored votes are counted and compared with those acknowledged.
The baseline is a bare FastAPI POST echo served by ``uvicorn.run`` with the same settings
(``log_level="info"``, access log on), driven by the same loop for the same time.
Target (the issue): >= 500 submissions/s, p99 < 100 ms, zero errors, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel
from sqlalchemy import create_engine, func, select

ROOT = Path(__file__).resolve().parents[1]
TESSERA = str(ROOT / ".venv" / "bin" / "tessera")
SLUG = "demo"
P_SELECT = 0.3
EMPTY_BACKOFF_S = 0.05


class Echo(BaseModel):
    """The baseline's body (module level: FastAPI must resolve it as a body, not a query)."""

    token: str
    n: int


@dataclass
class Stats:
    """What the volunteers saw; latencies in seconds, only for calls done after the warm-up."""

    latency: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    votes_acked: int = 0
    empty: int = 0
    calls: int = 0  # all calls, warm-up included (for the server's CPU per call)

    def record(self, name: str, seconds: float, measured: bool) -> None:
        if measured:
            self.latency.setdefault(name, []).append(seconds)

    def count(self, name: str) -> int:
        return len(self.latency.get(name, []))

    def pct(self, name: str, q: float) -> float:
        values = self.latency.get(name) or [float("nan")]
        return float(np.percentile(values, q)) * 1000.0


Step = Callable[[httpx.AsyncClient, Stats, bool], Awaitable[None]]


async def timed(
    client: httpx.AsyncClient,
    stats: Stats,
    measured: bool,
    name: str,
    method: str,
    url: str,
    **kw: object,
) -> httpx.Response | None:
    """One call, timed; a transport error or a non-2xx status is an error and returns None."""
    t0, stats.calls = time.perf_counter(), stats.calls + 1
    try:
        resp = await client.request(method, url, **kw)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        stats.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        return None
    stats.record(name, time.perf_counter() - t0, measured)
    if not resp.is_success:
        stats.errors.append(f"{name}: HTTP {resp.status_code}: {resp.text[:200]}")
        return None
    return resp


def tessera_cycle(fetch_tiles: bool, think_s: float = 0.0) -> Step:
    """next -> (tiles) -> submit; with ``think_s``, a look at the grid of 0.5-1.5x that first."""

    async def step(client: httpx.AsyncClient, stats: Stats, measured: bool) -> None:
        resp = await timed(
            client, stats, measured, "next", "GET", f"/api/projects/{SLUG}/tasks/next"
        )
        task = resp.json()["task"] if resp is not None else None
        if task is None:
            stats.empty += resp is not None
            await asyncio.sleep(EMPTY_BACKOFF_S)
            return
        if fetch_tiles:
            for tile in task["tiles"]:
                await timed(client, stats, measured, "tile", "GET", tile["url"])
        if think_s:
            await asyncio.sleep(think_s * random.uniform(0.5, 1.5))
        selected = [t["position"] for t in task["tiles"] if random.random() < P_SELECT]
        body = {
            "token": task["token"],
            "selected": selected,
            "elapsed_ms": random.randint(1500, 9000),
        }
        url = f"/api/projects/{SLUG}/tasks/submit"
        resp = await timed(client, stats, measured, "submit", "POST", url, json=body)
        if resp is not None:
            stats.votes_acked += int(resp.json()["votes"])

    return step


async def echo_step(client: httpx.AsyncClient, stats: Stats, measured: bool) -> None:
    await timed(client, stats, measured, "echo", "POST", "/echo", json={"token": "x" * 64, "n": 9})


async def drive(base: str, step: Step, volunteers: int, seconds: float, warmup: float) -> Stats:
    """``volunteers`` closed loops of ``step`` for ``warmup + seconds``; one client (jar) each."""
    stats = Stats()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def volunteer() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            while (now := time.perf_counter()) < stop_at:
                await step(client, stats, now >= measure_from)

    await asyncio.gather(*(volunteer() for _ in range(volunteers)))
    return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ok(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


class Server:
    """A server subprocess in its own process group, logging to a file; stopped like Ctrl+C."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.log, self.base = log, f"http://127.0.0.1:{port}"
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.tail()}")
            try:
                if httpx.get(self.base + path, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        """The log's last lines that are not access-log lines (errors, tracebacks)."""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join([ln for ln in text if '" 200' not in ln][-lines:])


def start_postgres(stack: ExitStack, tmp: Path) -> str:
    pg_dir, script = tmp / "pg", str(ROOT / ".ci" / "postgres")
    tmp.chmod(0o755)  # as root, the script runs PostgreSQL as the postgres user
    out = run_ok([script, "start", str(pg_dir), str(free_port())], dict(os.environ))
    stack.callback(subprocess.run, [script, "stop", str(pg_dir)], capture_output=True)
    return out.strip().splitlines()[-1]


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    stats: Stats
    server_cpu: float  # CPU seconds over the whole phase (warm-up included)
    client_cpu: float
    wall: float
    votes_stored: int | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(name: str, server: Server, step: Step, args: argparse.Namespace) -> Result:
    server.wait_ready("/healthz")
    wall, cpu, own = time.perf_counter(), cpu_seconds(server.proc.pid), time.process_time()
    stats = asyncio.run(drive(server.base, step, args.volunteers, args.seconds, args.warmup))
    server_cpu = cpu_seconds(server.proc.pid) - cpu
    wall, own = time.perf_counter() - wall, time.process_time() - own
    server.stop()
    if stats.errors or server.proc.returncode not in (0, -signal.SIGINT):
        print(f"\n--- {name} server log (non-200 lines) ---\n{server.tail()}\n---")
    return Result(name, args.seconds, stats, server_cpu, own, wall)


def start_tessera(
    backend: str, images: int, workers: int, stack: ExitStack, database_url: str | None = None
) -> tuple[Server, str]:
    """A demo project of ``images`` scenes served by ``tessera serve``; the server and its URL.

    The database is a fresh one in a temp dir (PostgreSQL from ``.ci/postgres``), or the empty
    ``database_url`` when given. Rate limits are off, the server is stopped when ``stack`` closes.
    """
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"tessera-{backend}-")))
    env = {**os.environ, "TESSERA_DATA_DIR": str(tmp / "data"), "TESSERA_ENVIRONMENT": "test"}
    # A load test: every simulated volunteer comes from this one address, at machine speed.
    env |= {
        "TESSERA_RATE_LIMIT_VOLUNTEER_PER_MINUTE": "0",
        "TESSERA_RATE_LIMIT_ADDRESS_PER_MINUTE": "0",
    }
    if database_url is not None:
        env["TESSERA_DATABASE_URL"] = database_url
    elif backend == "postgres":
        env["TESSERA_DATABASE_URL"] = start_postgres(stack, tmp)
    if backend == "postgres":
        run_ok([TESSERA, "db", "upgrade"], env)
    run_ok([TESSERA, "demo", "--no-serve", "--images", str(images)], env)
    url = env.get("TESSERA_DATABASE_URL") or f"sqlite:///{tmp / 'data' / 'tessera.db'}"
    port = free_port()
    cmd = [TESSERA, "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    server = Server(cmd, env, tmp / "server.log", port)
    stack.callback(server.stop)
    return server, url


def count_votes(url: str) -> int:
    """The votes stored in the database at ``url`` (count them after the server stopped)."""
    from app.models import Vote  # the app's own table; imported late, it is heavy

    engine = create_engine(url)
    with engine.connect() as conn:
        stored = int(conn.execute(select(func.count()).select_from(Vote)).scalar_one())
    engine.dispose()
    return stored


def bench_tessera(backend: str, args: argparse.Namespace, stack: ExitStack) -> Result:
    server, url = start_tessera(backend, args.images, args.workers, stack)
    result = run_phase(f"tessera/{backend}", server, tessera_cycle(args.tiles), args)
    return dataclasses.replace(result, votes_stored=count_votes(url))


def bench_bare(args: argparse.Namespace, stack: ExitStack) -> Result:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-bare-")))
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(port)]
    server = Server(cmd, dict(os.environ), tmp / "server.log", port)
    stack.callback(server.stop)
    return run_phase("bare-fastapi", server, echo_step, args)


def serve_bare(port: int) -> None:
    """The baseline: one JSON echo, served like ``tessera serve`` (uvicorn.run, log level info)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    def echo(body: Echo) -> Echo:  # sync like Tessera's routes: it runs in the threadpool too
        return body

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


def report(results: list[Result]) -> None:
    bare = next(r for r in results if r.votes_stored is None)
    bare_rps = bare.stats.count("echo") / bare.seconds
    print(
        f"\n{'run':<18}{'call':<8}{'calls/s':>9}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}"
        f"{'errors':>8}{'srv cores':>10}{'cli cores':>10}"
    )
    for r in results:
        names = sorted(r.stats.latency, key=["next", "tile", "submit", "echo"].index)
        for i, name in enumerate(names):
            cells = [r.stats.count(name) / r.seconds] + [r.stats.pct(name, q) for q in (50, 90, 99)]
            first = [len(r.stats.errors), r.server_cpu / r.wall, r.client_cpu / r.wall]
            first = first if i == 0 else []
            print(
                f"{r.name if i == 0 else '':<18}{name:<8}{cells[0]:>9.1f}"
                + "".join(f"{v:>8.1f}" for v in cells[1:])
                + (f"{first[0]:>8}{first[1]:>10.2f}{first[2]:>10.2f}" if first else "")
            )
    for r in results:
        for e in sorted(set(r.stats.errors))[:10]:
            print(f"  {r.name} error x{r.stats.errors.count(e)}: {e}")
    print()
    for r in results:
        if r.votes_stored is None:
            continue
        subs = r.stats.count("submit") / r.seconds
        calls = sum(map(len, r.stats.latency.values())) / r.seconds
        check = "ok" if r.votes_stored == r.stats.votes_acked else "MISMATCH"
        print(
            f"{r.name}: {subs:.1f} submissions/s = cycles/s ({calls:.1f} calls/s); votes "
            f"acknowledged {r.stats.votes_acked}, stored {r.votes_stored} ({check}); "
            f"empty offers {r.stats.empty}"
        )
        per_call = 1000 * r.server_cpu / r.stats.calls
        bare_call = 1000 * bare.server_cpu / bare.stats.calls
        print(f"  server CPU per call {per_call:.1f} ms (bare {bare_call:.2f} ms)")
        # The ratio compares a submission with one bare request, though a cycle holds
        # calls/subs requests (next + submit); per call divides that out.
        print(
            f"  vs bare ({bare_rps:.1f} req/s): submissions/bare requests {subs / bare_rps:.3f}"
            f", Tessera calls/bare requests {calls / bare_rps:.3f}; "
            f"target 500 submissions/s: {subs / 500:.1%}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not measured")
    parser.add_argument("--volunteers", type=int, default=16)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--tiles", action="store_true", help="also fetch the nine tiles")
    parser.add_argument("--workers", type=int, default=1, help="tessera serve --workers")
    parser.add_argument("--quick", action="store_true", help="5 s per phase, 1 s warm-up")
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        serve_bare(args.bare_server)
        return 0
    if args.quick:
        args.seconds, args.warmup = 5.0, 1.0
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print(
        f"{args.volunteers} volunteers, {args.seconds:.0f} s measured after {args.warmup:.0f} s"
        f" warm-up, {args.images} demo images, tiles {'on' if args.tiles else 'off'}, "
        f"{os.cpu_count()} CPUs"
    )
    results: list[Result] = []
    with ExitStack() as stack:  # servers, PostgreSQL and temp dirs go, on errors and Ctrl+C too
        results.append(bench_bare(args, stack))
        results.extend(bench_tessera(b, args, stack) for b in backends)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
