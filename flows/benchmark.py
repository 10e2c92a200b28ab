"""The `benchmark` flow: measure GPU classes and record the results in gpu_targets.json.

Three ways to measure, one way to record:

- no `classes`: this machine, in-process (`benchmark-local` task → `benchmarks.run.run_benchmark`);
- `classes` + `via="deployment"`: one run of this same flow's deployment per class on the work queue
  `<queue_prefix><first 8 characters of the class id>` (a worker on a machine of that class serves it),
  all classes at once; each child measures its own machine and returns its result, it does not write
  gpu_targets.json. Reading the children's results back needs result storage both machines see
  (`PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`, e.g. an S3-compatible bucket); the flow persists its result
  as JSON;
- `classes` + `via="salad"`: one Salad queue job per class (`salad_queues` maps class id → queue, default
  `benchmark-<prefix>`); a container group of that class whose queue connection points at the worker's
  `POST /benchmark` (`deployments/benchmark_job.py`) measures in a child process and the job's output is
  `{"status": "ok", "result": …}`.

Results merge into `targets_path` per class id, keeping every other entry (`benchmarks.targets`), with
prices from `prices_path`; then a table artifact, a PNG chart and a markdown artifact pointing at it.

The measuring, the result schema, the merge and the chart are the `benchmarks/` library (which imports no
flow); this module only composes them, like every flow. Its one deployment entrypoint is
`flows/benchmark.py:benchmark`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from benchmarks.chart import plot_targets
from benchmarks.run import BenchmarkConfig, run_benchmark
from benchmarks.schema import BenchmarkResult
from benchmarks.targets import merge_into_file, results_table
from tasks.scaling import read_targets
from tasks.salad import salad_client_from_env
from tasks.salad_dispatch import SaladJobTimeout, wait_salad_job

TABLE_KEY = "gpu-benchmark-results"
CHART_KEY = "gpu-benchmark-chart"
DEFAULT_DEPLOYMENT = "benchmark/gpu-benchmark"

def queue_for(class_id: str, prefix: str = "gpu-") -> str:
    """The work queue of a GPU class: `gpu-ed563892` for class id `ed563892-…`."""
    return f"{prefix}{class_id[:8]}"


# ------------------------------------------------------------------------------------ tasks


@task(name="benchmark-local", cache_policy=NO_CACHE)
def run_local(config: dict[str, Any]) -> dict[str, Any]:
    """Benchmark this machine in-process (the engine is built and dropped inside the task)."""
    result = run_benchmark(BenchmarkConfig.model_validate(config), say=get_run_logger().info)
    return result.model_dump(mode="json")


@task(name="benchmark-deployment", cache_policy=NO_CACHE)
def run_on_class(deployment: str, class_id: str, queue: str, parameters: dict[str, Any],
                 timeout_s: float) -> dict[str, Any]:
    """Run the benchmark deployment on one class's work queue and return the child's result."""
    run = run_deployment(deployment, parameters=parameters, work_queue_name=queue, timeout=timeout_s,
                         flow_run_name=f"benchmark-{queue}", as_subflow=True)
    state = run.state
    if state is None or not state.is_completed():
        final = state is not None and state.is_final()
        what = state.name if final else f"not finished within {timeout_s:g}s"
        raise RuntimeError(f"benchmark run {run.id} on work queue {queue}: {what}")
    out = state.result()
    return _single_result(out)


@task(name="benchmark-salad-job", cache_policy=NO_CACHE)
def run_on_salad(queue: str, class_id: str, request: dict[str, Any], timeout_s: float,
                 poll_s: float = 15.0) -> dict[str, Any]:
    """Queue one benchmark job on Salad and wait (bounded) for its output."""
    with salad_client_from_env() as client:  # credentials from the environment, never parameters
        job = client.create_job(queue, input={"benchmark": request},
                                metadata={"purpose": "benchmark", "gpu_class_id": class_id})
        job_id = str(job["id"])
        try:
            job = wait_salad_job(queue, job_id, client, poll_s=poll_s, timeout_s=timeout_s)
        except SaladJobTimeout as exc:
            raise RuntimeError(f"Salad benchmark job {job_id} on {queue}: {exc}") from None
    status = job.get("status") if job is not None else None
    if status != "succeeded":
        raise RuntimeError(f"Salad benchmark job {job_id} on {queue}: {status or 'no status'}")
    return _single_result(job.get("output") or {})


def _single_result(out: Any) -> dict[str, Any]:
    """A child's result: a flow return value ({"results": [r]}), {"result": r}, or r itself."""
    if isinstance(out, dict) and isinstance(out.get("results"), list) and len(out["results"]) == 1:
        out = out["results"][0]
    elif isinstance(out, dict) and isinstance(out.get("result"), dict):
        out = out["result"]
    return BenchmarkResult.model_validate(out).model_dump(mode="json")  # reject anything malformed


@task(name="benchmark-merge", cache_policy=NO_CACHE)
def merge_into_targets(results: list[tuple[Optional[str], dict[str, Any]]], targets_path: str,
                       prices_path: Optional[str]) -> list[dict[str, Any]]:
    """Merge each (class id or None, result) into gpu_targets.json; every other entry is kept."""
    return merge_into_file(targets_path, [(cid, BenchmarkResult.model_validate(data)) for cid, data in results],
                           prices_path)


