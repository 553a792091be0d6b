"""JSON routers, mounted under /api."""

from fastapi import APIRouter

from app.api import project

api_router = APIRouter(prefix="/api")
api_router.include_router(project.router)
