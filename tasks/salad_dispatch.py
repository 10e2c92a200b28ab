"""Route ``salad:<class>``: run one job on SaladCloud and turn the Salad job into the job's outcome.

The job (its DESIGN §4 body) is submitted to the class's Salad job queue; Salad's job-queue worker POSTs
it to a container's ``/generate``. This module follows the Salad job to a terminal state by polling
(Salad webhooks are optional, DESIGN §11) and maps it:

* ``succeeded`` → the ``/generate`` 200 body (``status: ok``, ``output_url``, ``metrics``) is the result;
* ``failed`` → the job fails with the §4 failure body that ``/generate`` answered last (a final non-2xx);
  when Salad recorded no such body (no container ever answered) a retryable ``processing_error`` says so;
* ``cancelled`` (by :func:`follow_salad_job`'s ``is_cancelled`` or in Salad) → cancelled, no body;
* no terminal state within ``timeout_s`` → the Salad job is cancelled and the job fails, retryable.

Submit and follow are separate so that a caller that keeps no state of its own can record the Salad job
id (``on_submitted``) and, after a restart, follow the same Salad job instead of submitting it again.
Polling tolerates Salad API faults (the client retries; a fault that outlasts its retries is logged and
the next poll tries again) until the deadline.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Literal, Mapping, Optional

from pydantic import BaseModel

from tasks.contract import processing_failure
from tasks.salad import SaladApiError, SaladClient

log = logging.getLogger(__name__)

# The §4 request fields; anything else on a job (webhook_url, client metadata) stays with the orchestrator.
JOB_INPUT_FIELDS = ("musetalk_job_id", "video_url", "audio_url", "aspect_ratio", "resolution", "params")
SALAD_FINAL = ("succeeded", "failed", "cancelled")  # a Salad job's terminal statuses
DEFAULT_POLL_S = 2.0
DEFAULT_TIMEOUT_S = 3 * 3600.0


class SaladOutcome(BaseModel):
    """A Salad job's end: the job's status and its §4 body (None when cancelled)."""

    status: Literal["succeeded", "failed", "cancelled"]
    salad_job_id: str
    queue: str
    body: Optional[dict[str, Any]] = None


def salad_input(job: Mapping[str, Any]) -> dict[str, Any]:
    """The body Salad's worker will POST to /generate: the job's §4 fields only, unset ones left out."""
    return {k: job[k] for k in JOB_INPUT_FIELDS if job.get(k) is not None}


def _failure(job_id: Optional[str], message: str, *, retryable: bool, reason: str) -> dict[str, Any]:
    return processing_failure(message, stage="inference", retryable=retryable, details={"reason": reason},
                              job_id=job_id)


def submit_salad_job(job: Mapping[str, Any], queue: str, client: SaladClient) -> str:
    """Queue the job in Salad; returns the Salad job id. Raises SaladApiError when Salad refuses it."""
    job_id = job.get("musetalk_job_id")
    created = client.create_job(queue, input=salad_input(job), metadata={"musetalk_job_id": job_id})
    salad_job_id = str(created["id"])
    log.info("job %s submitted to Salad queue %s as %s", job_id, queue, salad_job_id)
    return salad_job_id


def outcome_of(salad_job: Mapping[str, Any], queue: str, job_id: Optional[str]) -> SaladOutcome:
    """Map a terminal Salad job to the job's outcome (see the module doc)."""
    status = salad_job.get("status")
    output = salad_job.get("output")
    sid = str(salad_job.get("id"))
    if status == "succeeded":
        if isinstance(output, dict) and output.get("status") == "ok" and output.get("output_url"):
            return SaladOutcome(status="succeeded", salad_job_id=sid, queue=queue, body=output)
        return SaladOutcome(status="failed", salad_job_id=sid, queue=queue, body=_failure(
            job_id, "the Salad job succeeded but /generate's answer has no output_url", retryable=True,
            reason="bad_output"))
    if status == "failed":
        if isinstance(output, dict) and output.get("status") == "failed" and output.get("error_type"):
            return SaladOutcome(status="failed", salad_job_id=sid, queue=queue, body=output)
        return SaladOutcome(status="failed", salad_job_id=sid, queue=queue, body=_failure(
            job_id, "the Salad job failed without an answer from /generate (no container took it, or it "
            "crashed)", retryable=True, reason="salad_failed"))
    return SaladOutcome(status="cancelled", salad_job_id=sid, queue=queue)


