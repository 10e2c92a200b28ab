"""The orchestrator's HTTP app: the public job API (``/v1/avatar/...``, Bearer API keys:
:mod:`orchestrator.public_api`), the internal protocol of DESIGN §5 (``/internal/...``,
``X-Internal-API-Key``: :mod:`orchestrator.internal_api`), ``GET /hc`` and offline ``/docs``.

This module only wires them: settings on ``app.state`` (read by :mod:`orchestrator.api_dependencies`), the
failure body of :mod:`orchestrator.api_errors`, and the lifespan. One Prefect client is opened per process
(lifespan) and shared by handlers and the background sweep."""


import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prefect.client.orchestration import get_client

from deployments.openapi_docs import install_offline_docs
from orchestrator import internal_api, public_api
from orchestrator.api_errors import ApiError, api_error_handler, validation_error_handler
from orchestrator.front_door import install_front_door
from orchestrator.prefect_writes import limit_writes
from orchestrator.routes import ensure_route_deployments
from orchestrator.settings import OrchestratorSettings, get_orchestrator_settings
from orchestrator.sweeper import sweep_forever
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the process's Prefect client, make sure the route deployments exist, and run the sweep
    (lost workers, Salad runs, webhooks) unless ``app.state.sweep`` is off."""
    settings: OrchestratorSettings = app.state.settings
    async with get_client() as client:
        limit_writes(client, settings.musetalk_prefect_max_writes)
        app.state.prefect = client
        await ensure_route_deployments(client)
        stop = asyncio.Event()
        task = (asyncio.create_task(sweep_forever(client, settings, app.state.workdir_settings, stop))
                if app.state.sweep else None)
        try:
            yield
        finally:
            stop.set()
            if task is not None:  # let the pass in progress end; a stuck one is cancelled
                done, _ = await asyncio.wait({task}, timeout=15)
                if not done:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)


def create_app(settings: OrchestratorSettings | None = None, workdir_settings: Settings | None = None, *,
               sweep: bool = True) -> FastAPI:
    settings = settings or get_orchestrator_settings()
    workdir_settings = workdir_settings or get_settings()
    if not settings.api_keys:
        log.warning("MUSETALK_API_KEYS is empty: every public API call will be refused (401)")
    if not workdir_settings.internal_api_key or not workdir_settings.internal_api_key.get_secret_value():
        log.warning("INTERNAL_API_KEY is not set: every /internal call will be refused (401)")

    app = FastAPI(title="musetalk-flow orchestrator", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Lip-sync jobs on the MuseTalk fleet (DESIGN §11) and the workers' protocol (§5).")
    app.state.settings, app.state.workdir_settings, app.state.sweep = settings, workdir_settings, sweep
    install_offline_docs(app)
    install_front_door(app, workdir_settings)  # limits and strict JSON before any handler; 404/405 bodies
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(public_api.router)
    app.include_router(internal_api.router)
    return app
