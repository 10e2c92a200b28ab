"""Error classes shared by the engine and everything above it.

Two families matter to the service: :class:`MediaError` (the customer's input is bad: HTTP 422, never
retried) and :class:`ProcessingError` (the worker failed: HTTP 500, ``retryable`` says whether a retry
may help). Every error names the stage it happened in, using the stage names of the HTTP contract.
"""

from __future__ import annotations

from typing import Any

# The job contract's stages (DESIGN §4); an error's ``stage`` is one of them.
JOB_STAGES = ("download", "validation", "preprocessing", "inference", "postprocessing", "upload")


class MuseTalkError(Exception):
    """Base class: a message for humans, the pipeline stage, and structured details."""

    error_type = "processing_error"
    retryable = False

    def __init__(self, message: str, *, stage: str = "inference", details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.details = dict(details or {})


class MediaError(MuseTalkError):
    """The input media is unusable (unreachable, not media, too long, no face …). Not retryable."""

    error_type = "media_error"
    retryable = False


class NoFaceError(MediaError):
    """No face could be found in the avatar video."""

    def __init__(self, video: str, frame: int | None = None, message: str | None = None):
        where = "any frame" if frame is None else f"frame {frame}"
        super().__init__(
            message or f"no face detected in {where} of the avatar video {video!r}",
            stage="preprocessing",
            details={"video": video, "frame": frame},
        )
        self.video = video
        self.frame = frame


class ProcessingError(MuseTalkError):
    """The worker failed (OOM, storage down, crash). ``retryable`` tells the queue whether to try again."""

    def __init__(self, message: str, *, stage: str = "inference", retryable: bool = True,
                 details: dict[str, Any] | None = None):
        super().__init__(message, stage=stage, details=details)
        self.retryable = retryable


class MissingWeightsError(ProcessingError):
    """A model file is missing or unreadable; names the file and how to obtain it."""

    def __init__(self, path: str, hint: str):
        super().__init__(f"model file missing or unreadable: {path} — {hint}", stage="preprocessing",
                         retryable=False, details={"path": path})
        self.path = path
