"""``musetalk-flow up`` as a newcomer runs it (README, "Run the whole system"): Prefect on SQLite, the
orchestrator and one local buffer worker on tiny models. A job submitted at once — while the worker may
still be loading — renders; SIGTERM (docker stop, systemd) stops every child, not only ``up`` itself."""

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


def test_up_renders_a_job_submitted_at_once_and_sigterm_stops_every_child(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    avatar_clip(media / "avatar.mp4")
    make_speech(media / "speech.wav", seconds=0.6)
    logs = tmp_path / "up-logs"
    port, worker_port, prefect_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV and not k.startswith(("PREFECT_", "SALAD_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), MUSETALK_WORKDIR=str(tmp_path / "work"),
               MUSETALK_API_KEYS=KEY, MUSETALK_ALLOW_PRIVATE_URLS="true", BUFFER_POLL_INTERVAL_SEC="1",
               PREFECT_UI_ENABLED="false", PYTHONUNBUFFERED="1")
    out = (tmp_path / "up.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "up", "--tiny", "--port", str(port),
                             "--worker-port", str(worker_port), "--prefect-port", str(prefect_port),
                             "--log-dir", str(logs)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
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
            proc.kill()
        for child in psutil.Process().children(recursive=True):
            if str(logs) in " ".join(child.cmdline()) or str(prefect_port) in " ".join(child.cmdline()):
                child.kill()
        out.close()
    orchestrator_log = (logs / "orchestrator.log").read_text(errors="replace")
    assert "Logging error" not in orchestrator_log
    assert re.search(r'"POST /v1/avatar/jobs HTTP/1.1" 202', orchestrator_log)
