"""Autoscaling flow: queue length → cheapest GPU class meeting the target → PATCH replicas.

Run it on a schedule (`scale_deployment()`, every 60 s). Salad credentials come from the environment
inside the tasks (SALAD_API_KEY, SALAD_ORG_NAME, SALAD_PROJECT_NAME), never from parameters.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.salad import read_queue_length, read_replicas, write_replicas
from tasks.scaling import decision_markdown, read_prices, read_targets, run_scaling_pass

ARTIFACT_KEY = "salad-scale-decision"


@flow(name="scale")
def scale(
    queue_name: str,
    container_groups: dict[str, str],
    min_replicas: int = 0,
    max_replicas: int = 10,
    jobs_per_replica: int = 2,
    target_rtf: float = 1.0,
    others_min_replicas: int = 0,
    dry_run: bool = True,
    targets_path: str = "gpu_targets.json",
    prices_path: Optional[str] = None,
) -> dict[str, Any]:
    """One scaling pass. `container_groups` maps Salad GPU class id → container group name.

    `prices_path` (salad_prices.json) overrides the prices recorded with the benchmarks (batch priority).
    Dry run is the default: a deployment must opt in to changing replicas.
    """
    logger = get_run_logger()
    result = run_scaling_pass(
        queue_name=queue_name,
        container_groups=container_groups,
        targets=read_targets(targets_path),
        read_queue_length=read_queue_length,
        read_replicas=read_replicas,
        write_replicas=write_replicas,
        dry_run=dry_run,
        prices=read_prices(prices_path).per_hour("batch") if prices_path else None,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        jobs_per_replica=jobs_per_replica,
        target_rtf=target_rtf,
        others_min_replicas=others_min_replicas,
    )
    logger.info(
        "%s; changes %s%s",
        result.decision.reason,
        result.changes or "none",
        " (dry run)" if dry_run else f", applied {result.applied}",
    )
    create_markdown_artifact(
        markdown=decision_markdown(result.decision, result.current_replicas, result.applied, dry_run),
        key=ARTIFACT_KEY,
        description="Salad autoscaling decision",
    )
    return result.model_dump()


def scale_deployment(
    queue_name: str,
    container_groups: dict[str, str],
    *,
    name: str = "salad-autoscale",
    interval_s: float = 60.0,
    dry_run: bool = False,
    **parameters: Any,
) -> Any:
    """A deployment of `scale` every `interval_s` seconds, one run at a time (not started here).

    Serve it with `prefect.serve(scale_deployment(...))` or register it with `.apply()`.
    """
    params = {"queue_name": queue_name, "container_groups": container_groups, "dry_run": dry_run}
    params.update(parameters)
    return scale.to_deployment(
        name=name,
        interval=timedelta(seconds=interval_s),
        parameters=params,
        concurrency_limit=1,
        description="Scale Salad container groups to the job queue (cheapest class meeting the RTF).",
        tags=["salad", "autoscale"],
    )
