"""Orchestrator client and progress reporter against a fake orchestrator on 127.0.0.1; settings and
secret redaction."""

from __future__ import annotations

import io
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from pydantic import SecretStr

from tasks.progress import OrchestratorClient, OrchestratorError, ProgressReporter
from tasks.logs import CleanRecordFactory, configure_logging, reset_logging
from tasks.settings import Settings, get_settings, redact, secret_values
from tests.fake_orchestrator import FakeOrchestrator
from tests.servers import free_port, serve_in_thread, wait_until

KEY = "s3cr3t-internal-key-0123456789"


@pytest.fixture(scope="module")
def server():
    fake = FakeOrchestrator()
    with serve_in_thread(fake.app) as (url, _, _):
        yield fake, url


@pytest.fixture
def fake(server):
    fake, _ = server
    fake.reset()
    return fake


@pytest.fixture
def client(server, fake):
    _, url = server
    with OrchestratorClient(url + "/main", SecretStr(KEY), "worker-1", buffer_base_url=url + "/buf/") as c:
        yield c


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


# ----------------------------------------------------------------------------------------- client


def test_progress_posts_contract_body_with_key(client, fake):
    assert client.progress("job/../1", "running", 0.25, "inferring", metrics={"fps": 12.5})
    (req,) = fake.requests
    assert req["path"] == "/main/internal/jobs/job%2F..%2F1/progress"  # id cannot change the endpoint
    assert req["key"] == KEY
    assert req["body"] == {"status": "running", "progress": 0.25, "phase": "inferring",
                           "worker_id": "worker-1", "metrics": {"fps": 12.5}}


def test_progress_non_2xx_returns_false_and_logs(client, fake, caplog):
    fake.statuses["/progress"] = 503
    with caplog.at_level(logging.INFO, logger="tasks.progress"):
        assert client.progress("job-1", "failed", 2.0, "failed", error="boom") is False
    assert fake.bodies("/progress") == [{"status": "failed", "progress": 1.0, "phase": "failed",
                                         "worker_id": "worker-1", "error": "boom"}]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "503" in warning[0].getMessage() and "/progress" in warning[0].getMessage()


def test_progress_rejects_invalid_phase_without_sending(client, fake):
    assert client.progress("job-1", "running", 0.1, "dancing") is False  # type: ignore[arg-type]
    assert fake.requests == []


def test_heartbeat_uses_buffer_url_and_raises_on_non_2xx(client, fake):
    client.heartbeat("busy", "RTX 4090 (24 GB)", 1)
    assert fake.requests[0]["path"] == "/buf/internal/buffer/workers/worker-1/heartbeat"
    assert fake.requests[0]["key"] == KEY
    assert fake.requests[0]["body"] == {"status": "busy", "gpu_class": "RTX 4090 (24 GB)",
                                        "capacity": 1, "error": None}
    fake.statuses["/heartbeat"] = 401
    with pytest.raises(OrchestratorError) as info:
        client.heartbeat("idle", "RTX 4090 (24 GB)", 1, error="previous beat failed")
    assert info.value.status_code == 401
    assert fake.requests[-1]["body"]["error"] == "previous beat failed"


def test_claim_returns_job_or_none(client, fake):
    assert client.claim() is None
    job = {"buffer_job_id": "b-7", "musetalk_job_id": "m-7", "video_url": "https://x/v.mp4",
           "audio_url": "https://x/a.wav", "aspect_ratio": "9:16", "resolution": "720p"}
    fake.jobs.append(job)
    assert client.claim() == job
    assert fake.bodies("/claim") == [{"worker_id": "worker-1"}] * 2
    fake.statuses["/claim"] = 500
    with pytest.raises(OrchestratorError):
        client.claim()


