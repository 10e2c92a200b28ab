"""Buffer claims as leases decided by Prefect's state orchestration (DESIGN §5/§11).

A claim proposes ``Pending`` for an eligible run of the ``buffer`` pool, oldest first and urgent first. Prefect's
``PreventPendingTransitions`` rule refuses a second ``Pending`` (or one over ``Running``) in the server's
transaction, exactly as it does for two Prefect workers racing for a run: so two claimers — or two
orchestrator replicas — never win one run; the loser tries the next candidate. The winner writes the lease
(``{run id}.{nonce}``, unique per claim) and the worker into the run's labels and moves it to ``Running``
(Prefect counts ``run_count``: the attempt).

What a claim costs, since every Prefect write contends for its database (on SQLite, one writer at a time):
two reads for candidates (urgent, normal; at once), one for the runs held now, the roster of workers from a
cache of about a second (:func:`orchestrator.workers.buffer_workers`), and three writes for the winner
(``Pending``, labels, ``Running``); a report reads the run and writes its final state (plus a label when
it requeues the job). Claims in flight in one process do not race each other for the same
run: each takes a slot (0, 1, 2, …) and starts at that position of the candidate list, skipping runs
another claim of this process is proposing or has just won. A lone claim (slot 0) takes the oldest run;
twenty concurrent claims spread over the twenty oldest instead of all proposing ``Pending`` for the first
one and nineteen being refused. Only claims of different replicas can still collide, and Prefect refuses
the loser as before.

A status report names its lease: a lease that is no longer the run's (requeued, cancelled, finished by
another holder) is refused (409); the same final report repeated by its holder is answered 200 again."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Completed, Failed, Pending, Running

from orchestrator.jobs import (
    JOB_TAG, LEASE_LABEL, REPORTED_LABEL, TERMINAL, WORKER_LABEL, job_id_of, run_id_of_lease, status_of,
)
from orchestrator.per_loop import PerLoop
from orchestrator.results import persist_outcome
from orchestrator.routes import deployment_id
from tasks.contract import JobOutcome, failure_status

log = logging.getLogger(__name__)

CANDIDATES = 10  # read per priority beyond this claim's slot: room to step past runs others just took


class LeaseConflict(RuntimeError):
    """The lease is not (or no longer) the run's: answered 409."""


class LeaseUnknown(LookupError):
    """No run has this lease id at all: answered 404."""


async def buffer_deployment(client: PrefectClient) -> UUID:
    return await deployment_id(client, "generate/buffer")


async def buffer_runs(client: PrefectClient, states: list[StateType], *, tags: list[str] | None = None,
                      limit: int = 200, sort: FlowRunSort = FlowRunSort.EXPECTED_START_TIME_ASC) -> list[FlowRun]:
    dep = await buffer_deployment(client)
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
                                      tags=FlowRunFilterTags(all_=[JOB_TAG, *(tags or [])])),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep])), sort=sort, limit=limit)


async def active_buffer_runs(client: PrefectClient) -> list[FlowRun]:
    """Buffer runs held by a worker now (claimed: Pending for an instant, then Running)."""
    return await buffer_runs(client, [StateType.PENDING, StateType.RUNNING])


def claim_body(run: FlowRun, lease: str) -> dict[str, Any]:
    job = dict((run.parameters or {}).get("job") or {})
    return {"buffer_job_id": lease, "musetalk_job_id": job_id_of(run), "video_url": job.get("video_url"),
            "audio_url": job.get("audio_url"), "aspect_ratio": job.get("aspect_ratio"),
            "resolution": job.get("resolution"), "params": job.get("params") or {}}


class ClaimRefused(RuntimeError):
    """The worker may not claim (no heartbeat within the offline window): answered 409."""