class SaladJobTimeout(RuntimeError):
    """A Salad job did not end within its deadline (it has been cancelled in Salad)."""

    def __init__(self, salad_job_id: str, timeout_s: float, last_status: Optional[str]):
        super().__init__(f"the Salad job did not finish within {timeout_s:g} s (last status {last_status})")
        self.salad_job_id, self.timeout_s, self.last_status = salad_job_id, timeout_s, last_status


def wait_salad_job(
    queue: str,
    salad_job_id: str,
    client: SaladClient,
    *,
    poll_s: float = DEFAULT_POLL_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    is_cancelled: Optional[Callable[[], bool]] = None,
    on_status: Optional[Callable[[str], None]] = None,
) -> Optional[dict[str, Any]]:
    """Poll a Salad job until it ends: the terminal Salad job, whatever its input was (a §4 job or a
    benchmark). None when ``is_cancelled()`` said so; :class:`SaladJobTimeout` past ``timeout_s``. Both
    cancel the Salad job first, so no container keeps working on it.

    ``on_status`` hears each new Salad status (pending → running → …), e.g. to mark the run running.
    """
    deadline = time.monotonic() + timeout_s
    seen: Optional[str] = None
    while True:
        if is_cancelled is not None and is_cancelled():
            _cancel(client, queue, salad_job_id)
            return None
        try:
            salad_job = client.get_job(queue, salad_job_id)
        except SaladApiError as exc:
            if not exc.retryable:
                raise
            log.warning("Salad job %s: status unreadable for now (%s)", salad_job_id, exc)
            salad_job = None
        if salad_job is not None:
            status = str(salad_job.get("status"))
            if status != seen:
                seen = status
                if on_status is not None:
                    on_status(status)
            if status in SALAD_FINAL:
                return salad_job
        if time.monotonic() >= deadline:
            _cancel(client, queue, salad_job_id)
            raise SaladJobTimeout(salad_job_id, timeout_s, seen)
        time.sleep(poll_s)


def follow_salad_job(
    queue: str,
    salad_job_id: str,
    client: SaladClient,
    *,
    job_id: Optional[str] = None,
    **wait: Any,
) -> SaladOutcome:
    """Poll a Salad job until it ends (or the deadline, or ``is_cancelled()``; ``wait`` →
    :func:`wait_salad_job`) and map it to the job's outcome; see the module doc."""
    try:
        salad_job = wait_salad_job(queue, salad_job_id, client, **wait)
    except SaladJobTimeout as exc:
        return SaladOutcome(status="failed", salad_job_id=salad_job_id, queue=queue, body=_failure(
            job_id, str(exc), retryable=True, reason="timeout"))
    if salad_job is None:
        return SaladOutcome(status="cancelled", salad_job_id=salad_job_id, queue=queue)
    return outcome_of(salad_job, queue, job_id)


def _cancel(client: SaladClient, queue: str, salad_job_id: str) -> None:
    try:
        client.cancel_job(queue, salad_job_id)
    except SaladApiError as exc:  # best effort: a finished job cannot be cancelled, and that is fine
        log.warning("could not cancel Salad job %s: %s", salad_job_id, exc)


def dispatch_to_salad(
    job: Mapping[str, Any],
    queue: str,
    client: SaladClient,
    *,
    on_submitted: Optional[Callable[[str], None]] = None,
    **follow: Any,
) -> SaladOutcome:
    """Submit the job to ``queue`` and follow it to the end (``follow`` → :func:`follow_salad_job`)."""
    salad_job_id = submit_salad_job(job, queue, client)
    if on_submitted is not None:
        on_submitted(salad_job_id)
    return follow_salad_job(queue, salad_job_id, client, job_id=job.get("musetalk_job_id"), **follow)
