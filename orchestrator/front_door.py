"""The orchestrator's HTTP front door: every request is judged here before a handler runs, so nothing a
client sends reaches Prefect unless Prefect can store it, and every refusal is a 4xx with the API's one
error body ``{"error": {"type", "message"}}`` (DESIGN §11). Found by tests/test_fuzz_orchestrator.py.

==============================================  ======  =================  ==============================
what                                            status  type               why
==============================================  ======  =================  ==============================
body over ``MUSETALK_MAX_REQUEST_BYTES``        413     too_large          the same limit as the workers'
(any method; declared or streamed)                                         front door; Prefect refuses
                                                                           large parameters with a 500
POST body not strict JSON: not UTF-8/16/32,     422     invalid_request    Prefect cannot store or send
NaN/Infinity or a float out of range, nested                               them (a lone surrogate fails to
deeper than :data:`MAX_DEPTH`, a NUL or a lone                             encode, PostgreSQL refuses NUL,
surrogate in a string or key                                               deep nesting overflows pydantic)
``POST /v1/avatar/jobs``: ``Idempotency-Key``   422     invalid_request    it is a Prefect idempotency key
not 1-255 printable ASCII characters                                       (an indexed column)
``POST /v1/avatar/jobs``: ``video_url`` or      422     invalid_request    the workers' own URL rule
``audio_url`` malformed                                                    (:func:`tasks.fetch.check_url_form`)
``POST /v1/avatar/jobs``: ``webhook_url``       422     invalid_request    :func:`orchestrator.webhooks.
malformed, or a private literal address                                    check_webhook_url`
no route, wrong method, any framework error     4xx     not_found, …       the contract's body, not
                                                                           Starlette's ``{"detail"}``
==============================================  ======  =================  ==============================

Types, required fields and ids are the models' business (orchestrator/schemas.py): their 422 is the same
body (orchestrator/api_errors.py). A body over the limit is read and dropped up to a cap, so that a client still
sending gets its 413 rather than a reset connection (what the workers' front door found)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from musetalk_engine.errors import MediaError
from orchestrator.api_errors import ApiError, error_response
from orchestrator.webhooks import check_webhook_url
from tasks.fetch import check_url_form
from tasks.request_body import ClientGone, read_body, replaying
from tasks.settings import Settings

JOBS_PATH = "/v1/avatar/jobs"
# Deeper than any real metadata; pydantic's serializer gives up (a 500) a few hundred levels down.
MAX_DEPTH = 32
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# The type of each framework error status in the contract body.
TYPE_OF_STATUS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "invalid_request",
                  422: "invalid_request"}


# ------------------------------------------------------------------------------------------ rules


def _not_json(what: str) -> ApiError:
    return ApiError(422, "invalid_request", f"the body is not valid JSON ({what})")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _not_json(f"the number {text[:20]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise _not_json(f"{text} is not JSON")


def strict_json(body: bytes) -> Any:
    """``body`` as JSON that Prefect can store and send back (see the module doc); :class:`ApiError` else."""
    try:
        data = json.loads(body, parse_float=_finite, parse_constant=_constant)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, the int digits limit; nesting
        raise _not_json("syntax or encoding") from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _not_json(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    _check_text(key)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return data


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise _not_json("a string holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _not_json("a string holds a lone UTF-16 surrogate") from None


def check_job_submit(data: Any, idempotency_keys: list[str], workdir_settings: Settings) -> None:
    """``POST /v1/avatar/jobs``: the rules that need the settings or a header (the model checks the rest).
    ``idempotency_keys``: every ``Idempotency-Key`` header sent (the front door and the handler could
    otherwise read different ones). May look up ``*.localhost`` names: call it off the event loop."""
    if len(idempotency_keys) > 1:
        raise ApiError(422, "invalid_request", "Idempotency-Key: send it once")
    if idempotency_keys and not IDEMPOTENCY_KEY.fullmatch(idempotency_keys[0]):
        raise ApiError(422, "invalid_request", "Idempotency-Key: at most 255 printable ASCII characters")
    if not isinstance(data, dict):
        return
    for field, kind in (("video_url", "video"), ("audio_url", "audio"), ("webhook_url", "webhook")):
        value = data.get(field)
        if not isinstance(value, str) or not value:  # other types, and an empty URL, are the model's 422
            continue
        try:
            if kind == "webhook":
                check_webhook_url(value, workdir_settings)
            else:
                check_url_form(value, kind, workdir_settings)
        except MediaError as exc:
            raise ApiError(422, "invalid_request", f"{field}: {exc.message}") from None


# ------------------------------------------------------------------------------------------ ASGI


class FrontDoor:
    """ASGI middleware applying the table above, then handing the buffered body on to the app."""

    def __init__(self, app: ASGIApp, workdir_settings: Settings):
        self.app = app
        self.workdir_settings = workdir_settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.workdir_settings.musetalk_max_request_bytes
        try:
            body = await read_body(scope, receive, limit)
        except ClientGone:
            return
        if body is None:
            await self._answer(ApiError(413, "too_large", f"the request body is larger than {limit} bytes"),
                               scope, receive, send)
            return
        try:
            if scope["method"] == "POST" and body:
                data = strict_json(body)
                if scope["path"].rstrip("/") == JOBS_PATH:
                    keys = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"idempotency-key"]
                    await asyncio.to_thread(check_job_submit, data, keys, self.workdir_settings)
        except ApiError as refused:
            await self._answer(refused, scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    async def _answer(refused: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        # "Connection: close": an over-size body may not have been read to its end
        headers = {"Connection": "close"} if refused.status == 413 else None
        await error_response(refused.status, refused.type, refused.message, headers)(scope, receive, send)


async def _framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own HTTP errors (no route, wrong method, a body it could not parse)."""
    status = exc.status_code
    return error_response(status, TYPE_OF_STATUS.get(status, "http_error"), str(exc.detail),
                          dict(exc.headers) if exc.headers else None)


def install_front_door(app: FastAPI, workdir_settings: Settings) -> None:
    """The middleware and the framework-error body, on ``app`` (call before it starts)."""
    app.add_middleware(FrontDoor, workdir_settings=workdir_settings)
    app.add_exception_handler(StarletteHTTPException, _framework_error)
