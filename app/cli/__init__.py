"""The ``tessera`` command: one typer app (``app.cli.common.app``) whose commands live in
``data`` (database, import, projects, consensus, accounts, export), ``models`` (training and
model jobs), ``serve`` (server and demo) and ``maintenance`` (doctor, backup, restore)."""

from __future__ import annotations

import logging
import sys


def main() -> None:
    if sys.argv[1:2] == ["aggregate"]:  # the fast path: no typer (see app.cli.aggregate)
        from app.cli.aggregate import run

        raise SystemExit(run(sys.argv[2:]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from app.cli import data, maintenance, models, serve  # noqa: F401  (they register commands)
    from app.cli.common import app

    app()
