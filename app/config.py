"""Settings, read from the environment with the ``TESSERA_`` prefix.

The embedded default needs nothing: a data folder in the working directory holding a SQLite
database (WAL mode) and the content-addressed image store. Production must say where its
database is and give a secret key; a missing key is refused there rather than generated,
because several workers behind a load balancer must share one key.
"""

from __future__ import annotations

import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_FILE_NAME = "secret_key"
MIN_SECRET_LENGTH = 32


class SettingsError(RuntimeError):
    """The settings cannot work as given; the message says what to change."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_", env_file=None, extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path("tessera-data"), description="images, masks, models")
    database_url: str = Field(default="", description="empty: SQLite file in the data folder")
    secret_key: str = Field(default="", repr=False)
    # Where images, masks and checkpoints live: empty for the data folder, or
    # s3://bucket/prefix for S3-compatible object storage (AWS S3, MinIO, Ceph RGW, GCS in
    # interoperability mode); its endpoint and credentials come from the usual AWS variables
    # (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
    storage_url: str = Field(default="", description="empty: the data folder; s3://bucket/prefix")
    # Objects read from object storage are kept in the data folder's cache up to this size
    # (least recently used first out; each process counts its own reads, so roughly): tiles
    # read the same images again and again. A model job holds its files apart (hard links).
    storage_cache_bytes: int = Field(default=2 * 1024**3, ge=64 * 1024**2)

    # Import limits: a decompression bomb is refused before its pixels are decoded.
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_side: int = 16_384
    min_image_side: int = 16
    # Archives (zip, tar) given to the importer or uploaded by a curator: inflated size, count.
    max_archive_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_archive_members: int = Field(default=200_000, gt=0)
    # A tag file, vocabulary or COCO annotations file, each (JSON is read whole: up to 20x its
    # size in memory; COCO val2017's 25 MB fits, train2017's 448 MB needs this raised).
    max_description_bytes: int = Field(default=32 * 1024**2, gt=0)
    max_upload_bytes: int = Field(default=1024**3, gt=0)
    # Any other request body (JSON answers, forms): refused past this before it is read.
    max_body_bytes: int = Field(default=1024**2, gt=0)

    # Each task's tiles vary slightly (shift, colour, noise, JPEG quality) so that known tiles
    # cannot be memorised or matched by hash; off only to look at exact crops.
    tile_augmentation: bool = True

    # The full EM pass reconciles the online estimates every so often (0 turns it off).
    consensus_interval_s: float = 300.0
    # Answers are stored on the request and fused by a background fuser in batches
    # (``app.services.crowd.fuser``), woken by each answer and every fusion_interval_s anyway;
    # "external": by `tessera fuse` processes of their own (a busy PostgreSQL deployment);
    # "inline" fuses each in its request (slower; simulations that must replay exactly).
    fusion: Literal["background", "external", "inline"] = "background"
    fusion_interval_s: float = Field(default=1.0, gt=0)
    # When the oldest answer waiting for the fuser is older than this, a request fuses its own
    # answer itself: under overload answers slow down instead of the consensus falling behind.
    fusion_max_lag_s: float = Field(default=0.5, gt=0)

    # uvicorn's line per request; off under heavy load (metrics count requests anyway).
    access_log: bool = True
    host: str = "127.0.0.1"
    # Proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (comma-separated
    # addresses or networks, uvicorn's forwarded_allow_ips; "*" any). Empty: none, so the
    # client address the rate limits count is the connection's, whatever a header says.
    trusted_proxies: str = ""
    # Host names this server answers to (comma-separated, "*.example.org" allowed); "*": any.
    # Pages never build links from the Host header either way.
    allowed_hosts: str = "*"
    port: int = Field(default=8000, ge=1, le=65535)

    # Task requests (next, submit, skip) a minute, per volunteer and per client address; 0: off.
    # A person answers a grid in 3 s or more: 2 requests each, so 180 leaves room to spare.
    rate_limit_volunteer_per_minute: int = Field(default=180, ge=0)
    rate_limit_address_per_minute: int = Field(default=1200, ge=0)
    # New anonymous volunteers one address may make in an hour (each is a row and a cookie):
    # without it a client that drops its cookie made one per request.
    rate_limit_new_volunteers_per_hour: int = Field(default=120, ge=0)
    # Logins: wrong passwords per account name before it is locked for LOGIN_WINDOW_S (the
    # right password too: a guesser cannot tell), and attempts per client address.
    login_failures_per_account: int = Field(default=5, ge=0)
    # Tasks leased and not yet answered, per client address (all its volunteers together; each
    # volunteer holds at most the project's open_tasks_per_volunteer); 0: no cap.
    open_tasks_per_address: int = Field(default=60, ge=0)
    login_attempts_per_address: int = Field(default=30, ge=0)

    # When set, /metrics asks for it as a bearer token (Prometheus' `authorization` setting);
    # empty, /metrics is public (request counts and latencies, database size: no personal data).
    metrics_token: str = Field(default="", repr=False)
    # The API's documentation (/docs, /openapi.json) for anyone; false: 404 for both.
    public_api_docs: bool = True

    @model_validator(mode="after")
    def _storage_url_is_known(self) -> Settings:
        url = self.storage_url
        if url and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?", url):
            raise SettingsError(
                f"TESSERA_STORAGE_URL={url!r} is not a storage Tessera knows: leave it empty "
                "for the data folder, or give s3://bucket/prefix (a valid bucket name)"
            )
        return self

    @model_validator(mode="after")
    def _production_needs_explicit_values(self) -> Settings:
        if self.environment != "production":
            return self
        if not self.secret_key:
            raise SettingsError(
                "TESSERA_SECRET_KEY is required in production: generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'` and share it "
                "between all workers."
            )
        if len(self.secret_key) < MIN_SECRET_LENGTH:
            raise SettingsError(
                f"TESSERA_SECRET_KEY must be at least {MIN_SECRET_LENGTH} characters in production."
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tessera.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def masks_dir(self) -> Path:
        return self.data_dir / "masks"

    @property
    def storage_cache_dir(self) -> Path:
        """Local copies of objects read from object storage (unused with the data folder)."""
        return self.data_dir / "cache" / "objects"

    @property
    def scratch_dir(self) -> Path:
        """Private working folders (unpacked archives, uploads); emptied after each use."""
        return self.data_dir / "scratch"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.images_dir, self.masks_dir):
            path.mkdir(parents=True, exist_ok=True)

    def resolved_secret_key(self) -> str:
        """The signing key: given, or generated once into the data folder (not in production)."""
        if self.secret_key:
            return self.secret_key
        self.ensure_dirs()
        path = self.data_dir / SECRET_FILE_NAME
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
        key = secrets.token_urlsafe(48)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key)
        try:
            # link() fails if another process won the race; then its key is the key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return path.read_text(encoding="utf-8").strip()


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment; a value that cannot be used raises ``SettingsError``
    naming its variable (``TESSERA_PORT=80000``: "TESSERA_PORT: Input should be less than or
    equal to 65535"), never a traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"TESSERA_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
