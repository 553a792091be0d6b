"""The web service: health, the landing page and the project API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.config import Settings
from app.main import create_app
from app.services.importer import run_import
from tests.builders import write_image


@pytest.fixture
def client(settings: Settings, engine: object, session: Session) -> Iterator[TestClient]:
    """The app on the test database, its sessions inside the test's savepoint."""
    app = create_app(settings)
    app.state.session_factory = lambda: Session(
        bind=session.connection(), join_transaction_mode="create_savepoint"
    )
    with TestClient(app) as client:
        yield client


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_docs(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    # Swagger UI from this server, never from a CDN.
    assert "/docs/assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text.lower()
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert client.get("/docs/assets/swagger-editor.js").status_code == 404  # only what /docs uses
    schema = client.get("/openapi.json").json()
    assert "/api/projects" in schema["paths"]


def test_landing_page_lists_projects_with_counts(
    client: TestClient, session: Session, settings: Settings, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_image(src / "a.png", seed=1)
    write_image(src / "b.png", seed=2)
    (src / "tags.txt").write_text("a.png cat dog\nb.png cat\n")
    run_import(session, settings=settings, project_slug="pets", path=src, tag_file=None)

    page = client.get("/")
    assert page.status_code == 200
    assert 'data-project="pets"' in page.text
    projects = {p["slug"]: p for p in client.get("/api/projects").json()}
    assert (projects["pets"]["images"], projects["pets"]["tags"], projects["pets"]["targets"]) == (
        2,
        2,
        3,
    )


def test_unknown_project_is_a_clear_404(client: TestClient) -> None:
    response = client.get("/api/projects/nope")
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]