def test_report_bodies_and_success_requires_output_url(client, fake):
    with pytest.raises(ValueError):
        client.report("b-7", "succeeded", metrics={"total_time": 3.0})
    assert fake.requests == []  # never sent
    client.report("b-7", "succeeded", output_url="https://dl/x.mp4", metrics={"total_time": 3.0})
    client.report("b-8", "failed", error={"error_type": "media_error", "error_message": "no face"})
    assert [r["path"] for r in fake.requests] == ["/buf/internal/buffer/jobs/b-7/status",
                                                  "/buf/internal/buffer/jobs/b-8/status"]
    assert fake.requests[0]["body"] == {"status": "succeeded", "error": None,
                                        "output_url": "https://dl/x.mp4", "metrics": {"total_time": 3.0}}
    assert fake.requests[1]["body"]["status"] == "failed" and fake.requests[1]["body"]["output_url"] is None


def test_key_never_logged_or_in_errors(server, fake, caplog):
    _, url = server
    fake.statuses["/heartbeat"] = 500
    with caplog.at_level(logging.DEBUG):
        with OrchestratorClient(url, SecretStr(KEY), "w") as ok, \
                OrchestratorClient(_closed_port_url(), SecretStr(KEY), "w") as down:
            ok.progress("j", "running", 0.5, "encoding")
            errors = []
            for call in (lambda: ok.heartbeat("idle", "g", 1), lambda: down.heartbeat("idle", "g", 1),
                         down.claim):
                with pytest.raises(OrchestratorError) as info:
                    call()
                errors.append(info.value)
            texts = [caplog.text, repr(ok), repr(down), *map(str, errors), *map(repr, errors)]
    assert fake.requests and fake.requests[0]["key"] == KEY  # it was sent, just never shown
    assert all(KEY not in text for text in texts)


def test_unreachable_orchestrator_never_breaks_progress():
    with OrchestratorClient(_closed_port_url(), SecretStr(KEY), "w", timeout=1.0) as down:
        assert down.progress("j", "running", 0.1, "preparing") is False
        reporter = ProgressReporter(down, "j", min_interval=0.0, final_retry_sec=1.0)
        reporter.update("preparing", 0.1)
        reporter.finish()
        reporter.close(timeout=5)


def test_final_update_outlasts_an_orchestrator_outage_but_not_a_refusal(client, fake):
    """The terminal update (with the output URL) is retried while the orchestrator answers 5xx — e.g.
    while it restarts — and arrives once it is back; a 4xx refusal is final and not repeated."""
    import threading

    fake.statuses["/job-final/progress"] = 503

    def comes_back() -> None:
        # once it has refused an attempt (waited for, not timed: on a slow machine the first attempt may come late)
        wait_until(lambda: fake.bodies("/job-final/progress"), 30, step=0.01)
        with fake.lock:
            fake.statuses.clear()

    threading.Thread(target=comes_back, daemon=True).start()
    reporter = ProgressReporter(client, "job-final", min_interval=0.0, final_retry_sec=10.0)
    reporter.finish(metrics={"total_time": 1.0}, output_url="https://dl/final.mp4")
    reporter.close()
    finals = fake.bodies("/job-final/progress")
    assert len(finals) >= 2, "a 503 must be retried"
    assert all(b["status"] == "succeeded" and b["output_url"] == "https://dl/final.mp4" for b in finals)

    fake.requests.clear()
    fake.statuses["/job-gone/progress"] = 409
    refused = ProgressReporter(client, "job-gone", min_interval=0.0, final_retry_sec=10.0)
    refused.fail({"error_type": "processing_error"})
    started = time.monotonic()
    refused.close()
    assert len(fake.bodies("/job-gone/progress")) == 1 and time.monotonic() - started < 5


# --------------------------------------------------------------------------------------- reporter


