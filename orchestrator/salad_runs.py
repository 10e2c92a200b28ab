"""Route ``salad:<class>`` driven from the orchestrator: its runs wait ``Scheduled`` in pool ``salad``; a
replica takes one the way a buffer claim does (``Pending`` decided by Prefect, then ``Running``), submits it
to the class's Salad job queue and follows it (:mod:`tasks.salad_dispatch`), then gives the run its final
state and persisted result (the ``/generate`` body Salad recorded).

Stateless: the Salad job id and the follower (``{replica}@{unix time}``, refreshed while it polls) are run
labels. A Running run whose follower stopped refreshing (its orchestrator died; a clean stop clears the label
so the takeover is immediate) is taken over by any replica, which follows the recorded Salad job instead of
submitting it again. A job cancelled through the
API is ``Cancelled`` in Prefect; its follower sees that on its next poll and cancels the Salad job."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Cancelled, Completed, Failed, Pending, Running

from orchestrator.jobs import JOB_TAG, job_id_of, tag_value
from orchestrator.requeue import requeue_or_fail
from orchestrator.results import persist_outcome
from orchestrator.routes import SALAD_PREFIX, deployment_id
from orchestrator.settings import OrchestratorSettings
from tasks.contract import JobOutcome, failure_status, processing_failure
from tasks.salad import salad_configured
from tasks.settings import Settings

log = logging.getLogger(__name__)

FOLLOWER_LABEL = "musetalk.salad_follower"
SALAD_JOB_LABEL = "musetalk.salad_job"
BEAT_SEC = 10.0
REPLICA = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Handover(Exception):
    """This replica stops following a Salad job (stopping, or another replica took it over)."""


def _follower_stale(run: FlowRun, now: float) -> bool:
    value = (run.labels or {}).get(FOLLOWER_LABEL) or ""
    try:
        beat = float(value.rsplit("@", 1)[1])
    except (IndexError, ValueError):
        return True
    return now - beat > 3 * BEAT_SEC


class SaladRuns:
    """The Salad runs this replica follows (asyncio tasks, each blocking work in a thread)."""

    def __init__(self, client: PrefectClient, settings: OrchestratorSettings, workdir_settings: Settings):
        self.client, self.settings, self.workdir_settings = client, settings, workdir_settings
        self.following: dict[UUID, asyncio.Task] = {}
        self.stopping = threading.Event()

    async def _runs(self, states: list[StateType]) -> list[FlowRun]:
        dep = await deployment_id(self.client, "generate/salad")
        return await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
                                          tags=FlowRunFilterTags(all_=[JOB_TAG])),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep])), limit=50)

    async def pass_once(self) -> None:
        if not salad_configured():
            return
        for run in await self._runs([StateType.SCHEDULED]):
            won = await self.client.set_flow_run_state(run.id, Pending(message="submitting to Salad"))
            if won.status != SetStateStatus.ACCEPT:
                continue
            await self.client.update_flow_run_labels(run.id, {FOLLOWER_LABEL: f"{REPLICA}@{time.time()}",
                                                              SALAD_JOB_LABEL: ""})
            started = await self.client.set_flow_run_state(run.id, Running(message="on SaladCloud"))
            if started.status == SetStateStatus.ACCEPT:
                self._follow(run, salad_job=None)
        now = time.time()
        for run in await self._runs([StateType.PENDING]):
            # taken by a replica that stopped before it marked the run Running: back to the queue
            since = run.state.timestamp.timestamp() if run.state is not None else now
            if now - since > 3 * BEAT_SEC:
                await requeue_or_fail(self.client, run, self.settings.musetalk_max_attempts,
                                      "the orchestrator submitting it to Salad stopped")
        for run in await self._runs([StateType.RUNNING]):
            if run.id in self.following or not _follower_stale(run, now):
                continue
            await self.client.update_flow_run_labels(run.id, {FOLLOWER_LABEL: f"{REPLICA}@{now}"})
            log.warning("job %s: its Salad follower stopped; this orchestrator follows it now", job_id_of(run))
            self._follow(run, salad_job=(run.labels or {}).get(SALAD_JOB_LABEL) or None)

    def _follow(self, run: FlowRun, salad_job: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(run, salad_job))
        self.following[run.id] = task
        task.add_done_callback(lambda _: self.following.pop(run.id, None))

    async def _drive(self, run: FlowRun, salad_job: str | None) -> None:
        from tasks.salad import salad_client_from_env
        from tasks.salad_dispatch import dispatch_to_salad, follow_salad_job
        from tasks.salad_provision import queue_for_class

        loop = asyncio.get_running_loop()
        job = dict((run.parameters or {}).get("job") or {})
        job_id = job_id_of(run)
        route = tag_value(run, "route") or ""
        last_beat = [time.time()]

        def call(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

        def is_cancelled() -> bool:
            if self.stopping.is_set():
                raise Handover("the orchestrator is stopping; another replica (or this one restarted) takes over")
            fresh = call(self.client.read_flow_run(run.id))
            if fresh.state_type in (StateType.CANCELLED, StateType.CANCELLING):
                return True
            label = (fresh.labels or {}).get(FOLLOWER_LABEL) or ""
            if not label.startswith(REPLICA + "@"):
                raise Handover("another orchestrator follows this Salad job now")
            if time.time() - last_beat[0] >= BEAT_SEC:
                last_beat[0] = time.time()
                call(self.client.update_flow_run_labels(run.id, {FOLLOWER_LABEL: f"{REPLICA}@{time.time()}"}))
            return False

        def recorded(salad_job_id: str) -> None:
            call(self.client.update_flow_run_labels(run.id, {SALAD_JOB_LABEL: salad_job_id}))

        from orchestrator.routing import known_classes

        def work():
            queue = queue_for_class(route[len(SALAD_PREFIX):], known_classes(self.settings, self.workdir_settings))
            with salad_client_from_env() as salad:
                if salad_job:
                    return follow_salad_job(queue, salad_job, salad, job_id=job_id, is_cancelled=is_cancelled)
                return dispatch_to_salad(job, queue, salad, on_submitted=recorded, is_cancelled=is_cancelled)

        try:
            outcome = await asyncio.to_thread(work)
        except Handover as exc:
            log.info("job %s: %s", job_id, exc)
            if self.stopping.is_set():  # a clean stop: let the next replica take over at once
                await self.client.update_flow_run_labels(run.id, {FOLLOWER_LABEL: ""})
            return
        except Exception as exc:  # noqa: BLE001 — Salad refused the job, or its class is unknown
            log.exception("job %s: Salad dispatch failed", job_id)
            body = processing_failure(f"could not run the job on SaladCloud: {exc}"[:500], stage="inference",
                                      job_id=job_id)
            await self._finish(run.id, JobOutcome(http_status=500, body=body))
            return
        if outcome.status == "cancelled":
            fresh = await self.client.read_flow_run(run.id)
            if fresh.state_type == StateType.RUNNING:  # cancelled in Salad, not through the API
                await self.client.set_flow_run_state(run.id, Cancelled(message="cancelled in SaladCloud"),
                                                     force=True)
            return
        status = 200 if outcome.status == "succeeded" else failure_status((outcome.body or {}).get("error_type"))
        await self._finish(run.id, JobOutcome(http_status=status, body=outcome.body or {}))

    async def _finish(self, run_id: UUID, outcome: JobOutcome) -> None:
        fresh = await self.client.read_flow_run(run_id)
        if fresh.state_type != StateType.RUNNING:  # cancelled meanwhile: the result is discarded
            return
        record = await persist_outcome(outcome)
        final = (Completed(data=record, message="rendered on SaladCloud") if outcome.http_status == 200
                 else Failed(data=record, message=str(outcome.body.get("error_message"))))
        await self.client.set_flow_run_state(run_id, final)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop following (the threads notice at their next poll); the runs stay Running for a takeover."""
        self.stopping.set()
        if self.following:
            await asyncio.wait(list(self.following.values()), timeout=timeout)
