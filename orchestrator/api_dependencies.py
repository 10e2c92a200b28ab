"""FastAPI dependencies of the orchestrator's handlers. Each reads what :func:`orchestrator.api.create_app`
put on ``app.state`` (the settings, and the Prefect client the lifespan opens), so handlers are plain
module-level functions and tests build an app per configuration."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prefect.client.orchestration import PrefectClient

from orchestrator.api_errors import ApiError
from orchestrator.jobs import key_scope
from orchestrator.settings import OrchestratorSettings
from tasks.settings import Settings

# auto_error=False: a missing or malformed header is our 401 body, not FastAPI's 403
bearer = HTTPBearer(auto_error=False)


def orchestrator_settings(request: Request) -> OrchestratorSettings:
    return request.app.state.settings


def workdir_settings(request: Request) -> Settings:
    return request.app.state.workdir_settings


def prefect_client(request: Request) -> PrefectClient:
    """The process's one Prefect client, opened by the lifespan."""
    return request.app.state.prefect


def api_scope(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
              settings: Annotated[OrchestratorSettings, Depends(orchestrator_settings)]) -> str:
    """The caller's key scope; 401 without a known key (compared in constant time)."""
    given = credentials.credentials if credentials is not None else ""
    if not given or not any(hmac.compare_digest(given.encode(), k.encode()) for k in settings.api_keys):
        raise ApiError(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>")
    return key_scope(given)


def internal_key(workdir: Annotated[Settings, Depends(workdir_settings)],
                 x_internal_api_key: Annotated[str | None, Header()] = None) -> None:
    """401 unless the call carries the shared ``X-Internal-API-Key`` (none is accepted when it is unset)."""
    expected = workdir.internal_api_key.get_secret_value() if workdir.internal_api_key else ""
    if not expected or not x_internal_api_key or not hmac.compare_digest(
            x_internal_api_key.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "a valid X-Internal-API-Key is required")


KeyScope = Annotated[str, Depends(api_scope)]
Prefect = Annotated[PrefectClient, Depends(prefect_client)]
OrchSettings = Annotated[OrchestratorSettings, Depends(orchestrator_settings)]
WorkdirSettings = Annotated[Settings, Depends(workdir_settings)]
