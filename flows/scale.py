"""Autoscaling flow: each Salad class's container group sized to that class's unfinished jobs.

One pass reads, per class of gpu_targets.json, the unfinished runs of route ``salad:<class id>`` in
Prefect and the class's Salad queue length, decides (tasks.scaling, module doc) and PATCHes only the
groups whose replica count changes. Its deployment, ``scale/salad-autoscale``, runs it on a schedule
(deployments/prefect.yaml). Salad credentials come from the environment of the worker that runs it
(SALAD_API_KEY, SALAD_ORG_NAME, SALAD_PROJECT_NAME), never from parameters; without them the pass does
nothing and says so.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.route_depth import read_unfinished_runs
from tasks.salad import read_queue_length, read_replicas, salad_configured, write_replicas
from tasks.salad_provision import names_by_class
from tasks.scaling import (ClassDemand, ScalingPolicy, decision_markdown, read_targets, run_scaling_pass,
                           salad_classes)

ARTIFACT_KEY = "salad-scale-decision"


@flow(name="scale")
def scale(
    targets_path: str = "gpu_targets.json",
    pool: str = "salad",
    class_ids: Optional[list[str]] = None,
    min_replicas: int = 0,
    max_replicas: int = 10,
    jobs_per_replica: int = 1,
    dry_run: bool = True,
) -> dict[str, Any]:
    """One scaling pass over the Salad classes of ``targets_path`` (or just ``class_ids``).

    ``pool`` is the Prefect work pool of the Salad routes (one work queue per class id). Dry run is the
    default: a deployment must opt in to changing replicas.
    """
    logger = get_run_logger()
    if not salad_configured():
        logger.warning("Salad is not configured on this worker (SALAD_API_KEY, SALAD_ORG_NAME, "
                       "SALAD_PROJECT_NAME); nothing to scale")
        return {"skipped": "salad not configured", "decisions": [], "changes": {}, "applied": {}}
    targets = read_targets(targets_path)
    names = names_by_class(targets)
    entries = [e for e in salad_classes(targets) if not class_ids or str(e["id"]) in class_ids]
    classes = [ClassDemand(class_id=str(e["id"]), name=str(e["name"]), queue=names[str(e["id"])].queue,
                           container_group=names[str(e["id"])].container_group) for e in entries]
    result = run_scaling_pass(
        classes=classes,
        read_prefect_runs=partial(read_unfinished_runs, pool),
        read_queue_length=read_queue_length,
        read_replicas=read_replicas,
        write_replicas=write_replicas,
        policy=ScalingPolicy(min_replicas=min_replicas, max_replicas=max_replicas,
                             jobs_per_replica=jobs_per_replica),
        dry_run=dry_run,
    )
    for d in result.decisions:
        logger.info("%s (%s): %s", d.name, d.container_group, d.reason)
    logger.info("changes %s%s", result.changes or "none",
                " (dry run)" if dry_run else f", applied {result.applied}")
    create_markdown_artifact(markdown=decision_markdown(result), key=ARTIFACT_KEY,
                             description="Salad autoscaling decision")
    return result.model_dump()
