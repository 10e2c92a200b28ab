"""Jobs as flow runs of the ``generate`` flow (DESIGN §11): naming, lookup, status mapping and the public
view of one job. Everything a job is lives on its flow run:

- parameters ``{"job": §4 body + webhook_url + metadata}``;
- tags ``musetalk-job``, ``job:{id}``, ``route:{route}``, ``priority:{p}``, ``key:{api key scope}``,
  ``body:{request hash}`` (idempotency checks);
- tag ``webhook:pending`` until the sweeper has taken the terminal webhook (orchestrator/sweeper.py);
- labels of the current buffer lease (``musetalk.worker``, ``musetalk.lease``, ``musetalk.reported``) and of
  a Salad run's follower (``musetalk.salad_follower``, ``musetalk.salad_job``: orchestrator/salad_runs.py);
- the state (status), ``run_count`` (attempt), the persisted result and the progress artifact."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.states import Scheduled

from musetalk_engine.errors import MediaError
from orchestrator.progress_artifacts import read_progress
from orchestrator.results import read_outcome
from tasks.storage import safe_job_id

JOB_TAG = "musetalk-job"
# Labels on a run (Prefect key-value labels; merged on update).
WORKER_LABEL = "musetalk.worker"
LEASE_LABEL = "musetalk.lease"
REPORTED_LABEL = "musetalk.reported"

# The Scheduled-type state a run waits in until the orchestrator takes it (a buffer claim, a Salad
# dispatch). Not Prefect's plain "Scheduled": no Prefect worker polls those pools, so a waiting run is not
# late, and Prefect's late-runs service (which marks only runs named "Scheduled") would otherwise rewrite
# every waiting run's state every few seconds — on SQLite each such write competes with the claims for the
# one writer.
AWAITING_CLAIM = "AwaitingClaim"


def awaiting_claim(message: str | None = None) -> State:
    """The state a buffer or Salad run waits in, new (:mod:`orchestrator.submit`) or requeued."""
    return Scheduled(name=AWAITING_CLAIM, message=message)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUS_OF_STATE: dict[StateType, JobStatus] = {
    StateType.SCHEDULED: "queued", StateType.PENDING: "queued", StateType.PAUSED: "queued",
    StateType.RUNNING: "running",
    StateType.COMPLETED: "succeeded",
    StateType.FAILED: "failed", StateType.CRASHED: "failed",
    # a cancel of a running GPU-pool run passes through Cancelling; its result is discarded either way
    StateType.CANCELLING: "cancelled", StateType.CANCELLED: "cancelled",
}
STATES_OF_STATUS: dict[str, list[StateType]] = {}
for _state, _status in STATUS_OF_STATE.items():
    STATES_OF_STATUS.setdefault(_status, []).append(_state)
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}

def job_tag(job_id: str) -> str:
    return f"job:{job_id}"


def tag_value(run: FlowRun, prefix: str) -> str | None:
    for tag in run.tags or []:
        if tag.startswith(prefix + ":"):
            return tag[len(prefix) + 1:]
    return None


def key_scope(api_key: str) -> str:
    """An API key's scope tag value: a hash, never the key (tags are visible in the Prefect UI)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def job_id_of(run: FlowRun) -> str | None:
    return tag_value(run, "job")


def status_of(run: FlowRun) -> JobStatus:
    return STATUS_OF_STATE.get(run.state_type, "queued") if run.state_type else "queued"


async def find_job_run(client: PrefectClient, job_id: str, scope: str | None = None) -> FlowRun | None:
    """The one run that carries ``job:{id}`` (within ``scope``'s jobs when given)."""
    if not is_job_id(job_id):  # no job has it (submit refuses it), and Prefect need not see it
        return None
    tags = [JOB_TAG, job_tag(job_id)] + ([f"key:{scope}"] if scope else [])
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)), limit=2)
    return runs[0] if runs else None


def is_job_id(value: str) -> bool:
    """Whether ``value`` is an id a job may have (the workers' rule, :func:`tasks.storage.safe_job_id`)."""
    try:
        safe_job_id(value)
    except MediaError:
        return False
    return True


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def job_view(client: PrefectClient, run: FlowRun) -> dict[str, Any]:
    """The public body of ``GET /v1/avatar/jobs/{id}`` (DESIGN §11), read from the run alone."""
    status = status_of(run)
    job = dict((run.parameters or {}).get("job") or {})
    progress = await read_progress(client, run.id)
    outcome = await read_outcome(run.state) if run.state_type in TERMINAL else None
    body = outcome.body if outcome is not None else {}
    labels = dict(run.labels or {})
    worker_id = labels.get(WORKER_LABEL) or progress.worker_id
    error = None
    if status == "failed":
        error = {"type": body.get("error_type") or "processing_error",
                 "message": body.get("error_message") or (run.state.message if run.state else None)
                 or "the job failed", "stage": body.get("stage"), "retryable": bool(body.get("retryable", False))}
    value = progress.progress
    phase = progress.phase
    if status == "succeeded":
        value, phase = 1.0, "completed"
    elif status == "queued":
        value, phase = 0.0, None
    elif status == "failed":
        phase = "failed"
    metrics = body.get("metrics") if status == "succeeded" else (body.get("stage_times") and
                                                                 {"stage_times": body.get("stage_times")})
    return {
        "id": job_id_of(run), "status": status, "progress": round(value, 4), "phase": phase,
        "route": tag_value(run, "route"), "priority": tag_value(run, "priority"), "worker_id": worker_id,
        "attempt": run.run_count, "output_url": body.get("output_url") if status == "succeeded" else None,
        "metrics": metrics or None, "error": error,
        "created_at": _iso(run.created), "started_at": _iso(run.start_time), "finished_at": _iso(run.end_time),
        "input": {k: job.get(k) for k in ("video_url", "audio_url", "aspect_ratio", "resolution", "params")},
        "metadata": job.get("metadata"), "flow_run_id": str(run.id),
    }


def run_id_of_lease(buffer_job_id: str) -> UUID | None:
    """The flow run a lease (``{run id}.{nonce}``) belongs to; None for anything else."""
    head, _, nonce = buffer_job_id.partition(".")
    try:
        return UUID(head) if nonce else None
    except ValueError:
        return None
