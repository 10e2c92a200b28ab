"""The machine-wide per-GPU lock: two processes never hold one GPU at once, a dead holder frees it, and the
engine holds it while it renders (checked from a second, real process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from musetalk_engine.gpu_lock import GpuLock, gpu_lock_key

pytest_plugins = ["tests.fixtures_engine"]

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from musetalk_engine.gpu_lock import GpuLock
    lock = GpuLock("GPU-same", {directory!r})
    for _ in range(3):
        with lock:
            print("start", time.monotonic(), flush=True)
            time.sleep(0.3)
            print("end", time.monotonic(), flush=True)
        time.sleep(0.01)
""")

# exit 0 when the lock could be taken at once, 1 when another process holds it
TRY_LOCK = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
           "sys.exit(0 if not fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) else 1)"


def _try_lock(path: Path) -> int:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)], capture_output=True).returncode


def test_two_processes_never_hold_the_same_gpu_at_once(tmp_path):
    script = HOLDER.format(root=str(ROOT), directory=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        times = [float(line.split()[1]) for line in out.splitlines()]
        spans += list(zip(times[::2], times[1::2]))
    spans.sort()
    assert len(spans) == 6
    # CLOCK_MONOTONIC is one clock for the whole machine: each hold ends before the next one starts
    assert all(end <= nxt_start for (_, end), (nxt_start, _) in zip(spans, spans[1:])), spans


def test_a_dead_holder_frees_the_gpu(tmp_path):
    script = HOLDER.format(root=str(ROOT), directory=str(tmp_path)).replace("time.sleep(0.3)", "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().startswith("start")
    assert _try_lock(tmp_path / "GPU-same.lock") == 1
    holder.kill()
    holder.wait()
    assert _try_lock(tmp_path / "GPU-same.lock") == 0


def test_the_lock_is_reentrant_and_times_out(tmp_path):
    lock = GpuLock("GPU-x", tmp_path)
    with lock, lock:  # prepare inside render takes it again
        assert _try_lock(lock.path) == 1
        other = GpuLock("GPU-x", tmp_path)
        started = time.monotonic()
        # flock is per open file: a second lock object on the same file waits like another process would
        assert not other.acquire(timeout=0.2) and time.monotonic() - started >= 0.2
    assert _try_lock(lock.path) == 0


def test_gpu_lock_key_names_the_gpu_by_uuid(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"u{i}"))
    assert gpu_lock_key(torch.device("cuda", 1)) == "GPU-u1"
    assert gpu_lock_key(torch.device("cpu")) is None


def test_the_engine_holds_the_gpu_while_it_renders(tiny_models, media, tmp_path):
    """A second process cannot take the engine's GPU mid-render; it can again once the render is done."""
    from musetalk_engine.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(models_dir=tiny_models, device="cpu", gpu_lock="GPU-test",
                                 gpu_lock_dir=tmp_path / "locks", cache_dir=tmp_path / "cache"))
    assert engine.gpu_lock is not None
    seen = []

    def progress(done, total):
        if not seen:
            seen.append(_try_lock(engine.gpu_lock.path))

    engine.render(media.video, media.short_speech, tmp_path / "out.mp4", on_progress=progress)
    assert seen == [1]  # held by this process while rendering
    assert _try_lock(engine.gpu_lock.path) == 0  # and free afterwards
