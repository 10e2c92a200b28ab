"""The project's logging (tasks/logs.py) into a string for a test, and every logger level it touched put
back afterwards."""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from typing import Iterator

from tasks.logs import configure_logging, reset_logging


@contextmanager
def captured(fmt: str = "text", max_chars: int = 4000, level: int = logging.INFO,
             levels: dict[str, int] | None = None) -> Iterator[io.StringIO]:
    """Log lines as the service writes them, in a StringIO; ``levels``: loggers set after configuring
    (a request logger shown on purpose, a test client's own lines hidden)."""
    stream = io.StringIO()
    levels = levels or {}
    saved = {n: logging.getLogger(n).level for n in ("httpx", "httpcore", "", *levels)}
    configure_logging(level, fmt=fmt, max_chars=max_chars, stream=stream)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    try:
        yield stream
    finally:
        reset_logging()
        for name, lvl in saved.items():
            logging.getLogger(name).setLevel(lvl)
