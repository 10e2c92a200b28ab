"""Secrets never leave the worker: jobs run with distinctive fake credentials (INTERNAL_API_KEY for a fake
orchestrator, B2_APP_KEY for b2sdk's simulator, SALAD_API_KEY), in ONE flow run, and then every place a
secret could surface is searched: log records (all loggers; DEBUG for HTTP, B2 and our own), the Prefect
flow run's logs, parameters, task runs and artifacts read back through the client, every byte Prefect
stored (its SQLite database and persisted results), the response bodies, the B2 sidecars and file info,
the progress bodies the orchestrator received, and every file in the work dir.

One job fails with a B2 error whose text carries the application key (as a misbehaving library might
echo it), so the redaction on that path is exercised too. No ``install_redaction()``: nothing should need
scrubbing in the first place, except that one error.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest

from deployments.serve import start_prefect_api
from tests import hostile_media as hm

pytest_plugins = ["tests.fixtures_engine"]

BUCKET = "musetalk-secrets"
SECRETS = {
    "INTERNAL_API_KEY": "iak-SECRET-5d1f7c9e2b4a",
    "B2_APP_KEY": "K005SECRETb2appkey9a8b7c6d5e",
    "SALAD_API_KEY": "salad-SECRET-3e4f5a6b7c8d",
}


class _Capture(logging.Handler):
    """Every record, formatted with its traceback, from every logger that reaches it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{record.name} {record.levelname} {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception as exc:  # a record that cannot format must not break the run
            text = f"{record.name} unformattable {exc!r}"
        self.lines.append(text)


DEBUG_LOGGERS = ("httpx", "httpcore", "b2sdk", "urllib3", "tasks", "flows", "musetalk_engine")


@contextmanager
def capture_all_logs():
    """Attach one capture handler to the root and every logger that does not propagate. The loggers where
    request details live (httpx, httpcore, b2sdk, urllib3, ours) go to DEBUG for the run, feeding only the
    capture (not propagating: their DEBUG flood stays out of the console and the Prefect API)."""
    capture = _Capture()
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if not getattr(logging.getLogger(n), "propagate", True)]
    loggers += [logging.getLogger(n) for n in ("prefect", "prefect.flow_runs", "prefect.task_runs")]
    debug = [logging.getLogger(n) for n in DEBUG_LOGGERS]
    saved = {lg: (lg.level, lg.propagate) for lg in debug}
    for lg in set(loggers) | set(debug):
        lg.addHandler(capture)
    for lg in debug:
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield capture
    finally:
        for lg in set(loggers) | set(debug):
            lg.removeHandler(capture)
        for lg, (level, propagate) in saved.items():
            lg.setLevel(level)
            lg.propagate = propagate


@dataclass
class Run:
    rows: dict[str, dict]
    flow_run_id: UUID
    logs: list[str]
    raw: object
    orchestrator: hm.FakeOrchestrator
    work: Path
    cache: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models) -> Run:
    import tasks.storage
    from b2sdk.v2.exception import ServiceError

    base = tmp_path_factory.getbasetemp()
    work, video, audio = hm.worker_inputs(tmp_path_factory, "secrets")
    cache = base / "shared-engine-cache"
    mp = pytest.MonkeyPatch()
    raw, key_id = hm.simulated_b2(mp, BUCKET, SECRETS["B2_APP_KEY"])

    @contextmanager
    def leaky_b2():  # an upstream error that quotes the key it was given
        raw.set_upload_errors([ServiceError(f"503 backend rejected key {SECRETS['B2_APP_KEY']}")
                               for _ in range(15)])
        try:
            yield
        finally:
            raw.upload_errors = []

    hm.HOOKS["leaky_b2"] = leaky_b2
    try:
        with hm.MediaServer() as server, hm.FakeOrchestrator("ok") as orchestrator:
            hm.worker_env(mp, work, tiny_models, MUSETALK_CACHE_DIR=str(cache), B2_KEY_ID=key_id,
                          B2_BUCKET_NAME=BUCKET, ORCHESTRATOR_BASE_URL=orchestrator.url,
                          SALAD_ORG_NAME="acme", SALAD_PROJECT_NAME="lipsync", **SECRETS)
            v, a = server.file("/avatar.mp4", video), server.file("/speech.wav", audio)
            job = {"musetalk_job_id": "secret-ok", "video_url": v, "audio_url": a, "aspect_ratio": "1:1"}
            cases = [
                {"name": "ok", "job": job, "queue_job_id": "salad-queue-job-1"},
                {"name": "download_fails", "job": {**job, "musetalk_job_id": "secret-404",
                                                   "video_url": server.statuses("/gone.mp4", [404])}},
                {"name": "b2_error_quotes_key", "hook": "leaky_b2",
                 "job": {**job, "musetalk_job_id": "secret-b2-leak"}},
            ]
            start_prefect_api()
            with capture_all_logs() as logs:
                state = hm.run_jobs(cases, return_state=True)
                from prefect.logging.handlers import APILogHandler
                APILogHandler().flush()  # ship the run's logs to the server before reading them back
            rows = {r["name"]: r for r in state.result()}
            yield Run(rows=rows, flow_run_id=state.state_details.flow_run_id, logs=logs.lines, raw=raw,
                      orchestrator=orchestrator, work=work, cache=cache)
    finally:
        hm.HOOKS.pop("leaky_b2", None)
        mp.undo()
        tasks.storage.clear_storage_cache()
        from tasks.settings import get_settings
        get_settings.cache_clear()


