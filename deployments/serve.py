"""The long-lived worker process: HTTP ``/hc`` + ``/generate`` (DESIGN §4), ``/benchmark`` (the benchmark
flow's Salad jobs, :mod:`deployments.benchmark_job`) and, when ``BUFFER_WORKER_ID`` is set, the buffer
heartbeat/claim loop (DESIGN §5), all over warm engines: one per GPU it renders on (``MUSETALK_DEVICES``;
unset: one, on ``MUSETALK_DEVICE``).

Why one process: Prefect's ``flow.serve()`` and process workers start a fresh interpreter per flow run, which
would reload the weights for every job. Here the ``generate`` flow is called in-process, so the engine loaded
at start-up serves every job, and each job is still a real Prefect flow run (visible in the UI when a
Prefect API is configured; otherwise on Prefect's temporary server, started during warm-up).

Threads, and why each exists:

* uvicorn's event loop: HTTP only. It never renders, so ``/hc`` answers while a job runs.
* ``engine-loader``: builds each slot's engine (one after another: :mod:`musetalk_engine.engine` says
  why), warms each on its own render thread (the first alone, then the others at once) and starts
  Prefect's API, then ends. ``/hc`` is 503 until every slot is warm (the old worker
  answered ``/hc`` before the models were loaded): a worker configured for four GPUs that says ready with
  three would heartbeat a capacity it does not have, so one GPU that fails to load fails the worker, with
  the device named in ``/hc`` and the heartbeat's error.
* ``render`` (one GPU) or ``render-0`` … ``render-N`` (a *slot* per GPU, :mod:`deployments.render_queue`):
  each owns one GPU and its engine, made that thread's current CUDA device, and renders one job at a
  time. Jobs from HTTP (renders and benchmarks) and from the buffer loop share one FIFO wait list and start
  on the first free slot, so two never use one GPU at once; at most ``MUSETALK_MAX_QUEUED`` wait beyond
  the slots, more get 503 (retryable).
* buffer mode: ``buffer-heartbeat``, ``buffer-claim`` and a ``buffer-job`` thread per claimed job
  (:mod:`deployments.buffer`); up to ``BUFFER_CAPACITY`` claims at once (default and maximum: the slots).

Per-job timeout: the flow runs with Prefect's ``timeout_seconds = MUSETALK_JOB_TIMEOUT_SEC`` (Prefect raises
a cancellation inside the render thread, so the render unwinds: encoder aborted, temp dir removed, flow run
``TimedOut``). If the render is stuck in native code and does not unwind, the HTTP caller still gets its
500 a margin later and ``/hc`` turns 503 (``stuck``) so the platform stops routing jobs here (one stuck
slot is enough: that GPU stays lost until the process restarts).

Shutdown (SIGTERM): ``drain()`` first — ``/hc`` 503, no new jobs, queued jobs answered 503 (retryable),
the buffer loop stops claiming — then the running job gets ``MUSETALK_SHUTDOWN_GRACE_SEC`` to finish;
past that it is abandoned (an exception is raised in the render thread so it unwinds) and the process exits.
With several slots each running job gets the same grace, and each is abandoned in its own thread.

``queue_job_id``: the ``Salad-Job-Id`` header of the Salad job-queue worker (the buffer loop passes its
``buffer_job_id``). ``SALAD_QUEUE_JOB_ID`` is NOT used as a fallback: it is a deployment-wide setting, and
stamping it on every sidecar would make different jobs look alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Callable, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prefect import tags
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings

from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.benchmark_job import BenchmarkJob, run_benchmark_job
from deployments.front_door import JOB_PATHS, FrontDoor, known_job_id, rejected
from deployments.openapi_docs import install_offline_docs
from deployments.render_queue import ABANDON_WAIT_SEC, QueueClosed, QueueFull, RenderQueue, Ticket
from flows.generate import generate
from tasks.contract import (JobFailure, JobOutcome, JobRequest, JobSuccess, describe_errors,
                            failure_outcome, outcome_from_state, progress_error, timed_out, unavailable)
from tasks.engine import get_engine, serving
from deployments.prefect_api import start_prefect_api  # noqa: F401  (tests import it from here)
from tasks.settings import Settings, get_settings, read_settings, redact, settings_config

log = logging.getLogger(__name__)

# How long past the job timeout the HTTP caller waits for the flow's own TimedOut outcome before it is
# answered anyway (the render thread may be stuck in native code, where Prefect's cancellation cannot land).
TIMEOUT_MARGIN_SEC = 15.0
# The waiting request re-checks draining this often (a signal handler must not touch asyncio objects).
POLL_SEC = 0.25
RETRY_AFTER_SEC = "5"
# At shutdown, how long the model loader may take to finish its current step (a real engine loads in tens
# of seconds; the temporary Prefect server starts in up to EPHEMERAL_START_TIMEOUT_SEC on a loaded machine).
LOADER_JOIN_SEC = 150.0
# How long our child processes get between SIGTERM and SIGKILL when the serve process ends.
CHILD_STOP_SEC = 8.0


class ServeOptions(BaseSettings):
    """Knobs of the serve process that only it reads (environment, ``MUSETALK_`` prefix)."""

    model_config = settings_config()

    # Jobs that may wait while one renders; beyond that /generate answers 503 (retryable). Salad's worker
    # sends one job at a time, so this only matters for direct callers.
    musetalk_max_queued: int = Field(4, ge=0)
    # On SIGTERM: how long the running job may still take before it is abandoned.
    musetalk_shutdown_grace_sec: float = Field(25.0, ge=0)
    # /hc reports "stuck" once a render has run this long past MUSETALK_JOB_TIMEOUT_SEC.
    musetalk_stuck_grace_sec: float = Field(60.0, ge=0)
    # POST /benchmark: how long one benchmark job may measure (a full-random sweep takes minutes).
    musetalk_benchmark_timeout_sec: float = Field(3600.0, gt=0)


# ----------------------------------------------------------------------------------------------- service


# Called once per render slot with that slot's settings (``musetalk_device`` is the slot's device).
EngineLoader = Callable[[Settings], Any]


def slot_devices(settings: Settings) -> list[str]:
    """The device of each render slot: ``MUSETALK_DEVICES`` (``all``: every visible GPU), else one slot on
    ``MUSETALK_DEVICE``. ``all`` without a GPU is one ``cuda`` slot, whose load then fails with the reason."""
    devices = settings.device_list
    if devices is None:
        return [settings.musetalk_device]
    if devices == "all":
        from musetalk_engine.device import visible_gpus

        return visible_gpus() or ["cuda"]
    return list(devices)


@dataclass
class Slot:
    """One render slot: a device, the settings its engine is built from, and (once loaded) the engine."""

    index: int
    device: str  # as configured: cpu, cuda:1, auto …
    settings: Settings
    instance: int  # how many earlier slots name the same device (CPU slots may repeat; each has its engine)
    engine: Any = None
    resolved: Any = None  # the torch.device, once the loader has checked that it exists


Health = Literal["ok", "loading", "error", "stuck", "draining"]


class WorkerService:
    """State shared by the HTTP app and the buffer loop: warm-up, the render slots and their queue,
    drain/stop."""

    def __init__(self, settings: Settings | None = None, *, engine_loader: EngineLoader | None = None,
                 options: ServeOptions | None = None, prefect_warmup: Callable[[], Any] | None = None):
        self.settings = settings or get_settings()
        self.options = options or read_settings(ServeOptions)
        self.job_timeout = float(self.settings.musetalk_job_timeout_sec)
        self._engine_loader = engine_loader  # None: the process's cached engine per slot (get_engine)
        self._prefect_warmup = prefect_warmup or start_prefect_api
        # Prefect enforces the per-job timeout inside the flow run (see module docstring).
        self._flow = generate.with_options(timeout_seconds=self.job_timeout)
        devices = slot_devices(self.settings)
        self.slots = [Slot(i, name, self._settings_on(name), devices[:i].count(name))
                      for i, name in enumerate(devices)]
        self.queue = RenderQueue(self._run_job, max_queued=self.options.musetalk_max_queued,
                                 slots=len(self.slots), setup=self._enter_slot)
        if len(self.slots) > 1:
            log.info("%d render slots: %s", len(self.slots), ", ".join(slot.device for slot in self.slots))
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._draining = threading.Event()
        self._drain_started: float | None = None
        self._loader: threading.Thread | None = None
        self._cancel_load = threading.Event()
        # HTTP jobs queued or rendering, by id: (the request's canonical JSON, its ticket). A second request
        # with the same id joins the first when it is the same request, else it is a 409 (see take()).
        self._in_flight: dict[str, tuple[str, Ticket]] = {}
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
    def engine(self) -> Any:
        """The first slot's engine (the only one of a one-GPU worker); None until it is loaded."""
        return self.slots[0].engine

    @property
    def engines(self) -> list[Any]:
        """Every slot's engine, in slot order (None where not loaded yet)."""
        return [slot.engine for slot in self.slots]

    def slot_here(self) -> Slot:
        """The slot of the calling render thread (the first slot on any other thread)."""
        index = self.queue.slot_index()
        return self.slots[index if index is not None else 0]

    @property
    def gpu_class(self) -> str | None:
        gpu = getattr(self.engine, "gpu", None) or {}
        return self.settings.gpu_class_name or gpu.get("name")

    def timeout_of(self, ticket: Ticket | None) -> float:
        """How long ``ticket`` may run: its own timeout, else MUSETALK_JOB_TIMEOUT_SEC."""
        return (ticket.timeout if ticket is not None and ticket.timeout else None) or self.job_timeout

    def ticket_stuck(self, ticket: Any) -> bool:
        """``ticket`` has rendered for longer than its timeout and the stuck grace."""
        return (getattr(ticket, "started", None) is not None
                and self.queue.running_for(ticket) > self.timeout_of(ticket) + self.options.musetalk_stuck_grace_sec)

    def stuck(self) -> bool:
        """Some slot is stuck on a job (see the module docstring: one is enough)."""
        return any(self.ticket_stuck(ticket) for ticket in self.queue.running())

    def _settings_on(self, device: str) -> Settings:
        """The settings of an engine on ``device`` (the process's own when that is its device already)."""
        if device == self.settings.musetalk_device:
            return self.settings
        return self.settings.model_copy(update={"musetalk_device": device})

    def _enter_slot(self, index: int) -> None:
        """First thing on slot ``index``'s render thread: its GPU becomes the thread's current device, so
        anything a job does on the GPU outside the engine's own device scopes lands on that GPU too."""
        device = self.slots[index].resolved
        if device is not None:
            from musetalk_engine.device import make_current

            make_current(device)

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
            if len(self.slots) > 1:
                warm = sum(1 for engine in self.engines if engine is not None)
                detail += f" ({warm} of {len(self.slots)} render slots ready)"
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
            # not a daemon: the interpreter waits for it at exit instead of tearing torch down under it
            self._loader = threading.Thread(target=self._load, name="engine-loader", daemon=False)
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
        """The loader thread: each step runs to its end (torch loading is native code that cannot be
        interrupted), and shutdown is honoured between steps. Every slot's engine is built first, one after
        another: model libraries patch torch for every thread while they build (musetalk_engine.engine),
        which would also corrupt a warm-up compiling on another thread. Then the first slot warms up alone
        (it imports the compiler's modules, not safe to race) and the others at once, each on its own render
        thread and GPU: N GPUs cost N builds but about two warm-ups (graph capture, compilation), not N."""
        started = time.perf_counter()
        self._sweep_workspaces()
        where = ""  # which slot failed, when there are several
        try:
            if self._cancel_load.is_set():
                return
            from musetalk_engine.device import resolve_device

            # every device checked before any weights load: a missing GPU fails in a second, not after the
            # other slots' engines have loaded
            for slot in self.slots:
                where = self._where(slot)
                slot.resolved = resolve_device(slot.device)
            engines = {}
            for slot in self.slots:
                where = self._where(slot)
                if self._cancel_load.is_set():
                    return
                engines[slot.index] = self._load_engine(slot)
            first, *rest = self.slots
            where = self._where(first)
            self._warm_slot(first, engines[first.index])
            if rest:
                with ThreadPoolExecutor(len(rest), thread_name_prefix="warm-slot") as pool:
                    warms = [(slot, pool.submit(self._warm_slot, slot, engines[slot.index])) for slot in rest]
                    for slot, warm in warms:  # the first failure in slot order is the one reported
                        where = self._where(slot)
                        warm.result()
            where = ""
            if self._cancel_load.is_set():
                return
            api = self._prefect_warmup()
            log.info("worker ready in %.1f s (Prefect API %s, %d render slot(s))", time.perf_counter() - started,
                     api, len(self.slots))
            self._ready.set()
        except Exception as exc:  # noqa: BLE001 — reported by /hc and the heartbeat, never a silent death
            self.load_error = redact(f"{where}{type(exc).__name__}: {exc}")[:500]
            log.error("worker failed to start: %s", self.load_error)
        finally:
            if self._cancel_load.is_set() and not self._ready.is_set():
                log.info("loading stopped: the worker is shutting down")

    def _where(self, slot: Slot) -> str:
        """How an error names the slot, where there are several."""
        return f"{slot.device}: " if len(self.slots) > 1 else ""

    def _warm_slot(self, slot: Slot, engine: Any) -> None:
        """Warm a slot's engine on the slot's render thread and give the slot its engine; nothing once
        shutdown has begun."""
        if self._cancel_load.is_set():
            return
        if not getattr(engine, "warm", False):
            self._warm_on_render_thread(engine, slot.index)
        slot.engine = engine

    def stop_loading(self, timeout: float = LOADER_JOIN_SEC) -> bool:
        """Tell the loader thread to stop after its current step and wait for it (at most ``timeout``);
        True once it has ended. An interpreter that exits while torch still loads on another thread
        aborts ("terminate called without an active exception", exit 134), so shutdown waits here."""
        self._cancel_load.set()
        loader = self._loader
        if loader is None or loader is threading.current_thread():
            return True
        loader.join(timeout)
        if loader.is_alive():
            log.warning("the model loader is still running after %.0f s", timeout)
        return not loader.is_alive()

    def _load_engine(self, slot: Slot) -> Any:
        if self._engine_loader is not None:
            return self._engine_loader(slot.settings)
        return get_engine(slot.settings, instance=slot.instance)

    def _warm_on_render_thread(self, engine: Any, slot: int = 0) -> None:
        """Warm up on the thread that will render: CUDA graph trees (``compiled`` mode) and the current
        device are per thread, so a warm-up elsewhere would be paid again by the first job."""
        failed: list[Exception] = []

        def warm(_job: dict[str, Any], _queue_job_id: str | None) -> JobOutcome:
            try:
                engine.warmup()
            except Exception as exc:  # noqa: BLE001 — re-raised on the loader thread, reported by /hc
                failed.append(exc)
            return JobOutcome(http_status=200 if not failed else 500, body={})

        self.queue.submit({}, None, run=warm, slot=slot).future.result()
        if failed:
            raise failed[0]

    def _sweep_workspaces(self) -> None:
        """Remove job workspaces a killed predecessor left behind (SIGKILL skips every cleanup); no job
        of this process has started yet, and one serve process owns its work dir."""
        work = self.settings.job_work_root
        for directory in work.glob("job-*"):
            if directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
                log.warning("removed the stale workspace %s", directory.name)

    def grace_over(self) -> bool:
        """Draining for longer than ``MUSETALK_SHUTDOWN_GRACE_SEC``: the running job is to be abandoned."""
        return (self._drain_started is not None
                and time.monotonic() >= self._drain_started + self.options.musetalk_shutdown_grace_sec)

    def drain(self) -> None:
        """Stop taking work and loading (signal-handler safe: it only sets events)."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
        self._draining.set()
        self._cancel_load.set()

    def stop(self) -> None:
        """Drain, let the running jobs finish within the grace period, else abandon them; stop buffer mode."""
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
        self.stop_loading()
        log.info("worker stopped")

    # --- the render thread's work

    def _run_job(self, job: dict[str, Any], queue_job_id: str | None) -> JobOutcome:
        """One job as a real `generate` flow run, in this render thread, on its slot's warm engine."""
        job_id = job.get("musetalk_job_id")
        if self.draining:
            return unavailable("draining", "the worker is shutting down", job_id)
        engine = self.slot_here().engine
        try:
            # The orchestrator's run of this job carries `job:{id}`; this process's own run of it is an
            # attempt of that job, never a second `job:` run (DESIGN §11). The flow's tasks use this warm
            # engine, not one of their own.
            with tags(f"attempt-of:{job_id}") if job_id else nullcontext(), serving(engine):
                state = self._flow(job, queue_job_id, return_state=True)
        except Exception as exc:  # noqa: BLE001 — the flow could not run at all (e.g. Prefect API down)
            log.exception("job %s: the generate flow could not run", job_id)
            outcome, own = failure_outcome(exc, stage="preprocessing", job_id=job_id), False
        else:
            outcome, own = outcome_from_state(state, self.job_timeout, job_id)
        if not own and job_id:
            self._progress_failed(job_id, outcome.body)
        return outcome

    def _progress_failed(self, job_id: str, body: dict[str, Any]) -> None:
        """Tell the orchestrator the job failed when the flow could not (timeout, crash); best effort."""
        from tasks.progress import ProgressReporter

        with ProgressReporter.from_settings(job_id, self.settings) as reporter:
            reporter.fail(progress_error(body))

    # --- waiting for a job from async code

    async def take(self, job: dict[str, Any], queue_job_id: str | None, *, job_id: str | None = None,
                   run: Callable[[dict[str, Any], str | None], JobOutcome] | None = None,
                   timeout: float | None = None) -> JobOutcome:
        """An HTTP job from arrival to outcome: admission, its turn on the render thread (``run`` for work
        other than a render), then its outcome, or the 503 that says why it cannot be taken."""
        refusal = self.admission(job_id)
        if refusal is not None:
            return refusal
        fingerprint = json.dumps(job, sort_keys=True, default=str)
        if job_id is not None:
            held = self._in_flight.get(job_id)
            if held is not None:
                if held[0] != fingerprint:
                    return rejected(f"job {job_id} is already queued or rendering on this worker with a "
                                    "different request; a job id names one job", status=409, job_id=job_id,
                                    details={"reason": "duplicate_job_id"})
                log.info("job %s is already in flight here; this request waits for the same outcome", job_id)
                return await self.outcome(held[1])
        try:
            ticket = self.queue.submit(job, queue_job_id, run=run, timeout=timeout)
        except QueueFull as exc:
            return unavailable("busy", str(exc), job_id)
        except QueueClosed as exc:
            return unavailable("draining", str(exc), job_id)
        if job_id is not None:
            # only the event loop reads and writes this map (take() and the done callback it schedules)
            self._in_flight[job_id] = (fingerprint, ticket)
            loop = asyncio.get_running_loop()
            ticket.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._landed, job_id, ticket))
        log.info("%s accepted (Salad job %s)", f"job {job_id}" if job_id else "benchmark job", queue_job_id or "-")
        return await self.outcome(ticket)

    def _landed(self, job_id: str, ticket: Ticket) -> None:
        """``ticket`` has its outcome: its id is free again (a later request renders anew)."""
        if self._in_flight.get(job_id, (None, None))[1] is ticket:
            del self._in_flight[job_id]

    async def outcome(self, ticket: Ticket) -> JobOutcome:
        """Await a ticket's outcome without blocking the event loop; bounded by its timeout."""
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
                asyncio.get_running_loop().run_in_executor(None, partial(self.queue.abandon, ABANDON_WAIT_SEC,
                                                                         ticket))
            elif time.monotonic() - ticket.started > self.timeout_of(ticket) + TIMEOUT_MARGIN_SEC:
                log.error("job %s: no outcome %.0f s past its timeout; answering 500, render thread stuck",
                          ticket.job_id, TIMEOUT_MARGIN_SEC)
                return timed_out(self.timeout_of(ticket), ticket.job_id)


