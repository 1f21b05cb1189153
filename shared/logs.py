"""Process-wide logging set-up shared by the router, workers and supervisor."""

from __future__ import annotations

import logging
import os


def setup_logging(role: str) -> None:
    level = os.environ.get("LLAMAFLEET_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s",
    )
