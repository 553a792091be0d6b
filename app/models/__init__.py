"""The tables, one module per domain word. Importing this package registers them all."""

from app.models.account import Account, Role
from app.models.consensus import Consensus, MaskSource, MaskVersion, QualitySnapshot
from app.models.image import Image, ImageEmbedding, ImageTag, ImageTagSource, ImageTagStatus
from app.models.model_version import Job, JobStatus, ModelKind, ModelVersion
from app.models.project import DEFAULT_PROJECT_SETTINGS, Project
from app.models.tag import Tag, TagAlias, TagCategory
from app.models.target import (
    SETTLED_BY,
    VOTED_REASONS,
    Cell,
    CellStatus,
    RetireReason,
    Target,
    TargetState,
    Window,
    WindowState,
)
from app.models.task import Gold, GoldSource, Task, TaskKind, TaskState, TaskTile, Vote
from app.models.volunteer import Credibility, Volunteer

__all__ = [
    "DEFAULT_PROJECT_SETTINGS",
    "SETTLED_BY",
    "VOTED_REASONS",
    "Account",
    "Cell",
    "CellStatus",
    "Consensus",
    "Credibility",
    "Gold",
    "GoldSource",
    "Image",
    "ImageEmbedding",
    "ImageTag",
    "ImageTagSource",
    "ImageTagStatus",
    "Job",
    "JobStatus",
    "MaskSource",
    "MaskVersion",
    "ModelKind",
    "ModelVersion",
    "Project",
    "QualitySnapshot",
    "RetireReason",
    "Role",
    "Tag",
    "TagAlias",
    "TagCategory",
    "Target",
    "TargetState",
    "Task",
    "TaskKind",
    "TaskState",
    "TaskTile",
    "Volunteer",
    "Vote",
    "Window",
    "WindowState",
]
