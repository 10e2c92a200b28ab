"""The serve process (deployments/serve.py) through a real socket: readiness, the /generate contract,
one render at a time, weights loaded once, per-job timeout, graceful shutdown.

One app (and engine) is shared by the module; tests that need other settings start a second app, which
reuses the process's cached engine. Renders are slowed by patching ``Engine.render`` (never by bigger media)."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

from musetalk_engine.engine import Engine
from musetalk_engine.errors import MediaError
from tasks.settings import Settings, get_settings
from tests.hostile_media import UNSET_ENV, worker_env
from tests.servers import free_port, media_server, serve_in_thread, wait_until

pytest_plugins = ["tests.fixtures_engine"]


# ---------------------------------------------------------------------------------------------- helpers


class RenderSpy:
    """Replaces ``Engine.render``: records (start, end) spans, optionally sleeps first (in small steps, so
    a cancellation raised in the thread lands; ``release``, once set, ends the sleep early) and optionally
    fails instead of rendering."""

    def __init__(self, original):
        self.original = original
        self.spans: list[tuple[float, float]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.delay = 0.0
        self.fail: Exception | None = None

    def __call__(self, engine, *args, **kwargs):
        start = time.monotonic()
        self.started.set()
        try:
            end_sleep = start + self.delay
            while time.monotonic() < end_sleep and not self.release.is_set():
                time.sleep(0.05)
            if self.fail is not None:
                raise self.fail
            return self.original(engine, *args, **kwargs)
        finally:
            self.spans.append((start, time.monotonic()))


@pytest.fixture
def spy(monkeypatch) -> RenderSpy:
    spy = RenderSpy(Engine.render)
    monkeypatch.setattr(Engine, "render", lambda engine, *a, **k: spy(engine, *a, **k))
    return spy


def flow_runs_of(job_ids: set[str]) -> list[Any]:
    """The `generate` flow runs recorded by the Prefect API for these job ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["generate"])), limit=200)
    return [r for r in runs if (r.parameters.get("job") or {}).get("musetalk_job_id") in job_ids]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """Settings for this module's worker: tiny models, its own cache (a fresh engine), local storage."""
    root = tmp_path_factory.mktemp("serve")
    mp = pytest.MonkeyPatch()
    (root / "work").mkdir()
    worker_env(mp, root / "work", tiny_models, MUSETALK_CACHE_DIR=str(root / "cache"),
               MUSETALK_DOWNLOAD_RETRY_BASE_SEC="0.01")
    yield root
    mp.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def media_url(tmp_path_factory) -> Iterator[str]:
    from musetalk_engine.sample_media import make_avatar_video, make_speech

    root = tmp_path_factory.mktemp("serve-media")
    make_avatar_video(root / "avatar.mp4", seconds=1.0, width=360, height=360)
    make_speech(root / "speech.wav", seconds=1.2)
    with media_server(root) as url:
        yield url


def job(media_url: str, job_id: str, video: str = "avatar.mp4") -> dict[str, Any]:
    return {"musetalk_job_id": job_id, "video_url": f"{media_url}/{video}", "audio_url": f"{media_url}/speech.wav"}


class Worker:
    def __init__(self, url: str, app: Any, gate: threading.Event, loads_before: int):
        self.url, self.app, self.gate, self.loads_before = url, app, gate, loads_before
        self.service = app.state.service
        self.http = httpx.Client(base_url=url, timeout=300)

    def warm(self) -> None:
        self.gate.set()
        assert self.service.wait_ready(240), self.service.load_error
        assert self.http.get("/hc").status_code == 200


@pytest.fixture(scope="module")
def worker(env) -> Iterator[Worker]:
    """The module's worker; its engine loader waits for ``gate`` so the test can see /hc before warm-up."""
    from deployments.serve import create_app, make_server
    from tasks.engine import get_engine

    gate = threading.Event()

    def gated_loader(settings: Settings):
        assert gate.wait(300), "the test never opened the gate"
        return get_engine(settings)

    loads_before = Engine.loads
    app = create_app(engine_loader=gated_loader)
    with serve_in_thread(app, lambda a: make_server(a, log_level="warning")) as (url, _, _):
        w = Worker(url, app, gate, loads_before)
        yield w
        w.gate.set()
        w.http.close()


@contextmanager
def second_worker(env, **options: Any) -> Iterator[tuple[str, Any, uvicorn.Server, threading.Thread]]:
    """Another app in this process (same cached engine), with its own serve options / job timeout."""
    from deployments.serve import ServeOptions, create_app, make_server

    timeout = options.pop("job_timeout", None)
    settings = get_settings() if timeout is None else Settings(musetalk_job_timeout_sec=timeout)
    app = create_app(settings, options=ServeOptions(**options))
    with serve_in_thread(app, lambda a: make_server(a, log_level="warning")) as (url, server, thread):
        assert app.state.service.wait_ready(240), app.state.service.load_error
        yield url, app, server, thread


# ------------------------------------------------------------------------------------------------- tests


