"""``musetalk-flow up`` as a newcomer runs it (README, "Run the whole system"): Prefect on SQLite, the
orchestrator and one local buffer worker on tiny models. A job submitted the moment the banner shows
renders on the local worker; SIGTERM (docker stop, systemd) stops every child, not only ``up`` itself; a
worker that cannot load its models ends ``up`` at once with the reason, not after the start timeout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from musetalk_engine.sample_media import make_speech
from tests.hostile_media import UNSET_ENV, avatar_clip
from tests.servers import free_port, media_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
KEY = "up-test-key"


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, logs: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"{what}: not within {timeout:.0f} s (up rc={proc.poll()})\n{tails}")


def start_up(tmp_path: Path, *extra: str, **env_extra: str) -> tuple[subprocess.Popen, Path, int]:
    """``up`` in a process of its own, its output in ``up.out``; (process, log dir, orchestrator port)."""
    logs = tmp_path / "up-logs"
    port, worker_port, prefect_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV and not k.startswith(("PREFECT_", "SALAD_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), MUSETALK_WORKDIR=str(tmp_path / "work"),
               MUSETALK_API_KEYS=KEY, MUSETALK_ALLOW_PRIVATE_URLS="true", BUFFER_POLL_INTERVAL_SEC="1",
               PREFECT_UI_ENABLED="false", PYTHONUNBUFFERED="1", **env_extra)
    with (tmp_path / "up.out").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "up", *extra, "--port", str(port),
                                 "--worker-port", str(worker_port), "--prefect-port", str(prefect_port),
                                 "--log-dir", str(logs)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return proc, logs, port


def stop_all(proc: subprocess.Popen) -> None:
    """Kill ``up`` and whatever it started (taken before the kill: its orphans are nobody's children)."""
    try:
        leftovers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        leftovers = []
    proc.kill()
    proc.wait(30)
    for child in leftovers:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def test_up_renders_a_job_submitted_at_once_and_sigterm_stops_every_child(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    avatar_clip(media / "avatar.mp4")
    make_speech(media / "speech.wav", seconds=0.6)
    proc, logs, port = start_up(tmp_path, "--tiny")
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    try:
        wait_for(lambda: "API key:" in (tmp_path / "up.out").read_text(), 300, "up's banner", proc, logs)
        children = psutil.Process(proc.pid).children()
        assert len(children) == 3, [c.cmdline() for c in children]  # Prefect, orchestrator, worker
        with media_server(media) as url:
            job = httpx.post(f"{base}/v1/avatar/jobs", headers=auth, timeout=30,
                             json={"video_url": f"{url}/avatar.mp4", "audio_url": f"{url}/speech.wav"}).json()

            def finished():
                view = httpx.get(f"{base}/v1/avatar/jobs/{job['id']}", headers=auth, timeout=30).json()
                return view if view["status"] in ("succeeded", "failed", "cancelled") else None

            view = wait_for(finished, 240, "the job's end", proc, logs)
        assert view["status"] == "succeeded", view
        assert view["route"] == "buffer" and view["output_url"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [c.cmdline() for c in alive]
    finally:
        if proc.poll() is None:
            stop_all(proc)
    orchestrator_log = (logs / "orchestrator.log").read_text(errors="replace")
    assert "Logging error" not in orchestrator_log
    assert re.search(r'"POST /v1/avatar/jobs HTTP/1.1" 202', orchestrator_log)


def test_up_without_models_ends_at_once_with_the_reason(tmp_path):
    """The newcomer's likeliest mistake (no weights, no --tiny): the worker answers /hc 503 "error" and stays
    up, so ``up`` must read that answer, stop everything and say why, not wait out its start timeout."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    proc, logs, _ = start_up(tmp_path, MUSETALK_MODELS_DIR=str(empty))
    try:
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            stop_all(proc)
    said = (tmp_path / "up.out").read_text()
    assert rc == 1, said
    lines = [line for line in said.splitlines() if "error" in line]
    assert lines and "the worker could not start" in lines[-1] and "worker.log" in lines[-1], said
    assert "Traceback" not in said and "RuntimeError" not in said
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(logs) in " ".join(p.info["cmdline"] or [])]