def test_reporter_sends_live_throttled_in_order_and_final(client, fake):
    reporter = ProgressReporter(client, "job-live", min_interval=0.05)
    reporter.update("preparing", 0.0)
    # at least 40 updates, 5 ms apart; the job "runs" on until two sends arrived (a slow machine sends later,
    # an implementation that sends only at the end never does, and fails below)
    steps, deadline = 0, time.monotonic() + 30
    while steps < 40 or (len(fake.requests) < 2 and time.monotonic() < deadline):
        reporter.update("inferring", steps / 10_000)
        steps += 1
        time.sleep(0.005)
    seen_while_running = len(fake.requests)
    reporter.update("encoding", 0.99)
    reporter.finish(metrics={"total_time": 1.0})
    closed_at = time.monotonic()
    reporter.close()

    bodies = fake.bodies("/job-live/progress")
    assert seen_while_running >= 2, "updates must arrive while the job runs, not in a burst at the end"
    assert any(r["at"] < closed_at for r in fake.requests)
    assert len(bodies) < steps  # throttled
    progress = [b["progress"] for b in bodies]
    assert progress == sorted(progress)  # in order
    assert [b["phase"] for b in bodies][:2] == ["preparing", "inferring"]
    assert "encoding" in [b["phase"] for b in bodies]  # a phase change is never throttled away
    assert bodies[-1] == {"status": "succeeded", "progress": 1.0, "phase": "completed",
                          "worker_id": "worker-1", "metrics": {"total_time": 1.0}}


def test_reporter_sends_held_state_after_interval_without_close(client, fake):
    reporter = ProgressReporter(client, "job-held", min_interval=0.1)
    reporter.update("inferring", 0.1)
    reporter.update("inferring", 0.2)  # throttled: held, then sent by the thread after ~0.1 s
    wait_until(lambda: len(fake.bodies("/job-held/progress")) >= 2, 30, step=0.01)
    assert [b["progress"] for b in fake.bodies("/job-held/progress")] == [0.1, 0.2]
    reporter.fail("boom")
    reporter.close()
    assert fake.bodies("/job-held/progress")[-1]["error"] == "boom"
    assert fake.bodies("/job-held/progress")[-1]["status"] == "failed"


def test_reporter_is_noop_without_orchestrator(fake):
    reporter = ProgressReporter.from_settings("j", Settings(orchestrator_base_url=None,
                                                            buffer_orchestrator_base_url=None))
    assert not reporter.enabled
    reporter.update("inferring", 0.5)
    reporter.finish()
    reporter.close()
    assert fake.requests == []


# --------------------------------------------------------------------------------- settings/redaction


def test_settings_read_design_env_names(monkeypatch, tmp_path):
    env = {"ORCHESTRATOR_BASE_URL": "http://orch:8000/", "INTERNAL_API_KEY": KEY, "BUFFER_WORKER_ID": "b1",
           "GPU_CLASS_NAME": "RTX 4090", "BUFFER_CAPACITY": "2", "BUFFER_POLL_INTERVAL_SEC": "5",
           "B2_KEY_ID": "kid", "B2_APP_KEY": "b2-app-key-xyz", "B2_BUCKET_NAME": "bkt",
           "MUSETALK_WORKDIR": str(tmp_path), "SALAD_API_KEY": "salad-key-123",
           "MUSETALK_MAX_DOWNLOAD_MB": "7", "MUSETALK_ALLOW_PRIVATE_URLS": "true",
           "MUSETALK_BATCH_SIZE": "", "BUFFER_ORCHESTRATOR_BASE_URL": ""}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.orchestrator_url == "http://orch:8000"
    assert s.buffer_orchestrator_url == "http://orch:8000"  # falls back; empty env counts as unset
    assert (s.buffer_capacity, s.buffer_poll_interval_sec, s.gpu_class_name) == (2, 5.0, "RTX 4090")
    assert s.b2_enabled and s.b2_prefix == "avatar/outputs" and s.buffer_enabled
    assert s.musetalk_batch_size is None and s.musetalk_max_download_mb == 7
    assert s.musetalk_allow_private_urls and not s.musetalk_allow_local_files
    assert s.result_root == tmp_path / "results/job_queue"
    assert s.resolve(s.musetalk_unet_model_path) == tmp_path / "models/musetalkV15/unet.pth"
    assert sorted(secret_values(s)) == sorted([KEY, "b2-app-key-xyz", "salad-key-123"])
    assert all(v not in repr(s) and v not in str(s.model_dump()) for v in secret_values(s))


