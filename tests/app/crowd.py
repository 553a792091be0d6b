"""Simulated volunteers that answer real HTTP tasks from the demo's ground truth."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Cell, Consensus, Image, Project, Target, TaskTile, Vote
from app.services.crowd.opening import load_truth
from app.services.project import square_cells
from ml.aggregation import grid
from ml.aggregation.simulate import VolunteerProfile, answer

# How close to a tile the object must come for a person to take the tile for part of it
# (``VolunteerProfile.near_yes``), as a share of the tile's side.
NEAR_MARGIN = 0.15


@dataclass
class Truths:
    """True coverage of any served tile, read from the held ground truth."""

    settings: Settings
    factory: sessionmaker[Session]
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    square: dict[int, bool] = field(default_factory=dict)  # by target: the project's frame
    # Complete ground truth (the demo's): a target without a mask is a tag the image lacks.
    absent_is_empty: bool = False

    def coverage(self, task_id: int) -> np.ndarray:
        with self.factory() as session:
            rows = session.execute(
                select(TaskTile.position, Cell, Target)
                .join(Cell, Cell.id == TaskTile.cell_id)
                .join(Target, Target.id == Cell.target_id)
                .where(TaskTile.task_id == task_id)
                .order_by(TaskTile.position)
            ).all()
            by_target: dict[int, list[tuple[int, grid.Cell]]] = defaultdict(list)
            for position, cell, target in rows:
                if target.id not in self.masks:
                    self.masks[target.id] = self._truth(session, target)
                by_target[target.id].append((position, grid.Cell(cell.level, cell.row, cell.col)))
        out = np.zeros(len(rows))
        for target_id, tiles in by_target.items():  # one integral image per target, not per tile
            coverage = grid.cell_coverage(
                self.masks[target_id], [a for _, a in tiles], square=self.square[target_id]
            )
            out[[p for p, _ in tiles]] = coverage
        return out

    def near(self, task_id: int, margin: float = NEAR_MARGIN) -> np.ndarray:
        """Per tile of a task: whether the object comes within ``margin`` of the tile's side
        of it (the tile itself included). Read after ``coverage``, which loads the truths."""
        with self.factory() as session:
            rows = session.execute(
                select(TaskTile.position, Cell.level, Cell.row, Cell.col, Cell.target_id)
                .join(Cell, Cell.id == TaskTile.cell_id)
                .where(TaskTile.task_id == task_id)
                .order_by(TaskTile.position)
            ).all()
        out = np.zeros(len(rows), dtype=bool)
        for position, level, row, col, target_id in rows:
            mask = self.masks[target_id]
            h, w = mask.shape
            r = grid.cell_rect(grid.Cell(level, row, col), h, w, square=self.square[target_id])
            pad = int(np.ceil(margin * max(r.bottom - r.top, r.right - r.left, 1)))
            top, left = max(r.top - pad, 0), max(r.left - pad, 0)
            out[position] = bool(
                mask[top : max(r.bottom + pad, 0), left : max(r.right + pad, 0)].any()
            )
        return out

    def cell_coverage(self, session: Session, target: Target, cell: Cell) -> float:
        """The true coverage of one cell of ``target``."""
        if target.id not in self.masks:
            self.masks[target.id] = self._truth(session, target)
        address = grid.Cell(cell.level, cell.row, cell.col)
        square = self.square[target.id]
        return float(grid.cell_coverage(self.masks[target.id], [address], square=square)[0])

    def _truth(self, session: Session, target: Target) -> np.ndarray:
        project = session.get(Project, target.project_id)
        assert project is not None
        self.square[target.id] = square_cells(project)
        mask = load_truth(session, self.settings, target)
        if mask is None and self.absent_is_empty:
            image = session.get(Image, target.image_id)
            assert image is not None
            mask = np.zeros((image.height, image.width), dtype=bool)
        assert mask is not None, "the simulation needs ground truth"
        return mask


@dataclass
class SimulatedVolunteer:
    client: TestClient
    profile: VolunteerProfile
    rng: np.random.Generator
    truths: Truths
    submitted: list[dict[str, Any]] = field(default_factory=list)
    selections: dict[int, list[int]] = field(default_factory=dict)

    def next_task(self, slug: str, **params: str) -> dict[str, Any] | None:
        response = self.client.get(f"/api/projects/{slug}/tasks/next", params=params)
        assert response.status_code == 200, response.text
        task: dict[str, Any] | None = response.json()["task"]
        return task

    def answer(self, slug: str, task: dict[str, Any]) -> dict[str, Any]:
        coverage = self.truths.coverage(task["id"])
        near = self.truths.near(task["id"]) if self.profile.near_yes > 0 else None
        labels, seconds = answer(self.profile, coverage, self.rng, near)
        selected = [int(p) for p in np.flatnonzero(labels)]
        response = self.client.post(
            f"/api/projects/{slug}/tasks/submit",
            json={
                "token": task["token"],
                "selected": selected,
                "elapsed_ms": int(seconds.sum() * 1000),
            },
        )
        assert response.status_code == 200, response.text
        self.selections[task["id"]] = selected
        result: dict[str, Any] = response.json()
        self.submitted.append(result)
        return result

    def step(self, slug: str, **params: str) -> dict[str, Any] | None:
        task = self.next_task(slug, **params)
        return None if task is None else self.answer(slug, task)


def stored_and_counted(db: Session | Connection) -> tuple[dict[int, int], dict[int, int]]:
    """Per voted unknown cell, the votes stored on it and the votes its consensus counts: equal
    once every answer is fused, each exactly once."""
    unknown = select(TaskTile.cell_id).where(TaskTile.known.is_(False))
    votes = dict(
        db.execute(
            select(Vote.cell_id, func.count())
            .where(Vote.cell_id.in_(unknown))
            .group_by(Vote.cell_id)
        ).all()
    )
    counted = dict(
        db.execute(
            select(Consensus.cell_id, Consensus.n_votes).where(Consensus.cell_id.in_(votes))
        ).all()
    )
    return votes, counted
