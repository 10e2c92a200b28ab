"""The orchestrator's HTTP app: the public job API (``/v1/avatar/...``, Bearer API keys), the internal
protocol of DESIGN §5 (``/internal/...``, ``X-Internal-API-Key``), ``GET /hc`` and offline ``/docs``.

Handlers only translate HTTP to the operations of this package and back; every 4xx body is
``{"error": {"type", "message"}}``. One Prefect client is opened per process (lifespan) and shared by
handlers and the background sweep."""


import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

from deployments.openapi_docs import install_offline_docs
from orchestrator import leases
from orchestrator.cancel import NotCancellable, cancel_job
from orchestrator.jobs import (
    TERMINAL, WORKER_LABEL, find_job_run, job_id_of, job_view, key_scope, status_of, tag_value,
)
from orchestrator.listing import BadCursor, list_job_runs
from orchestrator.prefect_writes import limit_writes
from orchestrator.progress_artifacts import write_progress
from orchestrator.estimate import Estimate, EstimateRequest, NoMeasuredClass, estimate_job
from orchestrator.routes import ensure_route_deployments
from orchestrator.routing import RouteError, known_classes, price_list
from orchestrator.schemas import (
    ClaimRequest, ErrorBody, Heartbeat, JobCreate, JobCreated, JobList, JobView, ProgressReport, StatusReport,
)
from orchestrator.settings import OrchestratorSettings, get_orchestrator_settings
from orchestrator.submit import JobConflict, submit_job
from orchestrator.sweeper import sweep_forever
from orchestrator.workers import record_heartbeat
from tasks.contract import describe_errors
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}}


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str):
        self.status, self.type, self.message = status, type_, message


def error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status)


