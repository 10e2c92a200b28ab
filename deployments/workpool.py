"""Work pools and queues of the fleet, then the deployments of ``deployments/prefect.yaml`` through Prefect's
own ``prefect deploy`` — ``musetalk-flow deploy`` in one call.

``prefect.yaml`` is the one definition of the deployments (which flow, name, pool, queue, schedule,
parameters, and the pull step); nothing here lists them again. What the YAML format cannot hold lives here:
the pools themselves and their queues' priorities, which ``prefect deploy`` requires to exist already.

- every pool the YAML names is a ``process`` pool: workers run each flow run in a fresh interpreter;
- its queues are ``urgent`` (priority 1) and ``default`` (priority 10), so a free worker always takes
  urgent runs first — except the ``control`` pool's one ``default`` queue (scheduled control-plane flows);
- ``deploy(pool=…)`` puts the YAML's ``gpu`` deployments into another pool (a second fleet, a test).

One render per GPU is a property of the *worker*, not of the pool: pool and queue concurrency limits are
fleet-wide totals (a pool limit of 1 would let one machine of the whole fleet work). Each GPU gets one
worker started with ``--limit 1``; multi-GPU machines start one worker per GPU (``CUDA_VISIBLE_DEVICES``).

The code is found through the YAML's pull step (:func:`enter_repo`), which changes into the directory
holding ``flows/`` on the worker's machine (the installed project, or ``$MUSETALK_REPO_DIR``), so
deployments made on one machine run on any machine that has the project installed, whatever its path."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping
from uuid import UUID

POOL_NAME = "gpu"
BUFFER_POOL = "buffer"
SALAD_POOL = "salad"
CONTROL_POOL = "control"
POOL_TYPE = "process"
QUEUES: dict[str, int] = {"urgent": 1, "default": 10}  # lower number = served first
# A pool of scheduled control-plane flows has no urgent lane.
POOL_QUEUES: dict[str, dict[str, int]] = {CONTROL_POOL: {"default": 1}}
PULL_STEP = "deployments.workpool.enter_repo"
DEPLOY_TIMEOUT_S = 600.0


# ----------------------------------------------------------------------------------------- code location

def repo_root() -> Path:
    """The directory holding ``flows/`` and ``deployments/`` in this installation."""
    return Path(__file__).resolve().parent.parent


def prefect_file() -> Path:
    return repo_root() / "deployments" / "prefect.yaml"


def enter_repo(directory: str | None = None) -> dict[str, str]:
    """Pull step: change into the project directory so the relative entrypoints resolve.

    ``directory``, else ``$MUSETALK_REPO_DIR``, else where this module is installed (editable checkout,
    ``/app`` in the image, or site-packages — all hold ``flows/``)."""
    target = Path(directory or os.environ.get("MUSETALK_REPO_DIR") or repo_root()).expanduser()
    if not (target / "flows").is_dir():
        raise FileNotFoundError(f"{target} has no flows/ directory; set MUSETALK_REPO_DIR to the project")
    os.chdir(target)
    return {"directory": str(target)}


# ------------------------------------------------------------------------------------------ definitions

def load_definition(path: Path | None = None) -> dict[str, Any]:
    """``prefect.yaml`` as Prefect reads it (YAML anchors resolved)."""
    import yaml

    return yaml.safe_load((path or prefect_file()).read_text(encoding="utf-8"))


def definition_for(pool: str = POOL_NAME, job_variables: Mapping[str, Any] | None = None,
                   parameters: Mapping[str, Mapping[str, Any]] | None = None,
                   schedules_active: bool = True) -> dict[str, Any]:
    """The YAML with the ``gpu`` deployments moved to ``pool``, ``job_variables`` added to every deployment
    and ``parameters`` (keyed by deployment name, e.g. ``salad-autoscale``) merged into theirs;
    ``schedules_active=False`` registers every schedule paused (switched on in the UI or by a later
    ``musetalk-flow deploy``)."""
    definition = copy.deepcopy(load_definition())
    for entry in definition["deployments"]:
        for schedule in entry.get("schedules") or ():
            schedule["active"] = bool(schedule.get("active", True)) and schedules_active
        work_pool = entry.setdefault("work_pool", {})
        if work_pool.get("name") == POOL_NAME:
            work_pool["name"] = pool
        work_pool["job_variables"] = {**(work_pool.get("job_variables") or {}), **(job_variables or {})}
        if parameters and entry["name"] in parameters:
            entry["parameters"] = {**(entry.get("parameters") or {}), **parameters[entry["name"]]}
    return definition


def pools_of(definition: dict[str, Any]) -> list[str]:
    """Every work pool the definition's deployments name, in order of first mention."""
    return list(dict.fromkeys(entry["work_pool"]["name"] for entry in definition["deployments"]))


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

    queues = POOL_QUEUES.get(pool, QUEUES) if queues is None else queues
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

def deploy(pool: str = POOL_NAME, job_variables: dict[str, Any] | None = None, pool_limit: int | None = None,
           parameters: Mapping[str, Mapping[str, Any]] | None = None, schedules_active: bool = True) -> dict[str, UUID]:
    """Create the pools and queues, then apply ``prefect.yaml`` with ``prefect deploy --all``;
    ``{"batch/gpu": id, ...}`` for every deployment it defines. See :func:`definition_for` for the
    arguments; ``pool_limit`` caps ``pool`` (the GPU pool)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    definition = definition_for(pool, job_variables, parameters, schedules_active=schedules_active)
    for name in pools_of(definition):
        ensure_work_pool(name, concurrency_limit=pool_limit if name == pool else None)
    with get_client(sync_client=True) as client:
        # the child must reach this process's server, also when it is Prefect's temporary one
        api_url = str(client.api_url)
        run_prefect_deploy(definition, api_url)
        wanted = {(e["entrypoint"], e["name"], e["work_pool"]["name"]) for e in definition["deployments"]}
        found = client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=sorted({e["name"] for e in definition["deployments"]}))))
        flow_names: dict[UUID, str] = {}
        ids: dict[str, UUID] = {}
        for d in found:
            if (d.entrypoint, d.name, d.work_pool_name) in wanted:
                if d.flow_id not in flow_names:
                    flow_names[d.flow_id] = client.read_flow(d.flow_id).name
                ids[f"{flow_names[d.flow_id]}/{d.name}"] = d.id
    if len(ids) != len(wanted):
        raise RuntimeError(f"prefect deploy registered {sorted(ids)}; {len(wanted)} deployments expected")
    return ids


def run_prefect_deploy(definition: dict[str, Any], api_url: str) -> str:
    """``prefect --no-prompt deploy --all`` on ``definition``, from the project directory (entrypoints are
    relative to it); its output. Prefect's CLI is its supported way to turn a prefect.yaml, pull steps
    included, into deployments."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="musetalk-deploy-") as tmp:
        path = Path(tmp) / "prefect.yaml"
        path.write_text(yaml.safe_dump(definition, sort_keys=False), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
            cwd=repo_root(), env={**os.environ, "PREFECT_API_URL": api_url}, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_S)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({done.returncode}):\n{out[-3000:]}")
    return out
