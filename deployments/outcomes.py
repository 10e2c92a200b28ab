"""The worker's HTTP outcomes that no flow produced: not ready / busy / draining (503), a job past its
timeout or a flow run that ended without its own outcome (500). Bodies follow DESIGN §4."""

from __future__ import annotations

from typing import Any

from flows.generate import JobOutcome, outcome_of
from tasks.settings import redact


def failed_body(message: str, *, stage: str = "preprocessing", retryable: bool = True,
                details: dict[str, Any] | None = None, job_id: str | None = None) -> dict[str, Any]:
    """A worker-side ``processing_error`` body of the contract (DESIGN §4)."""
    return {"status": "failed", "error_type": "processing_error", "error_message": message, "stage": stage,
            "details": dict(details or {}), "retryable": retryable, "stage_times": {},
            "musetalk_job_id": job_id}


def unavailable(reason: str, message: str, job_id: str | None = None) -> JobOutcome:
    """503 (Salad's queue retries it elsewhere): not ready, busy, draining."""
    return JobOutcome(http_status=503, body=failed_body(message, details={"reason": reason}, job_id=job_id))


def timed_out(timeout: float, job_id: str | None) -> JobOutcome:
    return JobOutcome(http_status=500, body=failed_body(
        f"the job did not finish within its timeout of {timeout:g} s", stage="inference",
        details={"reason": "timeout", "timeout_sec": timeout}, job_id=job_id))


def outcome_from_state(state: Any, timeout: float, job_id: str | None) -> tuple[JobOutcome, bool]:
    """The job's outcome from a finished ``generate`` state, and whether the flow produced it itself.

    A flow that timed out or crashed carries no outcome (the flow body never returned one); those become
    a retryable 500 here."""
    try:
        return outcome_of(state), True
    except Exception:  # noqa: BLE001 — any unreadable result means the flow did not finish its own way
        pass
    if getattr(state, "name", "") == "TimedOut":
        return timed_out(timeout, job_id), False
    message = redact(f"flow run ended {getattr(state, 'name', '?')}: {getattr(state, 'message', '')}")[:500]
    return JobOutcome(http_status=500, body=failed_body(message, stage="inference", job_id=job_id)), False
