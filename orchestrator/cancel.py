"""``DELETE /v1/avatar/jobs/{id}`` (DESIGN §11): a queued job becomes ``cancelled`` at once and never
renders; a running one on the ``gpu`` pool goes to ``Cancelling`` (its Prefect worker kills the process);
a running buffer or Salad job is ``Cancelled`` at once — its worker's next progress or report gets 409 and
its result is discarded. A finished job cannot be cancelled (409)."""

from __future__ import annotations

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Cancelled, Cancelling

from orchestrator.jobs import TERMINAL, status_of, tag_value


class NotCancellable(RuntimeError):
    """The job already finished (409)."""


async def cancel_job(client: PrefectClient, run: FlowRun) -> str:
    """Cancel ``run``; the job's status afterwards."""
    for _ in range(3):  # the state may move under us (a claim, a worker starting it): decide again
        if run.state_type in TERMINAL or run.state_type == StateType.CANCELLING:
            if run.state_type in (StateType.CANCELLED, StateType.CANCELLING):
                return "cancelled"
            raise NotCancellable(f"the job already {status_of(run)}")
        if run.state_type == StateType.RUNNING and (tag_value(run, "route") or "") == "gpu":
            proposed = Cancelling(message="cancelled through the API")
        else:
            proposed = Cancelled(message="cancelled through the API")
        # Scheduled/Pending → Cancelled is a normal transition; Running buffer/Salad runs have no process
        # Prefect could stop, so they are set directly.
        result = await client.set_flow_run_state(run.id, proposed, force=run.state_type == StateType.RUNNING)
        if result.status == SetStateStatus.ACCEPT:
            return "cancelled"
        run = await client.read_flow_run(run.id)
    raise NotCancellable("the job's state kept changing; try again")
