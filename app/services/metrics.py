"""Prometheus metrics: what the database says (shared by every worker) and this process's requests.

The database-derived families are read at scrape time by a custom collector, so several uvicorn
workers or servers report the same totals: votes (append-only, so a true counter), retired cells
by reason, queue sizes (open windows, targets by state), and job durations. Request counts and
latencies are per process (``tessera_http_*``); with several workers, let Prometheus sum them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import as_utc
from app.models import (
    Cell,
    Job,
    JobStatus,
    Project,
    Target,
    Task,
    Vote,
    Window,
    WindowState,
)


class DatabaseCollector(Collector):
    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            yield from _families(session)


def _families(session: Session) -> Iterator[Metric]:
    slugs = dict(session.execute(select(Project.id, Project.slug)).all())
    votes = CounterMetricFamily("tessera_votes", "Votes stored", labels=["project"])
    for project_id, n in session.execute(
        select(Task.project_id, func.count(Vote.id))
        .join(Vote, Vote.task_id == Task.id)
        .group_by(Task.project_id)
    ):
        votes.add_metric([slugs[project_id]], n)
    yield votes
    retired = CounterMetricFamily(
        "tessera_cells_retired", "Cells retired, by reason", labels=["project", "reason"]
    )
    for project_id, reason, n in session.execute(
        select(Target.project_id, Cell.retire_reason, func.count(Cell.id))
        .join(Target, Target.id == Cell.target_id)
        .where(Cell.retire_reason.is_not(None))
        .group_by(Target.project_id, Cell.retire_reason)
    ):
        retired.add_metric([slugs[project_id], str(reason)], n)
    yield retired
    windows = GaugeMetricFamily(
        "tessera_open_windows", "Open windows (the task queue)", labels=["project"]
    )
    for project_id, n in session.execute(
        select(Window.project_id, func.count(Window.id))
        .where(Window.state == WindowState.OPEN)
        .group_by(Window.project_id)
    ):
        windows.add_metric([slugs[project_id]], n)
    yield windows
    targets = GaugeMetricFamily("tessera_targets", "Targets by state", labels=["project", "state"])
    for project_id, state, n in session.execute(
        select(Target.project_id, Target.state, func.count(Target.id)).group_by(
            Target.project_id, Target.state
        )
    ):
        targets.add_metric([slugs[project_id], str(state)], n)
    yield targets
    yield from _jobs(session)


def _jobs(session: Session) -> Iterator[Metric]:
    labels = ["kind", "status"]
    runs = CounterMetricFamily("tessera_jobs", "Jobs finished, by kind and status", labels=labels)
    seconds = CounterMetricFamily(
        "tessera_job_duration_seconds", "Total run time of finished jobs", labels=labels
    )
    totals: dict[tuple[str, str], tuple[int, float]] = {}
    for kind, status, started, finished in session.execute(
        select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
            Job.status.in_([JobStatus.SUCCEEDED, JobStatus.FAILED])
        )
    ):
        n, total = totals.get((kind, str(status)), (0, 0.0))
        took = (as_utc(finished) - as_utc(started)).total_seconds() if started and finished else 0
        totals[(kind, str(status))] = (n + 1, total + took)
    for (kind, state), (n, total) in sorted(totals.items()):
        runs.add_metric([kind, state], n)
        seconds.add_metric([kind, state], total)
    yield runs
    yield seconds


class RequestMetrics:
    """This process's request counter and latency histogram, labelled by route template."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tessera_http_requests",
            "HTTP requests handled by this process",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "tessera_http_request_duration_seconds",
            "HTTP request latency in this process",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )


UNMATCHED = "unmatched"


def route_template(scope: Any) -> str:
    """The template of the route a request matched, prefixes included
    (``/api/tasks/{task_id}/tiles/{position}``); a mounted app's mount point (``/static``); or
    ``unmatched``. A route included from a router knows only its own part of the path: the rest
    is the router's prefix, taken from the URL (Tessera's prefixes hold no parameters, and no
    route takes a ``:path`` parameter)."""
    own = getattr(scope.get("route"), "path_format", None)
    if own is None:
        return str(scope.get("root_path") or UNMATCHED)
    tail = own.strip("/").split("/")
    parts = str(scope["path"]).strip("/").split("/")
    return "/" + "/".join(parts[: max(0, len(parts) - len(tail))] + tail)


class RequestMetricsMiddleware:
    """Counts requests and their latency, as pure ASGI middleware (no body wrapping, no thread
    hop), labelled by the template of the route that matched (``/api/tasks/{task_id}/tiles/
    {position}``), so that the series stay as few as the routes; a path no route matched (a
    probe, a typo) counts under one label, ``unmatched``."""

    def __init__(self, app: Any, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            template = route_template(scope)
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
