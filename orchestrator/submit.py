"""``POST /v1/avatar/jobs``: a new job is a new flow run of the ``generate`` deployment of its route.

Idempotency (DESIGN §11): the client's ``Idempotency-Key`` is scoped by its API key and is the run's
Prefect idempotency key; a run with that key created within the window is the same job (200), or a 409 if
the body differs (its hash is a tag). Without a key, the job id is the key, so a job id is never two runs.
Prefect itself returns the existing run when two replicas create the same key on one deployment."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort

from orchestrator.jobs import JOB_TAG, awaiting_claim, body_hash, find_job_run, job_tag, tag_value
from orchestrator.routes import deployment_id
from orchestrator.routing import choose_route
from orchestrator.schemas import JobCreate
from orchestrator.settings import OrchestratorSettings
from orchestrator.sweeper import WEBHOOK_PENDING_TAG
from orchestrator.workers import utcnow
from tasks.settings import Settings


class JobConflict(RuntimeError):
    """The key or id is taken by a different job (409)."""


@dataclass
class Submitted:
    run: FlowRun
    created: bool  # False: an earlier request's job (same Idempotency-Key)


async def _runs_with_key(client: PrefectClient, key: str) -> list[FlowRun]:
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key]),
                                      tags=FlowRunFilterTags(all_=[JOB_TAG])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5)


async def submit_job(client: PrefectClient, request: JobCreate, *, scope: str, idempotency_key: str | None,
                     settings: OrchestratorSettings, workdir_settings: Settings) -> Submitted:
    """Create the job's run (or find the earlier one); JobConflict / RouteError for the 409 / 422 cases."""
    fingerprint = body_hash(request.model_dump(mode="json"))
    prefect_key = None
    if idempotency_key:
        prefect_key = f"{scope}:{idempotency_key}"
        window_start = utcnow() - timedelta(seconds=settings.musetalk_idempotency_window_sec)
        earlier = await _runs_with_key(client, prefect_key)
        recent = [r for r in earlier if r.created is not None and r.created >= window_start]
        if recent:
            if tag_value(recent[0], "body") != fingerprint:
                raise JobConflict("this Idempotency-Key was used with a different request body")
            return Submitted(recent[0], created=False)
        if earlier:  # an expired use of the key: Prefect would hand back that old run, so make this one new
            prefect_key = f"{prefect_key}:{utcnow().isoformat()}"
    job_id = request.musetalk_job_id or str(uuid.uuid4())
    if await find_job_run(client, job_id) is not None:
        raise JobConflict(f"job id {job_id!r} is taken")
    route = await choose_route(client, request.route, settings, workdir_settings)
    job: dict[str, Any] = {"musetalk_job_id": job_id, "video_url": request.video_url,
                           "audio_url": request.audio_url, "aspect_ratio": request.aspect_ratio,
                           "resolution": request.resolution, "params": request.params.model_dump(exclude_unset=True),
                           "webhook_url": request.webhook_url, "metadata": request.metadata}
    tags = [JOB_TAG, job_tag(job_id), f"route:{route.name}", f"priority:{request.priority}", f"key:{scope}",
            f"body:{fingerprint}"] + ([WEBHOOK_PENDING_TAG] if request.webhook_url else [])
    run = await client.create_flow_run_from_deployment(
        await deployment_id(client, route.deployment), parameters={"job": job}, name=job_id, tags=tags,
        idempotency_key=prefect_key or f"{scope}:id:{job_id}", work_queue_name=route.work_queue(request.priority),
        state=awaiting_claim() if route.claimed_by_orchestrator else None)
    if job_tag(job_id) not in (run.tags or []):  # another replica created this key's run a moment earlier
        if tag_value(run, "body") != fingerprint:
            raise JobConflict("this Idempotency-Key was used with a different request body")
        return Submitted(run, created=False)
    return Submitted(run, created=True)