def create_app(settings: OrchestratorSettings | None = None, workdir_settings: Settings | None = None, *,
               sweep: bool = True) -> FastAPI:
    settings = settings or get_orchestrator_settings()
    workdir_settings = workdir_settings or get_settings()
    api_keys = settings.api_keys
    if not api_keys:
        log.warning("MUSETALK_API_KEYS is empty: every public API call will be refused (401)")
    internal_key = workdir_settings.internal_api_key.get_secret_value() if workdir_settings.internal_api_key else ""
    if not internal_key:
        log.warning("INTERNAL_API_KEY is not set: every /internal call will be refused (401)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with get_client() as client:
            limit_writes(client, settings.musetalk_prefect_max_writes)
            app.state.prefect = client
            await ensure_route_deployments(client)
            stop = asyncio.Event()
            task = asyncio.create_task(sweep_forever(client, settings, workdir_settings, stop)) if sweep else None
            try:
                yield
            finally:
                stop.set()
                if task is not None:  # let the pass in progress end; a stuck one is cancelled
                    done, _ = await asyncio.wait({task}, timeout=15)
                    if not done:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)

    app = FastAPI(title="musetalk-flow orchestrator", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Lip-sync jobs on the MuseTalk fleet (DESIGN §11) and the workers' protocol (§5).")
    install_offline_docs(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.type, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid_request", describe_errors(exc.errors()))

    bearer = HTTPBearer(auto_error=False)

    def api_scope(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        """The caller's key scope; 401 without a known key (compared in constant time)."""
        given = credentials.credentials if credentials is not None else ""
        if not given or not any(hmac.compare_digest(given.encode(), k.encode()) for k in api_keys):
            raise ApiError(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>")
        return key_scope(given)

    def internal(x_internal_api_key: Annotated[str | None, Header()] = None) -> None:
        if not internal_key or not x_internal_api_key or not hmac.compare_digest(
                x_internal_api_key.encode(), internal_key.encode()):
            raise ApiError(401, "unauthorized", "a valid X-Internal-API-Key is required")

    def prefect(request: Request):
        return request.app.state.prefect

    Scope = Annotated[str, Depends(api_scope)]

    # ------------------------------------------------------------------------------------- public API

    @app.get("/hc", tags=["health"])
    async def health(request: Request) -> dict[str, Any]:
        problem = await prefect(request).api_healthcheck()
        if problem is not None:
            return JSONResponse({"status": "error", "detail": f"Prefect API unreachable: {problem}"}, 503)
        return {"status": "ok"}

    @app.post("/v1/avatar/jobs", status_code=202, response_model=JobCreated, responses=ERRORS, tags=["jobs"])
    async def create_job(body: JobCreate, request: Request, scope: Scope,
                         idempotency_key: Annotated[str | None, Header()] = None):
        try:
            submitted = await submit_job(prefect(request), body, scope=scope, idempotency_key=idempotency_key,
                                         settings=settings, workdir_settings=workdir_settings)
        except JobConflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        except RouteError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        run = submitted.run
        answer = {"id": job_id_of(run), "status": status_of(run),
                  "created_at": run.created.isoformat() if run.created else None}
        return JSONResponse(answer, status_code=202 if submitted.created else 200)

    async def scoped_run(request: Request, job_id: str, scope: str):
        run = await find_job_run(prefect(request), job_id, scope)
        if run is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return run

    @app.get("/v1/avatar/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
    async def get_job(job_id: str, request: Request, scope: Scope):
        return await job_view(prefect(request), await scoped_run(request, job_id, scope))

    @app.get("/v1/avatar/jobs", response_model=JobList, responses=ERRORS, tags=["jobs"])
    async def list_jobs(request: Request, scope: Scope,
                        status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20, cursor: str | None = None):
        client = prefect(request)
        try:
            runs, next_cursor = await list_job_runs(client, scope, status=status, limit=limit, cursor=cursor)
        except BadCursor as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        return {"items": [await job_view(client, r) for r in runs], "next_cursor": next_cursor}

    @app.delete("/v1/avatar/jobs/{job_id}", status_code=202, responses=ERRORS, tags=["jobs"])
    async def delete_job(job_id: str, request: Request, scope: Scope) -> dict[str, str]:
        run = await scoped_run(request, job_id, scope)
        try:
            status = await cancel_job(prefect(request), run)
        except NotCancellable as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return {"id": job_id, "status": status}

    @app.post("/v1/avatar/estimate", response_model=Estimate, responses=ERRORS, tags=["jobs"])
    async def estimate(body: EstimateRequest, scope: Scope):
        targets = known_classes(settings, workdir_settings)
        prices = price_list(settings, workdir_settings)
        try:
            return estimate_job(body, targets, prices, target_rtf=settings.musetalk_salad_target_rtf)
        except NoMeasuredClass as exc:
            raise ApiError(422, "no_measured_class", str(exc)) from None

    # ------------------------------------------------------------------------------- internal (§5)

    Internal = Depends(internal)

    @app.post("/internal/jobs/{job_id}/progress", dependencies=[Internal], responses=ERRORS, tags=["internal"])
    async def progress(job_id: str, body: ProgressReport, request: Request) -> dict[str, Any]:
        client = prefect(request)
        run = await find_job_run(client, job_id)
        if run is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        if run.state_type in TERMINAL or run.state_type == StateType.CANCELLING:
            raise ApiError(409, "conflict", f"job {job_id} is no longer running ({run.state_type.value.lower()})")
        holder = (run.labels or {}).get(WORKER_LABEL)
        if tag_value(run, "route") == "buffer" and holder and body.worker_id and body.worker_id != holder:
            raise ApiError(409, "conflict", f"job {job_id} is held by another worker")
        await write_progress(client, run.id, job_id, body.progress, body.phase, body.worker_id, body.status)
        return {"ok": True}

    @app.post("/internal/buffer/workers/{worker_id}/heartbeat", dependencies=[Internal], responses=ERRORS,
              tags=["internal"])
    async def heartbeat(worker_id: str, body: Heartbeat, request: Request) -> dict[str, Any]:
        await record_heartbeat(prefect(request), worker_id, body.model_dump(), settings.musetalk_worker_offline_sec)
        return {"ok": True}

    @app.post("/internal/buffer/jobs/claim", dependencies=[Internal], responses=ERRORS, tags=["internal"])
    async def claim(body: ClaimRequest, request: Request) -> dict[str, Any]:
        client = prefect(request)
        try:
            return {"job": await leases.claim(client, body.worker_id, settings.musetalk_worker_offline_sec)}
        except leases.ClaimRefused as exc:
            raise ApiError(409, "conflict", str(exc)) from None

    @app.post("/internal/buffer/jobs/{buffer_job_id}/status", dependencies=[Internal], responses=ERRORS,
              tags=["internal"])
    async def status(buffer_job_id: str, body: StatusReport, request: Request) -> dict[str, Any]:
        if body.status == "succeeded" and not body.output_url:
            raise ApiError(422, "invalid_request", "a succeeded report must carry output_url")
        try:
            job_status = await leases.report(prefect(request), buffer_job_id, body.model_dump(),
                                             settings.musetalk_max_attempts)
        except leases.LeaseUnknown as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except leases.LeaseConflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return {"ok": True, "job_status": job_status}

    return app
