"""JSON routers, mounted under /api."""

from fastapi import APIRouter

from app.api import project, task, volunteer

api_router = APIRouter(prefix="/api")
api_router.include_router(project.router)
api_router.include_router(task.router)
api_router.include_router(volunteer.router)
