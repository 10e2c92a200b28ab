"""The real `musetalk-flow serve` process, stopped as an operator (or the platform) would: SIGTERM or SIGINT
while it imports, while it loads its models, and once it is ready. Every time it must exit 0, print no
traceback and no native abort ("terminate called …", exit 134), and leave no process of ours behind — the
process tree (psutil) seen while it ran is gone afterwards, Prefect's temporary server included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.hostile_media import UNSET_ENV
from tests.servers import free_port, wait_until

pytest_plugins = ["tests.fixtures_engine"]


class Serve:
    def __init__(self, tmp: Path, models: Path):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV and not k.startswith("MUSETALK_")}
        env.update(MUSETALK_MODELS_DIR=str(models), MUSETALK_WORKDIR=str(tmp), MUSETALK_CACHE_DIR=str(tmp / "cache"),
                   PREFECT_HOME=str(tmp / "prefect"))  # its own temporary server and database
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant observed

    def hc(self) -> dict | None:
        self.observe()
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/hc", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None

    def observe(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            pass

    def stop(self, sig: int) -> tuple[int, str]:
        self.observe()
        self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=240)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode, out

    def survivors(self) -> list[str]:
        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        return left


def _assert_clean(code: int, out: str, serve: Serve) -> None:
    assert code == 0, out[-3000:]
    assert "terminate called" not in out and "Traceback" not in out, out[-3000:]
    # a child told to stop may take a while to exit on a loaded machine; one left running never does
    assert wait_until(lambda: not serve.survivors(), 60), serve.survivors()


def test_sigint_while_importing(tmp_path, tiny_models):
    serve = Serve(tmp_path, tiny_models)
    time.sleep(1.0)  # torch/Prefect still importing: no HTTP yet
    code, out = serve.stop(signal.SIGINT)
    _assert_clean(code, out, serve)


def test_sigterm_while_loading_models(tmp_path, tiny_models):
    serve = Serve(tmp_path, tiny_models)
    assert wait_until(lambda: serve.hc() is not None, 180, step=0.05), "no HTTP"
    assert serve.hc()["status"] == "loading"
    code, out = serve.stop(signal.SIGTERM)
    _assert_clean(code, out, serve)
    assert "loading stopped" in out or "worker ready" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_once_ready_ends_every_child(tmp_path, tiny_models, sig):
    serve = Serve(tmp_path, tiny_models)
    assert wait_until(lambda: (b := serve.hc()) is not None and b["status"] == "ok", 300, step=0.3)
    assert serve.seen, "the ready worker runs Prefect's temporary server as a child"
    code, out = serve.stop(sig)
    _assert_clean(code, out, serve)
    assert "stopped 1 child process" in out or "Stopping temporary server" in out
