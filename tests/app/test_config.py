"""Settings: embedded defaults, a generated secret for local use, production refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from app.config import Settings, SettingsError


def test_default_database_is_sqlite_in_the_data_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", database_url="")
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'd' / 'tessera.db')}"
    assert settings.is_sqlite


def test_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path / "x"))
    monkeypatch.setenv("TESSERA_MAX_IMAGE_PIXELS", "1234")
    settings = Settings()
    assert settings.data_dir == tmp_path / "x" and settings.max_image_pixels == 1234


def test_secret_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secret_key="")
    key = settings.resolved_secret_key()
    assert len(key) >= 32
    assert Settings(data_dir=tmp_path, secret_key="").resolved_secret_key() == key
    mode = stat.S_IMODE((tmp_path / "secret_key").stat().st_mode)
    assert mode == 0o600


def test_production_refuses_a_missing_or_short_secret(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="TESSERA_SECRET_KEY is required"):
        Settings(environment="production", data_dir=tmp_path, secret_key="")
    with pytest.raises(SettingsError, match="at least 32"):
        Settings(environment="production", data_dir=tmp_path, secret_key="short")
    ok = Settings(environment="production", data_dir=tmp_path, secret_key="k" * 40)
    assert ok.resolved_secret_key() == "k" * 40
