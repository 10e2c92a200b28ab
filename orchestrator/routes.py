"""Routes (DESIGN §11): where a job runs, as (deployment, work queue) of the ``generate`` flow.

``gpu`` → deployment ``generate/gpu`` in pool ``gpu`` (Prefect process workers), ``buffer`` →
``generate/buffer`` in pool ``buffer`` (claimed by buffer GPUs), ``salad:<class id>`` → ``generate/salad``
in pool ``salad``, work queue = the class id. Priority picks the ``urgent`` or ``default`` queue where the
pool has both, so a Prefect worker also serves urgent runs first."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from deployments.workpool import BUFFER_POOL, POOL_NAME, SALAD_POOL
from orchestrator.per_loop import PerLoop
from tasks.salad import salad_configured

log = logging.getLogger(__name__)

DEPLOYMENT_OF_KIND = {"gpu": "generate/gpu", "buffer": "generate/buffer", "salad": "generate/salad"}
POOL_OF_KIND = {"gpu": POOL_NAME, "buffer": BUFFER_POOL, "salad": SALAD_POOL}
SALAD_PREFIX = "salad:"


@dataclass(frozen=True)
class Route:
    kind: str  # gpu | buffer | salad
    salad_class: str | None = None

    @property
    def name(self) -> str:
        return f"{SALAD_PREFIX}{self.salad_class}" if self.kind == "salad" else self.kind

    @classmethod
    def parse(cls, value: str) -> "Route":
        """``gpu``, ``buffer`` or ``salad:<class id>``; ValueError otherwise (the class is checked later)."""
        if value in ("gpu", "buffer"):
            return cls(value)
        if value.startswith(SALAD_PREFIX) and len(value) > len(SALAD_PREFIX):
            return cls("salad", value[len(SALAD_PREFIX):])
        raise ValueError(f"unknown route {value!r}: use auto, gpu, buffer or salad:<GPU class id>")

    def work_queue(self, priority: str) -> str:
        if self.kind == "salad":
            return str(self.salad_class)
        return "urgent" if priority == "urgent" else "default"

    @property
    def claimed_by_orchestrator(self) -> bool:
        """Its runs are taken by the orchestrator (a buffer claim, a Salad dispatch), not by a Prefect worker,
        so they wait in ``AwaitingClaim``."""
        return self.kind in ("buffer", "salad")

    @property
    def deployment(self) -> str:
        return DEPLOYMENT_OF_KIND[self.kind]


_deployment_ids: dict[tuple[str, str], UUID] = {}


_deploy_lock: PerLoop[asyncio.Lock] = PerLoop(asyncio.Lock)


async def deployment_id(client: PrefectClient, name: str) -> UUID:
    """The id of a ``generate/*`` deployment; a missing one is registered (``musetalk-flow deploy``'s
    work, done here too so a fresh Prefect server needs no manual step). Ids never change: cached."""
    key = (str(client.api_url), name)
    if key in _deployment_ids:
        return _deployment_ids[key]
    async with _deploy_lock.get():
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:
            from deployments.workpool import deploy

            log.info("deployment %s is missing: registering the project's deployments", name)
            # The Salad autoscale schedule starts paused where Salad is not configured: on one machine
            # (`musetalk-flow up`) no control worker would take its runs, which would pile up as Late
            # every minute (and, on SQLite, compete with the claims for the one writer).
            await asyncio.to_thread(deploy, schedules_active=salad_configured())
            deployment = await client.read_deployment_by_name(name)
        _deployment_ids[key] = deployment.id
    return deployment.id


async def ensure_route_deployments(client: PrefectClient) -> None:
    """Every route's deployment (and so its work pool) exists; called at start-up."""
    for name in DEPLOYMENT_OF_KIND.values():
        await deployment_id(client, name)
