"""``revnets`` command line (needs the ``cli`` extra: ``pip install "revnets[cli]"``)."""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``revnets`` script and of ``python -m revnets``."""
    try:
        from .app import app
    except ModuleNotFoundError as error:
        sys.exit(
            f"revnets: the command line needs the package {error.name!r}, which is not installed; "
            'install the cli extra: pip install "revnets[cli]"'
        )
    app()
