"""The `generate` flow: one job in, the `/generate` response body out (DESIGN §4).

    download → validate → prepare avatar (cached) + audio features (cached) → render → upload

Every stage's wall time is measured; any failure becomes the contract's structured failure body and the
flow run ends Failed (with that body as its data), so Prefect's UI shows failed jobs as failed."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.states import Failed

from musetalk_engine import MODEL_VERSION
from musetalk_engine.avatar import file_sha256
from musetalk_engine.metrics import PeakRss
from tasks.engine import get_engine
from tasks.fetch import fetch_input, validate_input
from tasks.contract import JobOutcome, JobRequest, failure_outcome, progress_error
from tasks.audio import cache_audio_features
from tasks.avatar import cache_avatar
from tasks.render import render_video
from tasks.progress import ProgressReporter
from tasks.settings import get_settings
from tasks.storage import build_sidecar, safe_job_id, storage_from_settings, upload_result


class _Stages:
    """Wall time per contract stage, and which stage is running (for failure bodies)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.current = "validation"

    @contextmanager
    def __call__(self, name: str):
        self.current = name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 4)


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


def run_job(job_data: dict[str, Any], queue_job_id: str | None = None) -> JobOutcome:
    """The job's steps; callable inside any flow (``generate`` and ``batch`` share it)."""
    settings = get_settings()
    started = time.perf_counter()
    stages = _Stages()
    logger = get_run_logger()
    job_id = str(job_data.get("musetalk_job_id") or "")
    reporter = ProgressReporter.from_settings(job_id, settings) if job_id else ProgressReporter(None, "")
    rss = PeakRss().start()
    try:
        with stages("validation"):
            job = JobRequest.parse(job_data)
            safe_id = safe_job_id(job.musetalk_job_id)
        reporter.update("preparing", 0.0)
        work = settings.job_work_root
        work.mkdir(parents=True, exist_ok=True)
        if remove_stale_workspaces(work, safe_id):
            logger.warning("job %s: removed the workspace of an earlier, interrupted run", job.musetalk_job_id)
        with tempfile.TemporaryDirectory(prefix=f"job-{safe_id}-", dir=work) as tmp:
            tmp_path = Path(tmp)
            with stages("download"):
                video = fetch_input(job.video_url, input_path(tmp_path, job.video_url, "video"), "video")
                audio = fetch_input(job.audio_url, input_path(tmp_path, job.audio_url, "audio"), "audio")
            with stages("validation"):
                validate_input(video, "video")
                validate_input(audio, "audio")
            with stages("preprocessing"):
                engine = get_engine(settings)
                params = job.params.prepare_params(engine.landmarks_backend).model_dump()
                video_sha, audio_sha = file_sha256(video), file_sha256(audio)
                cache_dir = settings.resolve(settings.musetalk_cache_dir)
                # a Path: Prefect reads a str as a storage block's slug
                results = cache_dir / "prefect-results"
                avatar_state = cache_avatar.with_options(result_storage=results)(
                    video, video_sha, params, engine.fingerprint, return_state=True)
                avatar = avatar_state.result()
                # skipped when Prefect's cache answered or the engine's avatar cache already had it
                avatar_cached = avatar_state.name == "Cached" or bool(avatar["engine_cache_hit"])
                cache_audio_features.with_options(result_storage=results)(
                    audio, audio_sha, engine.fingerprint, cache_dir, settings.musetalk_max_audio_sec)
                reporter.update("preparing", 0.1)

            def progress(done: int, total: int) -> None:
                reporter.update("inferring", 0.1 + 0.8 * done / max(total, 1))

            with stages("inference"):
                out = tmp_path / f"{safe_id}.mp4"
                result = render_video(video, audio, out, video_sha256=video_sha, audio_sha256=audio_sha,
                                      params=params, cache_dir=cache_dir, batch_size=job.params.batch_size,
                                      aspect_ratio=None if job.params.keep_source_size else job.aspect_ratio,
                                      resolution=None if job.params.keep_source_size else job.resolution,
                                      on_progress=progress)
            with stages("postprocessing"):
                reporter.update("encoding", 0.9)
                m = result.metrics
                metrics = {
                    "GENERATION_TIME_SEC": round(m.generation_s, 3),
                    "SCRIPT_WALL_TIME_SEC": round(time.perf_counter() - started, 3),
                    # no GPU, no VRAM figure (0.0 would claim a measurement)
                    "PEAK_VRAM_MIB": (m.peak_vram_nvml_mib or m.peak_vram_mib) if m.device.startswith("cuda")
                    else None,
                    "PEAK_RAM_KB": rss.peak_kb,  # this job's peak (download to encode), not the process's
                    "gpu_class": settings.gpu_class_name or m.gpu_class,
                    "frames": m.frames, "fps": round(m.fps, 2), "batch_size": m.batch_size,
                    "avatar_cached": avatar_cached,
                    "engine_stage_times": m.stage_times,
                }
                sidecar = build_sidecar(job.musetalk_job_id, queue_job_id=queue_job_id,
                                        gpu_class=metrics["gpu_class"], aspect_ratio=job.aspect_ratio,
                                        resolution=job.resolution, metrics=metrics)
            with stages("upload"):
                reporter.update("uploading", 0.95)
                stored = upload_result(safe_id, out, sidecar, storage=storage_from_settings(settings))
        metrics["stage_times"] = dict(stages.times)
        metrics["total_time"] = round(time.perf_counter() - started, 3)
        metrics["SCRIPT_WALL_TIME_SEC"] = metrics["total_time"]
        body = {"status": "ok", "b2_bucket": stored.bucket, "b2_file_name": stored.file_name,
                "output_url": stored.output_url, "musetalk_job_id": job.musetalk_job_id,
                "model_version": MODEL_VERSION, "metrics": metrics}
        reporter.finish(metrics, output_url=stored.output_url)
        logger.info("job %s done: %d frames in %.2fs", job.musetalk_job_id, m.frames, metrics["total_time"])
        return JobOutcome(http_status=200, body=body)
    except Exception as exc:  # every failure becomes the contract's body; nothing escapes as a crash
        outcome = failure_outcome(exc, stage=stages.current, job_id=job_id or None, stage_times=stages.times)
        reporter.fail(progress_error(outcome.body))
        logger.warning("job %s failed at %s: %s", job_id, outcome.body["stage"], outcome.body["error_message"])
        return outcome
    finally:
        rss.stop()
        reporter.close()


# The result is persisted (as JSON, readable by any Prefect version) so a job's outcome can be read back
# from its flow run — the orchestrator's GET reads it; without this the API answers MissingResult.
@flow(name="generate", log_prints=True, persist_result=True, result_serializer="json")
def generate(job: dict[str, Any], queue_job_id: str | None = None):
    """One lip-sync job (the `/generate` body); returns a JobOutcome, or ends Failed carrying one."""
    outcome = run_job(job, queue_job_id)
    if outcome.http_status != 200:
        return Failed(message=outcome.body["error_message"], data=outcome.model_dump())
    return outcome.model_dump()
