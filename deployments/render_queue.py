"""The single render thread of a worker process: jobs run one at a time, in arrival order (one GPU per
process), with a bounded wait list, shutdown (close / wait_idle) and abandoning a stuck job."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from tasks.contract import JobOutcome, failure_outcome, unavailable

log = logging.getLogger(__name__)

# How long an abandoned render gets to unwind after the exception is raised in its thread.
ABANDON_WAIT_SEC = 5.0


class QueueFull(RuntimeError):
    """More jobs are waiting than ``MUSETALK_MAX_QUEUED`` allows."""


class QueueClosed(RuntimeError):
    """The worker is shutting down."""


class JobAbandoned(BaseException):
    """Raised inside the render thread to abandon its job at shutdown.

    A BaseException, like Prefect's own cancellation, so the job's ``except Exception`` handlers do not
    swallow it: the flow run ends Crashed and every ``finally``/``with`` on the way out still runs."""


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException] | None) -> bool:
    """Schedule ``exc_type`` in ``thread`` (raised at its next Python instruction, not inside a C call);
    ``None`` withdraws one still pending. Prefect cancels sync flow runs in threads the same way."""
    if thread.ident is None:
        return False
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), exc)
    return n == 1


@dataclass
class Ticket:
    """One submitted job: its input, its result future, and when it started rendering."""

    job: dict[str, Any]
    queue_job_id: str | None
    run: Callable[[dict[str, Any], str | None], JobOutcome] | None = None  # None: the queue's own
    timeout: float | None = None  # how long it may run; None: the worker's job timeout
    future: Future = field(default_factory=Future)
    started: float | None = None

    @property
    def job_id(self) -> str | None:
        return self.job.get("musetalk_job_id")


class RenderQueue:
    """The single render thread: jobs run one at a time, in arrival order (one GPU per process).

    ``run(job, queue_job_id)`` must return a :class:`JobOutcome`; it runs on the render thread only."""

    def __init__(self, run: Callable[[dict[str, Any], str | None], JobOutcome], *, max_queued: int = 4):
        self._run = run
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._current: Ticket | None = None
        self._abandoned: Ticket | None = None
        self._closed = False
        # daemon: an abandoned render stuck in native code must not keep the process alive at exit
        self._thread = threading.Thread(target=self._loop, name="render", daemon=True)

    # --- state

    @property
    def busy(self) -> bool:
        """A job is rendering or waiting."""
        with self._cond:
            return self._current is not None or any(not t.future.cancelled() for t in self._waiting)

    @property
    def current(self) -> Ticket | None:
        return self._current

    def running_for(self) -> float:
        """Seconds the current job has been rendering (0 when idle)."""
        t = self._current
        return time.monotonic() - t.started if t is not None and t.started is not None else 0.0

    # --- use

    def submit(self, job: dict[str, Any], queue_job_id: str | None = None, *,
               run: Callable[[dict[str, Any], str | None], JobOutcome] | None = None,
               timeout: float | None = None) -> Ticket:
        """Queue a job (run by ``run`` instead of the queue's own callable when given: other GPU work,
        such as a benchmark, waits its turn like a render); raises QueueFull past the bound, QueueClosed
        while shutting down."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the worker is shutting down")
            waiting = sum(1 for t in self._waiting if not t.future.cancelled())
            pending = waiting + (self._current is not None)
            if pending >= 1 + self.max_queued:
                raise QueueFull(f"{waiting} job(s) already waiting for the GPU (MUSETALK_MAX_QUEUED="
                                f"{self.max_queued})")
            ticket = Ticket(dict(job), queue_job_id, run, timeout)
            self._waiting.append(ticket)
            if self._thread.ident is None:  # started on first use: an app that never serves has no thread
                self._thread.start()
            self._cond.notify_all()
            return ticket

    def close(self) -> int:
        """Refuse new jobs and cancel the waiting ones (their futures end cancelled); returns how many."""
        with self._cond:
            self._closed = True
            cancelled = sum(1 for t in self._waiting if t.future.cancel())
            self._waiting.clear()
            self._cond.notify_all()
            return cancelled

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing renders or waits (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._current is not None or self._waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def abandon(self, wait: float = ABANDON_WAIT_SEC) -> bool:
        """Raise :class:`JobAbandoned` in the render thread and wait for it to unwind; True when it did.

        Raised once per job: a second exception could cut the first one's cleanup short."""
        with self._cond:
            ticket = self._current
            if ticket is None:
                return True
            if self._abandoned is not ticket:
                self._abandoned = ticket
                log.warning("abandoning job %s after %.0f s of rendering", ticket.job_id, self.running_for())
                _raise_in_thread(self._thread, JobAbandoned)
        try:
            ticket.future.exception(timeout=wait)
            return True
        except Exception:  # noqa: BLE001 — concurrent.futures.TimeoutError: still stuck in native code
            log.error("job %s did not unwind within %.0f s; exiting anyway", ticket.job_id, wait)
            return False

    # --- the thread

    def _next(self) -> Ticket | None:
        with self._cond:
            while True:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return None
                ticket = self._waiting.popleft()
                if ticket.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
                    ticket.started = time.monotonic()
                    self._current = ticket
                    return ticket

    def _loop(self) -> None:
        ticket: Ticket | None = None
        while True:
            try:
                ticket = self._next()
                if ticket is None:
                    return
                self._finish(ticket, self._run_ticket(ticket))
            except JobAbandoned:  # landed just after the job returned (see abandon): settle it, go on
                if ticket is not None:
                    self._finish(ticket, unavailable("abandoned", "the worker shut down", ticket.job_id))

    def _run_ticket(self, ticket: Ticket) -> JobOutcome:
        try:
            return (ticket.run or self._run)(ticket.job, ticket.queue_job_id)
        except JobAbandoned:
            return unavailable("abandoned", "the worker shut down before the job finished", ticket.job_id)
        except BaseException as exc:  # noqa: BLE001 — the render thread must survive any job
            log.exception("job %s crashed the render call", ticket.job_id)
            return failure_outcome(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)),
                                   stage="inference", job_id=ticket.job_id)

    def _finish(self, ticket: Ticket, outcome: JobOutcome) -> None:
        with self._cond:
            if self._current is ticket:
                self._current = None
                # abandon() schedules its exception only while this ticket is current: drop one not yet
                # delivered, so it cannot hit the next job
                _raise_in_thread(self._thread, None)
            self._cond.notify_all()
        if not ticket.future.done():
            ticket.future.set_result(outcome)