class _Claims:
    """This process's claims in flight: their slots, the runs they are proposing, the runs they recently
    won (by the ``Scheduled`` state they were won from, so a requeued run is a candidate again)."""

    def __init__(self) -> None:
        self.slots: set[int] = set()
        self.proposing: set[UUID] = set()
        self.won: OrderedDict[UUID, float] = OrderedDict()  # state id → monotonic time

    def take_slot(self) -> int:
        slot = next(i for i in range(len(self.slots) + 1) if i not in self.slots)
        self.slots.add(slot)
        return slot

    def taken(self, run: FlowRun) -> bool:
        return run.id in self.proposing or (run.state is not None and run.state.id in self.won)

    def mark_won(self, run: FlowRun) -> None:
        if run.state is not None:
            self.won[run.state.id] = time.monotonic()
        while self.won and (len(self.won) > 10_000 or time.monotonic() - next(iter(self.won.values())) > 300):
            self.won.popitem(last=False)


_claims: PerLoop[_Claims] = PerLoop(_Claims)


def _in_turn(candidates: list[FlowRun], slot: int) -> list[FlowRun]:
    """The candidates (urgent first, then oldest first) starting at ``slot``, wrapping around."""
    if not candidates:
        return []
    start = slot % len(candidates)
    return candidates[start:] + candidates[:start]


async def claim(client: PrefectClient, worker_id: str, offline_sec: float) -> dict[str, Any] | None:
    """Move an eligible buffer run (urgent first, oldest first) to Running for ``worker_id``; its claim
    body, or None when nothing waits or the worker already holds as many runs as its capacity.
    ClaimRefused when the worker has no heartbeat within the offline window. The cheap question — is
    anything queued? — comes first: most claims of an idle fleet end there."""
    local = _claims.get()
    slot = local.take_slot()
    try:
        return await _claim(client, worker_id, offline_sec, local, slot)
    finally:
        local.slots.discard(slot)


async def _claim(client: PrefectClient, worker_id: str, offline_sec: float, local: _Claims,
                 slot: int) -> dict[str, Any] | None:
    from orchestrator.workers import ROSTER_MAX_AGE_S, buffer_workers, utcnow

    urgent, normal = await asyncio.gather(*(
        buffer_runs(client, [StateType.SCHEDULED], tags=[f"priority:{p}"], limit=CANDIDATES + slot)
        for p in ("urgent", "normal")))
    candidates = [run for run in urgent + normal if not local.taken(run)]
    if not candidates:
        return None
    roster, active = await asyncio.gather(buffer_workers(client, ROSTER_MAX_AGE_S), active_buffer_runs(client))
    worker = roster.get(worker_id)
    if worker is None or not worker.online(utcnow(), offline_sec):  # maybe newer than the cached roster
        worker = (await buffer_workers(client)).get(worker_id)
    if worker is None or not worker.online(utcnow(), offline_sec):
        raise ClaimRefused(f"worker {worker_id} has no heartbeat within the last {offline_sec:g} s: heartbeat first")
    held = sum(1 for r in active if (r.labels or {}).get(WORKER_LABEL) == worker_id)
    if held >= worker.capacity:
        return None
    for run in _in_turn(candidates, slot):
        if local.taken(run):  # another claim of this process got to it while this one waited
            continue
        local.proposing.add(run.id)
        try:
            won = await client.set_flow_run_state(run.id, Pending(message=f"claimed by buffer worker {worker_id}"))
            if won.status != SetStateStatus.ACCEPT:
                continue  # another replica took it first
            local.mark_won(run)
        finally:
            local.proposing.discard(run.id)
        lease = f"{run.id}.{uuid.uuid4().hex[:12]}"
        await client.update_flow_run_labels(run.id, {WORKER_LABEL: worker_id, LEASE_LABEL: lease, REPORTED_LABEL: ""})
        running = await client.set_flow_run_state(run.id, Running(message=f"on buffer worker {worker_id}"))
        if running.status != SetStateStatus.ACCEPT:  # cancelled in between: leave it to its new state
            log.warning("claim of %s by %s: Running refused (%s)", run.id, worker_id, running.details)
            continue
        log.info("job %s claimed by buffer worker %s (lease %s)", job_id_of(run), worker_id, lease)
        return claim_body(run, lease)
    return None


