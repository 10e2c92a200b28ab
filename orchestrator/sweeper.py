"""The orchestrator's background pass (every ``MUSETALK_SWEEP_INTERVAL_SEC``), stateless like the rest:

- **lost workers**: a buffer run whose holder has sent no heartbeat within ``MUSETALK_WORKER_OFFLINE_SEC``
  (by Prefect's own record of the worker) goes back to the queue, or fails after the last attempt; a run
  left ``Pending`` by a claim that never completed (its orchestrator died mid-claim) likewise, and so does
  a run whose live holder has reported ``idle`` for a whole window (the claim's answer was lost on the way);
- **Salad**: queued ``salad:<class>`` runs are submitted and followed (:mod:`orchestrator.salad_runs`);
- **webhooks**: a finished job still tagged ``webhook:pending`` gets its signed webhook (the tag is dropped
  first, so a replica that looks next does not send it again).

Every replica runs it; what one does, the next one sees in Prefect."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags

from orchestrator.jobs import JOB_TAG, TERMINAL, WORKER_LABEL, job_id_of, job_view
from orchestrator.leases import active_buffer_runs
from orchestrator.requeue import requeue_or_fail
from orchestrator.settings import OrchestratorSettings
from orchestrator.workers import buffer_workers, utcnow
from tasks.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_PENDING_TAG = "webhook:pending"


async def requeue_lost(client: PrefectClient, settings: OrchestratorSettings, up_since: float) -> list[str]:
    """Requeue (or fail) the runs of offline buffer workers; the job ids acted on.

    Nothing is judged in the first offline window after this orchestrator started: if it was the only
    replica and was down, the workers' heartbeats failed meanwhile, and their next ones (within the
    window) show them alive — judging at once would requeue every running job after a restart."""
    if time.monotonic() - up_since < settings.musetalk_worker_offline_sec:
        return []
    runs = await active_buffer_runs(client)
    if not runs:
        return []
    workers = await buffer_workers(client)
    now = utcnow()
    offline = settings.musetalk_worker_offline_sec
    acted = []
    for run in runs:
        holder = (run.labels or {}).get(WORKER_LABEL) or ""
        worker = workers.get(holder)
        since = run.state.timestamp if run.state is not None else None
        held_long = since is not None and (now - since) >= timedelta(seconds=offline)
        if worker is not None and worker.online(now, offline):
            idle = worker.status == "idle" and worker.idle_since is not None and since is not None
            # idle_since marks an unbroken run of idle heartbeats; whether it began before the claim or after,
            # the evidence must cover a whole window after the worker got the run
            if not (idle and now - max(worker.idle_since, since) >= timedelta(seconds=offline)):
                continue
            # Alive, and idle in every heartbeat for a whole window since it got the run: the claim's answer
            # never reached it (a timed-out request the server still completed), so nobody renders this job.
            reason = f"buffer worker {holder} reports idle while holding the job (its claim answer was lost)"
        elif worker is None and not held_long:
            continue  # a claim in progress (labels not written yet) or a worker Prefect has not listed yet
        else:
            reason = f"buffer worker {holder or '(unknown)'} sent no heartbeat for {offline:g} s"
        status = await requeue_or_fail(client, run, settings.musetalk_max_attempts, reason)
        if status is not None:
            acted.append(job_id_of(run) or str(run.id))
    return acted


async def send_webhooks(client: PrefectClient, workdir_settings: Settings, in_flight: set[str]) -> int:
    """Deliver the webhooks of finished jobs not yet notified; deliveries run in threads."""
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[JOB_TAG, WEBHOOK_PENDING_TAG]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(TERMINAL)))), limit=50)
    started = 0
    for run in runs:
        url = ((run.parameters or {}).get("job") or {}).get("webhook_url")
        key = str(run.id)
        if key in in_flight:
            continue
        await client.update_flow_run(run.id, tags=[t for t in run.tags if t != WEBHOOK_PENDING_TAG])
        if not url:
            continue
        view = await job_view(client, run)
        in_flight.add(key)
        asyncio.get_running_loop().create_task(_deliver(view, url, workdir_settings, in_flight, key))
        started += 1
    return started


async def _deliver(view: dict, url: str, workdir_settings: Settings, in_flight: set[str], key: str) -> None:
    from orchestrator.webhooks import deliver_job_webhook

    try:
        secret = workdir_settings.musetalk_webhook_secret
        if secret is None:
            log.warning("job %s: webhook not sent: MUSETALK_WEBHOOK_SECRET is not set", view.get("id"))
            return
        result = await asyncio.to_thread(deliver_job_webhook, view, url, secret, settings=workdir_settings)
        log.info("job %s: webhook %s", view.get("id"), "delivered" if result.delivered else f"failed: {result.error}")
    except Exception:  # noqa: BLE001 — a webhook never takes the sweeper down
        log.exception("job %s: webhook delivery crashed", view.get("id"))
    finally:
        in_flight.discard(key)


async def sweep_forever(client: PrefectClient, settings: OrchestratorSettings, workdir_settings: Settings,
                        stop: asyncio.Event) -> None:
    from orchestrator.salad_runs import SaladRuns

    in_flight: set[str] = set()
    up_since = time.monotonic()
    salad = SaladRuns(client, settings, workdir_settings)
    try:
        while not stop.is_set():
            for step in (lambda: requeue_lost(client, settings, up_since), salad.pass_once,
                         lambda: send_webhooks(client, workdir_settings, in_flight)):
                try:
                    await step()
                except Exception:  # noqa: BLE001 — Prefect or Salad briefly unreachable: next pass
                    log.exception("sweep step failed")
            try:
                await asyncio.wait_for(stop.wait(), settings.musetalk_sweep_interval_sec)
            except asyncio.TimeoutError:
                pass
    finally:
        await salad.close()
