"""The `generate` flow: one job in, the `/generate` response body out (DESIGN §4).

    download → validate → prepare avatar (cached) + audio features (cached) → render → upload

Every stage's wall time is measured; any failure becomes the contract's structured failure body and the
flow run ends Failed (with that body as its data), so Prefect's UI shows failed jobs as failed."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.states import Failed

from musetalk_engine import MODEL_VERSION
from musetalk_engine.avatar import file_sha256
from musetalk_engine.metrics import PeakRss, StageTimer
from tasks.engine import get_engine
from tasks.fetch import fetch_input, validate_input
from tasks.contract import JobMetrics, JobOutcome, JobRequest, JobSuccess, failure_outcome, progress_error
from tasks.audio import cache_audio_features
from tasks.avatar import cache_avatar
from tasks.render import render_video
from tasks.progress import ProgressReporter
from tasks.run_overhead import heartbeats_end_without_join, untagged_task_runs
from tasks.settings import Settings, get_settings
from tasks.storage import build_sidecar, safe_job_id, storage_from_settings, upload_result

# every process that runs this flow: its runs end when their final state is reported, not up to a second
# later (see tasks/run_overhead.py)
heartbeats_end_without_join()


def remove_stale_workspaces(work: Path, safe_id: str) -> list[Path]:
    """Delete the temp directories a killed run of this same job id left in ``work`` (SIGKILL skips
    every cleanup; a requeued job runs its id again). Only exact ``job-{id}-XXXXXXXX`` names match, so
    job ``a`` never touches job ``a-b``'s directory."""
    pattern = re.compile(re.escape(f"job-{safe_id}-") + r"[a-z0-9_]{8}")
    stale = [d for d in work.glob(f"job-{safe_id}-*") if d.is_dir() and pattern.fullmatch(d.name)]
    for directory in stale:
        shutil.rmtree(directory, ignore_errors=True)
    return stale


def input_path(tmp: Path, url: str, kind: str) -> Path:
    """Where a download goes: named after the URL's file name (so messages name the customer's file,
    not ours), reduced to safe characters, in a folder per kind."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urlsplit(url).path).name).lstrip(".")[:100] or kind
    folder = tmp / kind
    folder.mkdir(exist_ok=True)
    return folder / name


def job_workspace(settings: Settings, safe_id: str, logger: Any) -> tempfile.TemporaryDirectory:
    """The job's temp directory under the work root, after removing what a killed run of it left."""
    work = settings.job_work_root
    work.mkdir(parents=True, exist_ok=True)
    if remove_stale_workspaces(work, safe_id):
        logger.warning("job %s: removed the workspace of an earlier, interrupted run", safe_id)
    return tempfile.TemporaryDirectory(prefix=f"job-{safe_id}-", dir=work)


def for_both_inputs(task: Any, video_args: tuple, audio_args: tuple) -> tuple[Any, Any]:
    """``task`` on the video and on the audio at once, each its own task run on the flow's task runner:
    two downloads or two probes overlap instead of adding up (a probe is ~0.1 s of process start on a
    busy CPU; a download is a network round trip or more). Both are waited for, so neither outlives the
    job's workspace, and a failure is raised video first, as when they ran one after the other."""
    futures = [task.submit(*video_args), task.submit(*audio_args)]
    wait(futures)
    return futures[0].result(), futures[1].result()


class Prepared(NamedTuple):
    """What preprocessing hands the render: the avatar settings, both inputs' content hashes and where
    the cached audio features are."""

    params: dict[str, Any]
    video_sha256: str
    audio_sha256: str
    cache_dir: Path
    avatar_cached: bool


def prepare_inputs(settings: Settings, job: JobRequest, video: Path, audio: Path) -> Prepared:
    """The avatar and the audio features, each from Prefect's cache when an earlier run made them."""
    engine = get_engine(settings)
    params = job.params.prepare_params(engine.landmarks_backend).model_dump()
    video_sha, audio_sha = file_sha256(video), file_sha256(audio)
    cache_dir = settings.resolve(settings.musetalk_cache_dir)
    results = cache_dir / "prefect-results"  # a Path: Prefect reads a str as a storage block's slug
    avatar_state = cache_avatar.with_options(result_storage=results)(
        video, video_sha, params, engine.fingerprint, return_state=True)
    cache_audio_features.with_options(result_storage=results)(
        audio, audio_sha, engine.fingerprint, cache_dir, settings.musetalk_max_audio_sec)
    # skipped when Prefect's cache answered or the engine's avatar cache already had it
    avatar_cached = avatar_state.name == "Cached" or bool(avatar_state.result()["engine_cache_hit"])
    return Prepared(params, video_sha, audio_sha, cache_dir, avatar_cached)


def run_job(job_data: dict[str, Any], queue_job_id: str | None = None) -> JobOutcome:
    """download → validate → prepare avatar + audio features (cached) → render → upload, each stage
    timed, with live progress to the orchestrator; the success body, or any failure as the contract's
    failure body (nothing escapes as a crash). Callable inside any flow (``generate`` and ``batch``).

    The caller's tags (``attempt-of:``, ``batch:``) stay on the flow run and off its task runs: on a
    task run each costs an API round trip for concurrency slots (tasks/run_overhead.py)."""
    with untagged_task_runs():
        return _run_job(job_data, queue_job_id)


