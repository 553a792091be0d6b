"""Volunteers and their credibility (Beta posteriors of sensitivity and specificity)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow


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
    # Tiles served, and how many of them were known: the picker keeps the gold rate with these.
    tiles_served: Mapped[int] = mapped_column(Integer, default=0)
    known_served: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Credibility(Base):
    """One volunteer's credibility, overall (category '') or for one tag category.

    The two-coin model of ``ml.aggregation.dawid_skene``: soft counts of the volunteer's yes and
    no answers on cells believed positive and negative (sensitivity and specificity are their
    Beta posteriors), and exact counts on gold cells, which decide whether an apparent
    adversary's answers may be used inverted.
    """

    __tablename__ = "credibility"
    __table_args__ = (UniqueConstraint("volunteer_id", "category"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(String(32), default="")
    pos_yes: Mapped[float] = mapped_column(Float, default=0.0)
    pos_no: Mapped[float] = mapped_column(Float, default=0.0)
    neg_no: Mapped[float] = mapped_column(Float, default=0.0)
    neg_yes: Mapped[float] = mapped_column(Float, default=0.0)
    gold_tp: Mapped[int] = mapped_column(Integer, default=0)
    gold_fn: Mapped[int] = mapped_column(Integer, default=0)
    gold_tn: Mapped[int] = mapped_column(Integer, default=0)
    gold_fp: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def gold_answers(self) -> int:
        return self.gold_tp + self.gold_fn + self.gold_tn + self.gold_fp

    @property
    def gold_correct(self) -> int:
        return self.gold_tp + self.gold_tn
