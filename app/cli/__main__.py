"""``python -m app.cli``: the ``tessera`` command."""

from app.cli import main

main()
