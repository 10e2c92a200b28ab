"""A machine-wide lock per GPU: two processes (a buffer worker and a Prefect worker, two serve processes)
never render on one GPU at once.

An exclusive ``flock`` on ``<dir>/<key>.lock``. The kernel drops it when its holder dies, however it dies,
so a killed worker never leaves a GPU locked. The key is the GPU's UUID, so processes that see the GPU under
different ordinals (CUDA_VISIBLE_DEVICES) still agree; containers share the lock through a mounted
directory (``MUSETALK_GPU_LOCK_DIR``)."""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lock itself needs no torch: lock holders stay light processes
    import torch

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "musetalk-flow" / "gpu-locks"


def gpu_lock_key(device: torch.device) -> str | None:
    """The lock name of ``device``: its UUID on CUDA; None on the CPU (CPU renders may share the cores)."""
    if device.type != "cuda":
        return None
    from .device import torch_uuid

    return torch_uuid(device)


class GpuLock:
    """Exclusive use of one GPU across processes; re-entrant within a process (prepare inside render).

    ``with lock:`` blocks until no other process holds it. Threads of one process are serialised by the
    engine's own lock; this one only needs to keep other processes out."""

    def __init__(self, key: str, directory: Path = DEFAULT_LOCK_DIR):
        self.path = Path(directory) / f"{key}.lock"
        self._fd: int | None = None
        self._depth = 0
        self._guard = threading.RLock()
        self.waited_s = 0.0  # how long the last acquire waited for another process

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock (wait at most ``timeout`` s; None: as long as it takes). True when held."""
        self._guard.acquire()
        if self._depth:
            self._depth += 1
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        started = time.monotonic()
        try:
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() - started >= timeout:
                            os.close(fd)
                            self._guard.release()
                            return False
                        time.sleep(0.05)
        except BaseException:
            os.close(fd)
            self._guard.release()
            raise
        self.waited_s = time.monotonic() - started
        self._fd, self._depth = fd, 1
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator's `cat`
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._guard.release()

    def __enter__(self) -> "GpuLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