def test_settings_defaults(monkeypatch, tmp_path):
    for name in ("ORCHESTRATOR_BASE_URL", "BUFFER_ORCHESTRATOR_BASE_URL", "B2_KEY_ID", "B2_APP_KEY",
                 "B2_BUCKET_NAME", "MUSETALK_WORKDIR", "BUFFER_WORKER_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    s = Settings(_env_file=None)
    assert s.orchestrator_url is None and s.buffer_orchestrator_url is None and not s.b2_enabled
    # never the current directory: a command run in a checkout must not scatter cache/ results/ tmp/ in it
    assert s.musetalk_workdir == (Path("/app") if Path("/app").is_dir() else tmp_path / "data" / "musetalk-flow")
    assert s.result_root.is_relative_to(s.musetalk_workdir) and s.job_work_root.is_relative_to(s.musetalk_workdir)
    assert (s.buffer_capacity, s.buffer_poll_interval_sec, s.musetalk_max_download_mb) == (1, 10.0, 500)
    assert (s.musetalk_max_audio_sec, s.musetalk_max_video_sec, s.musetalk_landmarks) == (600, 600, "auto")
    assert not s.musetalk_allow_private_urls and not s.musetalk_allow_local_files
    assert Settings(b2_key_id="k", b2_bucket_name="b").b2_enabled is False  # no app key


def test_settings_read_dotenv_below_the_environment(monkeypatch, tmp_path):
    """`.env` in the current directory configures every entry point; exported variables win over it."""
    (tmp_path / ".env").write_text("B2_PREFIX=from-dotenv\nMUSETALK_MODELS_DIR=/srv/models\n"
                                   "PREFECT_API_URL=http://ignored.example/api\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("B2_PREFIX", raising=False)
    monkeypatch.setenv("MUSETALK_MODELS_DIR", "/from/env")
    s = Settings(_env_file=".env")
    assert s.b2_prefix == "from-dotenv" and s.musetalk_models_dir == Path("/from/env")


@contextmanager
def logging_with_secret(monkeypatch) -> Iterator[io.StringIO]:
    """The process's logging (tasks/logs.py) configured with ``KEY`` as the internal API key; undone after."""
    monkeypatch.setenv("INTERNAL_API_KEY", KEY)
    get_settings.cache_clear()
    saved = {n: logging.getLogger(n).level for n in ("httpx", "httpcore", "")}
    stream = io.StringIO()
    try:
        configure_logging(logging.INFO, fmt="text", max_chars=4000, stream=stream)
        yield stream
    finally:
        reset_logging()
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        get_settings.cache_clear()


def test_logging_scrubs_secrets_from_messages_args_and_tracebacks(monkeypatch):
    logger = logging.getLogger("tasks.test_redaction")
    with logging_with_secret(monkeypatch) as out:
        logger.info("calling with key %s", KEY)
        logger.info(f"inline {KEY}")
        try:
            raise RuntimeError(f"bad key {KEY}")
        except RuntimeError:
            logger.exception("failed")
    assert KEY not in out.getvalue()
    assert out.getvalue().count("***") == 3
    assert redact(f"a {KEY} b", [KEY]) == "a *** b"


def test_logging_redaction_covers_prefect_run_loggers_idempotently(monkeypatch):
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # what importing prefect.main / running a flow does: handlers on run loggers

    with logging_with_secret(monkeypatch):
        configure_logging(logging.INFO, fmt="text", max_chars=4000, stream=io.StringIO())  # a second call
        factory = logging.getLogRecordFactory()
        assert isinstance(factory, CleanRecordFactory) and not isinstance(factory.previous, CleanRecordFactory)
        run_logger = logging.getLogger("prefect.task_runs")
        assert run_logger.handlers  # the API handler is covered too: it only ever sees cleaned records
        record = run_logger.makeRecord(run_logger.name, logging.INFO, __file__, 1, "key %s", (KEY,), None)
        assert KEY not in record.getMessage() and "***" in record.getMessage()