def _run_job(job_data: dict[str, Any], queue_job_id: str | None) -> JobOutcome:
    settings = get_settings()
    started = time.perf_counter()
    timer = StageTimer(listed=())  # the contract's stages, in the order the job went through them
    logger = get_run_logger()
    job_id = str(job_data.get("musetalk_job_id") or "")
    reporter = ProgressReporter.from_settings(job_id, settings) if job_id else ProgressReporter(None, "")
    rss = PeakRss().start()
    try:
        with timer.stage("validation"):
            job = JobRequest.parse(job_data)
            safe_id = safe_job_id(job.musetalk_job_id)
        reporter.update("preparing", 0.0)
        with job_workspace(settings, safe_id, logger) as tmp:
            with timer.stage("download"):
                video, audio = for_both_inputs(
                    fetch_input, (job.video_url, input_path(Path(tmp), job.video_url, "video"), "video"),
                    (job.audio_url, input_path(Path(tmp), job.audio_url, "audio"), "audio"))
            with timer.stage("validation"):
                for_both_inputs(validate_input, (video, "video"), (audio, "audio"))
            with timer.stage("preprocessing"):
                prepared = prepare_inputs(settings, job, video, audio)
                reporter.update("preparing", 0.1)
            with timer.stage("inference"):
                framed = not job.params.keep_source_size
                out = Path(tmp) / f"{safe_id}.mp4"
                result = render_video(
                    video, audio, out, video_sha256=prepared.video_sha256, audio_sha256=prepared.audio_sha256,
                    params=prepared.params, cache_dir=prepared.cache_dir, batch_size=job.params.batch_size,
                    aspect_ratio=job.aspect_ratio if framed else None, resolution=job.resolution if framed else None,
                    on_progress=lambda done, total: reporter.update("inferring", 0.1 + 0.8 * done / max(total, 1)))
            with timer.stage("postprocessing"):
                reporter.update("encoding", 0.9)
                m = result.metrics
                generation = round(m.generation_s, 3)
                gpu_class = settings.gpu_class_name or m.gpu_class
                # no GPU, no VRAM figure (0.0 would claim a measurement)
                peak_vram = (m.peak_vram_nvml_mib or m.peak_vram_mib) if m.device.startswith("cuda") else None
                peak_ram = rss.peak_kb  # this job's peak (download to encode), not the process's
                # the sidecar travels with the video, so its wall time ends where the upload begins
                sidecar = build_sidecar(job.musetalk_job_id, queue_job_id=queue_job_id, gpu_class=gpu_class,
                                        aspect_ratio=job.aspect_ratio, resolution=job.resolution, metrics={
                                            "generation_time_sec": generation,
                                            "script_wall_time_sec": round(time.perf_counter() - started, 3),
                                            "peak_vram_mib": peak_vram, "peak_ram_kb": peak_ram})
            with timer.stage("upload"):
                reporter.update("uploading", 0.95)
                stored = upload_result(safe_id, out, sidecar, storage=storage_from_settings(settings))
        total = round(time.perf_counter() - started, 3)
        metrics = JobMetrics(
            GENERATION_TIME_SEC=generation, SCRIPT_WALL_TIME_SEC=total, PEAK_VRAM_MIB=peak_vram,
            PEAK_RAM_KB=peak_ram, gpu_class=gpu_class, frames=m.frames, fps=round(m.fps, 2),
            batch_size=m.batch_size, avatar_cached=prepared.avatar_cached, engine_stage_times=m.stage_times,
            stage_times=timer.as_dict(), total_time=total).model_dump()
        reporter.finish(metrics, output_url=stored.output_url)
        logger.info("job %s done: %d frames in %.2fs", job.musetalk_job_id, m.frames, total)
        return JobOutcome(http_status=200, body=JobSuccess(
            status="ok", b2_bucket=stored.bucket, b2_file_name=stored.file_name, output_url=stored.output_url,
            musetalk_job_id=job.musetalk_job_id, model_version=MODEL_VERSION, metrics=metrics).model_dump())
    except Exception as exc:  # every failure becomes the contract's body; nothing escapes as a crash
        outcome = failure_outcome(exc, stage=timer.current or "validation", job_id=job_id or None,
                                  stage_times=timer.as_dict())
        reporter.fail(progress_error(outcome.body))
        logger.warning("job %s failed at %s: %s", job_id, outcome.body["stage"], outcome.body["error_message"])
        return outcome
    finally:
        rss.stop()
        reporter.close()


@flow(name="generate", log_prints=True, persist_result=True, result_serializer="json")
def generate(job: JobRequest, queue_job_id: str | None = None):
    """One lip-sync job (the `/generate` body); returns a JobOutcome, or ends Failed carrying one.

    ``job`` is typed: Prefect's UI shows the job's fields as a form and the server refuses an invalid job
    before a run exists (callers that take bodies from customers validate first and answer 422 themselves)."""
    if isinstance(job, JobRequest):  # back to the body as sent: run_job parses (and reports) it itself
        job = job.model_dump(mode="json", exclude_unset=True)
    outcome = run_job(job, queue_job_id)
    if outcome.http_status != 200:
        return Failed(message=outcome.body["error_message"], data=outcome.model_dump())
    return outcome.model_dump()
