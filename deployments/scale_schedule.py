"""The ``scale`` flow on a schedule: deployment ``scale/salad-autoscale`` in work pool ``control``.

``control`` is a process pool for the control plane's own periodic flows, apart from the GPU pools so
a scaling pass never waits behind renders (and never takes a GPU worker's slot). One run at a time
(a slow pass is not overlapped by the next). Start its worker where the Salad credentials are:
``prefect worker start --pool control`` (``musetalk-flow up`` starts one locally).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from deployments.workpool import PULL_STEP, PullSteps, _cwd, ensure_work_pool, repo_root

CONTROL_POOL = "control"
ENTRYPOINT = "flows/scale.py:scale"
NAME = "salad-autoscale"
INTERVAL_S = 60.0


def deploy_scale(pool: str = CONTROL_POOL, *, interval_s: float = INTERVAL_S, dry_run: bool = False,
                 **parameters: Any) -> UUID:
    """Register ``scale/salad-autoscale`` every ``interval_s`` seconds (creating the pool); its id.

    ``parameters`` go to the flow (targets_path, min_replicas, max_replicas, jobs_per_replica, …)."""
    from datetime import timedelta

    from prefect.deployments.runner import RunnerDeployment

    ensure_work_pool(pool, queues={"default": 1})
    with _cwd(repo_root()):  # the entrypoint is stored relative to the project directory
        deployment = RunnerDeployment.from_entrypoint(
            ENTRYPOINT, name=NAME, work_pool_name=pool, work_queue_name="default",
            interval=timedelta(seconds=interval_s), concurrency_limit=1,
            parameters={"dry_run": dry_run, **parameters}, tags=["musetalk", "salad", "autoscale"],
            description="Size each Salad class's container group to its unfinished jobs.")
        deployment.storage = PullSteps([{PULL_STEP: {}}])
        return deployment.apply()