def test_render_queue_is_fifo_bounded_and_can_abandon_a_job():
    """The render queue alone (no engine): one thread, arrival order, a bound, abandon at shutdown."""
    from deployments.render_queue import QueueClosed, QueueFull, RenderQueue
    from tasks.contract import JobOutcome

    order: list[int] = []
    running = threading.Event()

    def run(job: dict, qid: str | None) -> JobOutcome:
        order.append(job["i"])
        running.set()
        end = time.monotonic() + job.get("sleep", 0.0)
        while time.monotonic() < end:
            time.sleep(0.01)
        return JobOutcome(http_status=200, body={"i": job["i"], "qid": qid})

    queue = RenderQueue(run, max_queued=2)
    tickets = [queue.submit({"i": i, "sleep": 0.1}, f"q{i}") for i in range(3)]
    with pytest.raises(QueueFull):
        queue.submit({"i": 9})
    assert [t.future.result(10).body for t in tickets] == [{"i": i, "qid": f"q{i}"} for i in range(3)]
    assert order == [0, 1, 2] and not queue.busy

    running.clear()
    stuck = queue.submit({"i": 5, "sleep": 60.0})
    assert running.wait(10)
    started = time.monotonic()
    assert queue.abandon(wait=10)
    assert time.monotonic() - started < 5
    assert stuck.future.result(1).http_status == 503
    assert queue.submit({"i": 6}).future.result(10).body["i"] == 6  # the thread lives on

    waiting = [queue.submit({"i": 7, "sleep": 1.0}), queue.submit({"i": 8})]
    assert queue.close() >= 1
    assert waiting[1].future.cancelled()
    with pytest.raises(QueueClosed):
        queue.submit({"i": 10})



def test_hc_is_503_until_warm_then_200(worker, media_url):
    hc = worker.http.get("/hc")
    assert hc.status_code == 503 and hc.json()["status"] == "loading"
    early = worker.http.post("/generate", json=job(media_url, "early"))
    assert early.status_code == 503 and early.headers["retry-after"]
    body = early.json()
    assert body["status"] == "failed" and body["error_type"] == "processing_error" and body["retryable"] is True
    worker.warm()
    assert worker.http.get("/hc").json() == {"status": "ok"}
    assert worker.service.engine.warm


