"""The long-lived worker process: HTTP ``/hc`` + ``/generate`` (DESIGN §4) and, when ``BUFFER_WORKER_ID`` is
set, the buffer heartbeat/claim loop (DESIGN §5), all over ONE warm engine.

Why one process: Prefect's ``flow.serve()`` and process workers start a fresh interpreter per flow run, which
would reload the weights for every job. Here the ``generate`` flow is called in-process, so the engine loaded
at start-up serves every job, and each job is still a real Prefect flow run (visible in the UI when a
Prefect API is configured; otherwise on Prefect's temporary server, started during warm-up).

Threads, and why each exists:

* uvicorn's event loop: HTTP only. It never renders, so ``/hc`` answers while a job runs.
* ``engine-loader``: loads and warms the engine and Prefect's API at start-up, then ends; ``/hc`` is 503
  until it has finished (the old worker answered ``/hc`` before the models were loaded).
* ``render``: the single render thread (one GPU). Jobs from HTTP and from the buffer loop share its FIFO
  queue, so two jobs never render at once; at most ``MUSETALK_MAX_QUEUED`` wait, more get 503 (retryable).
* buffer mode: ``buffer-heartbeat`` and ``buffer-claim`` (:mod:`deployments.buffer`).

Per-job timeout: the flow runs with Prefect's ``timeout_seconds = MUSETALK_JOB_TIMEOUT_SEC`` (Prefect raises
a cancellation inside the render thread, so the render unwinds: encoder aborted, temp dir removed, flow run
``TimedOut``). If the render is stuck in native code and does not unwind, the HTTP caller still gets its
500 a margin later and ``/hc`` turns 503 (``stuck``) so the platform stops routing jobs here.

Shutdown (SIGTERM): ``drain()`` first — ``/hc`` 503, no new jobs, queued jobs answered 503 (retryable),
the buffer loop stops claiming — then the running job gets ``MUSETALK_SHUTDOWN_GRACE_SEC`` to finish;
past that it is abandoned (an exception is raised in the render thread so it unwinds) and the process exits.

``queue_job_id``: the ``Salad-Job-Id`` header of the Salad job-queue worker (the buffer loop passes its
``buffer_job_id``). ``SALAD_QUEUE_JOB_ID`` is NOT used as a fallback: it is a deployment-wide setting, and
stamping it on every sidecar would make different jobs look alike.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import shutil
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.generate import JobOutcome, generate, outcome_of
from musetalk_engine.errors import STAGES, MediaError
from tasks.job import JobRequest, failure_body
from tasks.settings import Settings, get_settings, redact

log = logging.getLogger(__name__)

# How long past the job timeout the HTTP caller waits for the flow's own TimedOut outcome before it is
# answered anyway (the render thread may be stuck in native code, where Prefect's cancellation cannot land).
TIMEOUT_MARGIN_SEC = 15.0
# How long an abandoned render gets to unwind after the exception is raised in its thread.
ABANDON_WAIT_SEC = 5.0
# The waiting request re-checks draining this often (a signal handler must not touch asyncio objects).
POLL_SEC = 0.25
# Generous: the temporary server's first start takes 15-20 s on a loaded machine (default timeout 20 s).
EPHEMERAL_START_TIMEOUT_SEC = 120
RETRY_AFTER_SEC = "5"


class ServeOptions(BaseSettings):
    """Knobs of the serve process that only it reads (environment, ``MUSETALK_`` prefix)."""

    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore")

    # Jobs that may wait while one renders; beyond that /generate answers 503 (retryable). Salad's worker
    # sends one job at a time, so this only matters for direct callers.
    musetalk_max_queued: int = Field(4, ge=0)
    # On SIGTERM: how long the running job may still take before it is abandoned.
    musetalk_shutdown_grace_sec: float = Field(25.0, ge=0)
    # /hc reports "stuck" once a render has run this long past MUSETALK_JOB_TIMEOUT_SEC.
    musetalk_stuck_grace_sec: float = Field(60.0, ge=0)


# ------------------------------------------------------------------------------------ response bodies


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
        f"the job did not finish within MUSETALK_JOB_TIMEOUT_SEC={timeout:g} s", stage="inference",
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


# ------------------------------------------------------------------------------------------ render queue


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
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
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

    def submit(self, job: dict[str, Any], queue_job_id: str | None = None) -> Ticket:
        """Queue a job; raises QueueFull past the bound, QueueClosed while shutting down."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the worker is shutting down")
            waiting = sum(1 for t in self._waiting if not t.future.cancelled())
            pending = waiting + (self._current is not None)
            if pending >= 1 + self.max_queued:
                raise QueueFull(f"{waiting} job(s) already waiting for the GPU (MUSETALK_MAX_QUEUED="
                                f"{self.max_queued})")
            ticket = Ticket(dict(job), queue_job_id)
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
            return self._run(ticket.job, ticket.queue_job_id)
        except JobAbandoned:
            return unavailable("abandoned", "the worker shut down before the job finished", ticket.job_id)
        except BaseException as exc:  # noqa: BLE001 — the render thread must survive any job
            log.exception("job %s crashed the render call", ticket.job_id)
            status, body = failure_body(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)),
                                        {}, "inference")
            return JobOutcome(http_status=status, body={**body, "musetalk_job_id": ticket.job_id})

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


