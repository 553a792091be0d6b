"""When to retrain: an interval, a cron expression, and "after N newly complete targets".

A project's ``retrain`` setting says when, e.g.::

    {"every": "6h"}                      # also "30m", "1d" or a number of seconds
    {"cron": "0 3 * * *"}                # standard five-field crontab
    {"after_complete": 50}               # once 50 targets completed since the last round
    {"every": "1d", "after_complete": 50}  # whichever comes first

``tessera schedule`` runs an APScheduler loop that starts ``tessera retrain --project P`` as a
separate process for each trigger (so training never shares a process with the web server),
never two at once per project (the project lock refuses a second one anyway), coalescing
missed runs. ``tessera serve --scheduler`` starts that loop as a child process. In production the
same ``tessera retrain`` command runs from cron or a Kubernetes CronJob (see the README).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, JobStatus, MaskSource, MaskVersion, Project, Target, TargetState

log = logging.getLogger(__name__)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
POLL_SECONDS = 60.0


@dataclass(frozen=True)
class RetrainSchedule:
    every_s: float | None = None
    cron: str | None = None
    after_complete: int | None = None

    @property
    def empty(self) -> bool:
        return self.every_s is None and self.cron is None and self.after_complete is None


def parse_duration(text: str | float | int) -> float:
    """``"90"``, ``90``, ``"30m"``, ``"6h"``, ``"1d"`` -> seconds (positive)."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
        if not match:
            raise ValueError(f"not a duration: {text!r} (use e.g. 90, 30m, 6h or 1d)")
        seconds = float(match[1]) * UNITS[match[2] or "s"]
    if seconds <= 0:
        raise ValueError(f"a retrain interval must be positive, got {text!r}")
    return seconds


def schedule_of(project: Project) -> RetrainSchedule:
    """The project's ``retrain`` setting, checked (ValueError names what is wrong)."""
    raw: dict[str, Any] = dict(project.settings.get("retrain") or {}) if project.settings else {}
    unknown = set(raw) - {"every", "cron", "after_complete"}
    if unknown:
        raise ValueError(f"project {project.slug!r}: unknown retrain keys {sorted(unknown)}")
    cron = raw.get("cron")
    if cron is not None:
        CronTrigger.from_crontab(str(cron))  # raises ValueError on a bad expression
    after = raw.get("after_complete")
    if after is not None and (not isinstance(after, int) or after < 1):
        raise ValueError(f"project {project.slug!r}: after_complete must be a positive integer")
    every = raw.get("every")
    return RetrainSchedule(
        every_s=parse_duration(every) if every is not None else None,
        cron=str(cron) if cron is not None else None,
        after_complete=after,
    )


def completed_since_last_retrain(session: Session, project: Project) -> int:
    """Targets completed (a consensus mask written) since the last successful retrain began."""
    since: datetime | None = session.scalar(
        select(func.max(Job.started_at)).where(
            Job.project_id == project.id, Job.kind == "retrain", Job.status == JobStatus.SUCCEEDED
        )
    )
    query = (
        select(func.count(func.distinct(MaskVersion.target_id)))
        .join(Target, Target.id == MaskVersion.target_id)
        .where(
            Target.project_id == project.id,
            Target.state == TargetState.COMPLETE,
            MaskVersion.source == MaskSource.CONSENSUS,
        )
    )
    if since is not None:
        query = query.where(MaskVersion.created_at >= since)
    return int(session.scalar(query) or 0)


def retrain_command(slug: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "retrain", "--project", slug]


class RetrainScheduler:
    """APScheduler jobs that start a retrain process per project when its schedule says so."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        command: Any = retrain_command,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.factory = factory
        self.command = command
        self.poll_seconds = poll_seconds
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600}
        )
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._guard = threading.Lock()
        self.started: list[str] = []  # slugs, in the order their retrains were started

    def add_projects(self, slugs: Sequence[str] | None = None) -> dict[str, RetrainSchedule]:
        """Schedule the given projects (default: every project with a ``retrain`` setting)."""
        plans: dict[str, RetrainSchedule] = {}
        with self.factory() as session:
            query = select(Project).order_by(Project.slug)
            if slugs:
                query = query.where(Project.slug.in_(list(slugs)))
            for project in session.scalars(query):
                plan = schedule_of(project)
                if not plan.empty:
                    plans[project.slug] = plan
        for slug, plan in plans.items():
            if plan.every_s is not None:
                self._add(slug, "every", IntervalTrigger(seconds=plan.every_s))
            if plan.cron is not None:
                self._add(slug, "cron", CronTrigger.from_crontab(plan.cron))
            if plan.after_complete is not None:
                self.scheduler.add_job(
                    self._check_completed,
                    IntervalTrigger(seconds=self.poll_seconds),
                    args=[slug, plan.after_complete],
                    id=f"{slug}:after",
                )
        return plans

    def _add(self, slug: str, name: str, trigger: Any) -> None:
        self.scheduler.add_job(self.start_retrain, trigger, args=[slug], id=f"{slug}:{name}")

    def _check_completed(self, slug: str, threshold: int) -> None:
        with self.factory() as session:
            project = session.scalar(select(Project).where(Project.slug == slug))
            if project is not None and completed_since_last_retrain(session, project) >= threshold:
                self.start_retrain(slug)

    def start_retrain(self, slug: str) -> bool:
        """Start a retrain process unless this scheduler's previous one is still running."""
        with self._guard:
            previous = self._running.get(slug)
            if previous is not None and previous.poll() is None:
                log.info("retrain of %s still running; skipped", slug)
                return False
            log.info("starting a retrain of %s", slug)
            self._running[slug] = subprocess.Popen(self.command(slug))
            self.started.append(slug)
            return True

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        """Stop scheduling and stop running retrains (the next job marks them failed)."""
        self.scheduler.shutdown(wait=False)
        for process in self._running.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
