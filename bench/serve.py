"""Load-test a real ``tessera serve`` with simulated volunteers, next to a bare FastAPI baseline.

Usage: ``python bench/serve.py [--backend sqlite|postgres|both] [--workers 1] [--path one|two]
[--answers truth|random] [--rate R] [--seconds 20] [--volunteers 16] [--clients 2] [--images 20]
[--tiles] [--storage local|s3] [--quick]``

Per backend: a fresh demo project in a temp dir (PostgreSQL from ``.ci/postgres``), ``tessera
serve`` (uvicorn, ``--workers``) as a subprocess of this interpreter (``python -m app.cli``, so
that it runs from any virtualenv), then N volunteers spread over ``--clients`` client processes,
each an ``httpx.AsyncClient`` with its own cookie jar, in a closed loop without think time
(throughput at saturation), or with ``--rate R`` each starting grids on a schedule so that the
volunteers together offer R grids/s (the latency at that load).

- ``--path one`` (the default, as the volunteer page does): one request per grid (answer this
  task and get the next, ``POST /api/projects/{slug}/tasks/answer``); ``--path two``: next task,
  then submit.
- ``--answers truth`` (the default) is an honest crowd: 80% diligent, 15% sloppy, 5% random
  clickers (``ml.aggregation.simulate.PROFILES``) answering from the demo's ground truth, so that
  cells retire, windows open and targets complete as in real work; the clients read which
  cells a task shows from the database (their CPU is reported). ``random`` selects each square
  with p=0.3 (nothing ever retires: the cheap path only).

- ``--storage s3`` keeps the project's images and masks in a bucket of moto's S3 server, started
  on loopback (``TESSERA_STORAGE_URL``); with ``--tiles`` the first cut of each image reads it
  from there (then from the local cache). The server's CPU does not count the S3 server's.

Rates and latencies count only calls that finish after the warm-up; errors (non-2xx or
transport) and acknowledged votes count all. Server CPU is summed over the server's whole
process tree (every uvicorn worker), from /proc. After the server stops, the stored votes are
counted and compared with those acknowledged. The baseline is a bare FastAPI POST echo served
by ``uvicorn.run`` with the same settings, driven by the same clients for the same time.

Each configuration ends with one line that scripts can read::

    serve: backend=sqlite workers=1 path=one storage=local tiles=0 rate=0 answers=truth
    grids_per_s=... p99_ms=...
    cpu_ms_per_grid=... echo_cpu_ms=... client_cores=... fusion=background
    fuser_lag_p99_ms=... unfused_at_stop=... acked=... stored=...

Targets (issue #21): SQLite >= 500 answered grids/s with p99 < 100 ms on 2 cores; PostgreSQL
>= 400/s with 2 workers; server CPU per answered grid <= 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel
from sqlalchemy import create_engine, func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the app and the tests' simulated crowd, from this checkout
TESSERA = [sys.executable, "-m", "app.cli"]  # this interpreter's Tessera, whatever its venv
SLUG = "demo"
P_SELECT = 0.3
EMPTY_BACKOFF_S = 0.05
# An honest crowd (issue #16's realistic mix): one kind per simulated volunteer, in this ratio.
CROWD_MIX = (("diligent", 0.80), ("sloppy", 0.15), ("random_clicker", 0.05))


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
    grids: int = 0  # answered grids, warm-up included (for the server's CPU per grid)

    def record(self, name: str, seconds: float, measured: bool) -> None:
        if measured:
            self.latency.setdefault(name, []).append(seconds)

    def count(self, name: str) -> int:
        return len(self.latency.get(name, []))

    def pct(self, name: str, q: float) -> float:
        values = self.latency.get(name) or [float("nan")]
        return float(np.percentile(values, q)) * 1000.0

    def merge(self, other: Stats) -> None:
        for name, values in other.latency.items():
            self.latency.setdefault(name, []).extend(values)
        self.errors += other.errors
        self.votes_acked += other.votes_acked
        self.empty += other.empty
        self.calls += other.calls
        self.grids += other.grids


Step = Callable[[httpx.AsyncClient, Stats, bool], Awaitable[None]]
# Which squares a volunteer selects: from the volunteer (a key) and the task's JSON, the
# positions to submit.
Chooser = Callable[[int, dict[str, Any]], list[int]]


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


def at_random(_who: int, task: dict[str, Any]) -> list[int]:
    """Each square with p=``P_SELECT``: nothing ever settles (the cheap path only)."""
    return [t["position"] for t in task["tiles"] if random.random() < P_SELECT]


def _body(who: int, task: dict[str, Any], choose: Chooser) -> dict[str, Any]:
    return {
        "token": task["token"],
        "selected": choose(who, task),
        "elapsed_ms": random.randint(1500, 9000),
    }


def tessera_cycle(fetch_tiles: bool, think_s: float = 0.0, choose: Chooser = at_random) -> Step:
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
        url = f"/api/projects/{SLUG}/tasks/submit"
        body = _body(id(client), task, choose)
        resp = await timed(client, stats, measured, "submit", "POST", url, json=body)
        if resp is not None:
            stats.votes_acked += int(resp.json()["votes"])
            stats.grids += 1

    return step


def answer_cycle(fetch_tiles: bool, choose: Chooser = at_random) -> Step:
    """One request per grid: answer the task in hand and get the next in the same response."""
    held: dict[int, dict[str, Any] | None] = {}  # the task each client holds, by client id

    async def step(client: httpx.AsyncClient, stats: Stats, measured: bool) -> None:
        task = held.get(id(client))
        body = {"submit": _body(id(client), task, choose)} if task is not None else {}
        if task is not None and fetch_tiles:
            for tile in task["tiles"]:
                await timed(client, stats, measured, "tile", "GET", tile["url"])
        url = f"/api/projects/{SLUG}/tasks/answer"
        resp = await timed(client, stats, measured, "answer", "POST", url, json=body)
        if resp is None:
            held[id(client)] = None  # start again from a fresh task
            await asyncio.sleep(EMPTY_BACKOFF_S)
            return
        data = resp.json()
        if data.get("submission") is not None:
            stats.votes_acked += int(data["submission"]["votes"])
            stats.grids += 1
        held[id(client)] = data["task"]
        if data["task"] is None:
            stats.empty += 1
            await asyncio.sleep(EMPTY_BACKOFF_S)

    return step


async def echo_step(client: httpx.AsyncClient, stats: Stats, measured: bool) -> None:
    resp = await timed(
        client, stats, measured, "echo", "POST", "/echo", json={"token": "x" * 64, "n": 9}
    )
    stats.grids += resp is not None


async def drive(
    base: str, step: Step, volunteers: int, seconds: float, warmup: float, rate: float = 0.0
) -> Stats:
    """``volunteers`` loops of ``step`` for ``warmup + seconds``; one client (jar) each. Closed
    loops without think time, or with ``rate`` (steps per second over all these volunteers)
    each volunteer starts a step on a schedule: a latency at a given load, not at saturation (a
    volunteer behind schedule starts at once, catching up at most one step)."""
    stats = Stats()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    interval = volunteers / rate if rate > 0 else 0.0

    async def volunteer() -> None:
        next_at = start + random.uniform(0.0, interval)  # staggered
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            while (now := time.perf_counter()) < stop_at:
                if interval:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at = max(next_at, time.perf_counter() - interval) + interval
                await step(client, stats, time.perf_counter() >= measure_from)

    await asyncio.gather(*(volunteer() for _ in range(volunteers)))
    return stats


class TruthChooser:
    """Answers like an honest crowd: each simulated volunteer of a kind from ``CROWD_MIX``
    answers a task's squares from the demo's ground truth (``tests.app.crowd.Truths``, which
    reads the task's cells from the database)."""

    def __init__(self, data_dir: str, database_url: str, seed: int) -> None:
        from app.config import Settings
        from app.db import make_engine, make_session_factory
        from ml.aggregation.simulate import PROFILES
        from tests.app.crowd import Truths

        settings = Settings(data_dir=Path(data_dir), database_url=database_url)
        self.engine = make_engine(database_url)
        self.truths = Truths(settings, make_session_factory(self.engine), absent_is_empty=True)
        self.rng = np.random.default_rng(seed)
        self.profiles = [PROFILES[kind] for kind, _ in CROWD_MIX]
        shares = np.array([share for _, share in CROWD_MIX])
        self.shares = shares / shares.sum()
        self.kind: dict[int, int] = {}  # each volunteer keeps the kind it first drew

    def __call__(self, who: int, task: dict[str, Any]) -> list[int]:
        from ml.aggregation.simulate import answer

        if who not in self.kind:
            self.kind[who] = int(self.rng.choice(len(self.profiles), p=self.shares))
        profile = self.profiles[self.kind[who]]
        labels, _ = answer(profile, self.truths.coverage(int(task["id"])), self.rng)
        return [int(p) for p in np.flatnonzero(labels)]


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
        self.data_dir = ""  # a Tessera server's data folder (``start_tessera``)
        self.helpers: list[Server] = []  # processes of the same service (`tessera fuse`)
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

    def cpu_seconds(self) -> float:
        """CPU time of the service: this process tree and its helpers'."""
        return sum(tree_cpu_seconds(s.proc.pid) for s in [self, *self.helpers])

    def stop(self) -> None:
        for helper in self.helpers:
            helper.stop()
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


def start_s3(stack: ExitStack) -> None:
    """moto's S3 server on loopback and a bucket on it, named in this process's environment (the
    servers and the clients started after inherit it)."""
    import boto3

    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(proc.wait, 30)
    stack.callback(proc.terminate)
    os.environ |= {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TESSERA_STORAGE_URL": "s3://tessera-bench/data",
    }
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="tessera-bench")
            return
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)


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
    server_cpu: float  # CPU seconds of the server's process tree over the whole phase
    client_cpu: float  # of every client process
    wall: float
    votes_stored: int | None = None
    lag: tuple[float, float, int] = (float("nan"), float("nan"), 0)  # fuser p50, p99 ms; unfused


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (every uvicorn worker), and of the children
    they have already reaped, from /proc (Linux)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = sum(int(f) for f in fields[11:15])
    total = 0
    for proc, t in ticks.items():
        p = proc
        while p not in (pid, 0, 1) and p in parent:
            p = parent[p]
        total += t if p == pid else 0
    return total / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ClientSpec:
    """What one client process runs (picklable: the step is built in the process)."""

    base: str
    kind: str  # "echo", "two" (next + submit) or "one" (one request per grid)
    volunteers: int
    seconds: float
    warmup: float
    tiles: bool
    seed: int
    truth: tuple[str, str] | None  # (data dir, database URL) for an honest crowd
    rate: float = 0.0  # this process's grids per second (0: closed loops)


