"""Task and submission I/O."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class TagView(BaseModel):
    name: str
    display_name: str
    description: str


class TileView(BaseModel):
    position: int = Field(description="0..8, row-major")
    url: str = Field(description="the tile's image (JPEG), for this volunteer only")
    width: int = Field(description="tile width in pixels as served")
    height: int = Field(description="tile height in pixels as served")
    source_width: int = Field(
        description="width of the part of the image the tile shows, in the source image's pixels"
    )
    source_height: int = Field(description="its height, in source pixels")


class TaskRead(BaseModel):
    id: int
    kind: Literal["window", "mosaic"]
    token: str = Field(description="signed; send it back with the answers")
    expires_at: datetime
    tag: TagView
    prompt: str
    tiles: list[TileView]
    context_url: str | None = Field(
        default=None,
        description="for a window finer than the whole image: the whole image (JPEG) with the "
        "window outlined and the rest dimmed, to show where the squares are",
    )
    around_url: str | None = Field(
        default=None,
        description="for a deeper window: the area around it (JPEG), the window outlined",
    )
    fallback_reason: str | None = Field(
        default=None, description="why a mosaic was asked for but a window task is served"
    )


class TaskOffer(BaseModel):
    task: TaskRead | None
    message: str | None = Field(default=None, description="why there is no task")


class SubmissionCreate(BaseModel):
    token: str = Field(min_length=1, max_length=2000)
    selected: list[int] = Field(max_length=9, description="positions (0..8) the volunteer chose")
    elapsed_ms: int = Field(ge=0, le=3_600_000, description="time from display to answer")


class SkipCreate(BaseModel):
    token: str = Field(min_length=1, max_length=2000)


class SubmissionRead(BaseModel):
    task_id: int
    votes: int
    feedback: Literal["ok", "check_again"] | None = Field(
        description="on known tiles: all right, or please check again (never which tile)"
    )
    # What fusing the answers did; None when the fuser does it after the answer is stored.
    retired_cells: int | None = None
    windows_opened: int | None = None
    completed_targets: int | None = None


class AnswerCreate(BaseModel):
    """One request per grid: the answer to the task in hand (or giving it back), and the next."""

    submit: SubmissionCreate | None = Field(default=None, description="the answers to a task")
    skip: SkipCreate | None = Field(default=None, description="or a task given back unanswered")
    next: bool = Field(default=True, description="also lease the next task")
    tag: str | None = Field(
        default=None, max_length=200, description="only this tag (name or alias)"
    )
    kind: Literal["auto", "window", "mosaic"] = "auto"

    @model_validator(mode="after")
    def _one_action(self) -> AnswerCreate:
        if self.submit is not None and self.skip is not None:
            raise ValueError("send either submit or skip, not both")
        return self


class AnswerRead(BaseModel):
    submission: SubmissionRead | None = Field(
        default=None, description="the stored result of the submitted task"
    )
    task: TaskRead | None = Field(default=None, description="the next task, when asked for")
    message: str | None = Field(default=None, description="why there is no next task")


class VolunteerStatsRead(BaseModel):
    name: str
    answers: int
    tasks: int
    streak_days: int = Field(description="consecutive days up to today with an answer")
    quality: Literal["new", "learning", "fair", "good", "excellent"] = Field(
        description="coarse agreement with known tiles; never says which tiles were known"
    )


class VolunteerUpdate(BaseModel):
    # No control characters (C0, DEL, C1), and no white space at either end (listed, not \s:
    # regex engines disagree on what \s is): what the service keeps after it collapses inner
    # runs of spaces is then 2-40 characters too, so the schema says all the service checks.
    display_name: str = Field(
        min_length=2,
        max_length=40,
        pattern=(
            "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
            "[^\\x00-\\x1f\\x7f-\\x9f]*"
            "[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]$"
        ),
    )
