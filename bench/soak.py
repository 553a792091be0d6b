"""Soak a real ``tessera serve`` with volunteers who answer like people, and watch it over time.

Usage: ``python bench/soak.py [--backend sqlite|postgres|both] [--seconds 600] [--interval 30]
[--volunteers 16] [--think 1.0] [--images 20] [--warmup 5] [--database-url URL]``

The pieces are ``bench/serve.py``'s: the same demo project and server (one uvicorn worker), the
same volunteer cycle (next task -> submit, each tile selected with p=0.3), the same error and
acknowledged-vote accounting. Unlike that load test, each volunteer looks at the grid for
``--think`` seconds (uniform in 0.5-1.5x) before answering, so the server runs at a share of its
capacity for a long time: the soak looks for what builds up (latency drift, a growing RSS or
count of open files, a rare error, a vote acknowledged but lost), not for the ceiling. 16
volunteers thinking 1 s submit about 15 times a second, under half of what one worker sustained
on the 2-core machine in ``bench/serve.py`` without think time (about 34 cycles/s on SQLite).

Every ``--interval`` seconds (after ``--warmup`` seconds not measured) one line: requests,
submissions/s, p50/p95/p99 of next-task and submit, errors, empty offers, the server's RSS
(VmRSS), open file descriptors and CPU cores. A call counts in the window its cycle started
in; a window's line comes once its last cycle is done. After the server stops, the stored votes
are counted from the database. Per backend: totals, votes acknowledged vs stored, p99 of the
first, last and worst window and whether it drifted (last above 1.5x the first and 5 ms more),
RSS and server CPU per submission (work per request that grows is a leak too) first and last.
Exit code 0 only if every backend had zero errors (client-side, a traceback in the server's log
or an unclean exit), stored every acknowledged vote and took some votes.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from serve import (
    Server,
    Stats,
    Step,
    count_votes,
    cpu_seconds,
    start_tessera,
    tessera_cycle,
)

CALLS = ("next", "submit")
DRIFT_RATIO, DRIFT_MIN_MS = 1.5, 5.0


@dataclass(frozen=True)
class Probe:
    """The server process's footprint at one moment, from /proc (Linux)."""

    rss_mib: float
    fds: int
    cpu_s: float
    at: float  # time.perf_counter()

    @classmethod
    def of(cls, pid: int) -> Probe:
        status = Path(f"/proc/{pid}/status").read_text()
        kib = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return cls(kib / 1024.0, fds, cpu_seconds(pid), time.perf_counter())


@dataclass(frozen=True)
class Window:
    end_s: float  # since the end of the warm-up
    seconds: float
    stats: Stats
    probe: Probe
    server_cores: float

    def p99(self, name: str) -> float:
        return self.stats.pct(name, 99)

    @property
    def cpu_ms_per_submission(self) -> float:
        return 1000 * self.server_cores * self.seconds / max(1, self.stats.count("submit"))


@dataclass(frozen=True)
class Soak:
    backend: str
    seconds: float
    warmup: Stats  # errors and votes count, latencies do not
    start: Probe  # at the end of the warm-up
    windows: list[Window]
    votes_stored: int
    server_problems: list[str]

    @property
    def all_stats(self) -> list[Stats]:
        return [self.warmup, *(w.stats for w in self.windows)]

    @property
    def errors(self) -> list[str]:
        return [e for s in self.all_stats for e in s.errors] + self.server_problems

    @property
    def votes_acked(self) -> int:
        return sum(s.votes_acked for s in self.all_stats)

    def failures(self) -> list[str]:
        out = []
        if self.errors:
            out.append(f"{self.backend}: {len(self.errors)} errors, first: {self.errors[0]}")
        if self.votes_acked != self.votes_stored:
            out.append(
                f"{self.backend}: votes acknowledged {self.votes_acked} != stored "
                f"{self.votes_stored}"
            )
        if self.votes_acked == 0:
            out.append(f"{self.backend}: no votes at all (no tasks offered?): nothing was soaked")
        return out


HEADER = (
    f"{'t s':>6}{'reqs':>7}{'sub/s':>7}"
    + "".join(f"{name + ' p50/p95/p99 ms':>23}" for name in CALLS)
    + f"{'errors':>7}{'empty':>6}{'RSS MiB':>9}{'fds':>5}{'cores':>6}"
)