# ----------------------------------------------------------------------------------------------- the app


class HealthBody(BaseModel):
    status: Health
    detail: str | None = None


def _response(outcome: JobOutcome) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SEC} if outcome.http_status == 503 else None
    return JSONResponse(outcome.body, status_code=outcome.http_status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        return "invalid job request: the body is not valid JSON"
    return "invalid job request: " + describe_errors(exc.errors())


def _failure_responses(bad_request: str, worker_fault: str) -> dict[int | str, dict[str, Any]]:
    """An endpoint's failure answers for the OpenAPI schema: every one is the contract's failure body."""
    return {422: {"model": JobFailure, "description": bad_request},
            500: {"model": JobFailure, "description": worker_fault},
            503: {"model": JobFailure, "description": "not ready / busy / shutting down"}}


def create_app(settings: Settings | None = None, *, engine_loader: EngineLoader | None = None,
               options: ServeOptions | None = None, prefect_warmup: Callable[[], Any] | None = None) -> FastAPI:
    """The worker's FastAPI app. ``engine_loader(settings)`` returns a loaded engine (tests inject one;
    the default is the process's cached engine for ``settings``); every job's flow runs on that engine.
    The flow reads its other settings (storage, progress, work dir) from :func:`tasks.settings.get_settings`.
    ``prefect_warmup`` replaces :func:`start_prefect_api` (tests of the HTTP layer alone)."""
    service = WorkerService(settings, engine_loader=engine_loader, options=options, prefect_warmup=prefect_warmup)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            # blocking (waits for the running job), so off the event loop
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="musetalk-flow worker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Lip-sync worker: Salad job-queue HTTP contract (DESIGN §4).")
    install_offline_docs(app)  # a GPU box may have no route to a CDN
    app.state.service = service

    # every job request is judged by the front door before FastAPI parses it (deployments/front_door.py)
    app.add_middleware(FrontDoor, settings=lambda: service.settings)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _response(rejected(_validation_message(exc), job_id=known_job_id(exc.body)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """On the job paths, FastAPI's own errors (405, a body it could not read) get the contract body."""
        if request.url.path not in JOB_PATHS:
            return await http_exception_handler(request, exc)
        status = 422 if exc.status_code == 400 else exc.status_code
        return _response(rejected(f"invalid job request: {exc.detail}", status=status))

    @app.get("/hc", response_model=HealthBody, responses={503: {"model": HealthBody}},
             summary="Readiness: 200 once the models are loaded and warm")
    async def hc() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.post("/generate", response_model=JobSuccess, summary="Render one lip-sync job",
              responses=_failure_responses("bad input (media_error, final)", "worker fault (processing_error)"))
    async def generate_endpoint(
            job: JobRequest,
            salad_job_id: Annotated[str | None, Header(alias="Salad-Job-Id")] = None) -> JSONResponse:
        return _response(await service.take(job.model_dump(mode="json", exclude_unset=True), salad_job_id,
                                            job_id=job.musetalk_job_id))

    @app.post("/benchmark", summary="Measure this worker's GPU (a benchmark flow job, via Salad)",
              responses=_failure_responses("invalid benchmark request", "the measurement failed"))
    async def benchmark_endpoint(
            job: BenchmarkJob,
            salad_job_id: Annotated[str | None, Header(alias="Salad-Job-Id")] = None) -> JSONResponse:
        timeout = service.options.musetalk_benchmark_timeout_sec

        def measure(payload: dict[str, Any], _queue_job_id: str | None) -> JobOutcome:
            # on a render thread: the GPU measured is that slot's, while the other slots go on rendering
            engine = service.slot_here().engine
            device = getattr(engine, "device", None)
            cuda = getattr(device, "type", "cpu") == "cuda"
            return run_benchmark_job(payload, service.settings, timeout, cuda=cuda,
                                     device=str(device) if cuda else None,
                                     release=getattr(engine, "release_gpu_memory", None))

        return _response(await service.take(job.model_dump(mode="json"), salad_job_id, run=measure,
                                            timeout=timeout))

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


def stop_children(timeout: float = CHILD_STOP_SEC) -> int:
    """End every process this one started (Prefect's temporary server, benchmark runs, ffmpeg encoders):
    SIGTERM, then SIGKILL after ``timeout``. Only for the serve process itself, which owns its children;
    returns how many there were."""
    import psutil

    try:  # Prefect's own stop first: it also forgets the server, so its atexit hook has nothing left to do
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()
    except Exception as exc:  # noqa: BLE001 — the process sweep below still ends it
        log.warning("stopping Prefect's temporary server: %s", exc)
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    if children:
        log.info("stopped %d child process(es)%s", len(children), f", {len(alive)} killed" if alive else "")
    return len(children)


def make_server(app: FastAPI, *, log_level: str = "info", owns_process: bool = False,
                stop_requested: threading.Event | None = None):
    """A uvicorn server whose SIGTERM/SIGINT first drains the worker, then shuts down gracefully.

    With ``owns_process`` (the ``musetalk-flow serve`` process, not a test's thread) the shutdown also
    waits for the model loader and ends every child process, and a signal ends the process with status 0
    instead of being raised again (uvicorn re-raises it; SIGTERM's default action would skip every exit
    hook, SIGINT's would end in a KeyboardInterrupt traceback)."""
    import uvicorn

    service: WorkerService = app.state.service

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
            service.drain()
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self):  # type: ignore[override]
            if not owns_process:
                with super().capture_signals():
                    yield
                return
            handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            if stop_requested is not None and stop_requested.is_set():  # signalled before these handlers
                self.handle_exit(signal.SIGTERM, None)
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None) -> None:  # type: ignore[override]
            await super().shutdown(sockets)
            if owns_process:
                service.drain()  # a forced exit (second SIGINT) skipped the lifespan's stop
                await asyncio.to_thread(service.stop_loading)
                await asyncio.to_thread(stop_children)

    # uvicorn waits for open requests past the grace period, until an abandoned job's 503 has gone out
    graceful = int(service.options.musetalk_shutdown_grace_sec + ABANDON_WAIT_SEC) + 5
    # log_config=None: uvicorn's records go to the process's one configuration (tasks/logs.py)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful,
                            log_config=None)
    return DrainingServer(config)


def serve(host: str = "0.0.0.0", port: int = 8000, *, log_level: str = "info",
          stop_requested: threading.Event | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT (``musetalk-flow serve``); 0 after a clean shutdown.

    ``stop_requested``: set by the caller's own signal handlers while this module was still importing
    (torch and Prefect take seconds); such a process stops before it starts anything."""
    from tasks.logs import configure_logging

    configure_logging(log_level.upper())
    if stop_requested is not None and stop_requested.is_set():
        log.info("stopped before start-up")
        return 0
    sock = bind_socket(host, port)
    app = create_app()
    server = make_server(app, log_level=log_level, owns_process=True, stop_requested=stop_requested)
    configure_logging(log_level.upper())  # again: importing Prefect gave uvicorn's loggers a console of their own
    log.info("serving on %s:%d (buffer mode %s)", host, port,
             "on" if app.state.service.buffer is not None else "off")
    server.run(sockets=[sock])
    if not app.state.service.stop_loading(0):
        # the loader is stuck in native code past LOADER_JOIN_SEC: leave without finalizing the interpreter,
        # which would abort under it (our children are already gone)
        log.error("exiting while the model loader is still running")
        logging.shutdown()
        os._exit(0)
    return 0
