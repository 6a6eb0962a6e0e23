"""Log set-up shared by the one-process service and every worker process."""

from __future__ import annotations

import logging

from service.settings import Settings


def configure_logging(settings: Settings) -> None:
    # The pid: with CAMSERVE_WORKERS > 1 every worker writes to the same stream, and which one reloaded,
    # died or refused a bundle is the first thing an operator asks.
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
    )
    # Request lines are JSON objects already: one per line, nothing in front, for log shippers.
    access = logging.getLogger("camserve.access")
    if not access.handlers:
        json_lines = logging.StreamHandler()
        json_lines.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(json_lines)
    access.propagate = False