# ----------------------------------------------------------------------------------------------- service


EngineLoader = Callable[[Settings], Any]


def default_engine_loader(settings: Settings) -> Any:
    """The process's cached engine (:func:`tasks.engine.get_engine`): the very one the flow's tasks use."""
    from tasks.engine import get_engine

    return get_engine(settings)


def start_prefect_api() -> str:
    """Make sure the Prefect API answers before the first job: start the temporary server when no
    ``PREFECT_API_URL`` is set (the flows of this process reuse it), then health-check it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    api = PREFECT_API_URL.value()
    if not api:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the process-wide instance that the flows' clients use too
        server.start(timeout=max(EPHEMERAL_START_TIMEOUT_SEC,
                                 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        api = server.api_url
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise RuntimeError(f"the Prefect API at {api} is not healthy: {problem}")
    return api


Health = Literal["ok", "loading", "error", "stuck", "draining"]


class WorkerService:
    """State shared by the HTTP app and the buffer loop: warm-up, the render queue, drain/stop."""

    def __init__(self, settings: Settings | None = None, *, engine_loader: EngineLoader | None = None,
                 options: ServeOptions | None = None, prefect_warmup: Callable[[], Any] | None = None):
        self.settings = settings or get_settings()
        self.options = options or ServeOptions()
        self.job_timeout = float(self.settings.musetalk_job_timeout_sec)
        self._engine_loader = engine_loader or default_engine_loader
        if settings is not None and engine_loader is None:
            from tasks.engine import engine_config

            if engine_config(settings) != engine_config(get_settings()):
                # the flow's tasks take their engine from get_settings(): a second one would be loaded
                log.warning("create_app(settings) differs from the environment's engine settings; the "
                            "generate flow will load its own engine")
        self._prefect_warmup = prefect_warmup or start_prefect_api
        # Prefect enforces the per-job timeout inside the flow run (see module docstring).
        self._flow = generate.with_options(timeout_seconds=self.job_timeout)
        self.queue = RenderQueue(self._run_job, max_queued=self.options.musetalk_max_queued)
        self.engine: Any = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._draining = threading.Event()
        self._drain_started: float | None = None
        self._loader: threading.Thread | None = None
        self.buffer: Any = None
        if self.settings.buffer_enabled:
            from deployments.buffer import BufferLoop

            self.buffer = BufferLoop.from_service(self)

    # --- state

    @property
    def ready(self) -> bool:
        """Engine loaded and warm, Prefect API up."""
        return self._ready.is_set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def gpu_class(self) -> str | None:
        gpu = getattr(self.engine, "gpu", None) or {}
        return self.settings.gpu_class_name or gpu.get("name")

    def stuck(self) -> bool:
        return self.queue.running_for() > self.job_timeout + self.options.musetalk_stuck_grace_sec

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of ``/hc``."""
        status: Health
        detail = None
        if self.draining:
            status, detail = "draining", "shutting down"
        elif self.load_error is not None:
            status, detail = "error", self.load_error
        elif not self.ready:
            status, detail = "loading", "loading and warming the models"
        elif self.stuck():
            status = "stuck"
            detail = f"a render has run {self.queue.running_for():.0f} s, past the job timeout"
        else:
            return 200, {"status": "ok"}
        return 503, {"status": status, "detail": detail}

    def admission(self, job_id: str | None) -> JobOutcome | None:
        """Why a new job cannot be taken now (a 503 outcome), or None."""
        if self.draining:
            return unavailable("draining", "the worker is shutting down", job_id)
        if self.load_error is not None:
            return unavailable("load_failed", f"the worker could not load its models: {self.load_error}", job_id)
        if not self.ready:
            return unavailable("not_ready", "the worker is still loading its models", job_id)
        if self.stuck():
            return unavailable("stuck", "the worker's GPU is stuck on an earlier job", job_id)
        return None

    # --- lifecycle

    def start(self) -> None:
        """Begin loading on a background thread (``/hc`` stays 503 until it is done); start buffer mode."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="engine-loader", daemon=True)
            self._loader.start()
        if self.buffer is not None:
            self.buffer.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until warm (True) or until loading failed / ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.1):
                return True
            if self.load_error is not None:
                return False
        return self.ready

    def _load(self) -> None:
        started = time.perf_counter()
        self._sweep_workspaces()
        try:
            engine = self._engine_loader(self.settings)
            if not getattr(engine, "warm", False):
                engine.warmup()
            self.engine = engine
            api = self._prefect_warmup()
            log.info("worker ready in %.1f s (Prefect API %s)", time.perf_counter() - started, api)
            self._ready.set()
        except Exception as exc:  # noqa: BLE001 — reported by /hc and the heartbeat, never a silent death
            self.load_error = redact(f"{type(exc).__name__}: {exc}")[:500]
            log.error("worker failed to start: %s", self.load_error)

    def _sweep_workspaces(self) -> None:
        """Remove job workspaces a killed predecessor left behind (SIGKILL skips every cleanup); no job
        of this process has started yet, and one serve process owns its work dir."""
        work = self.settings.resolve(self.settings.musetalk_workdir) / "tmp"
        for directory in work.glob("job-*"):
            if directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
                log.warning("removed the stale workspace %s", directory.name)

    def grace_over(self) -> bool:
        """Draining for longer than ``MUSETALK_SHUTDOWN_GRACE_SEC``: the running job is to be abandoned."""
        return (self._drain_started is not None
                and time.monotonic() >= self._drain_started + self.options.musetalk_shutdown_grace_sec)

    def drain(self) -> None:
        """Stop taking work (signal-handler safe: it only sets an event)."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
        self._draining.set()

    def stop(self) -> None:
        """Drain, let the running job finish within the grace period, else abandon it; stop buffer mode."""
        self.drain()
        grace = self.options.musetalk_shutdown_grace_sec
        deadline = (self._drain_started or time.monotonic()) + grace
        if self.buffer is not None:
            self.buffer.stop_claiming()
        cancelled = self.queue.close()
        if cancelled:
            log.info("shutdown: %d queued job(s) answered 503", cancelled)
        if not self.queue.wait_idle(max(0.0, deadline - time.monotonic())):
            self.queue.abandon(ABANDON_WAIT_SEC)
        if self.buffer is not None:
            self.buffer.stop(timeout=ABANDON_WAIT_SEC)
        log.info("worker stopped")

    # --- the render thread's work

    def _run_job(self, job: dict[str, Any], queue_job_id: str | None) -> JobOutcome:
        """One job as a real `generate` flow run, in this thread (the engine stays warm)."""
        job_id = job.get("musetalk_job_id")
        if self.draining:
            return unavailable("draining", "the worker is shutting down", job_id)
        try:
            state = self._flow(job, queue_job_id, return_state=True)
        except Exception as exc:  # noqa: BLE001 — the flow could not run at all (e.g. Prefect API down)
            log.exception("job %s: the generate flow could not run", job_id)
            status, body = failure_body(exc, {}, "preprocessing")
            outcome, own = JobOutcome(http_status=status, body={**body, "musetalk_job_id": job_id}), False
        else:
            outcome, own = outcome_from_state(state, self.job_timeout, job_id)
        if not own and job_id:
            self._progress_failed(job_id, outcome.body)
        return outcome

    def _progress_failed(self, job_id: str, body: dict[str, Any]) -> None:
        """Tell the orchestrator the job failed when the flow could not (timeout, crash); best effort."""
        from tasks.progress import OrchestratorClient

        client = OrchestratorClient.from_settings(self.settings)
        if client is None or not client.base_url:
            return
        with client:
            client.progress(job_id, "failed", 0.0, "failed", error={
                "type": body["error_type"], "message": body["error_message"], "stage": body["stage"]})

    # --- waiting for a job from async code

    async def outcome(self, ticket: Ticket) -> JobOutcome:
        """Await a ticket's outcome without blocking the event loop; bounded by the job timeout."""
        waiter = asyncio.wrap_future(ticket.future)
        abandoning = False
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=POLL_SEC)
            if done:
                if waiter.cancelled():
                    return unavailable("draining", "the worker shut down before the job started",
                                       ticket.job_id)
                return waiter.result()
            if ticket.started is None:
                if self.draining and ticket.future.cancel():
                    return unavailable("draining", "the worker shut down before the job started",
                                       ticket.job_id)
            elif self.grace_over() and not abandoning:
                # abandon here, within uvicorn's graceful window, so the caller still gets its 503
                abandoning = True
                asyncio.get_running_loop().run_in_executor(None, self.queue.abandon, ABANDON_WAIT_SEC)
            elif time.monotonic() - ticket.started > self.job_timeout + TIMEOUT_MARGIN_SEC:
                log.error("job %s: no outcome %.0f s past its timeout; answering 500, render thread stuck",
                          ticket.job_id, TIMEOUT_MARGIN_SEC)
                return timed_out(self.job_timeout, ticket.job_id)


