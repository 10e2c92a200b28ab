"""The one failure body of the orchestrator's HTTP API, ``{"error": {"type", "message"}}``: the exception
handlers raise it from, and the OpenAPI ``responses`` that document it."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from orchestrator.schemas import ErrorBody
from tasks.contract import describe_errors

# The failure answers every job and protocol endpoint documents.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody},
}


class ApiError(Exception):
    """Raised by a handler, a dependency or the front door; answered as ``status`` with the failure body."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


# A message may quote what the client sent (an id, a field name): bounded.
MAX_MESSAGE = 1000


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message[:MAX_MESSAGE]}}, status_code=status,
                        headers=headers)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 in the API's failure body, the message naming each bad field."""
    return error_response(422, "invalid_request", describe_errors(exc.errors()))
