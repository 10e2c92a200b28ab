"""Buffer mode (deployments/buffer.py) against a fake orchestrator on 127.0.0.1: heartbeats keep their
period while a (slowed) job renders, claim → render → report with output_url, live progress, failures
carried by the next heartbeat, one interval after an empty claim, backoff while the orchestrator fails."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from deployments.buffer import BufferLoop, backoff_delay
from tasks.contract import JobOutcome
from musetalk_engine.engine import Engine
from tasks.progress import OrchestratorClient
from tasks.settings import get_settings
from tests.hostile_media import worker_env
from tests.fake_orchestrator import FakeOrchestrator
from tests.servers import media_server, serve_in_thread, wait_until
from tests.test_serve import RenderSpy

pytest_plugins = ["tests.fixtures_engine"]

KEY = "buffer-test-internal-key-42"
INTERVAL = 0.3


@pytest.fixture(scope="module")
def orchestrator():
    fake = FakeOrchestrator()
    with serve_in_thread(fake.app) as (url, _, _):
        yield fake, url


@pytest.fixture
def fake(orchestrator):
    fake, _ = orchestrator
    fake.reset()
    yield fake
    fake.reset()


def make_loop(url: str, *, ready=lambda: True, busy=lambda: False, submit=None, interval=INTERVAL) -> BufferLoop:
    client = OrchestratorClient(url, SecretStr(KEY), "buffer-1")
    return BufferLoop(client, interval=interval, capacity=1, ready=ready, busy=busy, gpu_class=lambda: "CPU test",
                      submit=submit or (lambda job, qid: pytest.fail("nothing should be claimed")))


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def idle_after(fake, at: float) -> bool:
    """A heartbeat later than ``at`` said idle."""
    return any(b["at"] > at and b["body"]["status"] == "idle" for b in fake.of("/heartbeat"))


# --------------------------------------------------------------------------------- loop against fakes


def test_backoff_doubles_and_is_bounded():
    assert [backoff_delay(1.0, n, 10) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert backoff_delay(20.0, 3, 10) == 20.0  # never below the interval itself


def test_failed_heartbeat_is_logged_and_reported_in_the_next_beat(orchestrator, fake, caplog):
    _, url = orchestrator
    fake.fail_next["/heartbeat"] = [500]
    loop = make_loop(url, ready=lambda: False)  # not warm: heartbeats only, status busy, no claims
    with caplog.at_level(logging.WARNING):
        loop.start()
        assert wait_until(lambda: len(fake.of("/heartbeat")) >= 3, 30)
        loop.stop()
    beats = [r["body"] for r in fake.of("/heartbeat")]
    assert beats[0]["error"] is None
    assert "heartbeat failed" in beats[1]["error"] and "HTTP 500" in beats[1]["error"]
    assert beats[2]["error"] is None  # delivered once, then cleared
    assert all(b["status"] == "busy" and b["gpu_class"] == "CPU test" and b["capacity"] == 1 for b in beats)
    assert all(r["key"] == KEY and r["path"] == "/internal/buffer/workers/buffer-1/heartbeat"
               for r in fake.of("/heartbeat"))
    assert fake.of("/claim") == []
    assert any("heartbeat" in r.getMessage() and "500" in r.getMessage() for r in caplog.records
               if r.levelno >= logging.WARNING)
    assert KEY not in caplog.text


def test_empty_claim_waits_one_interval(orchestrator, fake):
    _, url = orchestrator
    loop = make_loop(url)
    loop.start()
    assert wait_until(lambda: len(fake.of("/claim")) >= 4, 30)
    stopping = time.monotonic()
    loop.stop()
    claims = fake.of("/claim")
    assert all(r["body"] == {"worker_id": "buffer-1"} for r in claims)
    assert all(g >= INTERVAL * 0.9 for g in gaps([r["at"] for r in claims]))
    # a beat sent while the loop stops says busy (claiming has stopped): only the beats before count
    before = [r["body"]["status"] for r in fake.of("/heartbeat") if r["at"] < stopping]
    assert before and set(before) == {"idle"}, before


def test_orchestrator_failures_back_off_and_surface_in_heartbeats(orchestrator, fake):
    _, url = orchestrator
    fake.statuses["/claim"] = 503
    loop = make_loop(url, interval=0.1)

    def errors() -> list[str]:
        return [r["body"]["error"] for r in fake.of("/heartbeat") if r["body"]["error"]]

    loop.start()
    # waited for, not slept: a slow machine stretches the attempts, it must not fail the test
    assert wait_until(lambda: len(fake.of("/claim")) >= 4 and errors(), 30)
    loop.stop()
    # at least 0.2, 0.4, 0.8 s between attempts (the interval doubled per failure), not one per 0.1 s interval;
    # lower bounds only: load only stretches gaps (a gap stretched early must not fail a later doubling)
    g = gaps([r["at"] for r in fake.of("/claim")])
    assert all(gap >= 0.1 * 2 ** (i + 1) * 0.9 for i, gap in enumerate(g[:3])), g
    assert "claim failed" in errors()[0] and "HTTP 503" in errors()[0]


def test_not_claiming_while_busy_with_another_job(orchestrator, fake):
    _, url = orchestrator
    loop = make_loop(url, busy=lambda: True)
    loop.start()
    assert wait_until(lambda: len(fake.of("/heartbeat")) >= 3, 30)
    loop.stop()
    assert fake.of("/claim") == []
    assert {r["body"]["status"] for r in fake.of("/heartbeat")} == {"busy"}


class _Ticket:
    def __init__(self, outcome: JobOutcome):
        self.future: Future = Future()
        self.future.set_result(outcome)
        self.started = time.monotonic()


def test_outcomes_are_reported_and_success_always_carries_output_url(orchestrator, fake):
    _, url = orchestrator
    outcomes = iter([
        JobOutcome(http_status=200, body={"status": "ok", "output_url": "https://dl/j1.mp4", "metrics": {"x": 1}}),
        JobOutcome(http_status=200, body={"status": "ok", "metrics": {}}),  # no output_url: not a success
        JobOutcome(http_status=422, body={"status": "failed", "error_type": "media_error", "error_message": "no face",
                                          "stage": "preprocessing", "details": {}, "retryable": False,
                                          "stage_times": {"download": 0.1}}),
    ])
    submitted: list[tuple[dict, str | None]] = []

    def submit(job, qid):
        submitted.append((job, qid))
        return _Ticket(next(outcomes))

    fake.jobs = [{"buffer_job_id": f"b-{i}", "musetalk_job_id": f"m-{i}", "video_url": "v", "audio_url": "a",
                  "aspect_ratio": "9:16", "resolution": "720p"} for i in range(3)]
    loop = make_loop(url, submit=submit)
    loop.start()
    assert wait_until(lambda: len(fake.of("/status")) >= 3, 60)
    loop.stop()
    assert [qid for _, qid in submitted] == ["b-0", "b-1", "b-2"]
    assert submitted[0][0] == {"musetalk_job_id": "m-0", "video_url": "v", "audio_url": "a",
                               "aspect_ratio": "9:16", "resolution": "720p"}
    reports = {r["path"].split("/")[-2]: r["body"] for r in fake.of("/status")}
    assert reports["b-0"] == {"status": "succeeded", "error": None, "output_url": "https://dl/j1.mp4",
                              "metrics": {"x": 1}}
    assert reports["b-1"]["status"] == "failed" and "output_url" in reports["b-1"]["error"]["error_message"]
    assert reports["b-2"]["status"] == "failed" and reports["b-2"]["output_url"] is None
    assert reports["b-2"]["error"]["error_type"] == "media_error"
    assert reports["b-2"]["metrics"] == {"stage_times": {"download": 0.1}}


# ------------------------------------------------------------------------- the real worker, one real job


@pytest.fixture(scope="module")
def buffer_env(tiny_models, tmp_path_factory, orchestrator):
    _, url = orchestrator
    root = tmp_path_factory.mktemp("buffer")
    mp = pytest.MonkeyPatch()
    (root / "work").mkdir()
    worker_env(mp, root / "work", tiny_models, MUSETALK_CACHE_DIR=str(root / "cache"),
               BUFFER_WORKER_ID="gpu-box-1", ORCHESTRATOR_BASE_URL=url, INTERNAL_API_KEY=KEY,
               BUFFER_POLL_INTERVAL_SEC=str(INTERVAL), GPU_CLASS_NAME="RTX test (24 GB)")
    yield root
    mp.undo()
    get_settings.cache_clear()


def test_claimed_job_renders_while_heartbeats_and_progress_keep_flowing(buffer_env, fake, tmp_path, monkeypatch):
    from deployments.serve import create_app
    from musetalk_engine.sample_media import make_avatar_video, make_speech

    make_avatar_video(tmp_path / "avatar.mp4", seconds=1.0, width=360, height=360)
    make_speech(tmp_path / "speech.wav", seconds=1.2)
    spy = RenderSpy(Engine.render)
    spy.delay = 2.5  # the job stays in its render long enough for several heartbeats
    monkeypatch.setattr(Engine, "render", lambda engine, *a, **k: spy(engine, *a, **k))

    with media_server(tmp_path) as media:
        fake.jobs = [{"buffer_job_id": "buf-7", "musetalk_job_id": "job-7", "video_url": f"{media}/avatar.mp4",
                      "audio_url": f"{media}/speech.wav", "aspect_ratio": None, "resolution": None}]
        app = create_app()
        with TestClient(app) as client:  # runs the lifespan: warm-up, then the buffer threads
            assert app.state.service.wait_ready(240), app.state.service.load_error
            assert client.get("/hc").status_code == 200
            assert wait_until(lambda: fake.of("/status"), 240, step=0.2), "no status report"
            # the worker says idle again once the claim is released (waited for, not slept: CI machines are slow;
            # beats sent while the app shuts down say busy, so the last beat overall proves nothing)
            assert wait_until(lambda: idle_after(fake, fake.of("/status")[0]["at"]), 30, step=0.1), \
                "no idle heartbeat after the report"
    assert Engine.loads >= 1

    (report,) = fake.of("/status")
    assert report["path"] == "/internal/buffer/jobs/buf-7/status" and report["key"] == KEY
    body = report["body"]
    assert body["status"] == "succeeded" and body["error"] is None
    assert body["output_url"].endswith("job-7.mp4")
    assert {"GENERATION_TIME_SEC", "PEAK_RAM_KB", "stage_times", "total_time"} <= set(body["metrics"])
    assert body["metrics"]["gpu_class"] == "RTX test (24 GB)"

    render_start, render_end = spy.spans[0]
    claimed = [r for r in fake.of("/claim") if r["at"] < render_start][-1]
    beats = fake.of("/heartbeat")
    assert all(b["key"] == KEY and b["body"]["gpu_class"] == "RTX test (24 GB)" for b in beats)
    # the period holds while the job renders (the old worker went silent here)
    # (bounds allow for a loaded CI machine; a loop blocked by the render would send none at all)
    during = [b for b in beats if render_start <= b["at"] <= render_end]
    assert len(during) >= (render_end - render_start) / INTERVAL / 2
    assert all(b["body"]["status"] == "busy" for b in during)
    window = [b["at"] for b in beats if claimed["at"] <= b["at"] <= report["at"]]
    assert max(gaps(window)) < 2.0, gaps(window)

    # progress arrived live, not in a burst at the end
    progress = fake.of("/internal/jobs/job-7/progress")
    phases = [p["body"]["phase"] for p in progress]
    assert phases[0] == "preparing" and "inferring" in phases and phases[-1] == "completed"
    # the final update says where the result is; metrics mean what they say on a CPU worker
    assert progress[-1]["body"]["output_url"] == body["output_url"]
    assert body["metrics"]["PEAK_VRAM_MIB"] is None
    assert 0 < body["metrics"]["PEAK_RAM_KB"]
    assert progress[0]["at"] < render_start < report["at"]
    assert report["at"] - progress[0]["at"] > spy.delay * 0.8
    assert all(p["body"]["worker_id"] == "gpu-box-1" for p in progress)