async def run_of_lease(client: PrefectClient, lease: str) -> FlowRun:
    run_id = run_id_of_lease(lease)
    if run_id is None:
        raise LeaseUnknown(f"no buffer job {lease!r}")
    try:
        run = await client.read_flow_run(run_id)
    except ObjectNotFound:
        raise LeaseUnknown(f"no buffer job {lease!r}") from None
    if JOB_TAG not in (run.tags or []):
        raise LeaseUnknown(f"no buffer job {lease!r}")
    return run


def outcome_of_report(report: dict[str, Any], job_id: str | None) -> JobOutcome:
    """The §4 body a buffer report stands for (what the run's result will be)."""
    if report["status"] == "succeeded":
        url = report["output_url"]
        body = {"status": "ok", "output_url": url, "musetalk_job_id": job_id, "metrics": report.get("metrics") or {},
                "b2_file_name": url.rsplit("/", 1)[-1]}
        return JobOutcome(http_status=200, body=body)
    error = report.get("error") or {}
    if not isinstance(error, dict):
        error = {"error_message": str(error)}
    error_type = error.get("error_type") or error.get("type") or "processing_error"
    body = {"status": "failed", "error_type": error_type if error_type in ("media_error", "processing_error")
            else "processing_error",
            "error_message": str(error.get("error_message") or error.get("message") or "the buffer worker failed"),
            "stage": error.get("stage") or "inference", "details": error.get("details") or {},
            "retryable": bool(error.get("retryable", error_type != "media_error")),
            "stage_times": (report.get("metrics") or {}).get("stage_times") or {}, "musetalk_job_id": job_id}
    return JobOutcome(http_status=failure_status(body["error_type"]), body=body)


async def report(client: PrefectClient, lease: str, body: dict[str, Any], max_attempts: int) -> str:
    """Apply a buffer worker's final report; the job's new status. LeaseConflict when the lease is stale."""
    from orchestrator.requeue import requeue_or_fail

    run = await run_of_lease(client, lease)
    labels = dict(run.labels or {})
    if labels.get(REPORTED_LABEL) == lease:  # the holder repeats a report that requeued its job
        return status_of(run)
    if labels.get(LEASE_LABEL) != lease:
        raise LeaseConflict(f"buffer job {lease} is no longer this worker's: the job was requeued or reassigned")
    if run.state_type in (StateType.COMPLETED, StateType.FAILED):
        # Still this lease and finished: only its holder's report finishes a buffer run under a current lease
        # (a requeue or a final failure by the sweeper clears the lease first; a cancel ends in Cancelled),
        # so this is that report repeated — no label write needed to recognise it.
        return status_of(run)
    if run.state_type in TERMINAL:
        raise LeaseConflict(f"buffer job {lease}: the job is already {run.state_type.value.lower()}")
    if run.state_type != StateType.RUNNING:
        raise LeaseConflict(f"buffer job {lease}: the job is {run.state_type.value.lower()}, not running")
    outcome = outcome_of_report(body, job_id_of(run))
    if outcome.http_status == 500 and outcome.body["retryable"]:
        # a worker fault another worker may not have: the next attempt, unless this was the last one
        # REPORTED_LABEL: a repeat of this report is recognised and answered the same
        status = await requeue_or_fail(client, run, max_attempts, outcome.body["error_message"], expect_lease=lease,
                                       labels={REPORTED_LABEL: lease})
        if status is not None:
            return status
    record = await persist_outcome(outcome)
    final = (Completed(data=record, message=f"rendered by buffer worker {labels.get(WORKER_LABEL)}")
             if outcome.http_status == 200 else Failed(data=record, message=outcome.body["error_message"]))
    result = await client.set_flow_run_state(run.id, final)
    if result.status != SetStateStatus.ACCEPT:
        raise LeaseConflict(f"buffer job {lease}: Prefect refused the final state ({result.details})")
    return "succeeded" if outcome.http_status == 200 else "failed"