def _client(spec: ClientSpec) -> tuple[Stats, float]:
    """One client process: its volunteers' stats and its own CPU seconds."""
    random.seed(spec.seed)
    choose: Chooser = at_random
    if spec.truth is not None:
        choose = TruthChooser(*spec.truth, seed=spec.seed)
    step: Step = echo_step
    if spec.kind == "two":
        step = tessera_cycle(spec.tiles, choose=choose)
    elif spec.kind == "one":
        step = answer_cycle(spec.tiles, choose=choose)
    cpu = time.process_time()
    stats = asyncio.run(
        drive(spec.base, step, spec.volunteers, spec.seconds, spec.warmup, spec.rate)
    )
    return stats, time.process_time() - cpu


def run_phase(
    name: str,
    server: Server,
    kind: str,
    args: argparse.Namespace,
    truth: tuple[str, str] | None = None,
) -> Result:
    """Drive ``server`` from ``args.clients`` processes, ``args.volunteers`` volunteers in all."""
    server.wait_ready("/healthz")
    clients = max(1, min(args.clients, args.volunteers))
    shares = [args.volunteers // clients + (i < args.volunteers % clients) for i in range(clients)]
    rate = args.rate if kind != "echo" else 0.0  # the echo always runs flat out
    specs = [
        ClientSpec(
            server.base,
            kind,
            share,
            args.seconds,
            args.warmup,
            args.tiles,
            seed=i,
            truth=truth,
            rate=rate * share / args.volunteers,
        )
        for i, share in enumerate(shares)
    ]
    fork = multiprocessing.get_context("fork")
    wall, cpu = time.perf_counter(), server.cpu_seconds()
    with ProcessPoolExecutor(clients, mp_context=fork) as pool:
        done = list(pool.map(_client, specs))
    server_cpu = server.cpu_seconds() - cpu
    wall = time.perf_counter() - wall
    server.stop()
    stats = Stats()
    for part, _ in done:
        stats.merge(part)
    if stats.errors or server.proc.returncode not in (0, -signal.SIGINT):
        print(f"\n--- {name} server log (non-200 lines) ---\n{server.tail()}\n---")
    return Result(name, args.seconds, stats, server_cpu, sum(c for _, c in done), wall)


def start_tessera(
    backend: str,
    images: int,
    workers: int,
    stack: ExitStack,
    database_url: str | None = None,
    fusion: str = "background",
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
        "TESSERA_RATE_LIMIT_NEW_VOLUNTEERS_PER_HOUR": "0",
        "TESSERA_RATE_LIMIT_ADDRESS_PER_MINUTE": "0",
        "TESSERA_OPEN_TASKS_PER_ADDRESS": "0",
        "TESSERA_FUSION": fusion,
    }
    if database_url is not None:
        env["TESSERA_DATABASE_URL"] = database_url
    elif backend == "postgres":
        env["TESSERA_DATABASE_URL"] = start_postgres(stack, tmp)
    if backend == "postgres":
        run_ok([*TESSERA, "db", "upgrade"], env)
    run_ok([*TESSERA, "demo", "--no-serve", "--images", str(images)], env)
    url = env.get("TESSERA_DATABASE_URL") or f"sqlite:///{tmp / 'data' / 'tessera.db'}"
    port = free_port()
    cmd = [*TESSERA, "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    server = Server(cmd, env, tmp / "server.log", port)
    server.data_dir = env["TESSERA_DATA_DIR"]
    if fusion == "external":  # a fuser process of its own beside the web workers
        fuse = [*TESSERA, "fuse", "--poll", "0.2"]
        server.helpers.append(Server(fuse, env, tmp / "fuser.log", port))
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


def fusion_lag(url: str) -> tuple[float, float, int]:
    """The fuser's lag (submitted to fused), p50 and p99 in ms over the fused tasks, and how
    many submitted tasks were left unfused when the server stopped."""
    from app.models import Task, TaskState

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Task.submitted_at, Task.fused_at).where(Task.state == TaskState.SUBMITTED)
        ).all()
    engine.dispose()
    lags = [(f - s).total_seconds() * 1000 for s, f in rows if f is not None and s is not None]
    left = sum(f is None for _, f in rows)
    if not lags:
        return float("nan"), float("nan"), left
    return float(np.percentile(lags, 50)), float(np.percentile(lags, 99)), left