# ----------------------------------------------------------------------------------------------- the app


class GenerateRequest(JobRequest):
    """``POST /generate`` body (DESIGN §4). Unknown fields are ignored."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "musetalk_job_id": "job-123", "video_url": "https://example.com/avatar.mp4",
        "audio_url": "https://example.com/speech.wav", "aspect_ratio": "9:16", "resolution": "720p",
        "params": {"batch_size": 16}}]})


class GenerateMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    GENERATION_TIME_SEC: float
    SCRIPT_WALL_TIME_SEC: float
    PEAK_VRAM_MIB: float | None = None
    PEAK_RAM_KB: int | None = None
    gpu_class: str | None = None
    stage_times: dict[str, float] = {}
    total_time: float


class GenerateOk(BaseModel):
    """200: the result is stored; ``output_url`` is always present."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]
    b2_bucket: str
    b2_file_name: str
    output_url: str
    musetalk_job_id: str
    metrics: GenerateMetrics


class GenerateFailed(BaseModel):
    """422 ``media_error`` (bad input, final) or 500/503 ``processing_error`` (worker fault; ``retryable``)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["failed"]
    error_type: Literal["media_error", "processing_error"]
    error_message: str
    stage: Literal[STAGES]  # type: ignore[valid-type]
    details: dict[str, Any] = {}
    retryable: bool
    stage_times: dict[str, float] = {}
    musetalk_job_id: str | None = None


class HealthBody(BaseModel):
    status: Health
    detail: str | None = None


def _response(outcome: JobOutcome) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SEC} if outcome.http_status == 503 else None
    return JSONResponse(outcome.body, status_code=outcome.http_status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "invalid job request: the body is not valid JSON"
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "invalid job request: " + "; ".join(problems)


def create_app(settings: Settings | None = None, *, engine_loader: EngineLoader | None = None,
               options: ServeOptions | None = None) -> FastAPI:
    """The worker's FastAPI app. ``engine_loader(settings)`` returns a loaded engine (tests inject one);
    the default is the process's cached engine, which the ``generate`` flow's tasks also use, so pass
    settings equal to :func:`tasks.settings.get_settings` (the flow reads those)."""
    service = WorkerService(settings, engine_loader=engine_loader, options=options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            # blocking (waits for the running job), so off the event loop
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="musetalk-flow worker", version="0.1.0", lifespan=lifespan,
                  description="Lip-sync worker: Salad job-queue HTTP contract (DESIGN §4).")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        _, body = failure_body(MediaError(_validation_message(exc), stage="validation"), {})
        raw = exc.body if isinstance(exc.body, dict) else {}
        body["musetalk_job_id"] = raw.get("musetalk_job_id") if isinstance(raw.get("musetalk_job_id"), str) else None
        return JSONResponse(body, status_code=422)

    @app.get("/hc", response_model=HealthBody, responses={503: {"model": HealthBody}},
             summary="Readiness: 200 once the models are loaded and warm")
    async def hc() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.post("/generate", response_model=GenerateOk, summary="Render one lip-sync job",
              responses={422: {"model": GenerateFailed, "description": "bad input (media_error, final)"},
                         500: {"model": GenerateFailed, "description": "worker fault (processing_error)"},
                         503: {"model": GenerateFailed, "description": "not ready / busy / shutting down"}})
    async def generate_endpoint(
            job: GenerateRequest,
            salad_job_id: Annotated[str | None, Header(alias="Salad-Job-Id")] = None) -> JSONResponse:
        refusal = service.admission(job.musetalk_job_id)
        if refusal is not None:
            return _response(refusal)
        try:
            ticket = service.queue.submit(job.model_dump(mode="json", exclude_unset=True), salad_job_id)
        except QueueFull as exc:
            return _response(unavailable("busy", str(exc), job.musetalk_job_id))
        except QueueClosed as exc:
            return _response(unavailable("draining", str(exc), job.musetalk_job_id))
        log.info("job %s accepted (Salad job %s)", job.musetalk_job_id, salad_job_id or "-")
        return _response(await service.outcome(ticket))

    return app


# ------------------------------------------------------------------------------------------- run it


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front: Prefect's temporary server picks a free port in 8000-8999 while
    warming up, and must not take ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, *, log_level: str = "info"):
    """A uvicorn server whose SIGTERM/SIGINT first drains the worker, then shuts down gracefully."""
    import uvicorn

    service: WorkerService = app.state.service

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
            service.drain()
            super().handle_exit(sig, frame)

    # uvicorn waits for open requests past the grace period, until an abandoned job's 503 has gone out
    graceful = int(service.options.musetalk_shutdown_grace_sec + ABANDON_WAIT_SEC) + 5
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful)
    return DrainingServer(config)


def serve(host: str = "0.0.0.0", port: int = 8000, *, log_level: str = "info") -> int:
    """Run the worker until SIGTERM/SIGINT (``musetalk-flow serve``)."""
    from tasks.settings import install_redaction

    sock = bind_socket(host, port)
    app = create_app()
    server = make_server(app, log_level=log_level)
    install_redaction()  # after uvicorn configured its loggers, so their handlers get the filter too
    log.info("serving on %s:%d (buffer mode %s)", host, port,
             "on" if app.state.service.buffer is not None else "off")
    server.run(sockets=[sock])
    return 0
