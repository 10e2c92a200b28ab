"""Bodies of the orchestrator's HTTP API: the public job API (DESIGN §11) and the internal protocol (§5).
These models are also its OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from musetalk_engine.errors import MediaError
from musetalk_engine.framing import validate_framing
from orchestrator.jobs import JobStatus
from tasks.contract import JobParams
from tasks.progress import Phase, Status
from tasks.settings import WORKER_ID_PATTERN
from tasks.storage import safe_job_id


def media_rule(check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)`` — one of the workers' own input rules — with its :class:`MediaError` turned into the
    ``ValueError`` pydantic reports as a 422 naming the field: the API refuses what a worker would."""
    try:
        return check(*args)
    except MediaError as exc:
        raise ValueError(exc.message) from None


class JobCreate(BaseModel):
    """``POST /v1/avatar/jobs``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "video_url": "https://example.com/avatar.mp4", "audio_url": "https://example.com/speech.wav",
        "aspect_ratio": "9:16", "resolution": "720p", "priority": "normal", "route": "auto",
        "webhook_url": "https://example.com/hooks/musetalk", "metadata": {"order": "A-17"}}]})

    musetalk_job_id: str | None = Field(None, description="the job's id; a UUID when absent")
    video_url: str = Field(min_length=1)
    audio_url: str = Field(min_length=1)
    aspect_ratio: str | None = None
    resolution: str | None = None
    params: JobParams = Field(default_factory=JobParams)
    webhook_url: str | None = Field(None, description="POSTed the job's GET body, signed, on a terminal state")
    metadata: dict[str, Any] | None = None
    priority: Literal["urgent", "normal"] = "normal"
    route: str = Field("auto", description="auto, gpu, buffer or salad:<GPU class id>")

    @field_validator("musetalk_job_id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        # the workers' own rule (ids name files, storage keys, tags): an id they would refuse is refused here,
        # at submit, not after the job has waited in a queue
        return None if value is None else media_rule(safe_job_id, value)

    @model_validator(mode="after")
    def _framing(self) -> "JobCreate":
        media_rule(validate_framing, self.aspect_ratio, self.resolution)
        return self


class JobCreated(BaseModel):
    id: str
    status: str
    created_at: str | None


class JobError(BaseModel):
    type: str
    message: str
    stage: str | None = None
    retryable: bool = False


class JobView(BaseModel):
    """``GET /v1/avatar/jobs/{id}`` (also the webhook body)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: JobStatus
    progress: float
    phase: str | None
    route: str | None
    priority: str | None
    worker_id: str | None
    attempt: int
    output_url: str | None
    metrics: dict[str, Any] | None
    error: JobError | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    input: dict[str, Any]
    metadata: dict[str, Any] | None


class JobList(BaseModel):
    items: list[JobView]
    next_cursor: str | None


class ErrorBody(BaseModel):
    """Every 4xx of this API: ``{"error": {"type", "message"}}``."""

    error: dict[str, str]


# ---------------------------------------------------------------------------------------- internal (§5)

# A buffer worker's id: the rule its own settings check at start (tasks/settings.py says why).
WorkerId = Annotated[str, Field(pattern=WORKER_ID_PATTERN, description="letters, digits, . _ : @ -; at most 128")]
WorkerIdInPath = Annotated[str, Path(pattern=WORKER_ID_PATTERN)]
# The heartbeat's error text is the worker's last failures (it sends at most 500 characters): kept, cut.
MAX_HEARTBEAT_ERROR_CHARS = 1000
MAX_GPU_CLASS_CHARS = 128

class ProgressReport(BaseModel):
    status: Status
    progress: float = Field(ge=0, le=1)
    phase: Phase
    metrics: dict[str, Any] | None = None
    error: Any = None
    # only compared with the run's holder, never stored: bounded, not held to the worker-id rule, so a
    # progress report is never refused for its sender's name
    worker_id: str | None = Field(None, max_length=256)


class Heartbeat(BaseModel):
    status: Literal["idle", "busy"]
    gpu_class: str | None = None
    capacity: int = Field(1, ge=1)
    error: str | None = None

    @field_validator("gpu_class")
    @classmethod
    def _short_class(cls, value: str | None) -> str | None:
        # cut, not refused: a refused heartbeat would make a live worker look offline
        return value[:MAX_GPU_CLASS_CHARS] if value else value

    @field_validator("error")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        # cut, not refused: a refused heartbeat would make a live worker look offline
        return value[:MAX_HEARTBEAT_ERROR_CHARS] if value else value


class ClaimRequest(BaseModel):
    worker_id: WorkerId


class StatusReport(BaseModel):
    status: Literal["succeeded", "failed"]
    error: Any = None
    output_url: str | None = None
    metrics: dict[str, Any] | None = None
