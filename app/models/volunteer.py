"""Volunteers and their credibility (Beta posteriors of sensitivity and specificity)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow

# Mildly optimistic prior: a new volunteer is assumed better than chance, not expert.
PRIOR_ALPHA = 4.0
PRIOR_BETA = 1.0


class Volunteer(Base):
    __tablename__ = "volunteers"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The identity carried in the anonymous signed cookie.
    public_id: Mapped[str] = mapped_column(String(36), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(80))
    # Set when an anonymous identity is attached to an account.
    account_id: Mapped[int | None] = mapped_column(Integer, index=True)
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    banned_at: Mapped[datetime | None] = mapped_column(default=None)
    ban_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Credibility(Base):
    """One volunteer's credibility, overall (category '') or for one tag category."""

    __tablename__ = "credibility"
    __table_args__ = (UniqueConstraint("volunteer_id", "category"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(String(32), default="")
    sens_alpha: Mapped[float] = mapped_column(Float, default=PRIOR_ALPHA)
    sens_beta: Mapped[float] = mapped_column(Float, default=PRIOR_BETA)
    spec_alpha: Mapped[float] = mapped_column(Float, default=PRIOR_ALPHA)
    spec_beta: Mapped[float] = mapped_column(Float, default=PRIOR_BETA)
    gold_answers: Mapped[int] = mapped_column(Integer, default=0)
    gold_correct: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def sensitivity(self) -> float:
        return self.sens_alpha / (self.sens_alpha + self.sens_beta)

    @property
    def specificity(self) -> float:
        return self.spec_alpha / (self.spec_alpha + self.spec_beta)
