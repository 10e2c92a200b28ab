"""Signed job webhooks: signature format and verification, delivery to a local receiver with retries, and
the SSRF guard refusing private addresses."""

from __future__ import annotations

import http.server
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

# A venv made before tenacity became a dependency skips (and says why) instead of breaking collection.
pytest.importorskip("tenacity", reason="tenacity is a dependency now: pip install -e . (or pip install tenacity)")

from orchestrator.webhooks import (  # noqa: E402 - after the dependency check
    ATTEMPTS,
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    deliver_job_webhook,
    encode_body,
    sign,
    verify_signature,
)
from tasks.settings import Settings
from tests.servers import free_port

SECRET = "whsec-test-5b1d0e7a"
JOB = {"id": "job-1", "status": "succeeded", "progress": 1.0, "output_url": "https://cdn.example/job-1.mp4",
       "metrics": {"GENERATION_TIME_SEC": 1.5}, "error": None}


def settings(tmp_path: Path, **overrides) -> Settings:
    values = {"musetalk_workdir": tmp_path, "musetalk_webhook_retry_base_sec": 0.0,
              "musetalk_allow_private_urls": True}
    values.update(overrides)
    return Settings(**values)


class Receiver:
    """Answers POSTs with scripted statuses (the last one repeats) and records every request."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    def next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


@contextmanager
def receiver(statuses: list[int]) -> Iterator[tuple[str, Receiver]]:
    state = Receiver(statuses)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.requests.append(({k: v for k, v in self.headers.items()}, body))
            status = state.next_status()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hooks/musetalk?token=abc", state
    finally:
        httpd.shutdown()
        httpd.server_close()


# --------------------------------------------------------------------------------------- signatures


def test_signature_format_and_verification() -> None:
    body = encode_body(JOB)
    header = sign(SECRET, body, timestamp=1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000" and v1.startswith("v1=") and len(v1) == 3 + 64
    now = 1_700_000_100
    assert verify_signature(SECRET, body, header, now=now)
    assert not verify_signature("another-secret", body, header, now=now)
    assert not verify_signature(SECRET, body + b" ", header, now=now)  # any change to the bytes
    assert not verify_signature(SECRET, body, header, now=now + 3600)  # too old: a replay
    assert not verify_signature(SECRET, body, header.replace("t=1700000000", "t=1700000099"), now=now)
    assert not verify_signature(SECRET, body, None)
    assert not verify_signature(SECRET, body, "v1=abc", now=now)
    # a rotated secret: the receiver accepts either of two signatures
    rotated = f"{header},v1={sign('old-secret', body, 1_700_000_000).split('v1=')[1]}"
    assert verify_signature("old-secret", body, rotated, now=now)
    with pytest.raises(ValueError, match="MUSETALK_WEBHOOK_SECRET"):
        sign("", body)


# ----------------------------------------------------------------------------------------- delivery


def test_delivered_body_is_signed_and_verifiable(tmp_path: Path) -> None:
    with receiver([200]) as (url, state):
        result = deliver_job_webhook(JOB, url, SECRET, settings=settings(tmp_path))
    assert result.delivered and result.attempts == 1 and result.status_code == 200
    assert "token" not in result.url  # the query string (often a credential) never shows
    (headers, body), = state.requests
    assert json.loads(body) == JOB
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
    assert headers[EVENT_HEADER] == "job.succeeded"
    assert headers["Content-Type"] == "application/json"
    assert SECRET not in json.dumps(dict(headers))


def test_transient_failures_are_retried_with_one_delivery_id(tmp_path: Path) -> None:
    with receiver([503, 429, 200]) as (url, state):
        result = deliver_job_webhook(JOB, url, SECRET, settings=settings(tmp_path))
    assert result.delivered and result.attempts == 3
    ids = {h[DELIVERY_HEADER] for h, _ in state.requests}
    assert len(state.requests) == 3 and len(ids) == 1
    assert all(verify_signature(SECRET, b, h[SIGNATURE_HEADER]) for h, b in state.requests)


def test_gives_up_after_five_attempts_with_backoff(tmp_path: Path) -> None:
    with receiver([500]) as (url, state):
        started = time.monotonic()
        result = deliver_job_webhook(JOB, url, SECRET,
                                     settings=settings(tmp_path, musetalk_webhook_retry_base_sec=0.02))
        elapsed = time.monotonic() - started
    assert not result.delivered and result.attempts == ATTEMPTS == 5 and result.status_code == 500
    assert len(state.requests) == 5
    assert elapsed >= 0.02 * (1 + 2 + 4) * 0.9  # exponential waits between attempts (tenacity's 2^n·base)


def test_final_client_error_is_not_retried(tmp_path: Path) -> None:
    with receiver([401]) as (url, state):
        result = deliver_job_webhook(JOB, url, SECRET, settings=settings(tmp_path))
    assert not result.delivered and result.attempts == 1 and result.status_code == 401
    assert "401" in result.error and len(state.requests) == 1


def test_unreachable_receiver_is_retried(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    result = deliver_job_webhook(JOB, url, SECRET, settings=settings(tmp_path), attempts=3)
    assert not result.delivered and result.attempts == 3 and result.status_code is None
    assert "connection failed" in result.error


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "10.0.0.7", "[::1]"])
def test_private_address_is_refused_without_the_allowlist(tmp_path: Path, host: str) -> None:
    with receiver([200]) as (url, state):
        port = url.split(":")[2].split("/")[0]
        target = url.replace(f"127.0.0.1:{port}", f"{host}:{port}") if host != "127.0.0.1" else url
        result = deliver_job_webhook(JOB, target, SECRET,
                                     settings=settings(tmp_path, musetalk_allow_private_urls=False))
    assert not result.delivered and result.attempts == 1
    assert "private or reserved" in result.error and "webhook URL" in result.error
    assert state.requests == []


def test_non_http_scheme_is_refused(tmp_path: Path) -> None:
    result = deliver_job_webhook(JOB, "file:///etc/passwd", SECRET, settings=settings(tmp_path))
    assert not result.delivered and "http or https" in result.error


def test_operator_allowlist_admits_a_private_receiver(tmp_path: Path) -> None:
    """The same allowlist as media URLs: a listed private network receives webhooks, others stay refused."""
    strict = {"musetalk_allow_private_urls": False}
    with receiver([200]) as (url, state):
        allowed = deliver_job_webhook(JOB, url, SECRET, settings=settings(
            tmp_path, musetalk_private_url_allowlist="127.0.0.0/8", **strict))
        other = deliver_job_webhook(JOB, url, SECRET, settings=settings(
            tmp_path, musetalk_private_url_allowlist="10.0.0.0/8", **strict))
    assert allowed.delivered and not other.delivered and "private or reserved" in other.error
    assert len(state.requests) == 1
