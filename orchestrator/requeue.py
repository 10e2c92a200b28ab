"""A lost worker's job goes back to the queue (DESIGN §5/§11): its run returns to ``Scheduled`` (named
``AwaitingClaim``, as a new buffer or Salad run; the next claim's ``Running`` makes the attempt ``run_count + 1``); a
run that has had ``MUSETALK_MAX_ATTEMPTS`` attempts fails for good instead.

Prefect has no compare-and-set on states, so a requeue re-reads the run and acts only when it is still
the state and lease it judged; the window left is the time of one API call."""

from __future__ import annotations

import logging
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Failed

from orchestrator.jobs import LEASE_LABEL, WORKER_LABEL, awaiting_claim, job_id_of
from orchestrator.results import persist_outcome
from tasks.contract import JobOutcome, processing_failure

log = logging.getLogger(__name__)


async def requeue_or_fail(client: PrefectClient, run: FlowRun, max_attempts: int, reason: str, *,
                          expect_lease: str | None = None, labels: dict[str, str] | None = None) -> str | None:
    """Requeue ``run`` (→ ``queued``) or, past the last attempt, fail it (→ ``failed``); None when the run
    moved on meanwhile (another replica acted, the job was cancelled) and nothing was done. ``labels``
    are written with the lease's release, in the same call."""
    fresh = await client.read_flow_run(run.id)
    if fresh.state is None or run.state is None or fresh.state.id != run.state.id:
        return None
    if expect_lease is not None and (fresh.labels or {}).get(LEASE_LABEL) != expect_lease:
        return None
    if fresh.state_type not in (StateType.PENDING, StateType.RUNNING):
        return None
    job_id = job_id_of(fresh)
    attempts = max(fresh.run_count, 1)
    await client.update_flow_run_labels(fresh.id, {LEASE_LABEL: "", WORKER_LABEL: "", **(labels or {})})
    if attempts >= max_attempts:
        message = f"{reason}; gave up after {attempts} attempt(s)"
        body = processing_failure(message, stage="inference", retryable=False, details={"attempts": attempts},
                                  job_id=job_id)
        record = await persist_outcome(JobOutcome(http_status=500, body=body))
        await client.set_flow_run_state(fresh.id, Failed(data=record, message=message), force=True)
        log.warning("job %s failed for good: %s", job_id, message)
        return "failed"
    # force: Prefect's rules do not expect a run to leave Running for Scheduled; nothing else would move it
    await client.set_flow_run_state(fresh.id, awaiting_claim(f"requeued: {reason}"), force=True)
    log.warning("job %s requeued after attempt %d: %s", job_id, attempts, reason)
    return "queued"
