"""The `batch` flow: a manifest of jobs in, every job rendered on this worker's warm engine, a results
table (Prefect artifact + CSV) and a summary out.

- Jobs that share an avatar (same ``video_url``) run back to back, so the avatar is prepared once and the
  engine's caches stay hot.
- Each job is its own run, a ``batch-job`` subflow named by the job id (in-process: the engine loads once
  per batch run, not once per job), with a progress artifact while it renders and a link artifact to its
  video. A failing job becomes a failed row (and a failed job run); the others carry on.
- ``fan_out=N`` spreads a large batch over the work pool: the manifest is cut into N+1 shares, shares
  1..N become child runs of the same deployment (``fan_out=0``) that other workers pick up, and this run
  renders share 0 meanwhile, then waits (bounded, Prefect's ``wait_for_flow_run``) and gathers the
  children's rows from their results-table artifacts (see "Why artifacts" below).
- Re-running a job id overwrites the same output keys (storage keys are a pure function of the job id).

- Fan-out never waits on children no worker can take: shares are capped by the pool's online workers
  (minus this run's own), and a child still unclaimed when this run has finished its own share is
  cancelled and rendered here instead.

The final state tells the truth (the summary is its data): Completed when every job succeeded;
**Partial** (a Completed-type state) when some failed; Failed when none succeeded; **Incomplete** (a
Failed-type state) when the machinery broke — the engine could not load, or a child share did not finish
within the bound. ``jobs`` is typed (a list of :class:`tasks.contract.JobRequest`), so Prefect's UI shows
a form and the server validates a list before the run starts; a manifest *file* is parsed in the run,
where a bad row fails as its own job.

Why artifacts, not the children's persisted results: a child's return value is only readable by the parent
through result storage both machines reach, and this project does not guarantee one. Prefect's default is
each machine's own ``$PREFECT_HOME/storage``; a shared default storage block
(``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``) is asked for only where the orchestrator reads GPU-pool results
(deployments/README.md), and a fleet that runs ``batch/gpu`` with ``prefect deployment run`` needs no such
setting. A child on machine B would persist its rows to B's disk, and ``state.result()`` on machine A would
fail. The table artifact is stored by the Prefect server, which every worker already talks to, and it is
the batch's published output anyway (the UI's results table), so the parent reads back exactly what an
operator sees. Should the project ever require shared result storage for every worker, ``gather_share``
can read ``state.result()`` instead and the artifact stays for people."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Sequence
from uuid import UUID

import pandas as pd
from prefect import flow, get_run_logger
from prefect import tags
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Cancelled, Completed, Failed

from flows.generate import run_job
from tasks.engine import get_engine
from tasks.fetch import display_url
from musetalk_engine.files import atomic_write
from tasks.artifacts import link_output, progress_artifact
from tasks.contract import JobOutcome, JobRequest, failure_outcome
from tasks.settings import get_settings

ARTIFACT_KEY = "musetalk-batch"
COLUMNS = ("index", "musetalk_job_id", "status", "http_status", "output_url", "time_s", "error_type",
           "error_message", "stage", "retryable", "avatar_cached", "video", "share", "worker")
LOCAL_SHARE = "local"
POLL_INTERVAL_S = 2.0
# Names of the batch's final states besides Completed/Failed (see the module docstring).
PARTIAL = "Partial"
INCOMPLETE = "Incomplete"
# Slack on top of the per-job budget for a child to be picked up, start its interpreter and load models.
FAN_OUT_SLACK_S = 900.0


# ------------------------------------------------------------------------------------------- manifest

def _row_to_job(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row as a job dict: empty cells dropped (defaults apply), ``params`` JSON decoded."""
    job = {str(k).strip(): v.strip() if isinstance(v, str) else v for k, v in row.items()}
    job = {k: v for k, v in job.items() if k and v not in ("", None)}
    if isinstance(job.get("params"), str):
        try:
            job["params"] = json.loads(job["params"])
        except json.JSONDecodeError:
            pass  # left as text: that job fails validation on its own (422), the batch goes on
    return job


