"""Buffer mode (DESIGN §5): a local GPU machine heartbeats to the orchestrator and claims jobs from it.

Two threads, so a render never delays a heartbeat (the old worker blocked its event loop while rendering
and the orchestrator marked it offline mid-job):

* ``buffer-heartbeat`` POSTs ``{status: idle|busy, gpu_class, capacity, error}`` every
  ``BUFFER_POLL_INTERVAL_SEC``, measured start to start, also while a job renders. ``error`` carries the
  failures seen since the last heartbeat that got through (its own, the claim's, a report's, a failed
  model load), so a problem is visible in the orchestrator even when it was the orchestrator that failed.
* ``buffer-claim`` claims only when the worker is warm, a render slot is free (HTTP jobs running or
  waiting take slots too) and it holds fewer than ``capacity`` claimed jobs; it waits one interval after
  ``{"job": null}``. A claimed job goes to the process's render queue (shared with ``/generate``) at once,
  so the next claim may follow while it renders (``BUFFER_CAPACITY`` > 1 on a several-GPU worker).
* ``buffer-job`` (one per claimed job, at most ``capacity``): waits for the job's outcome, then reports
  ``succeeded`` with ``output_url`` and metrics, or ``failed`` with the error. A success without
  ``output_url`` is reported as a failure, never a success. The claim is held until the report is done,
  so with capacity 1 the next claim comes after the report, as the orchestrator expects.

The heartbeat says ``idle`` only when a claim could be made now, so ``busy`` means every slot (or every
claim the capacity allows) is taken; a partly used several-GPU worker heartbeats ``idle``.

An orchestrator that is down or answers non-2xx gets bounded exponential backoff (the interval doubled
per consecutive failure, capped); every response is logged by :class:`tasks.progress.OrchestratorClient`.
On shutdown the loop stops claiming; a job that the shutdown abandons is not reported, since the
orchestrator requeues the job of a worker whose heartbeats stop.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Protocol

from tenacity import RetryCallState, RetryError, Retrying, stop_after_attempt

from tasks.contract import processing_failure
from tasks.progress import OrchestratorClient
from tasks.settings import Settings, redact

log = logging.getLogger(__name__)

# How a heartbeat's error starts when the worker's models did not load: it will never claim (the orchestrator
# queues nothing behind it)
LOAD_FAILED = "model load failed"

# Well under the orchestrator's offline window (MUSETALK_WORKER_OFFLINE_SEC, 30 s): after an orchestrator
# outage the first heartbeat must arrive before the window closes, or a live worker's job is requeued.
HEARTBEAT_BACKOFF_CAP_SEC = 5.0
CLAIM_BACKOFF_CAP_SEC = 60.0
REPORT_ATTEMPTS = 5
MAX_ERROR_CHARS = 500
# Outcomes the shutdown produced: the job did not really run, the orchestrator will requeue it.
SHUTDOWN_REASONS = ("abandoned", "draining")


def backoff_delay(base: float, failures: int, cap: float) -> float:
    """``base`` after a success, doubled per consecutive failure, never above ``max(base, cap)``."""
    if failures <= 0:
        return base
    return min(base * 2 ** min(failures, 30), max(base, cap))


class _ShuttingDown(Exception):
    """The worker stopped while a report waited for its next attempt."""


class TicketLike(Protocol):
    """What the render queue hands back for a submitted job (see :class:`deployments.render_queue.Ticket`)."""

    future: Any
    started: float | None


class _Errors:
    """Failure texts waiting to be carried by the next heartbeat that gets through."""

    def __init__(self, keep: int = 5):
        self._lock = threading.Lock()
        self._items: list[str] = []
        self._keep = keep

    def add(self, text: str) -> None:
        with self._lock:
            if not self._items or self._items[-1] != text:
                self._items = (self._items + [text])[-self._keep:]

    def snapshot(self) -> tuple[str | None, int]:
        with self._lock:
            return ("; ".join(self._items) or None), len(self._items)

    def delivered(self, n: int) -> None:
        with self._lock:
            del self._items[:n]


class BufferLoop:
    """Heartbeat and claim threads of one buffer worker, holding up to ``capacity`` claimed jobs at once.

    ``busy()``: no render slot is free for another job now (the render queue's ``full``); ``stuck(ticket)``:
    that job has rendered far past its timeout."""

    def __init__(self, client: OrchestratorClient, *, interval: float, capacity: int,
                 submit: Callable[[dict[str, Any], str | None], TicketLike],
                 ready: Callable[[], bool], busy: Callable[[], bool],
                 gpu_class: Callable[[], str | None] = lambda: None,
                 load_error: Callable[[], str | None] = lambda: None,
                 stuck: Callable[[TicketLike], bool] = lambda ticket: False):
        self.client = client
        self.interval = float(interval)
        self.capacity = int(capacity)
        self._submit, self._ready, self._busy = submit, ready, busy
        self._gpu_class, self._load_error = gpu_class, load_error
        self._stuck = stuck
        self.errors = _Errors()
        self._stop_claims = threading.Event()
        self._stop_all = threading.Event()
        # buffer job ids claimed and not yet reported; the claim thread waits on it while it is full
        self._held: set[str] = set()
        self._held_changed = threading.Condition()
        # daemon threads, like the claim thread: a job stuck in native code must not hold the process at exit
        self._following: set[threading.Thread] = set()
        self._claim_thread = threading.Thread(target=self._claim_loop, name="buffer-claim", daemon=True)
        self._beat_thread = threading.Thread(target=self._heartbeat_loop, name="buffer-heartbeat", daemon=True)

    @classmethod
    def from_service(cls, service: Any) -> "BufferLoop":
        """The loop of a :class:`deployments.serve.WorkerService` (shares its render queue); it holds
        BUFFER_CAPACITY claims at once, at most and by default one per render slot."""
        settings: Settings = service.settings
        client = OrchestratorClient.from_settings(settings)
        if client is None or not client.buffer_base_url:
            raise ValueError("BUFFER_WORKER_ID is set but neither BUFFER_ORCHESTRATOR_BASE_URL nor "
                             "ORCHESTRATOR_BASE_URL is: buffer mode cannot reach the orchestrator")
        slots = service.queue.slots
        capacity = settings.buffer_claims(slots)
        if settings.buffer_capacity > capacity:
            log.warning("BUFFER_CAPACITY=%d but this process has %d render slot(s) (MUSETALK_DEVICES); it claims "
                        "at most %d job(s) at once", settings.buffer_capacity, slots, capacity)
        return cls(client, interval=settings.buffer_poll_interval_sec, capacity=capacity,
                   submit=service.queue.submit, ready=lambda: service.ready and not service.draining,
                   busy=lambda: service.queue.full, gpu_class=lambda: service.gpu_class,
                   load_error=lambda: service.load_error, stuck=service.ticket_stuck)

    @property
    def held(self) -> int:
        """Claimed jobs not reported yet."""
        with self._held_changed:
            return len(self._held)

    # --- lifecycle

    def start(self) -> None:
        log.info("buffer mode: worker %s, heartbeat every %.1f s to %s", self.client.worker_id,
                 self.interval, self.client.buffer_base_url)
        self._beat_thread.start()
        self._claim_thread.start()

    def stop_claiming(self) -> None:
        """No new claims; heartbeats go on (the running jobs are still this worker's)."""
        self._stop_claims.set()
        with self._held_changed:
            self._held_changed.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread (the claimed jobs' threads first report the jobs that finished)."""
        self.stop_claiming()
        deadline = time.monotonic() + timeout
        if self._claim_thread.is_alive():
            self._claim_thread.join(timeout)
        with self._held_changed:
            following = set(self._following)
        for thread in following:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop_all.set()
        if self._beat_thread.is_alive():
            self._beat_thread.join(timeout)
        self.client.close()

    def _can_claim(self) -> bool:
        """Warm, a render slot free, a claim left under the capacity, and still claiming."""
        return (self._ready() and not self._busy() and self.held < self.capacity
                and not self._stop_claims.is_set())

    def status(self) -> str:
        """``idle`` exactly when the claim thread would claim now."""
        return "idle" if self._can_claim() else "busy"

    def _note(self, what: str, exc: BaseException) -> None:
        text = redact(f"{what}: {exc}")[:MAX_ERROR_CHARS]
        self.errors.add(text)
        log.warning("buffer %s", text)

    # --- heartbeat thread

    def heartbeat_once(self) -> bool:
        """Send one heartbeat with the pending error text; True when it got through."""
        pending, n = self.errors.snapshot()
        load_error = self._load_error()
        error = "; ".join(e for e in (f"{LOAD_FAILED}: {load_error}" if load_error else None, pending) if e)
        try:
            self.client.heartbeat(self.status(), self._gpu_class(), self.capacity, error[:MAX_ERROR_CHARS] or None)
        except Exception as exc:  # noqa: BLE001 — OrchestratorError, or anything else: next beat says so
            self._note("heartbeat failed", exc)
            return False
        self.errors.delivered(n)
        return True

    def _heartbeat_loop(self) -> None:
        failures = 0
        next_at = time.monotonic()
        while not self._stop_all.is_set():
            failures = 0 if self.heartbeat_once() else failures + 1
            # start to start, so the period holds however long a POST takes; never a burst to catch up
            next_at = max(next_at + backoff_delay(self.interval, failures, HEARTBEAT_BACKOFF_CAP_SEC),
                          time.monotonic())
            self._stop_all.wait(max(0.0, next_at - time.monotonic()))

    # --- claim thread

    def _pause_while_full(self, seconds: float) -> None:
        """Wait ``seconds``, or less: until a claimed job is reported or claiming stops."""
        with self._held_changed:
            if not self._stop_claims.is_set():
                self._held_changed.wait(seconds)

    def _claim_loop(self) -> None:
        failures = 0
        while not self._stop_claims.is_set():
            if not self._can_claim():
                self._pause_while_full(min(self.interval, 0.5))
                continue
            try:
                job = self.client.claim()
            except Exception as exc:  # noqa: BLE001
                failures += 1
                self._note("claim failed", exc)
                self._stop_claims.wait(backoff_delay(self.interval, failures, CLAIM_BACKOFF_CAP_SEC))
                continue
            failures = 0
            if job is None:
                self._stop_claims.wait(self.interval)
                continue
            started = self._start(job)
            if started is not None:
                # followed on its own thread, so the next claim need not wait for this job's end
                follower = threading.Thread(target=self._follow, args=started, daemon=True,
                                            name=f"buffer-job-{started[1]}"[:60])
                with self._held_changed:
                    self._following.add(follower)
                follower.start()

    def run_claimed(self, job: dict[str, Any]) -> None:
        """Render a claimed job on the shared render queue and report its outcome (in this thread)."""
        started = self._start(job)
        if started is not None:
            self._follow(*started)

    def _start(self, job: dict[str, Any]) -> tuple[TicketLike, str] | None:
        """Queue a claimed job for rendering and hold its claim; None when it could not be queued.

        Queued here, on the claim thread, before the next claim: the render queue then counts it, so the
        next claim sees its slot taken."""
        buffer_job_id = str(job["buffer_job_id"])
        payload = {k: v for k, v in job.items() if k != "buffer_job_id"}
        log.info("claimed buffer job %s (job %s)", buffer_job_id, payload.get("musetalk_job_id"))
        try:
            ticket = self._submit(payload, buffer_job_id)
        except Exception as exc:  # noqa: BLE001 — QueueClosed/QueueFull: we cannot run it
            self._note(f"buffer job {buffer_job_id} not started", exc)
            return None
        with self._held_changed:
            self._held.add(buffer_job_id)
        return ticket, buffer_job_id

    def _follow(self, ticket: TicketLike, buffer_job_id: str) -> None:
        """Wait for a claimed job's outcome and report it; its claim is released once that is done."""
        try:
            outcome = self._wait(ticket, buffer_job_id)
            if outcome is None:
                return
            if outcome.http_status == 503 and outcome.body.get("details", {}).get("reason") in SHUTDOWN_REASONS:
                log.warning("buffer job %s not finished (worker shutting down); not reported, the orchestrator "
                            "requeues it", buffer_job_id)
                return
            self.report(buffer_job_id, outcome.http_status, outcome.body)
        finally:
            with self._held_changed:
                self._held.discard(buffer_job_id)
                self._following.discard(threading.current_thread())
                self._held_changed.notify_all()

    def _wait(self, ticket: TicketLike, buffer_job_id: str) -> Any:
        """The job's outcome; a render stuck far past its timeout is reported failed rather than awaited;
        None once the loop is stopped (its heartbeats end, so the orchestrator requeues the job)."""
        while not self._stop_all.is_set():
            try:
                return ticket.future.result(timeout=0.5)
            except FutureTimeout:
                pass
            except Exception as exc:  # noqa: BLE001 — cancelled by the shutdown before it started
                log.warning("buffer job %s ended without an outcome: %r", buffer_job_id, exc)
                return None
            if ticket.started is not None and self._stuck(ticket):
                self._note(f"buffer job {buffer_job_id}", RuntimeError("render stuck past its timeout"))
                self.report(buffer_job_id, 500, processing_failure("the render is stuck past MUSETALK_JOB_TIMEOUT_SEC",
                                                                   stage="inference"))
                return None
        return None

    def report(self, buffer_job_id: str, http_status: int, body: dict[str, Any]) -> bool:
        """Report the outcome (retried with backoff); a success always carries ``output_url``."""
        output_url = body.get("output_url")
        if http_status == 200 and output_url:
            kwargs: dict[str, Any] = {"status": "succeeded", "output_url": output_url,
                                      "metrics": body.get("metrics")}
        else:
            if http_status == 200:  # never report success without the file's location
                body = processing_failure("the job finished without an output_url", stage="upload")
            error = {k: body.get(k) for k in ("error_type", "error_message", "stage", "retryable", "details")}
            kwargs = {"status": "failed", "error": error,
                      "metrics": {"stage_times": body.get("stage_times", {})}}
        base = min(self.interval, 1.0)

        def note(state: RetryCallState) -> None:
            self._note(f"report of buffer job {buffer_job_id} failed (attempt {state.attempt_number})",
                       state.outcome.exception())

        def pause(seconds: float) -> None:  # a shutdown ends the waiting, and the retries with it
            if self._stop_all.wait(seconds):
                raise _ShuttingDown

        try:
            Retrying(stop=stop_after_attempt(REPORT_ATTEMPTS), after=note, sleep=pause,
                     wait=lambda state: backoff_delay(base, state.attempt_number - 1, 30.0))(
                self.client.report, buffer_job_id, **kwargs)
        except (RetryError, _ShuttingDown):
            log.error("buffer job %s: outcome %s could not be reported", buffer_job_id, kwargs["status"])
            return False
        log.info("buffer job %s reported %s", buffer_job_id, kwargs["status"])
        return True
