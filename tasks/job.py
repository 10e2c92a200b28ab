"""The job request of the HTTP contract (DESIGN §4) and the response bodies it gets back."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from musetalk_engine.avatar import PrepareParams
from musetalk_engine.errors import MediaError, MuseTalkError
from musetalk_engine.framing import validate_framing


class JobParams(BaseModel):
    """Optional engine overrides a job may carry in ``params``."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int | None = Field(None, ge=1, le=256)
    # the avatar settings a job may change, with the engine's own defaults and bounds
    extra_margin: int = PrepareParams.model_fields["extra_margin"]
    parsing_mode: str = PrepareParams.model_fields["parsing_mode"]
    left_cheek_width: int = PrepareParams.model_fields["left_cheek_width"]
    right_cheek_width: int = PrepareParams.model_fields["right_cheek_width"]
    fps: float = PrepareParams.model_fields["fps"]
    keep_source_size: bool = False  # ignore aspect_ratio/resolution and keep the source frame

    def prepare_params(self, landmarks: str) -> PrepareParams:
        return PrepareParams(landmarks=landmarks, **self.model_dump(exclude={"batch_size", "keep_source_size"}))


class JobRequest(BaseModel):
    """``POST /generate`` body; also one row of a batch manifest."""

    model_config = ConfigDict(extra="ignore")

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


def describe_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic's validation errors as one line, ``field.path: message; …`` (a request's body itself is
    ``body``), for the 422 that names what was wrong."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
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
        status = 422 if exc.error_type == "media_error" else 500
        body = {"status": "failed", "error_type": exc.error_type, "error_message": exc.message,
                "stage": exc.stage, "details": exc.details, "retryable": exc.retryable}
    else:  # an unexpected crash is a worker fault; retrying on another worker may help
        status = 500
        body = {"status": "failed", "error_type": "processing_error",
                "error_message": f"{type(exc).__name__}: {exc}"[:500], "stage": stage, "details": {},
                "retryable": True}
    body["stage_times"] = stage_times
    return status, body
