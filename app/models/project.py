"""A project: a set of images, a tag vocabulary and the campaign settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow

DEFAULT_PROJECT_SETTINGS: dict[str, Any] = {
    # How deep the grid pyramid may go, and the smallest cell worth asking about.
    "max_level": 4,
    "min_cell_px": 16,
    # Votes per cell before it is retired as uncertain, and the confidence to retire early.
    # Budget and min_votes count credible votes: a random clicker's counts for almost nothing.
    "vote_budget": 7,
    "retire_confidence": 0.95,
    # Share of tiles that are known (gold), and the reCAPTCHA-style mosaic mix.
    "gold_rate": 0.15,
    "mosaic_mix": {"known_true": 3, "known_false": 5, "unknown": 1},
    "lease_seconds": 300,
    # Windows one volunteer may hold leased at once (the page holds the task in hand and the
    # next one, fetched ahead); a new lease past it gives the oldest window back, so that nobody
    # can hoard the open windows and leave the crowd nothing to answer. The older task may still
    # be answered (a page offline keeps its answers and sends them later).
    "open_tasks_per_volunteer": 2,
    # Share of targets with ground truth whose truth is served as known tiles (the rest is the
    # frozen evaluation set), and the share of tasks served as mosaics when gold allows.
    "control_share": 0.3,
    "mosaic_share": 0.25,
    # A grid with fewer open squares than this is filled up with other windows' last open
    # squares of its tag, served as a mosaic (``picker._packed``; 0: never). Off by default:
    # measured, it helped the crowd alone and the random baseline, not the learning loop.
    "pack_below": 0,
    "min_votes": 3,
    # Credible votes for the object that retire a cell still unsure after min_votes as split:
    # a sliver of the object, left to its finer window (ml.aggregation.rules; 0: never).
    "split_votes": 2,
    # Votes that confirm a cell whose model prior is already sure (instead of min_votes).
    "model_confirm_votes": 1,
    # The segmenter also learns the current masks of targets still collecting where their
    # squares are settled, each pixel weighted by its confidence (an open square weighs
    # nothing): early in a project nothing is complete, and the control images are a handful.
    "train_on_progress": True,
    # How the learning loop ranks targets: uncertainty, disagreement or random (the baseline).
    "acquisition": "uncertainty",
    # How the pixels inside the cells an object's border crosses are decided (ml.composition):
    # grabcut (the image, seeded by the decided cells and the model), model, or cells.
    "composition": "grabcut",
    # The pyramid's frame (``ml.aggregation.grid``): the square around each image, so every
    # cell is a square (True), or the image itself (False: projects made before migration
    # 0005). Fixed when the project is made (``create_project`` stores it): votes are stored
    # by cell address, whose meaning the frame sets.
    "square_cells": True,
}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def setting(self, key: str) -> Any:
        return {**DEFAULT_PROJECT_SETTINGS, **(self.settings or {})}[key]
