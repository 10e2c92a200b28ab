"""The job contract (DESIGN §4) in one place: the request a job arrives as, the bodies it gets back
(success, failure), their metrics, and the :class:`JobOutcome` (HTTP status + body) that every caller
passes around — the ``generate``/``batch`` flows, the serve process's HTTP app (its OpenAPI schema is these
models), its render queue and buffer loop, the benchmark endpoint and the CLI.

Bodies travel as plain dicts (what goes on the wire, and what Prefect persists as a flow result); the
models below describe them, and the helpers here are the only places that build a failure body."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from musetalk_engine.avatar import PrepareParams
from musetalk_engine.errors import JOB_STAGES, MediaError, MuseTalkError
from musetalk_engine.framing import validate_framing
from tasks.logs import scrub_urls
from tasks.settings import redact

__all__ = ["JOB_STAGES", "JobParams", "JobRequest", "JobMetrics", "JobSuccess", "JobFailure", "JobOutcome",
           "describe_errors", "progress_error", "disk_full", "failure_status", "failure_body", "failure_outcome",
           "processing_failure", "unavailable", "timed_out", "outcome_from_state"]

JobStage = Literal[JOB_STAGES]  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------------- request

class JobParams(BaseModel):
    """Optional engine overrides a job may carry in ``params``."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int | None = Field(None, ge=1, le=256)
    # the avatar settings a job may change, with the engine's own defaults and bounds
    extra_margin: int = PrepareParams.model_fields["extra_margin"]
    parsing_mode: str = PrepareParams.model_fields["parsing_mode"]
    left_cheek_width: int = PrepareParams.model_fields["left_cheek_width"]
    right_cheek_width: int = PrepareParams.model_fields["right_cheek_width"]
    blur_factor: float = PrepareParams.model_fields["blur_factor"]
    fps: float = PrepareParams.model_fields["fps"]
    keep_source_size: bool = False  # ignore aspect_ratio/resolution and keep the source frame

    def prepare_params(self, landmarks: str) -> PrepareParams:
        return PrepareParams(landmarks=landmarks, **self.model_dump(exclude={"batch_size", "keep_source_size"}))


class JobRequest(BaseModel):
    """``POST /generate`` body; also one row of a batch manifest and a claimed buffer job. Unknown fields
    are ignored."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "musetalk_job_id": "job-123", "video_url": "https://example.com/avatar.mp4",
        "audio_url": "https://example.com/speech.wav", "aspect_ratio": "9:16", "resolution": "720p",
        "params": {"batch_size": 16}}]})

    musetalk_job_id: str = Field(min_length=1)
    video_url: str = Field(min_length=1)
    audio_url: str = Field(min_length=1)
    aspect_ratio: str | None = None
    resolution: str | None = None
    params: JobParams = Field(default_factory=JobParams)

    @classmethod
    def parse(cls, data: Any) -> "JobRequest":
        """Validate a request, turning every problem into a 422 ``media_error`` naming the field."""
        try:
            job = cls.model_validate(data)
        except ValidationError as exc:
            raise MediaError(f"invalid job request: {describe_errors(exc.errors())}", stage="validation") from None
        validate_framing(job.aspect_ratio, job.resolution)
        return job


# ------------------------------------------------------------------------------------------- bodies

class JobMetrics(BaseModel):
    """``metrics`` of a success body: DESIGN §4's fields, plus what the render measured."""

    model_config = ConfigDict(extra="allow")

    GENERATION_TIME_SEC: float
    SCRIPT_WALL_TIME_SEC: float  # the whole job, upload included: equal to total_time
    PEAK_VRAM_MIB: float | None = None
    PEAK_RAM_KB: int | None = None
    gpu_class: str | None = None
    frames: int | None = None
    fps: float | None = None
    batch_size: int | None = None
    avatar_cached: bool | None = None  # the avatar came from a cache (Prefect's or the engine's)
    engine_stage_times: dict[str, float] = {}  # the render's own stages (decode, unet, blend, …)
    stage_times: dict[str, float] = {}  # the contract's stages
    total_time: float


class JobSuccess(BaseModel):
    """200: the result is stored; ``output_url`` is always present."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]
    b2_bucket: str
    b2_file_name: str
    output_url: str
    musetalk_job_id: str
    model_version: str | None = None
    metrics: JobMetrics


class JobFailure(BaseModel):
    """422 ``media_error`` (bad input, final) or 500/503 ``processing_error`` (worker fault; ``retryable``)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["failed"]
    error_type: Literal["media_error", "processing_error"]
    error_message: str
    stage: JobStage
    details: dict[str, Any] = {}
    retryable: bool
    stage_times: dict[str, float] = {}
    musetalk_job_id: str | None = None


class JobOutcome(BaseModel):
    """What a caller of a job gets: the HTTP status and the response body (a success or failure body)."""

    http_status: int
    body: dict[str, Any]

    @classmethod
    def of_flow_state(cls, state: Any) -> "JobOutcome":
        """The outcome a finished ``generate`` flow run carries (completed, or failed with its body). A run
        that timed out or crashed carries none: this raises (see :func:`outcome_from_state`)."""
        return cls.model_validate(state.result(raise_on_failure=False))


