"""A job's live progress is a Prefect progress artifact on its flow run (visible in the run's UI page).

The artifact's ``data`` is Prefect's percentage (0..100); its metadata keeps the §5 fields the public API
shows (``phase``, ``worker_id``, the report's ``status``). One artifact per run, created by the first
report and updated by the next ones, found again by (flow run, type) — nothing is cached here."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
from prefect.client.schemas.sorting import ArtifactSort

PROGRESS_TYPE = "progress"


class Progress:
    """What a run's progress artifact says."""

    def __init__(self, progress: float = 0.0, phase: str | None = None, worker_id: str | None = None,
                 status: str | None = None):
        self.progress, self.phase, self.worker_id, self.status = progress, phase, worker_id, status


async def _artifacts(client: PrefectClient, run_id: UUID) -> list[Any]:
    return await client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                                       type=ArtifactFilterType(any_=[PROGRESS_TYPE])),
        sort=ArtifactSort.UPDATED_DESC, limit=1)


async def write_progress(client: PrefectClient, run_id: UUID, job_id: str, progress: float, phase: str,
                         worker_id: str | None, status: str) -> None:
    percent = round(min(max(float(progress), 0.0), 1.0) * 100.0, 2)
    metadata = {"phase": phase, "worker_id": worker_id or "", "status": status}
    description = f"job `{job_id}`: {phase}" + (f" on worker `{worker_id}`" if worker_id else "")
    existing = await _artifacts(client, run_id)
    if existing:
        await client.update_artifact(existing[0].id, ArtifactUpdate(data=percent, description=description,
                                                                     metadata_=metadata))
    else:
        await client.create_artifact(ArtifactCreate(type=PROGRESS_TYPE, data=percent, description=description,
                                                    metadata_=metadata, flow_run_id=run_id))


async def read_progress(client: PrefectClient, run_id: UUID) -> Progress:
    existing = await _artifacts(client, run_id)
    if not existing:
        return Progress()
    artifact = existing[0]
    meta = artifact.metadata_ or {}
    try:
        value = float(artifact.data) / 100.0
    except (TypeError, ValueError):
        value = 0.0
    return Progress(value, meta.get("phase") or None, meta.get("worker_id") or None, meta.get("status") or None)