def _leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def _bytes_leaks(data: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in data]


def test_jobs_ran_as_expected(run):
    assert run.rows["ok"]["http_status"] == 200, run.rows["ok"]["body"]
    assert run.rows["ok"]["body"]["b2_bucket"] == BUCKET
    assert run.rows["download_fails"]["http_status"] == 422
    leak = run.rows["b2_error_quotes_key"]
    assert leak["http_status"] == 500 and leak["body"]["stage"] == "upload"
    assert "***" in leak["body"]["error_message"]  # the key was there, and was scrubbed
    # the orchestrator got the key in its header, as the protocol requires
    assert {key for _, key, _ in run.orchestrator.posts} == {SECRETS["INTERNAL_API_KEY"]}


def test_no_secret_in_responses(run):
    for name, row in run.rows.items():
        assert _leaks(json.dumps(row["body"])) == [], name


def test_no_secret_in_log_records(run):
    assert len(run.logs) > 20  # the capture really saw the run (DEBUG included)
    leaking = [line[:300] for line in run.logs if _leaks(line)]
    assert leaking == []


def test_no_secret_in_prefect_logs_parameters_task_runs_or_artifacts(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run.flow_run_id)
        logs, offset = [], 0
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.flow_run_id])),
                                    limit=200, offset=offset)
            logs += page
            offset += len(page)
            if len(page) < 200:
                break
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.flow_run_id])), limit=200)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run_id])))
    assert len(logs) > 10 and any("secret-ok" in log.message for log in logs)
    assert [log.message[:200] for log in logs if _leaks(log.message)] == []
    assert _leaks(json.dumps(flow_run.parameters, default=str)) == []
    assert _leaks(flow_run.model_dump_json()) == []
    assert len(task_runs) >= 10
    assert [t.name for t in task_runs if _leaks(t.model_dump_json())] == []
    assert [a.key for a in artifacts if _leaks(a.model_dump_json())] == []


def test_no_secret_in_anything_prefect_stored(run):
    """The temporary server's database (WAL included) and every persisted task result."""
    home = Path(os.environ["PREFECT_HOME"])
    stored = [p for p in home.rglob("*") if p.is_file()] + [p for p in run.cache.rglob("*") if p.is_file()
                                                            and "prefect-results" in p.parts]
    assert any(p.name.startswith("prefect.db") for p in stored), "the server database was not found"
    assert [str(p) for p in stored if _bytes_leaks(p.read_bytes())] == []


def test_no_secret_in_sidecars_or_b2_file_info(run):
    sidecar = hm.b2_read(run.raw, BUCKET, "avatar/outputs/secret-ok.json")
    assert json.loads(sidecar)["queue_job_id"] == "salad-queue-job-1"
    assert _bytes_leaks(sidecar) == []
    bucket = run.raw.bucket_name_to_bucket[BUCKET]
    for f in bucket.file_id_to_file.values():
        assert _leaks(json.dumps(f.file_info, default=str)) == [], f.name


def test_no_secret_in_progress_bodies_or_work_files(run):
    assert _leaks(json.dumps([body for _, _, body in run.orchestrator.posts])) == []
    files = [p for p in run.work.rglob("*") if p.is_file()]
    assert [str(p) for p in files if _bytes_leaks(p.read_bytes())] == []
    assert list((run.work / "tmp").iterdir()) == []
