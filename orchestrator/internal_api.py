"""The server side of the worker protocol (DESIGN §5), under ``/internal`` and ``X-Internal-API-Key``:
progress from any worker, and the buffer workers' heartbeat, claim and status report."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from prefect.client.schemas.objects import StateType

from orchestrator import leases
from orchestrator.api_dependencies import OrchSettings, Prefect, internal_key
from orchestrator.api_errors import ERRORS, ApiError
from orchestrator.jobs import TERMINAL, WORKER_LABEL, find_job_run, tag_value
from orchestrator.progress_artifacts import write_progress
from orchestrator.schemas import ClaimRequest, Heartbeat, ProgressReport, StatusReport, WorkerIdInPath
from orchestrator.workers import record_heartbeat

router = APIRouter(prefix="/internal", dependencies=[Depends(internal_key)], responses=ERRORS, tags=["internal"])


@router.post("/jobs/{job_id}/progress")
async def progress(job_id: str, body: ProgressReport, client: Prefect) -> dict[str, Any]:
    run = await find_job_run(client, job_id)
    if run is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    # the 409 is how a worker learns that its job was cancelled or finished without it
    if run.state_type in TERMINAL or run.state_type == StateType.CANCELLING:
        raise ApiError(409, "conflict", f"job {job_id} is no longer running ({run.state_type.value.lower()})")
    holder = (run.labels or {}).get(WORKER_LABEL)
    if tag_value(run, "route") == "buffer" and holder and body.worker_id and body.worker_id != holder:
        raise ApiError(409, "conflict", f"job {job_id} is held by another worker")
    await write_progress(client, run.id, job_id, body.progress, body.phase, body.worker_id, body.status)
    return {"ok": True}


@router.post("/buffer/workers/{worker_id}/heartbeat")
async def heartbeat(worker_id: WorkerIdInPath, body: Heartbeat, client: Prefect,
                    settings: OrchSettings) -> dict[str, Any]:
    await record_heartbeat(client, worker_id, body.model_dump(), settings.musetalk_worker_offline_sec)
    return {"ok": True}


@router.post("/buffer/jobs/claim")
async def claim(body: ClaimRequest, client: Prefect, settings: OrchSettings) -> dict[str, Any]:
    try:
        return {"job": await leases.claim(client, body.worker_id, settings.musetalk_worker_offline_sec)}
    except leases.ClaimRefused as exc:
        raise ApiError(409, "conflict", str(exc)) from None


@router.post("/buffer/jobs/{buffer_job_id}/status")
async def status(buffer_job_id: str, body: StatusReport, client: Prefect, settings: OrchSettings) -> dict[str, Any]:
    if body.status == "succeeded" and not body.output_url:
        raise ApiError(422, "invalid_request", "a succeeded report must carry output_url")
    try:
        job_status = await leases.report(client, buffer_job_id, body.model_dump(), settings.musetalk_max_attempts)
    except leases.LeaseUnknown as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except leases.LeaseConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return {"ok": True, "job_status": job_status}
