"""The public job API (DESIGN §11): ``/v1/avatar/jobs`` (create, get, list, cancel), ``/v1/avatar/estimate``
behind ``Authorization: Bearer <key>``, and the unauthenticated ``GET /hc``. Handlers only translate HTTP
to the operations of this package and back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun

from orchestrator.api_dependencies import KeyScope, OrchSettings, Prefect, WorkdirSettings
from orchestrator.api_errors import ERRORS, ApiError
from orchestrator.cancel import NotCancellable, cancel_job
from orchestrator.estimate import Estimate, EstimateRequest, NoMeasuredClass, estimate_job
from orchestrator.jobs import find_job_run, job_id_of, job_view, status_of
from orchestrator.listing import BadCursor, list_job_runs
from orchestrator.routing import RouteError, known_classes, price_list
from orchestrator.schemas import JobCreate, JobCreated, JobList, JobView
from orchestrator.submit import JobConflict, submit_job

router = APIRouter()


async def scoped_run(client: PrefectClient, job_id: str, scope: str) -> FlowRun:
    """The job's run if this key scope owns it; 404 otherwise (another key's job does not exist for it)."""
    run = await find_job_run(client, job_id, scope)
    if run is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return run


@router.get("/hc", tags=["health"])
async def health(client: Prefect) -> dict[str, Any]:
    problem = await client.api_healthcheck()
    if problem is not None:
        return JSONResponse({"status": "error", "detail": f"Prefect API unreachable: {problem}"}, 503)
    return {"status": "ok"}


@router.post("/v1/avatar/jobs", status_code=202, response_model=JobCreated, responses=ERRORS, tags=["jobs"])
async def create_job(body: JobCreate, client: Prefect, scope: KeyScope, settings: OrchSettings,
                     workdir_settings: WorkdirSettings, idempotency_key: Annotated[str | None, Header()] = None):
    try:
        submitted = await submit_job(client, body, scope=scope, idempotency_key=idempotency_key,
                                     settings=settings, workdir_settings=workdir_settings)
    except JobConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except RouteError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    run = submitted.run
    answer = {"id": job_id_of(run), "status": status_of(run),
              "created_at": run.created.isoformat() if run.created else None}
    return JSONResponse(answer, status_code=202 if submitted.created else 200)


@router.get("/v1/avatar/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
async def get_job(job_id: str, client: Prefect, scope: KeyScope):
    return await job_view(client, await scoped_run(client, job_id, scope))


@router.get("/v1/avatar/jobs", response_model=JobList, responses=ERRORS, tags=["jobs"])
async def list_jobs(client: Prefect, scope: KeyScope,
                    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20, cursor: str | None = None):
    try:
        runs, next_cursor = await list_job_runs(client, scope, status=status, limit=limit, cursor=cursor)
    except BadCursor as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return {"items": [await job_view(client, r) for r in runs], "next_cursor": next_cursor}


@router.delete("/v1/avatar/jobs/{job_id}", status_code=202, responses=ERRORS, tags=["jobs"])
async def delete_job(job_id: str, client: Prefect, scope: KeyScope) -> dict[str, str]:
    run = await scoped_run(client, job_id, scope)
    try:
        status = await cancel_job(client, run)
    except NotCancellable as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return {"id": job_id, "status": status}


@router.post("/v1/avatar/estimate", response_model=Estimate, responses=ERRORS, tags=["jobs"])
async def estimate(body: EstimateRequest, scope: KeyScope, settings: OrchSettings, workdir_settings: WorkdirSettings):
    targets = known_classes(settings, workdir_settings)
    prices = price_list(settings, workdir_settings)
    try:
        return estimate_job(body, targets, prices, target_rtf=settings.musetalk_salad_target_rtf)
    except NoMeasuredClass as exc:
        raise ApiError(422, "no_measured_class", str(exc)) from None