def bench_tessera(backend: str, args: argparse.Namespace, stack: ExitStack) -> Result:
    server, url = start_tessera(backend, args.images, args.workers, stack, fusion=args.fusion)
    truth = (server.data_dir, url) if args.answers == "truth" else None
    result = run_phase(f"tessera/{backend}", server, args.path, args, truth)
    return dataclasses.replace(result, votes_stored=count_votes(url), lag=fusion_lag(url))


def bench_bare(args: argparse.Namespace, stack: ExitStack) -> Result:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-bare-")))
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(port)]
    server = Server(cmd, dict(os.environ), tmp / "server.log", port)
    stack.callback(server.stop)
    return run_phase("bare-fastapi", server, "echo", args)


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


CALL_ORDER = ["next", "tile", "submit", "answer", "echo"]


def report(results: list[Result], args: argparse.Namespace) -> None:
    bare = next(r for r in results if r.votes_stored is None)
    bare_rps = bare.stats.count("echo") / bare.seconds
    echo_cpu_ms = 1000 * bare.server_cpu / max(1, bare.stats.calls)
    print(
        f"\n{'run':<18}{'call':<8}{'calls/s':>9}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}"
        f"{'errors':>8}{'srv cores':>10}{'cli cores':>10}"
    )
    for r in results:
        names = sorted(r.stats.latency, key=CALL_ORDER.index)
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
    print(f"\nbare echo: {bare_rps:.0f} requests/s, server CPU {echo_cpu_ms:.2f} ms per request")
    for r in results:
        if r.votes_stored is None:
            continue
        grid_calls = ["answer"] if args.path == "one" else ["submit"]
        grids_per_s = sum(r.stats.count(c) for c in grid_calls) / r.seconds
        # The latency of answering a grid: the one request, or next + submit together.
        cycle = ["answer"] if args.path == "one" else ["next", "submit"]
        p99 = sum(r.stats.pct(c, 99) for c in cycle)
        cpu_ms = 1000 * r.server_cpu / max(1, r.stats.grids)
        check = "ok" if r.votes_stored == r.stats.votes_acked else "MISMATCH"
        backend = r.name.split("/")[1]
        print(
            f"{r.name}: {grids_per_s:.1f} answered grids/s; server CPU {cpu_ms:.1f} ms per grid "
            f"= {cpu_ms / echo_cpu_ms:.0f}x an echo request; votes acknowledged "
            f"{r.stats.votes_acked}, stored {r.votes_stored} ({check}); empty offers "
            f"{r.stats.empty}; target 500 grids/s: {grids_per_s / 500:.1%}"
        )
        print(
            f"  fuser lag (submitted to fused) p50 {r.lag[0]:.0f} ms, p99 {r.lag[1]:.0f} ms; "
            f"{r.lag[2]} answers not fused when the server stopped"
        )
        print(
            f"serve: backend={backend} workers={args.workers} path={args.path} "
            f"storage={args.storage} tiles={int(args.tiles)} "
            f"rate={args.rate:g} "
            f"answers={args.answers} grids_per_s={grids_per_s:.1f} p99_ms={p99:.1f} "
            f"cpu_ms_per_grid={cpu_ms:.2f} echo_cpu_ms={echo_cpu_ms:.3f} "
            f"client_cores={r.client_cpu / r.wall:.2f} fusion={args.fusion} "
            f"fuser_lag_p99_ms={r.lag[1]:.0f} unfused_at_stop={r.lag[2]} "
            f"acked={r.stats.votes_acked} stored={r.votes_stored}",
            flush=True,
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
    parser.add_argument(
        "--path",
        choices=["one", "two"],
        default="one",
        help="one request per grid (answer + next), or two (next, then submit)",
    )
    parser.add_argument("--answers", choices=["truth", "random"], default="truth")
    parser.add_argument(
        "--fusion",
        choices=["background", "external", "inline"],
        default="background",
        help="fuse answers in a server thread (the default), a `tessera fuse` process, or in "
        "each request",
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered grids per second over all volunteers, each starting grids on a schedule "
        "(latency at that load); 0: closed loops without think time (throughput)",
    )
    parser.add_argument(
        "--storage",
        choices=["local", "s3"],
        default="local",
        help="the project's files in the data folder, or in a bucket of moto's S3 server",
    )
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
        f"{args.clients} client processes, answers {args.answers}, {os.cpu_count()} CPUs, "
        f"storage {args.storage}"
        + (f", offered {args.rate:g} grids/s" if args.rate else ", closed loops")
    )
    results: list[Result] = []
    with ExitStack() as stack:  # servers, PostgreSQL and temp dirs go, on errors and Ctrl+C too
        if args.storage == "s3":
            start_s3(stack)
        results.append(bench_bare(args, stack))
        results.extend(bench_tessera(b, args, stack) for b in backends)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
