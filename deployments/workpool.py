"""Work pool, queues and deployments of the GPU fleet, with Prefect's Python API.

Does what ``deployments/prefect.yaml`` + ``prefect work-pool create`` / ``prefect work-queue create`` do,
from one call (``musetalk-flow deploy``):

- a ``process`` work pool ``gpu``: workers run each flow run in a fresh interpreter on their machine;
- queues ``urgent`` (priority 1) and ``default`` (priority 10): a free worker always takes urgent runs first;
- deployments ``generate/gpu``, ``batch/gpu`` on ``default`` and ``generate/urgent``, ``batch/urgent`` on
  ``urgent`` (``prefect deployment run`` has no queue option, so urgency is a deployment);
- the orchestrator's other routes (DESIGN §11): ``generate/buffer`` in pool ``buffer`` (no Prefect worker
  polls it: buffer GPUs claim its runs from the orchestrator and are recorded as its workers) and
  ``generate/salad`` in pool ``salad`` (one queue per Salad GPU class, dispatched to Salad job queues).

One render per GPU is a property of the *worker*, not of the pool: pool and queue concurrency limits are
fleet-wide totals (a pool limit of 1 would let one machine of the whole fleet work). Each GPU gets one
worker started with ``--limit 1``; multi-GPU machines start one worker per GPU (``CUDA_VISIBLE_DEVICES``).

The code is found through a pull step (:func:`enter_repo`) that changes into the directory holding
``flows/`` on the worker's machine (the installed project, or ``$MUSETALK_REPO_DIR``), so deployments made
on one machine run on any machine that has the project installed, whatever its path."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from uuid import UUID

POOL_NAME = "gpu"
POOL_TYPE = "process"
QUEUES: dict[str, int] = {"urgent": 1, "default": 10}  # lower number = served first
BUFFER_POOL = "buffer"
SALAD_POOL = "salad"
ENTRYPOINTS = {"generate": "flows/generate.py:generate", "batch": "flows/batch.py:batch"}
PULL_STEP = "deployments.workpool.enter_repo"


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str  # key of ENTRYPOINTS
    name: str
    queue: str
    description: str
    pool: str | None = None  # None: the GPU pool ``deploy`` is given

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec("generate", "gpu", "default", "One lip-sync job on a GPU worker."),
    DeploymentSpec("generate", "urgent", "urgent", "One lip-sync job, ahead of everything on the default queue."),
    DeploymentSpec("batch", "gpu", "default", "A manifest of jobs on one warm engine; fan_out spreads it."),
    DeploymentSpec("batch", "urgent", "urgent", "A batch ahead of everything on the default queue."),
    DeploymentSpec("generate", "buffer", "default", "A job for the buffer GPUs: claimed over the orchestrator's "
                   "protocol, never polled by a Prefect worker.", pool=BUFFER_POOL),
    DeploymentSpec("generate", "salad", "default", "A job for SaladCloud: the orchestrator submits it to the Salad "
                   "job queue of the GPU class its work queue names.", pool=SALAD_POOL),
)


# ----------------------------------------------------------------------------------------- code location

def repo_root() -> Path:
    """The directory holding ``flows/`` and ``deployments/`` in this installation."""
    return Path(__file__).resolve().parent.parent


def enter_repo(directory: str | None = None) -> dict[str, str]:
    """Pull step: change into the project directory so the relative entrypoints resolve.

    ``directory``, else ``$MUSETALK_REPO_DIR``, else where this module is installed (editable checkout,
    ``/app`` in the image, or site-packages — all hold ``flows/``)."""
    target = Path(directory or os.environ.get("MUSETALK_REPO_DIR") or repo_root()).expanduser()
    if not (target / "flows").is_dir():
        raise FileNotFoundError(f"{target} has no flows/ directory; set MUSETALK_REPO_DIR to the project")
    os.chdir(target)
    return {"directory": str(target)}


class PullSteps:
    """Deployment storage that only records pull steps (the code is already on every worker)."""

    def __init__(self, steps: list[dict[str, Any]]):
        self.steps = steps
        self._base = repo_root()

    def set_base_path(self, path: Path) -> None:
        self._base = path

    @property
    def destination(self) -> Path:
        return self._base

    @property
    def pull_interval(self) -> int | None:
        return None

    async def pull_code(self) -> None:  # nothing to fetch: the project is installed
        return None

    def to_pull_step(self) -> list[dict[str, Any]]:
        return self.steps

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PullSteps) and other.steps == self.steps


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# ------------------------------------------------------------------------------------------ pool + queues

def ensure_work_pool(pool: str = POOL_NAME, queues: dict[str, int] | None = None,
                     concurrency_limit: int | None = None) -> None:
    """Create the process work pool and its prioritised queues, or bring existing ones in line.

    ``concurrency_limit`` caps the whole fleet's simultaneous runs (e.g. the number of GPUs you pay for);
    leave it None for no cap — per-GPU exclusivity is the workers' ``--limit 1``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    queues = QUEUES if queues is None else queues
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type=POOL_TYPE, description="MuseTalk GPU workers (one worker per GPU, --limit 1)",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=concurrency_limit))
        else:
            if concurrency_limit is not None:
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency_limit))
        existing = {q.name: q for q in client.read_work_queues(work_pool_name=pool)}
        # highest priority first: creating a queue at a taken priority shifts the others down
        for name, priority in sorted(queues.items(), key=lambda kv: kv[1]):
            if name in existing:
                if existing[name].priority != priority:
                    client.update_work_queue(existing[name].id, priority=priority)
            else:
                client.create_work_queue(name=name, work_pool_name=pool, priority=priority)


# ------------------------------------------------------------------------------------------- deployments

def deploy(pool: str = POOL_NAME, specs: Sequence[DeploymentSpec] = DEPLOYMENTS,
           job_variables: dict[str, Any] | None = None, pool_limit: int | None = None) -> dict[str, UUID]:
    """Register the deployments (creating pool and queues first); ``{"batch/gpu": id, ...}``."""
    from prefect.deployments.runner import RunnerDeployment

    ensure_work_pool(pool, concurrency_limit=pool_limit)
    for other in sorted({spec.pool for spec in specs if spec.pool and spec.pool != pool}):
        ensure_work_pool(other)
    ids: dict[str, UUID] = {}
    with _cwd(repo_root()):  # entrypoints are stored relative to the project directory
        for spec in specs:
            deployment = RunnerDeployment.from_entrypoint(
                ENTRYPOINTS[spec.flow], name=spec.name, work_pool_name=spec.pool or pool, work_queue_name=spec.queue,
                description=spec.description, tags=["musetalk"], job_variables=dict(job_variables or {}))
            deployment.storage = PullSteps([{PULL_STEP: {}}])
            ids[spec.full_name] = deployment.apply()
    return ids
