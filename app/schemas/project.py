"""Project I/O."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ProjectRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    slug: str = Field(description="URL-safe identifier")
    name: str
    description: str
    images: int = Field(description="images in the project")
    tags: int = Field(description="tags in the vocabulary")
    targets: int = Field(description="(image, tag) pairs to segment")


class Health(BaseModel):
    status: str
    database: str
    version: str
