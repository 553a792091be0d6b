"""HTML pages rendered with Jinja2 templates from frontend/templates."""

from __future__ import annotations

from pathlib import Path

from fastapi.templating import Jinja2Templates

FRONTEND_DIR = Path(__file__).resolve().parent.parent.parent / "frontend"
templates = Jinja2Templates(directory=FRONTEND_DIR / "templates")
