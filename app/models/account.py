"""Accounts: people who log in (curators and admins; volunteers may attach their identity)."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Boolean, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow
from app.models._types import str_enum


class Role(enum.StrEnum):
    """Ordered by power: each role may do everything the ones before it may."""

    VOLUNTEER = "volunteer"
    CURATOR = "curator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    # argon2id, in the PHC string format (parameters and salt inside).
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(str_enum(Role), default=Role.VOLUNTEER)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)
    # A login cookie carries the epoch it was issued in; moving it on (``revoke_sessions``:
    # logout, new password, new role, disabled) ends every session issued before.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