def _parse_jsonl(text: str, where: str) -> list[dict[str, Any]]:
    jobs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} line {n}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where} line {n}: a job must be a JSON object")
        jobs.append(item)
    return jobs


def _from_list(items: Iterable[Any], where: str) -> list[dict[str, Any]]:
    jobs = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{where} item {n}: a job must be an object, not {type(item).__name__}")
        jobs.append(dict(item))
    return jobs


def _from_json(data: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("jobs"), list):
        data = data["jobs"]
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of jobs (or {{\"jobs\": [...]}})")
    return _from_list(data, where)


def load_manifest(source: Sequence[dict[str, Any]] | str | Path) -> list[dict[str, Any]]:
    """The jobs of a manifest: a list of job dicts, inline JSON text, or a ``.csv`` / ``.jsonl`` /
    ``.ndjson`` / ``.json`` file path. Rows are not validated here — a bad row fails as its own job."""
    if isinstance(source, (list, tuple)):
        return _from_list(source, "manifest")
    if isinstance(source, dict):
        return _from_json(source, "manifest")
    if isinstance(source, str) and source.lstrip()[:1] in ("[", "{"):
        return _from_json(json.loads(source), "manifest")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"manifest file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return [_row_to_job(r) for r in frame.to_dict(orient="records")]
    text = path.read_text(encoding="utf-8")
    if suffix in (".jsonl", ".ndjson"):
        return _parse_jsonl(text, path.name)
    if suffix == ".json":
        return _from_json(json.loads(text), path.name)
    raise ValueError(f"manifest {path.name!r}: use .csv, .jsonl, .ndjson or .json")


def group_by_avatar(jobs: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """``(manifest index, job)`` pairs with jobs of the same ``video_url`` next to each other; groups in
    order of first appearance, jobs in manifest order within a group."""
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(str(job.get("video_url") or ""), []).append((i, job))
    return [pair for group in groups.values() for pair in group]


def split_shares(ordered: Sequence[Any], shares: int) -> list[list[Any]]:
    """``ordered`` cut into at most ``shares`` contiguous, near-equal, non-empty pieces (contiguous keeps
    avatar groups together except where a cut falls inside one)."""
    shares = max(1, min(shares, len(ordered)))
    size = math.ceil(len(ordered) / shares) if ordered else 0
    return [list(ordered[i:i + size]) for i in range(0, len(ordered), size)] if size else [[]]


# ----------------------------------------------------------------------------------------------- rows

def _job_label(index: int, job: dict[str, Any]) -> str:
    return str(job.get("musetalk_job_id") or f"row-{index}")


def worker_name() -> str:
    """Who ran this: the Prefect worker that started the run (it puts its name in the run's environment),
    else the host name."""
    return os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()


def outcome_row(index: int, job: dict[str, Any], outcome: JobOutcome, seconds: float,
                share: str = LOCAL_SHARE, worker: str | None = None) -> dict[str, Any]:
    """One results-table row: status, output URL and time of a job, or its error."""
    body = outcome.body
    ok = outcome.http_status == 200
    video = job.get("video_url")
    return {
        "index": index,
        "musetalk_job_id": _job_label(index, job),
        "status": "ok" if ok else "failed",
        "http_status": outcome.http_status,
        "output_url": body.get("output_url") if ok else None,
        "time_s": round(seconds, 3),
        "error_type": None if ok else body.get("error_type"),
        "error_message": None if ok else body.get("error_message"),
        "stage": None if ok else body.get("stage"),
        "retryable": None if ok else body.get("retryable"),
        "avatar_cached": (body.get("metrics") or {}).get("avatar_cached") if ok else None,
        # never the full URL: a presigned query string is a credential
        "video": display_url(video) if isinstance(video, str) else None,
        "share": share,
        "worker": worker,
    }


def failed_rows(pairs: Sequence[tuple[int, dict[str, Any]]], exc: BaseException, stage: str,
                share: str, worker: str | None = None) -> list[dict[str, Any]]:
    """Rows for jobs that could not run at all (engine did not load, child share lost)."""
    return [outcome_row(i, job, failure_outcome(exc, stage=stage, job_id=job.get("musetalk_job_id")), 0.0,
                        share, worker)
            for i, job in pairs]


@flow(name="batch-job", flow_run_name="{job_id}", log_prints=True)
def batch_job(job: dict[str, Any], job_id: str, queue_job_id: str | None = None):
    """One job of a batch as its own run (named by the job id): progress artifact while it renders, a link
    artifact to the video when done; ends Failed (carrying the failure body) when the job failed."""
    with progress_artifact(job_id):
        outcome = run_job(job, queue_job_id)
    if outcome.http_status != 200:
        return Failed(message=str(outcome.body.get("error_message")), data=outcome.model_dump())
    if outcome.body.get("output_url"):
        link_output(job_id, outcome.body["output_url"])
    return outcome.model_dump()


def _job_outcome(state: Any, job_id: str) -> JobOutcome:
    """The outcome a ``batch-job`` state carries; one that crashed without one becomes a worker fault."""
    from musetalk_engine.errors import ProcessingError

    data = state.result(raise_on_failure=False)
    if isinstance(data, dict) and "http_status" in data:
        return JobOutcome.model_validate(data)
    why = f"job run ended {state.name} without an outcome: {state.message or data}"
    return failure_outcome(ProcessingError(why, stage="inference", retryable=True), stage="inference",
                           job_id=job_id)


def run_local(pairs: Sequence[tuple[int, dict[str, Any]]]) -> tuple[list[dict[str, Any]], bool]:
    """Run jobs one after another on this process's engine; (rows, engine_ok)."""
    logger = get_run_logger()
    if not pairs:
        return [], True
    try:
        engine = get_engine(get_settings())  # loaded once here, reused by every job of the batch
    except Exception as exc:  # every job would fail the same way: record it once per job, no renders
        logger.error("engine did not load: %s", exc)
        return failed_rows(pairs, exc, "preprocessing", LOCAL_SHARE, worker_name()), False
    logger.info("rendering %d job(s) on %s", len(pairs), engine.device)
    rows = []
    from prefect.runtime import flow_run

    for n, (index, job) in enumerate(pairs, start=1):
        started = time.perf_counter()
        label = _job_label(index, job)
        # each job's run carries its batch, so the UI (and tests) find a batch's job runs by tag
        with tags(f"batch:{flow_run.id}"):
            state = batch_job(job, label, job.get("queue_job_id"), return_state=True)
        outcome = _job_outcome(state, label)
        rows.append(outcome_row(index, job, outcome, time.perf_counter() - started, worker=worker_name()))
        logger.info("job %d/%d %s: %s", n, len(pairs), rows[-1]["musetalk_job_id"], rows[-1]["status"])
    return rows, True


# -------------------------------------------------------------------------------------------- fan-out

def _deployment_name(explicit: str | None) -> str | None:
    """``flow/deployment`` for child runs: the given one, else the deployment this run came from."""
    if explicit:
        return explicit if "/" in explicit else f"batch/{explicit}"
    from prefect.runtime import deployment, flow_run

    name = deployment.name
    return f"{flow_run.flow_name}/{name}" if name else None


def dispatch_shares(deployment: str, shares: Sequence[Sequence[tuple[int, dict[str, Any]]]],
                    parent_id: str) -> list[UUID]:
    """Start one child run per share (``fan_out=0``) and return their ids at once.

    The idempotency key (parent run id + share number) makes a retried parent find its existing children
    instead of starting the work twice; children go to the parent's work queue, so urgency carries over."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        queue = client.read_flow_run(UUID(parent_id)).work_queue_name
    ids = []
    for n, share in enumerate(shares, start=1):
        run = run_deployment(deployment, parameters={"jobs": [job for _, job in share], "fan_out": 0},
                             timeout=0, idempotency_key=f"{parent_id}-share-{n}", work_queue_name=queue,
                             tags=["batch-share"])
        ids.append(run.id)
    return ids


def online_workers(run_id: str) -> int | None:
    """Online workers of the work pool this run came from (None when it came from no pool)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    with get_client(sync_client=True) as client:
        pool = client.read_flow_run(UUID(run_id)).work_pool_name
        if not pool:
            return None
        workers = client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
    return len(workers)


def capped_fan_out(fan_out: int, online: int | None) -> int:
    """Children that can actually be taken: one per online worker besides the one running this batch."""
    if online is None:
        return fan_out
    return max(0, min(fan_out, online - 1))


def reclaim_unstarted(ids: Sequence[UUID], dispatched_at: float, pickup_s: float,
                      poll_s: float = POLL_INTERVAL_S) -> set[UUID]:
    """Cancel the children no worker claimed within ``pickup_s`` of their dispatch (still Scheduled) and
    return their ids: this run renders their shares itself instead of waiting for a worker that may never
    come. Returns at once when every child has been claimed; a child a worker claims while being cancelled
    refuses the cancel and is waited for as usual."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    taken: set[UUID] = set()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids))))
            waiting = [r for r in runs if r.state is not None and r.state.is_scheduled()]
            if not waiting:
                return taken
            if time.monotonic() - dispatched_at >= pickup_s:
                break
            time.sleep(poll_s)
        for run in waiting:
            result = client.set_flow_run_state(
                run.id, Cancelled(message="no worker took this share; the parent batch rendered it"))
            if result.status.value == "ACCEPT":
                taken.add(run.id)
    return taken


def wait_for_runs(ids: Sequence[UUID], timeout_s: float, poll_s: float = POLL_INTERVAL_S) -> dict[UUID, Any]:
    """The flow runs ``ids`` once all are final or ``timeout_s`` has passed (whichever comes first):
    Prefect's ``wait_for_flow_run`` on every child at once; a child still running at the deadline is
    returned as it stands, one the server does not know is left out."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import FlowRunWaitTimeout, ObjectNotFound
    from prefect.flow_runs import wait_for_flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def wait_all() -> dict[UUID, Any]:
        async with get_client() as client:
            async def one(run_id: UUID) -> Any:
                try:
                    return await wait_for_flow_run(run_id, timeout=max(1, math.ceil(timeout_s)),
                                                   poll_interval=max(1, math.ceil(poll_s)), client=client)
                except FlowRunWaitTimeout:
                    return await client.read_flow_run(run_id)
                except ObjectNotFound:
                    return None

            runs = await asyncio.gather(*(one(run_id) for run_id in ids))
        return {run.id: run for run in runs if run is not None}

    return run_coro_as_sync(wait_all()) if ids else {}


def artifact_rows(flow_run_id: UUID) -> list[dict[str, Any]] | None:
    """The results table a batch run published, read back from the Prefect server (None if none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))
    if not found:
        return None
    data = max(found, key=lambda a: a.created or 0).data  # the latest, should a run have published twice
    rows = json.loads(data) if isinstance(data, str) else data
    return rows if isinstance(rows, list) else None


def gather_share(share: Sequence[tuple[int, dict[str, Any]]], run: Any | None, timeout_s: float
                 ) -> tuple[list[dict[str, Any]], bool]:
    """A child share's rows (re-indexed to the parent manifest) and whether the child's machinery held (a
    child that ended Incomplete, or crashed, had a problem of its own even when it published rows; one
    that ended Failed because every job failed did its work)."""
    from musetalk_engine.errors import ProcessingError

    label = run.name if run is not None else "?"
    state = run.state if run is not None else None
    if state is not None and state.is_final():
        rows = artifact_rows(run.id)
        if rows is not None and len(rows) == len(share):
            by_index = sorted(rows, key=lambda r: r.get("index", 0))
            # the child numbered its own manifest 0..n-1; map back to this batch's manifest positions
            return ([{**row, "index": i, "share": label} for (i, _), row in zip(share, by_index)],
                    state.is_completed() or (state.is_failed() and state.name != INCOMPLETE))
        why = f"sub-batch {label} ended {state.name} without a results table: {state.message or ''}".strip()
        return failed_rows(share, ProcessingError(why, stage="inference", retryable=True),
                           "inference", label), False
    why = (f"sub-batch {label} did not finish within {timeout_s:.0f}s "
           f"(state {state.name if state else 'unknown'}); it may still complete and overwrite its outputs")
    return failed_rows(share, ProcessingError(why, stage="inference", retryable=True), "inference", label), False


# -------------------------------------------------------------------------------------------- results

def results_csv_path(flow_run_id: str) -> Path:
    """``{MUSETALK_WORKDIR}/{MUSETALK_RESULT_DIR}/batches/{flow_run_id}.csv``."""
    return get_settings().result_root / "batches" / f"{flow_run_id}.csv"


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The results table as CSV (written to a temp name first, so readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))
    return path


def summarize(rows: Sequence[dict[str, Any]], flow_run_id: str, csv_path: Path,
              children: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = sum(1 for r in rows if r["status"] == "ok")
    return {"flow_run_id": flow_run_id, "total": len(rows), "succeeded": ok, "failed": len(rows) - ok,
            "csv_path": str(csv_path), "children": list(children),
            "jobs": [{k: r.get(k) for k in ("index", "musetalk_job_id", "status", "http_status", "output_url",
                                             "time_s", "error_type", "error_message", "share", "worker")}
                     for r in rows]}


# ----------------------------------------------------------------------------------------------- flow

def final_state(summary: dict[str, Any], healthy: bool):
    """The batch run's final state, carrying the summary (see the module docstring)."""
    ok, total, failed = summary["succeeded"], summary["total"], summary["failed"]
    if not healthy:
        return Failed(name=INCOMPLETE, data=summary,
                      message=f"batch incomplete: part of it could not run; {ok} of {total} job(s) succeeded")
    if failed and not ok:
        return Failed(message=f"all {total} job(s) failed", data=summary)
    if failed:
        return Completed(name=PARTIAL, message=f"{ok} of {total} job(s) succeeded, {failed} failed", data=summary)
    return Completed(message=f"all {total} job(s) succeeded", data=summary)


def publish_results(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The results table (read back by a parent batch) and a page of links to the videos."""
    create_table_artifact(table=list(rows), key=ARTIFACT_KEY,
                          description=f"{summary['succeeded']}/{summary['total']} job(s) succeeded; each "
                                      "output_url is the job's video (also linked from its job run)")
    lines = [f"- [{r['musetalk_job_id']}]({r['output_url']})" if r["status"] == "ok" else
             f"- {r['musetalk_job_id']}: failed at {r['stage']}: {r['error_message']}" for r in rows]
    create_markdown_artifact(markdown=f"## {summary['succeeded']}/{summary['total']} job(s) succeeded\n\n"
                                      + "\n".join(lines), key=f"{ARTIFACT_KEY}-outputs",
                             description="the batch's videos")


@flow(name="batch", log_prints=True)
def batch(jobs: list[JobRequest] | str, fan_out: int = 0, deployment: str | None = None,
          wait_timeout_s: float | None = None, pickup_timeout_s: float | None = None):
    """Render a manifest of jobs (a list of jobs, or a CSV/JSONL/JSON path on the worker).

    ``fan_out``: number of child runs to hand shares of the batch to (0 = all here); ``deployment``: the
    ``batch/<name>`` deployment for them (default: the one this run came from); ``wait_timeout_s``: bound
    on waiting for them (default: per-job timeout × largest share + slack); ``pickup_timeout_s``: how
    long after dispatch a child may stay unclaimed before this run renders its share itself (default
    ``MUSETALK_FANOUT_PICKUP_SEC``)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    run_id = str(flow_run.id)
    if isinstance(jobs, (list, tuple)):  # validated by Prefect already; back to plain bodies for the rows
        jobs = [j.model_dump(mode="json", exclude_unset=True) if isinstance(j, JobRequest) else j for j in jobs]
    manifest = load_manifest(jobs)
    ordered = group_by_avatar(manifest)
    logger.info("batch of %d job(s), %d avatar(s)", len(ordered), len({str(j.get('video_url')) for j in manifest}))

    if fan_out > 0:
        online = online_workers(run_id)
        capped = capped_fan_out(fan_out, online)
        if capped < fan_out:
            logger.warning("fan_out=%d but the pool has %s online worker(s) besides this one: %d child run(s)",
                           fan_out, online - 1 if online else 0, capped)
        fan_out = capped
    shares = split_shares(ordered, fan_out + 1) if fan_out > 0 and ordered else [list(ordered)]
    target = _deployment_name(deployment) if len(shares) > 1 else None
    if len(shares) > 1 and target is None:
        logger.warning("fan_out=%d but this run has no deployment to fan out to; running everything here",
                       fan_out)
        shares = [list(ordered)]
    child_ids = dispatch_shares(target, shares[1:], run_id) if target else []
    dispatched_at = time.monotonic()
    if child_ids:
        logger.info("fanned out %d share(s) to %s: %s", len(child_ids), target, [str(i) for i in child_ids])

    rows, healthy = run_local(shares[0])

    children = []
    if child_ids:
        # never wait on a share no worker took: render it here
        pickup = pickup_timeout_s if pickup_timeout_s is not None else get_settings().musetalk_fanout_pickup_sec
        reclaimed = reclaim_unstarted(child_ids, dispatched_at, pickup)
        for share, child_id in [(sh, cid) for sh, cid in zip(shares[1:], child_ids) if cid in reclaimed]:
            logger.warning("no worker took child run %s; rendering its %d job(s) here", child_id, len(share))
            share_rows, ok = run_local(share)
            rows.extend(share_rows)
            healthy = healthy and ok
            children.append({"flow_run_id": str(child_id), "name": None, "state": "Cancelled",
                             "jobs": len(share), "rendered_by_parent": True})
        pending = [(sh, cid) for sh, cid in zip(shares[1:], child_ids) if cid not in reclaimed]
        shares, child_ids = [shares[0], *[sh for sh, _ in pending]], [cid for _, cid in pending]
    if child_ids:
        bound = wait_timeout_s if wait_timeout_s is not None else (
            get_settings().musetalk_job_timeout_sec * max(len(s) for s in shares[1:]) + FAN_OUT_SLACK_S)
        runs = wait_for_runs(child_ids, bound)
        for share, child_id in zip(shares[1:], child_ids):
            run = runs.get(child_id)
            share_rows, finished = gather_share(share, run, bound)
            rows.extend(share_rows)
            healthy = healthy and finished
            children.append({"flow_run_id": str(child_id), "name": run.name if run else None,
                             "state": run.state.name if run and run.state else None, "jobs": len(share)})

    position = {index: n for n, (index, _) in enumerate(ordered)}
    rows.sort(key=lambda r: position[r["index"]])  # the grouped order the jobs ran in
    csv_path = write_results(rows, results_csv_path(run_id))
    summary = summarize(rows, run_id, csv_path, children)
    publish_results(rows, summary)
    logger.info("batch done: %d ok, %d failed; %s", summary["succeeded"], summary["failed"], csv_path)
    return final_state(summary, healthy)