@task(name="benchmark-report", cache_policy=NO_CACHE)
def report(targets: list[dict[str, Any]], chart_path: Optional[str], chart_url: Optional[str]) -> list[dict]:
    """Table artifact of the measured classes, the PNG chart, and artifacts pointing at it."""
    df = results_table(targets)
    rows = [{k: _plain(v) for k, v in row.items()} for row in df.to_dict("records")]
    create_table_artifact(table=rows, key=TABLE_KEY,
                          description="Benchmarked GPU classes, cheapest per output minute first")
    if chart_path:
        png = plot_targets(targets, chart_path)
        if chart_url:  # a URL the UI can load (e.g. the PNG uploaded to a public bucket)
            create_image_artifact(image_url=chart_url, key=CHART_KEY, description="fps and cost per class")
        else:
            create_markdown_artifact(key=CHART_KEY, description="fps and cost per class",
                                     markdown=_chart_markdown(df, png))
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value  # numpy scalars → JSON-able


def _chart_markdown(df: Any, png: Path) -> str:
    lines = [f"Chart: `{png.resolve()}`", "", "| class | fps | rtf | ¢/output min | batch |", "|---|---|---|---|---|"]
    for _, r in df.iterrows():
        cost = r["cost_per_output_minute"]
        cents = "—" if cost is None or (isinstance(cost, float) and math.isnan(cost)) else f"{cost * 100:.3f}"
        lines.append(f"| {r['name']} | {r['fps']:.1f} | {r['real_time_factor']:.3f} | {cents} "
                     f"| {int(r['best_batch_size'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the flow


@flow(name="benchmark", persist_result=True, result_serializer="json")
def benchmark(
    classes: Optional[list[str]] = None,
    via: Literal["deployment", "salad"] = "deployment",
    profile: Optional[Literal["tiny", "full-random", "real"]] = None,
    batch_sizes: Optional[list[int]] = None,
    modes: Optional[list[Literal["eager", "graphs", "compiled"]]] = None,
    audio_seconds: float = 10.0,
    video_seconds: float = 2.0,
    width: int = 1280,
    height: int = 720,
    models_dir: Optional[str] = None,
    work_dir: Optional[str] = None,
    device: str = "auto",
    torch_threads: Optional[int] = None,
    repeats: int = 1,
    class_id: Optional[str] = None,
    gpu_class: Optional[str] = None,
    targets_path: Optional[str] = "gpu_targets.json",
    prices_path: Optional[str] = "salad_prices.json",
    chart_path: Optional[str] = "gpu_targets.png",
    chart_url: Optional[str] = None,
    deployment_name: str = DEFAULT_DEPLOYMENT,
    queue_prefix: str = "gpu-",
    salad_queues: Optional[dict[str, str]] = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Benchmark this machine (no `classes`) or each listed Salad class, then record the results.

    `profile`: None picks `full-random` on a CUDA machine and `tiny` elsewhere. `class_id` names the
    class a local run is merged into (default: matched from the GPU name; a non-Salad device is added
    as a local entry). `targets_path=None` measures without recording (what fan-out children do).
    Returns {"results": [BenchmarkResult JSON, …], "failed": {class id: error}, "table": rows}.
    """
    logger = get_run_logger()
    # the flow's parameters that configure the measurement itself, passed on unchanged to children
    # (profile and gpu_class are set per branch below)
    measure = {k: v for k, v in locals().items() if k in BenchmarkConfig.model_fields}
    measure["batch_sizes"] = measure["batch_sizes"] or []
    measure["modes"] = measure["modes"] or []
    results: list[tuple[Optional[str], dict[str, Any]]] = []
    failed: dict[str, str] = {}

    if not classes:
        config = {**measure, "profile": profile or _local_profile(device), "gpu_class": gpu_class}
        results.append((class_id, run_local(config)))
    else:
        names = _class_names(targets_path)
        futures = {}
        for cid in classes:
            child = {**measure, "profile": profile, "gpu_class": names.get(cid), "class_id": cid,
                     "targets_path": None, "chart_path": None}
            if via == "salad":
                queue = (salad_queues or {}).get(cid) or queue_for(cid, "benchmark-")
                futures[cid] = run_on_salad.submit(queue, cid, child, timeout_s)
            else:
                futures[cid] = run_on_class.submit(deployment_name, cid, queue_for(cid, queue_prefix),
                                                   child, timeout_s)
        for cid, future in futures.items():
            future.wait()
            if future.state.is_completed():
                results.append((cid, future.result()))
            else:  # one class failing (no worker, no capacity) must not lose the others' results
                failed[cid] = str(future.state.message or future.state.name)
                logger.warning("benchmark of class %s failed: %s", cid, failed[cid])

    rows: list[dict] = []
    if targets_path and results:
        targets = merge_into_targets(results, targets_path, prices_path)
        rows = report(targets, chart_path, chart_url)
        logger.info("merged %d result(s) into %s", len(results), targets_path)
    if classes and not results:
        raise RuntimeError(f"no GPU class could be benchmarked: {failed}")
    return {"results": [r for _, r in results], "failed": failed, "table": rows}


def _local_profile(device: str) -> str:
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "full-random" if cuda else "tiny"


def _class_names(targets_path: Optional[str]) -> dict[str, str]:
    """class id → Salad class name, so that each child reports which class it ran on."""
    if not targets_path or not Path(targets_path).is_file():
        return {}
    return {t["id"]: t["name"] for t in read_targets(targets_path) if t.get("id")}
