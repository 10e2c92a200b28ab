"""The process's logging (tasks/logs.py), read back from the real stream a handler wrote: URLs lose their
query and credentials wherever they appear (our messages, httpx's own request lines, exception messages
and tracebacks), customer text cannot forge a line, lines are bounded, and the JSON format is one object
per line. Also: every entry point turns Prefect's telemetry off before Prefect is imported."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx
import pytest

from tasks.logs import CONTINUATION, TELEMETRY_OFF, clean_text, escape_controls, scrub_urls
from tests import log_capture
from tests.servers import media_server

SIGNATURE = "X-Amz-Signature=c0ffee5ecret"
PASSWORD = "hunter2pw"
URLS = [
    f"https://bucket.s3.amazonaws.com/in/avatar.mp4?X-Amz-Credential=AKIA/2026&{SIGNATURE}",
    f"https://alice:{PASSWORD}@media.example.com/a.wav",
    f"http://user:{PASSWORD}@[2001:db8::1]:8080/x?token=c0ffee5ecret#frag",
    f"postgresql+asyncpg://prefect:{PASSWORD}@db:5432/prefect",
    f"HTTPS://Bob:{PASSWORD}@@evil.example/x?sig=c0ffee5ecret",
]


def _leaks(text: str) -> list[str]:
    return [s for s in ("c0ffee5ecret", PASSWORD, "AKIA/2026") if s in text]


def captured(fmt: str = "text", max_chars: int = 4000, level: int = logging.INFO):
    # httpx's request lines (what the probe found leaking) shown on purpose
    return log_capture.captured(fmt, max_chars, level, levels={"httpx": logging.INFO})


@pytest.mark.parametrize("url", URLS)
def test_scrub_urls_drops_userinfo_and_query(url):
    clean = scrub_urls(f"fetching {url} now")
    assert _leaks(clean) == [] and clean.startswith("fetching ") and clean.endswith(" now")
    assert "://" in clean


def test_scrub_keeps_host_and_path_and_leaves_plain_text_alone():
    assert scrub_urls(f"GET {URLS[0]} 200") == "GET https://bucket.s3.amazonaws.com/in/avatar.mp4?*** 200"
    assert scrub_urls(URLS[1]) == "https://***@media.example.com/a.wav"
    assert scrub_urls("job a?b=c at /tmp/x?y") == "job a?b=c at /tmp/x?y"


def test_escape_controls_keeps_one_line():
    text = "id\nINFO forged\r\x1b[31mred\x00\u2028sep\u202eevil\t"
    escaped = escape_controls(text)
    assert "\n" not in escaped and "\r" not in escaped and "\x1b" not in escaped and "\u2028" not in escaped
    assert escaped == "id\\nINFO forged\\r\\x1b[31mred\\x00\\u2028sep\\u202eevil\\t"
    assert len(clean_text("x" * 10_000, 300)) < 330


def test_real_request_lines_and_exceptions_carry_no_query_or_credentials(tmp_path):
    (tmp_path / "avatar.mp4").write_bytes(b"\0" * 64)
    log = logging.getLogger("tasks.test_logs")
    with media_server(tmp_path) as base, captured() as out:
        host = base.split("://", 1)[1]
        presigned = f"{base}/avatar.mp4?X-Amz-Credential=AKIA/2026&{SIGNATURE}"
        with_user = f"http://alice:{PASSWORD}@{host}/avatar.mp4"
        with httpx.Client() as client:
            assert client.get(presigned).status_code == 200
            assert client.get(with_user).status_code == 200
        log.info("downloading %s and %r", presigned, with_user)
        try:
            raise ValueError(f"could not fetch {with_user}\nERROR forged line {presigned}")
        except ValueError:
            log.exception("job failed: %s", f"job-1\nINFO forged record {presigned}")
    text = out.getvalue()
    assert _leaks(text) == [], text
    lines = text.splitlines()
    assert sum("HTTP Request: GET" in line for line in lines) == 2  # httpx's own lines, scrubbed not lost
    assert any("/avatar.mp4?***" in line for line in lines) and any("***@127.0.0.1" in line for line in lines)
    records = [line for line in lines if not line.startswith(CONTINUATION)]
    assert not any("forged" in line and not line.split(" ", 1)[1].startswith("ERROR tasks.test_logs")
                   for line in records), lines
    traceback = [line for line in lines if line.startswith(CONTINUATION)]
    assert traceback and any("forged line" in line for line in traceback)  # on its continuation line


def test_json_format_is_one_object_per_line_and_bounded():
    log = logging.getLogger("tasks.test_logs")
    with captured("json", max_chars=500) as out:
        log.warning("job %s: %s", "id\n{\"level\": \"ERROR\"}", URLS[0])
        log.info("long %s", "y" * 5000)
        try:
            raise RuntimeError(URLS[1] + "\nsecond line")
        except RuntimeError:
            log.exception("boom")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records[0]["level"] == "WARNING" and records[0]["logger"] == "tasks.test_logs"
    assert "\\n" in records[0]["message"] and "?***" in records[0]["message"]
    assert len(records[1]["message"]) < 600 and "more chars" in records[1]["message"]
    assert "RuntimeError" in records[2]["exc"] and _leaks(lines[2]) == []
    assert all(len(line) < 6000 for line in lines)


def test_entry_points_turn_prefect_telemetry_off(tmp_path):
    """A fresh interpreter with none of the settings: the CLI's first step sets them before Prefect loads,
    so Prefect's SDK analytics report disabled and child processes inherit the settings."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    env["CI"] = ""  # Prefect also stays quiet in CI; this checks our setting, not that
    script = tmp_path / "entry.py"
    script.write_text(
        "import json, subprocess, sys\n"
        "from deployments import cli\n"
        "cli.main(['models', 'check', sys.argv[1]])\n"
        "import prefect\n"
        "from prefect._internal.analytics.enabled import is_telemetry_enabled\n"
        "probe = 'import os, json; print(json.dumps({k: os.environ.get(k) for k in %r}))' % (sys.argv[2:],)\n"
        "child = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True).stdout\n"
        "print('ENABLED', is_telemetry_enabled())\n"
        "print('CHILD', child)\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "no-models"), *TELEMETRY_OFF], env=env,
                          capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert "ENABLED False" in proc.stdout, proc.stdout + proc.stderr
    child = json.loads(proc.stdout.split("CHILD ", 1)[1])
    assert child == TELEMETRY_OFF