def window_line(w: Window) -> str:
    s = w.stats
    pcts = "".join(
        f"{'/'.join(f'{s.pct(name, q):.1f}' for q in (50, 95, 99)):>23}" for name in CALLS
    )
    return (
        f"{w.end_s:>6.1f}{s.calls:>7}{s.count('submit') / w.seconds:>7.1f}{pcts}"
        f"{len(s.errors):>7}{s.empty:>6}{w.probe.rss_mib:>9.1f}{w.probe.fds:>5}"
        f"{w.server_cores:>6.2f}"
    )


async def drive_windows(
    base: str, step: Step, pid: int, args: argparse.Namespace
) -> tuple[Stats, Probe, list[Window]]:
    """``args.volunteers`` loops of ``step`` through the warm-up, then window after window.

    A window is closed once no cycle started in it is still running, so that its line counts
    the submissions of its cycles (a think time apart from their next-task call).
    """
    warm = Stats()
    windows: list[Window] = []
    current, running = warm, True
    holding: list[Stats | None] = [warm] * args.volunteers  # the window of each one's cycle

    async def volunteer(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            while running:
                holding[i] = stats = current
                await step(client, stats, stats is not warm)
        holding[i] = None

    async def reporter() -> Probe:
        nonlocal running
        try:
            return await report_windows()
        finally:
            running = False  # also when the server is gone and /proc fails

    async def report_windows() -> Probe:
        nonlocal current, running
        await asyncio.sleep(args.warmup)
        start, first = time.perf_counter(), Probe.of(pid)
        current, last = Stats(), first
        print(HEADER, flush=True)
        for i in range(1, math.ceil(args.seconds / args.interval) + 1):
            end_s = min(i * args.interval, args.seconds)
            await asyncio.sleep(max(0.0, start + end_s - time.perf_counter()))
            running = end_s < args.seconds
            done, current, probe = current, Stats(), Probe.of(pid)  # all still connected
            while any(h is done for h in holding):
                await asyncio.sleep(0.02)
            length = end_s - (windows[-1].end_s if windows else 0.0)
            cores = (probe.cpu_s - last.cpu_s) / (probe.at - last.at)
            windows.append(Window(end_s, length, done, probe, cores))
            print(window_line(windows[-1]), flush=True)
            last = probe
        return first

    reporting = asyncio.create_task(reporter())
    await asyncio.gather(*map(volunteer, range(args.volunteers)))
    return warm, await reporting, windows


def server_problems(server: Server) -> list[str]:
    """What the server's exit and log say went wrong that no response showed."""
    problems = []
    if server.proc.returncode not in (0, -signal.SIGINT):
        problems.append(f"server exited with status {server.proc.returncode}")
    tracebacks = server.log.read_text(errors="replace").count("Traceback")
    if tracebacks:
        problems.append(f"{tracebacks} tracebacks in the server log")
    return problems


def soak_backend(backend: str, args: argparse.Namespace) -> Soak:
    with ExitStack() as stack:  # server, PostgreSQL and temp dir go, on errors and Ctrl+C too
        server, url = start_tessera(backend, args.images, 1, stack, args.database_url)
        server.wait_ready("/healthz")
        step = tessera_cycle(fetch_tiles=False, think_s=args.think)
        print(f"\n== {backend}: server pid {server.proc.pid} at {server.base}", flush=True)
        warm, start, windows = asyncio.run(drive_windows(server.base, step, server.proc.pid, args))
        server.stop()
        problems = server_problems(server)
        if problems or any(w.stats.errors for w in windows) or warm.errors:
            # The temp dir goes with the stack: keep the whole log, the tail is rarely enough.
            kept = Path(tempfile.gettempdir()) / f"tessera-soak-{backend}-{os.getpid()}.log"
            shutil.copyfile(server.log, kept)
            print(f"--- {backend} server log (non-200 lines; all of it in {kept}) ---")
            print(f"{server.tail()}\n---")
        return Soak(backend, args.seconds, warm, start, windows, count_votes(url), problems)


def p99_summary(soak: Soak, name: str) -> str:
    p99s = [w.p99(name) for w in soak.windows]
    first, last = p99s[0], p99s[-1]
    worst = max(range(len(p99s)), key=lambda i: p99s[i])
    drifted = last > DRIFT_RATIO * first and last - first > DRIFT_MIN_MS
    return (
        f"  p99 {name:<6} ms: first {first:.1f}, last {last:.1f}, max {p99s[worst]:.1f} "
        f"(window ending {soak.windows[worst].end_s:.0f} s); "
        f"{'DRIFTED' if drifted else 'no drift'} (last/first {last / first:.2f})"
    )


def report(soak: Soak, args: argparse.Namespace) -> None:
    calls = sum(s.calls for s in soak.all_stats)
    subs = sum(w.stats.count("submit") for w in soak.windows)
    empty = sum(s.empty for s in soak.all_stats)
    check = "ok" if soak.votes_acked == soak.votes_stored else "MISMATCH"
    first, last = soak.windows[0].probe, soak.windows[-1].probe
    rss_max = max(w.probe.rss_mib for w in soak.windows)
    lines = [
        f"\n== {soak.backend} summary: {soak.seconds:.0f} s after {args.warmup:.0f} s warm-up, "
        f"{args.volunteers} volunteers, think {args.think:.2f} s, {args.images} images",
        f"  requests {calls}, submissions {subs} ({subs / soak.seconds:.1f}/s), "
        f"empty offers {empty}, errors {len(soak.errors)}",
        f"  {soak.backend}: votes acknowledged {soak.votes_acked}, stored {soak.votes_stored} "
        f"({check})",
        *(p99_summary(soak, name) for name in CALLS),
        f"  server RSS MiB: after warm-up {soak.start.rss_mib:.1f}, first window "
        f"{first.rss_mib:.1f}, last {last.rss_mib:.1f}, max {rss_max:.1f} "
        f"({last.rss_mib - first.rss_mib:+.1f} first->last); "
        f"open fds first {first.fds}, last {last.fds}",
        f"  server CPU ms per submission (next + submit): first window "
        f"{soak.windows[0].cpu_ms_per_submission:.1f}, last "
        f"{soak.windows[-1].cpu_ms_per_submission:.1f}",
    ]
    lines += [f"  error x{soak.errors.count(e)}: {e}" for e in sorted(set(soak.errors))[:10]]
    print("\n".join(lines), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=600.0, help="measured time per backend")
    parser.add_argument(
        "--interval", type=float, help="seconds per report window (30, less for short soaks)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not measured")
    parser.add_argument("--volunteers", type=int, default=16)
    parser.add_argument("--think", type=float, default=1.0, help="mean seconds before answering")
    parser.add_argument("--images", type=int, default=20, help="demo scenes")
    parser.add_argument(
        "--database-url", help="an empty database of the one --backend to use instead of a new one"
    )
    args = parser.parse_args()
    if args.seconds <= 0 or args.volunteers < 1 or args.think < 0 or args.warmup < 0:
        parser.error("--seconds and --volunteers must be positive, --think and --warmup >= 0")
    args.interval = args.interval or min(30.0, max(1.0, args.seconds / 5))
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if args.database_url:
        scheme = "sqlite" if args.database_url.startswith("sqlite") else "postgres"
        if args.backend != scheme:
            parser.error(f"--database-url is a {scheme} URL: give --backend {scheme} with it")
    return args


def main() -> int:
    args = parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print(
        f"soak: {', '.join(backends)}; {args.seconds:.0f} s each after {args.warmup:.0f} s "
        f"warm-up, windows of {args.interval:g} s, {args.volunteers} volunteers thinking "
        f"{args.think:.2f} s, {args.images} demo images, {os.cpu_count()} CPUs",
        flush=True,
    )
    soaks = []
    for backend in backends:
        soaks.append(soak_backend(backend, args))
        report(soaks[-1], args)
    failures = [f for s in soaks for f in s.failures()]
    if failures:
        print("\nFAIL: " + "\n      ".join(failures))
        return 1
    print(f"\nPASS: zero errors, every acknowledged vote stored ({', '.join(backends)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
