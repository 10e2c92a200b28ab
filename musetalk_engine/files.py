"""Writing a file so that no reader ever sees half of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(dest: Path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """``write(tmp)`` to a unique temp name beside ``dest``, then rename it into place: readers (and other
    workers sharing the directory) never see half a file, and two writers never share a temp file.
    ``durable`` also flushes the file to disk before the rename (a file a crash must not lose)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
