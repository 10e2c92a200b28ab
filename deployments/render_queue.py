"""The render threads of a worker process, one per GPU ("slot"): each slot runs one job at a time, jobs
start in arrival order on whichever slot is free, with a bounded wait list, shutdown (close / wait_idle)
and abandoning a stuck job. One slot (the default) is the single render thread of a one-GPU worker.

Why one shared wait list rather than a queue per GPU: a job waits for the first GPU that frees up, never
behind a long job on a GPU picked when it arrived. A ticket may be pinned to one slot (the warm-up of that
slot's engine must run on its own thread)."""

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
    slot: int | None = None  # only this slot may run it; None: the first free one
    future: Future = field(default_factory=Future)
    started: float | None = None
    ran_on: int | None = None  # the slot that took it

    @property
    def job_id(self) -> str | None:
        return self.job.get("musetalk_job_id")


class RenderQueue:
    """``slots`` render threads sharing one FIFO wait list; each runs one job at a time.

    ``run(job, queue_job_id)`` must return a :class:`JobOutcome`; it runs on a render thread only, where
    :meth:`slot_index` says which slot it is. ``setup(index)`` runs first on each render thread (the
    worker makes that slot's GPU the thread's current device there)."""

    def __init__(self, run: Callable[[dict[str, Any], str | None], JobOutcome], *, max_queued: int = 4,
                 slots: int = 1, setup: Callable[[int], None] | None = None):
        if slots < 1:
            raise ValueError("a render queue needs at least one slot")
        self._run = run
        self.max_queued = max_queued
        self.slots = slots
        self._setup = setup
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket | None] = [None] * slots
        self._abandoned: list[Ticket | None] = [None] * slots
        self._closed = False
        self._here = threading.local()
        # daemon: an abandoned render stuck in native code must not keep the process alive at exit
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True,
                                          name="render" if slots == 1 else f"render-{i}") for i in range(slots)]

    # --- state

    def _pending(self) -> int:
        """Jobs rendering or waiting (cancelled ones not counted); call with the lock held."""
        return (sum(1 for t in self._running if t is not None)
                + sum(1 for t in self._waiting if not t.future.cancelled()))

    @property
    def busy(self) -> bool:
        """A job is rendering or waiting."""
        with self._cond:
            return self._pending() > 0

    @property
    def full(self) -> bool:
        """Every slot is taken (rendering, or promised to a job that waits): a new job would wait."""
        with self._cond:
            return self._pending() >= self.slots

    @property
    def current(self) -> Ticket | None:
        """A rendering ticket (the lowest slot's), or None when no slot renders."""
        return next((t for t in self._running if t is not None), None)

    def running(self) -> list[Ticket]:
        """The tickets rendering now, one per busy slot."""
        return [t for t in list(self._running) if t is not None]

    def running_for(self, ticket: Ticket | None = None) -> float:
        """Seconds ``ticket`` has been rendering; without one, the longest-running job's (0 when idle)."""
        now = time.monotonic()
        tickets = [ticket] if ticket is not None else self.running()
        return max((now - t.started for t in tickets if t.started is not None), default=0.0)

    def slot_index(self) -> int | None:
        """The slot of the calling render thread (None on any other thread)."""
        return getattr(self._here, "index", None)

    # --- use

    def submit(self, job: dict[str, Any], queue_job_id: str | None = None, *,
               run: Callable[[dict[str, Any], str | None], JobOutcome] | None = None,
               timeout: float | None = None, slot: int | None = None) -> Ticket:
        """Queue a job (run by ``run`` instead of the queue's own callable when given: other GPU work,
        such as a benchmark, waits its turn like a render; ``slot`` pins it to that slot); raises
        QueueFull past the bound, QueueClosed while shutting down."""
        if slot is not None and not 0 <= slot < self.slots:
            raise ValueError(f"no slot {slot} (this queue has {self.slots})")
        with self._cond:
            if self._closed:
                raise QueueClosed("the worker is shutting down")
            if self._pending() >= self.slots + self.max_queued:
                waiting = sum(1 for t in self._waiting if not t.future.cancelled())
                raise QueueFull(f"{waiting} job(s) already waiting for the GPU (MUSETALK_MAX_QUEUED="
                                f"{self.max_queued})")
            ticket = Ticket(dict(job), queue_job_id, run, timeout, slot)
            self._waiting.append(ticket)
            if self._threads[0].ident is None:  # started on first use: an app that never serves has none
                for thread in self._threads:
                    thread.start()
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
            while any(t is not None for t in self._running) or self._waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def abandon(self, wait: float = ABANDON_WAIT_SEC, ticket: Ticket | None = None) -> bool:
        """Raise :class:`JobAbandoned` in the render thread of ``ticket`` (default: of every rendering job)
        and wait for it to unwind; True when every one did.

        Raised once per job: a second exception could cut the first one's cleanup short."""
        targets: list[Ticket] = []
        with self._cond:
            for i, current in enumerate(self._running):
                if current is None or (ticket is not None and current is not ticket):
                    continue
                targets.append(current)
                if self._abandoned[i] is not current:
                    self._abandoned[i] = current
                    log.warning("abandoning job %s after %.0f s of rendering", current.job_id,
                                self.running_for(current))
                    _raise_in_thread(self._threads[i], JobAbandoned)
        deadline = time.monotonic() + wait
        unwound = True
        for target in targets:
            try:
                target.future.exception(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 — concurrent.futures.TimeoutError: still stuck in native code
                log.error("job %s did not unwind within %.0f s; exiting anyway", target.job_id, wait)
                unwound = False
        return unwound

    # --- the threads

    def _take(self, index: int) -> Ticket | None:
        """The oldest waiting ticket slot ``index`` may run (unpinned, or pinned to it); lock held."""
        for k, ticket in enumerate(self._waiting):
            if ticket.slot is None or ticket.slot == index:
                del self._waiting[k]
                return ticket
        return None

    def _next(self, index: int) -> Ticket | None:
        with self._cond:
            while True:
                ticket = self._take(index)
                if ticket is None:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if ticket.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
                    ticket.started = time.monotonic()
                    ticket.ran_on = index
                    self._running[index] = ticket
                    return ticket

    def _loop(self, index: int) -> None:
        self._here.index = index
        if self._setup is not None:
            try:
                self._setup(index)
            except Exception:  # noqa: BLE001 — the jobs then fail on their own, with the reason
                log.exception("render slot %d: setting up its thread failed", index)
        ticket: Ticket | None = None
        while True:
            try:
                ticket = self._next(index)
                if ticket is None:
                    return
                self._finish(index, ticket, self._run_ticket(ticket))
            except JobAbandoned:  # landed just after the job returned (see abandon): settle it, go on
                if ticket is not None:
                    self._finish(index, ticket, unavailable("abandoned", "the worker shut down", ticket.job_id))

    def _run_ticket(self, ticket: Ticket) -> JobOutcome:
        try:
            return (ticket.run or self._run)(ticket.job, ticket.queue_job_id)
        except JobAbandoned:
            return unavailable("abandoned", "the worker shut down before the job finished", ticket.job_id)
        except BaseException as exc:  # noqa: BLE001 — the render thread must survive any job
            log.exception("job %s crashed the render call", ticket.job_id)
            return failure_outcome(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)),
                                   stage="inference", job_id=ticket.job_id)

    def _finish(self, index: int, ticket: Ticket, outcome: JobOutcome) -> None:
        with self._cond:
            if self._running[index] is ticket:
                self._running[index] = None
                # abandon() schedules its exception only while this ticket is current: drop one not yet
                # delivered, so it cannot hit the next job
                _raise_in_thread(self._threads[index], None)
            self._cond.notify_all()
        if not ticket.future.done():
            ticket.future.set_result(outcome)