def test_openapi_documents_the_contract(worker):
    schema = worker.http.get("/openapi.json").json()
    assert {"/hc", "/generate"} <= set(schema["paths"])
    post = schema["paths"]["/generate"]["post"]
    assert {"200", "422", "500", "503"} <= set(post["responses"])
    request = schema["components"]["schemas"]["JobRequest"]
    assert {"musetalk_job_id", "video_url", "audio_url"} <= set(request["required"])
    assert "output_url" in schema["components"]["schemas"]["JobSuccess"]["required"]
    page = worker.http.get("/docs").text  # Swagger UI from the installed package, no CDN
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert worker.http.get("/docs-assets/swagger-ui.css").status_code == 200


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"musetalk_job_id": "bad-1", "audio_url": "http://x/a.wav"}).encode(), "video_url"),
    (json.dumps({"musetalk_job_id": "bad-2", "video_url": "v", "audio_url": "a",
                 "params": {"batch_size": 0}}).encode(), "params.batch_size"),
])
def test_invalid_request_is_422_media_error_at_validation(worker, content, fragment):
    r = worker.http.post("/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422
    body = r.json()
    assert body["status"] == "failed" and body["error_type"] == "media_error"
    assert body["stage"] == "validation" and body["retryable"] is False
    assert fragment in body["error_message"]


def test_404_input_then_concurrent_jobs_render_one_at_a_time(worker, media_url, spy):
    worker.warm()
    bad = worker.http.post("/generate", json=job(media_url, "missing-video", video="nope.mp4"))
    assert bad.status_code == 422, bad.text
    assert bad.json()["error_type"] == "media_error" and bad.json()["stage"] == "download"
    assert bad.json()["retryable"] is False
    assert worker.http.get("/hc").status_code == 200

    results: dict[str, httpx.Response] = {}

    def post(job_id: str) -> None:
        with httpx.Client(base_url=worker.url, timeout=300) as c:
            results[job_id] = c.post("/generate", json=job(media_url, job_id),
                                     headers={"Salad-Job-Id": f"salad-{job_id}"})

    threads = [threading.Thread(target=post, args=(f"ok-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for job_id in ("ok-0", "ok-1"):
        r = results[job_id]
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok" and body["musetalk_job_id"] == job_id
        out = Path(body["output_url"].removeprefix("file://"))
        assert out.is_file() and out.stat().st_size > 0
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert sidecar["queue_job_id"] == f"salad-{job_id}"  # the Salad-Job-Id header
        assert {"GENERATION_TIME_SEC", "PEAK_RAM_KB", "stage_times", "total_time"} <= set(body["metrics"])

    # one render at a time: engine renders and whole flow runs (as Prefect recorded them) never overlap
    spans = sorted(spy.spans)
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]
    runs = flow_runs_of({"missing-video", "ok-0", "ok-1"})
    by_job = {r.parameters["job"]["musetalk_job_id"]: r for r in runs}
    assert by_job["missing-video"].state.is_failed()
    first, second = sorted((by_job["ok-0"], by_job["ok-1"]), key=lambda r: r.start_time)
    assert first.state.is_completed() and second.state.is_completed()
    assert first.end_time <= second.start_time
    # the weights were loaded once for warm-up and every job since
    assert Engine.loads - worker.loads_before == 1


def test_job_timeout_answers_500_and_abandons_the_render(env, media_url, spy):
    spy.delay = 120.0  # far past the timeout; the cancellation must land inside it
    with second_worker(env, job_timeout=4.0) as (url, app, _, _):
        service = app.state.service
        started = time.monotonic()
        r = httpx.post(f"{url}/generate", json=job(media_url, "too-slow"), timeout=120)
        elapsed = time.monotonic() - started
        assert r.status_code == 500, r.text
        body = r.json()
        assert body["error_type"] == "processing_error" and body["retryable"] is True
        assert body["details"]["reason"] == "timeout"
        assert elapsed < 60
        # abandoned cleanly: render thread free, engine lock released, flow run TimedOut in Prefect
        assert service.queue.wait_idle(60)
        assert service.engine._lock.acquire(timeout=30)
        service.engine._lock.release()
        (run,) = flow_runs_of({"too-slow"})
        assert run.state.name == "TimedOut"
        assert httpx.get(f"{url}/hc").status_code == 200


def test_sigterm_drains_finishes_the_running_job_and_refuses_queued_ones(env, media_url, spy):
    # the running job renders until the test releases it, after the SIGTERM (a fixed delay could end before
    # the second request is queued on a slow machine)
    spy.delay = 120.0
    spy.fail = MediaError("synthetic failure after a slow render", stage="inference")
    with second_worker(env, musetalk_shutdown_grace_sec=60) as (url, app, server, thread):
        results: dict[str, httpx.Response] = {}

        def post(job_id: str) -> None:
            results[job_id] = httpx.post(f"{url}/generate", json=job(media_url, job_id), timeout=120)

        first = threading.Thread(target=post, args=("running",))
        first.start()
        assert spy.started.wait(60)
        queued = threading.Thread(target=post, args=("queued",))
        queued.start()
        assert wait_until(lambda: app.state.service.queue.busy and len(app.state.service.queue._waiting) == 1, 60)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert app.state.service.health() == (503, {"status": "draining", "detail": "shutting down"})
        spy.release.set()  # the running job ends (with the synthetic failure) inside the grace period
        queued.join(120)
        first.join(120)
        thread.join(120)
        assert not thread.is_alive()
    assert results["queued"].status_code == 503
    assert results["queued"].json()["details"]["reason"] == "draining"
    # the running job finished its own way (the synthetic failure), its answer delivered before exit
    assert results["running"].status_code == 422
    assert "synthetic failure" in results["running"].json()["error_message"]


def test_sigterm_abandons_a_job_that_overruns_the_grace_period(env, media_url, spy):
    spy.delay = 300.0
    with second_worker(env, musetalk_shutdown_grace_sec=1) as (url, app, server, thread):
        service = app.state.service
        outcome: dict[str, Any] = {}

        def post() -> None:
            outcome["response"] = httpx.post(f"{url}/generate", json=job(media_url, "overrun"), timeout=60)

        client = threading.Thread(target=post)
        client.start()
        assert spy.started.wait(60)
        started = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        thread.join(60)
        assert not thread.is_alive() and time.monotonic() - started < 30
        client.join(30)
        assert service.queue.current is None  # the render unwound
        assert service.engine._lock.acquire(timeout=5)
        service.engine._lock.release()
    # the caller was answered before the exit: 503, so Salad's queue retries the job elsewhere
    r = outcome["response"]
    assert r.status_code == 503 and r.json()["retryable"] is True
    assert r.json()["details"]["reason"] == "abandoned"
    (run,) = flow_runs_of({"overrun"})
    assert run.state.is_crashed()


def test_cli_serve_reports_a_failed_load_and_stops_on_sigterm(tmp_path):
    """The real `musetalk-flow serve` process: no weights → /hc 503 with the reason; SIGTERM → exits."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV and not k.startswith("MUSETALK_")}
    env.update(MUSETALK_MODELS_DIR=str(tmp_path / "no-models"), MUSETALK_WORKDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def hc() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/hc", timeout=2)
            except httpx.HTTPError:
                return None

        assert wait_until(lambda: (r := hc()) is not None and r.json()["status"] == "error", 120, step=0.3)
        body = hc().json()
        assert hc().status_code == 503 and "unet.pth" in body["detail"]
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"musetalk_job_id": "j", "video_url": "https://x/v",
                                                                  "audio_url": "https://x/a"}, timeout=10)
        assert r.status_code == 503 and r.json()["details"]["reason"] == "load_failed"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once it has stopped
