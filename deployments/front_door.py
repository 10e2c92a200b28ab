"""The HTTP front door of the job endpoints (``POST /generate``, ``POST /benchmark``): every request is
judged here, before anything about it is logged, queued or sent to Prefect, and a customer's mistake is
always a final 4xx carrying the contract's failure body (DESIGN §4; Salad's queue retries only 408/429/5xx):

======================================  =======  =====================================================
what                                    status   why that status
======================================  =======  =====================================================
body over ``MUSETALK_MAX_REQUEST_BYTES``  413    the request as a whole is too large (HTTP's own code);
(declared or streamed; 64 KiB default)           kept only up to the limit, dropped up to 1 MiB (so the
                                                 client gets the answer), not read past that
body not JSON (any encoding, nesting,     422    like every other invalid request
huge numbers), or not a JSON object
a field invalid or over its limit         422    the field is named: job id (safe characters, at most
(:meth:`JobRequest.parse`, URL form and          128), URLs (``MUSETALK_MAX_URL_CHARS``, http(s), a
length: :func:`tasks.fetch.check_url_form`)      request can be built), framing, ``params``
``Salad-Job-Id`` header not an id         422    it is written to logs and sidecars
wrong method on a job path               405    with the contract body too
======================================  =======  =====================================================

A job id already in flight on this worker is decided later, by the service (409 or join, see
:meth:`deployments.serve.WorkerService.take`), as is everything that needs the inputs themselves (422 at
download/validation, e.g. the resolution limit).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from musetalk_engine.errors import MediaError
from tasks.contract import JobOutcome, JobRequest, failure_outcome
from tasks.fetch import check_url_form
from tasks.settings import Settings
from tasks.request_body import ClientGone, read_body, replaying
from tasks.storage import safe_job_id

JOB_PATHS = ("/generate", "/benchmark")
# What Salad's worker sends (a UUID); kept to characters that are safe in a log line or a file name.
QUEUE_JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_MESSAGE = 1000


def rejected(message: str, *, status: int = 422, stage: str = "validation", job_id: str | None = None,
             details: dict[str, Any] | None = None) -> JobOutcome:
    """A customer's error as the contract's failure body (``media_error``, never retryable); the message is
    bounded (pydantic names an offending key, and a key may be as long as the body allows)."""
    outcome = failure_outcome(MediaError(message[:MAX_MESSAGE], stage=stage, details=details or {}), stage=stage, job_id=job_id)
    return JobOutcome(http_status=status, body=outcome.body)


def known_job_id(data: Any) -> str | None:
    """The request's ``musetalk_job_id`` if it is a valid id (safe to echo and log), else None."""
    value = data.get("musetalk_job_id") if isinstance(data, dict) else None
    try:
        return safe_job_id(value) if isinstance(value, str) else None
    except MediaError:
        return None


def decode_json(body: bytes) -> Any:
    """The body as JSON (UTF-8/16/32, as RFC 8259 allows); :class:`MediaError` for anything else."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digits limit; nesting
        raise MediaError("invalid job request: the body is not valid JSON", stage="validation") from None


def check_job(data: Any, settings: Settings) -> JobRequest:
    """A ``/generate`` body, judged completely: fields, framing, job id, URL form (no network)."""
    if not isinstance(data, dict):
        raise MediaError("invalid job request: the body must be a JSON object", stage="validation")
    job = JobRequest.parse(data)
    safe_job_id(job.musetalk_job_id)
    check_url_form(job.video_url, "video", settings)
    check_url_form(job.audio_url, "audio", settings)
    return job


def check_queue_job_id(value: str | None) -> None:
    if value is not None and not QUEUE_JOB_ID.fullmatch(value):
        raise MediaError("the Salad-Job-Id header may only contain letters, digits, '.', '_', ':' and '-' "
                         "(at most 128)", stage="validation")


class FrontDoor:
    """ASGI middleware that applies the table above to ``POST`` on :data:`JOB_PATHS`, then hands the
    buffered body on to the app (which parses it again into its typed model)."""

    def __init__(self, app: ASGIApp, settings: Callable[[], Settings]):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in JOB_PATHS or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        limit = settings.musetalk_max_request_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await read_body(scope, receive, limit)
        except ClientGone:
            return
        if body is None:
            await self._answer(rejected(f"the request body is larger than {limit} bytes", status=413,
                                        details={"limit_bytes": limit}), scope, receive, send)
            return
        outcome = self._judge(scope["path"], body, headers, settings)
        if outcome is not None:
            await self._answer(outcome, scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    def _judge(path: str, body: bytes, headers: dict[str, str], settings: Settings) -> JobOutcome | None:
        data: Any = None
        try:
            data = decode_json(body)
            check_queue_job_id(headers.get("salad-job-id"))
            if path == "/generate":
                check_job(data, settings)
            elif not isinstance(data, dict):
                raise MediaError("invalid benchmark request: the body must be a JSON object", stage="validation")
        except MediaError as exc:
            return rejected(exc.message, stage=exc.stage, job_id=known_job_id(data), details=exc.details)
        except ValidationError as exc:  # a model check outside JobRequest.parse's own handling
            return rejected(f"invalid job request: {exc.error_count()} invalid field(s)", job_id=known_job_id(data))
        return None

    @staticmethod
    async def _answer(outcome: JobOutcome, scope: Scope, receive: Receive, send: Send) -> None:
        # "Connection: close": an over-size body may not have been read to its end
        headers = {"Connection": "close"} if outcome.http_status == 413 else None
        await JSONResponse(outcome.body, status_code=outcome.http_status, headers=headers)(scope, receive, send)
