"""Queue depth as Prefect sees it: unfinished flow runs per work queue of a pool.

For route ``salad:<class id>`` (pool ``salad``, work queue = class id) these are the jobs the
orchestrator has not finished: Scheduled (incl. Late and AwaitingRetry) or Pending runs wait for
dispatch, Running ones are with Salad. Each needs a container, so the ``scale`` flow counts them all.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
    WorkQueueFilter,
    WorkQueueFilterName,
)
from prefect.client.schemas.objects import StateType

UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


def count_unfinished_runs(pool: str, work_queues: list[str]) -> dict[str, int]:
    """work queue name → number of its flow runs in pool ``pool`` that are not in a final state."""
    unfinished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)))
    in_pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    with get_client(sync_client=True) as client:
        return {
            queue: client.count_flow_runs(
                flow_run_filter=unfinished,
                work_pool_filter=in_pool,
                work_queue_filter=WorkQueueFilter(name=WorkQueueFilterName(any_=[queue])),
            )
            for queue in work_queues
        }


@task(name="prefect-route-depth", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def read_unfinished_runs(pool: str, work_queues: list[str]) -> dict[str, int]:
    """:func:`count_unfinished_runs` as a task of the ``scale`` flow."""
    return count_unfinished_runs(pool, work_queues)
