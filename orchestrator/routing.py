"""Which route a new job takes (DESIGN §11). The route is fixed at submit time.

``auto`` tries the kinds of ``MUSETALK_ROUTE_POLICY`` in order (default ``buffer,gpu,salad``): an idle
buffer worker (an idle heartbeat within the offline window and a free slot) → ``buffer``; a ``gpu`` pool
with an online Prefect worker → ``gpu``; the cheapest measured Salad class whose real-time factor meets
the target (``gpu_targets.json`` speeds, ``salad_prices.json`` batch prices), when Salad is configured →
``salad:<class>``. With nothing free, the job queues where capacity will free up: ``buffer`` when a buffer
worker is online (busy, or still loading its models: it claims the job when it can), else ``gpu`` (the run
waits queued for a worker to join the pool). DESIGN §11 says "else gpu" outright; on one machine
(``musetalk-flow up``: one buffer worker, no pool worker) that left every job submitted while the worker was
busy queued forever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import WorkerStatus

from deployments.buffer import LOAD_FAILED
from orchestrator.routes import POOL_OF_KIND, Route
from tasks.salad import salad_configured
from orchestrator.settings import OrchestratorSettings
from orchestrator.workers import ROSTER_MAX_AGE_S, buffer_workers, utcnow
from tasks.scaling import PriceList, cheapest_salad_class, read_prices, read_targets
from tasks.settings import Settings


class RouteError(ValueError):
    """A route the request may not take (answered 422)."""


def known_classes(settings: OrchestratorSettings, workdir_settings: Settings) -> list[dict[str, Any]]:
    path = workdir_settings.resolve(settings.musetalk_gpu_targets)
    return read_targets(path) if Path(path).is_file() else []


def price_list(settings: OrchestratorSettings, workdir_settings: Settings) -> PriceList | None:
    if settings.musetalk_salad_prices is None:
        return None
    path = workdir_settings.resolve(settings.musetalk_salad_prices)
    return read_prices(path) if Path(path).is_file() else None


async def held_runs(client: PrefectClient) -> dict[str, int]:
    """How many buffer runs each worker holds now (Pending or Running under its lease)."""
    from orchestrator.leases import active_buffer_runs
    from orchestrator.jobs import WORKER_LABEL

    counts: dict[str, int] = {}
    for run in await active_buffer_runs(client):
        worker = (run.labels or {}).get(WORKER_LABEL)
        if worker:
            counts[worker] = counts.get(worker, 0) + 1
    return counts


async def idle_buffer_worker(client: PrefectClient, offline_sec: float) -> str | None:
    workers = await buffer_workers(client, ROSTER_MAX_AGE_S)
    if not workers:
        return None
    held = await held_runs(client)
    now = utcnow()
    for worker in workers.values():
        if worker.online(now, offline_sec) and worker.status == "idle" and held.get(worker.worker_id, 0) < worker.capacity:
            return worker.worker_id
    return None


async def buffer_worker_online(client: PrefectClient, offline_sec: float) -> bool:
    """A buffer worker heartbeated within the offline window (idle, busy or still loading), its models not
    failed to load (such a worker heartbeats busy for ever)."""
    now = utcnow()
    return any(w.online(now, offline_sec) and not (w.error or "").startswith(LOAD_FAILED)
               for w in (await buffer_workers(client, ROSTER_MAX_AGE_S)).values())


async def gpu_pool_online(client: PrefectClient) -> bool:
    workers = await client.read_workers_for_work_pool(POOL_OF_KIND["gpu"])
    return any(w.status == WorkerStatus.ONLINE for w in workers)


async def choose_route(client: PrefectClient, requested: str | None, settings: OrchestratorSettings,
                       workdir_settings: Settings) -> Route:
    """The route for a new job; RouteError for an unknown route or Salad class."""
    if requested and requested != "auto":
        try:
            route = Route.parse(requested)
        except ValueError as exc:
            raise RouteError(str(exc)) from None
        if route.kind == "salad":
            ids = {str(t.get("id")) for t in known_classes(settings, workdir_settings)}
            if route.salad_class not in ids:
                raise RouteError(f"unknown Salad GPU class {route.salad_class!r}: not in gpu_targets.json")
        return route
    for kind in settings.route_policy:
        if kind == "buffer" and await idle_buffer_worker(client, settings.musetalk_worker_offline_sec):
            return Route("buffer")
        if kind == "gpu" and await gpu_pool_online(client):
            return Route("gpu")
        if kind == "salad" and salad_configured():
            prices = price_list(settings, workdir_settings)
            chosen = cheapest_salad_class(known_classes(settings, workdir_settings),
                                          prices.per_hour("batch") if prices else None,
                                          settings.musetalk_salad_target_rtf)
            if chosen is not None:
                return Route("salad", chosen.class_id)
    if "buffer" in settings.route_policy and await buffer_worker_online(client, settings.musetalk_worker_offline_sec):
        return Route("buffer")
    return Route("gpu")