# ------------------------------------------------------------------------------------------- failures

def describe_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic's validation errors as one line, ``field.path: message; …`` (a request's body itself is
    ``body``), for the 422 that names what was wrong."""
    def part(p: Any) -> str:  # a key the customer chose may be as long as the body: the reason must still show
        text = str(p)
        return text if len(text) <= 64 else text[:64] + "…"

    return "; ".join(f"{'.'.join(part(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                     for e in errors)


def progress_error(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``error`` the orchestrator's progress endpoint takes, from a failure body."""
    return {"type": body["error_type"], "message": body["error_message"], "stage": body["stage"]}


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause/context chain) is a full disk: ENOSPC from Python, or
    ffmpeg's "No space left on device" inside an encoder error message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def failure_status(error_type: str | None) -> int:
    """The HTTP status of a failure body: 422 for bad media (final), 500 for a worker fault."""
    return 422 if error_type == "media_error" else 500


def failure_body(exc: BaseException, stage_times: dict[str, float], stage: str = "inference") -> tuple[int, dict]:
    """(HTTP status, body) for a failed job: 422 for bad media, 500 for worker faults."""
    if not isinstance(exc, MediaError) and disk_full(exc):
        # Say it plainly: the raw errors ("could not write …", an ffmpeg tail) hide the cause, and the
        # operator must know this worker needs cleaning while the job itself can run elsewhere.
        where = exc.stage if isinstance(exc, MuseTalkError) else stage
        body = {"status": "failed", "error_type": "processing_error",
                "error_message": f"the worker's disk is full (no space left on device) during {where}; "
                                 "the job can be retried on another worker",
                "stage": where, "details": {"reason": str(exc)[-300:]}, "retryable": True,
                "stage_times": stage_times}
        return 500, body
    if isinstance(exc, MuseTalkError):
        status = failure_status(exc.error_type)
        body = {"status": "failed", "error_type": exc.error_type, "error_message": exc.message,
                "stage": exc.stage, "details": exc.details, "retryable": exc.retryable}
    else:  # an unexpected crash is a worker fault; retrying on another worker may help
        status = 500
        body = {"status": "failed", "error_type": "processing_error",
                # scrubbed: a library's message may quote a URL with its signature (or an internal one)
                "error_message": scrub_urls(f"{type(exc).__name__}: {exc}")[:500], "stage": stage, "details": {},
                "retryable": True}
    body["stage_times"] = stage_times
    return status, body


def failure_outcome(exc: BaseException, *, stage: str, job_id: str | None,
                    stage_times: dict[str, float] | None = None) -> JobOutcome:
    """:func:`failure_body` of job ``job_id`` as its outcome."""
    status, body = failure_body(exc, dict(stage_times or {}), stage)
    return JobOutcome(http_status=status, body={**body, "musetalk_job_id": job_id})


def processing_failure(message: str, *, stage: str = "preprocessing", retryable: bool = True,
                       details: dict[str, Any] | None = None, job_id: str | None = None) -> dict[str, Any]:
    """A worker-side ``processing_error`` body that no exception produced (busy, timed out, stuck …)."""
    return {"status": "failed", "error_type": "processing_error", "error_message": message, "stage": stage,
            "details": dict(details or {}), "retryable": retryable, "stage_times": {},
            "musetalk_job_id": job_id}


def unavailable(reason: str, message: str, job_id: str | None = None) -> JobOutcome:
    """503 (Salad's queue retries it elsewhere): not ready, busy, draining."""
    return JobOutcome(http_status=503, body=processing_failure(message, details={"reason": reason}, job_id=job_id))


def timed_out(timeout: float, job_id: str | None) -> JobOutcome:
    """500 for a job that did not finish within its timeout."""
    return JobOutcome(http_status=500, body=processing_failure(
        f"the job did not finish within its timeout of {timeout:g} s", stage="inference",
        details={"reason": "timeout", "timeout_sec": timeout}, job_id=job_id))


def outcome_from_state(state: Any, timeout: float, job_id: str | None) -> tuple[JobOutcome, bool]:
    """The job's outcome from a finished ``generate`` state, and whether the flow produced it itself.

    A flow that timed out or crashed carries no outcome (the flow body never returned one); those become
    a retryable 500 here."""
    try:
        return JobOutcome.of_flow_state(state), True
    except Exception:  # noqa: BLE001 — any unreadable result means the flow did not finish its own way
        pass
    if getattr(state, "name", "") == "TimedOut":
        return timed_out(timeout, job_id), False
    message = redact(f"flow run ended {getattr(state, 'name', '?')}: {getattr(state, 'message', '')}")[:500]
    return JobOutcome(http_status=500, body=processing_failure(message, stage="inference", job_id=job_id)), False
