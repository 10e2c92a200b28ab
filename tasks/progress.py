"""Orchestrator client (DESIGN §5): job progress, and the buffer worker's heartbeat / claim / report.

Every call carries ``X-Internal-API-Key``; the key lives in an ``httpx.Auth`` object, not in the
client's default headers, so no headers repr or log line can show it. Every response is logged with
method, path, status and elapsed time (INFO for 2xx, WARNING otherwise).

Failure semantics differ on purpose:

* :meth:`OrchestratorClient.progress` is best effort: it never raises and returns whether it worked.
  Only a job's terminal update (succeeded/failed) is worth waiting for: :class:`ProgressReporter` retries
  it through a short orchestrator outage (a restart, a redeploy), so the job's final progress — and with
  it the output URL and metrics — is not lost; running updates are superseded by the next one anyway.
* heartbeat / claim / report raise :class:`OrchestratorError`; the buffer loop logs it, reports it in
  its next heartbeat and retries.

:class:`ProgressReporter` is what the render path uses: it throttles, and sends from a background
thread so a slow orchestrator never slows rendering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextvars import ContextVar
from typing import Any, Callable, Generator, Literal, get_args
from urllib.parse import quote

import httpx
from pydantic import SecretStr
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

from tasks.http_client import PooledClient
from tasks.settings import Settings, get_settings, redact

log = logging.getLogger(__name__)

# Someone else following a job's progress in this context (a batch shows each job's progress as a Prefect
# artifact on that job's run): called with (phase, progress 0..1) on every update, orchestrator or not.
progress_listener: ContextVar[Callable[[str, float], None] | None] = ContextVar("progress_listener",
                                                                               default=None)

Status = Literal["running", "succeeded", "failed"]
Phase = Literal["preparing", "inferring", "encoding", "uploading", "completed", "failed"]
STATUSES: tuple[str, ...] = get_args(Status)
PHASES: tuple[str, ...] = get_args(Phase)
TERMINAL_STATUSES = ("succeeded", "failed")
# How long a reporter keeps retrying a job's terminal update while the orchestrator is unreachable or
# answers 5xx (an orchestrator restart takes seconds). ``close`` waits for it only up to its own timeout,
# so a dead orchestrator delays a job's answer by at most that; a long-lived worker process (serve,
# buffer) keeps retrying on the background thread after the job has answered.
FINAL_RETRY_SEC = 60.0
API_KEY_HEADER = "X-Internal-API-Key"
_EXCERPT = 200


class OrchestratorError(RuntimeError):
    """A failed orchestrator call: method, path, HTTP status (None: no response) and a short reason."""

    def __init__(self, method: str, path: str, status: int | None, reason: str):
        self.method, self.path, self.status_code, self.reason = method, path, status, reason
        what = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"orchestrator {method} {path} failed: {what}: {reason}")


class _ApiKeyAuth(httpx.Auth):
    """Adds the internal API key to each request; holds it as a SecretStr (masked repr)."""

    def __init__(self, key: SecretStr | None):
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._key is not None:
            request.headers[API_KEY_HEADER] = self._key.get_secret_value()
        yield request


def _quote(segment: str) -> str:
    """One URL path segment; ``/`` and ``..`` in ids cannot change the endpoint."""
    return quote(str(segment), safe="")


class OrchestratorClient(PooledClient):
    """Synchronous client for the orchestrator's internal API."""

    def __init__(self, base_url: str | None, api_key: SecretStr | None, worker_id: str, *,
                 buffer_base_url: str | None = None, timeout: float = 5.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/") if base_url else None
        buffer = buffer_base_url or base_url
        self.buffer_base_url = buffer.rstrip("/") if buffer else None
        self.worker_id = worker_id
        self._secret = api_key.get_secret_value() if api_key is not None else ""
        if api_key is None:
            log.warning("INTERNAL_API_KEY is not set; orchestrator calls will carry no API key")
        # Connection failures are retried once by the transport: a request that never connected
        # cannot have been processed, so even POSTs are safe to repeat.
        self._http = httpx.Client(auth=_ApiKeyAuth(api_key), timeout=timeout,
                                  transport=transport or httpx.HTTPTransport(retries=1))

    def __repr__(self) -> str:
        return f"OrchestratorClient(base_url={self.base_url!r}, worker_id={self.worker_id!r})"

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> "OrchestratorClient | None":
        """A client from the environment, or None when no orchestrator URL is configured."""
        settings = settings or get_settings()
        if not settings.orchestrator_url and not settings.buffer_orchestrator_url:
            return None
        return cls(settings.orchestrator_url, settings.internal_api_key, settings.worker_id,
                   buffer_base_url=settings.buffer_orchestrator_url, **kwargs)

    # --- plumbing

    def _clean(self, text: str) -> str:
        return redact(text, [self._secret] if self._secret else [])

    def _post(self, base: str | None, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST and log the outcome; raises OrchestratorError when there is no response at all."""
        if not base:
            raise OrchestratorError("POST", path, None, "no orchestrator URL configured")
        started = time.perf_counter()
        try:
            response = self._http.post(f"{base}{path}", json=body)
        except httpx.HTTPError as exc:
            ms = (time.perf_counter() - started) * 1000
            reason = self._clean(f"{type(exc).__name__}: {exc}")[:_EXCERPT]
            log.warning("orchestrator POST %s -> no response after %.0f ms (%s)", path, ms, reason)
            raise OrchestratorError("POST", path, None, reason) from None
        ms = (time.perf_counter() - started) * 1000
        level = logging.INFO if response.is_success else logging.WARNING
        log.log(level, "orchestrator POST %s -> %d in %.0f ms", path, response.status_code, ms)
        return response

    def _checked(self, base: str | None, path: str, body: dict[str, Any]) -> httpx.Response:
        response = self._post(base, path, body)
        if not response.is_success:
            raise OrchestratorError("POST", path, response.status_code,
                                    self._clean(response.text[:_EXCERPT]))
        return response

    # --- progress (best effort)

    def progress(self, job_id: str, status: Status, progress: float, phase: Phase,
                 metrics: dict[str, Any] | None = None, error: Any = None, output_url: str | None = None) -> bool:
        """POST the job's progress; never raises, returns True on a 2xx."""
        return self.send_progress(job_id, status, progress, phase, metrics, error, output_url) == 200

    def send_progress(self, job_id: str, status: Status, progress: float, phase: Phase,
                      metrics: dict[str, Any] | None = None, error: Any = None,
                      output_url: str | None = None) -> int | None:
        """POST the job's progress; never raises. 200 for any 2xx, else the HTTP status, None when no
        answer came (so a caller can tell an outage worth retrying from a refusal); 422, as the
        orchestrator would answer, when the update could not be sent at all (an invalid status or phase,
        metrics that are not JSON): repeating it cannot help."""
        path = f"/internal/jobs/{_quote(job_id)}/progress"
        if status not in STATUSES or phase not in PHASES:
            log.error("progress for %s not sent: invalid status %r / phase %r", job_id, status, phase)
            return 422
        body: dict[str, Any] = {"status": status, "progress": round(min(max(float(progress), 0.0), 1.0), 4),
                                "phase": phase, "worker_id": self.worker_id}
        if metrics is not None:
            body["metrics"] = metrics
        if error is not None:
            body["error"] = error
        if output_url is not None:
            body["output_url"] = output_url
        try:
            response = self._post(self.base_url, path, body)
        except OrchestratorError:
            return None
        except Exception as exc:  # e.g. metrics that are not JSON: still never break the job
            log.warning("progress for %s not sent: %s", job_id, self._clean(repr(exc))[:_EXCERPT])
            return 422
        return 200 if response.is_success else response.status_code

    # --- buffer mode

    def heartbeat(self, status: Literal["idle", "busy"], gpu_class: str | None, capacity: int,
                  error: str | None = None) -> None:
        """POST a heartbeat; raises OrchestratorError on a non-2xx or no response."""
        path = f"/internal/buffer/workers/{_quote(self.worker_id)}/heartbeat"
        self._checked(self.buffer_base_url, path,
                      {"status": status, "gpu_class": gpu_class, "capacity": capacity, "error": error})

    def claim(self) -> dict[str, Any] | None:
        """Claim one job: the ``job`` object, or None when the queue is empty."""
        path = "/internal/buffer/jobs/claim"
        response = self._checked(self.buffer_base_url, path, {"worker_id": self.worker_id})
        try:
            job = response.json().get("job")
        except (ValueError, AttributeError):
            raise OrchestratorError("POST", path, response.status_code, "response is not a JSON object") from None
        if job is None:
            return None
        if not isinstance(job, dict) or not job.get("buffer_job_id"):
            raise OrchestratorError("POST", path, response.status_code, "claimed job has no buffer_job_id")
        return job

    def report(self, buffer_job_id: str, status: Literal["succeeded", "failed"], error: Any = None,
               output_url: str | None = None, metrics: dict[str, Any] | None = None) -> None:
        """Report a claimed job's outcome; a success without ``output_url`` is a ValueError (never sent)."""
        if status not in ("succeeded", "failed"):
            raise ValueError(f"report status must be 'succeeded' or 'failed', not {status!r}")
        if status == "succeeded" and not output_url:
            raise ValueError("a succeeded report must carry output_url")
        path = f"/internal/buffer/jobs/{_quote(buffer_job_id)}/status"
        self._checked(self.buffer_base_url, path,
                      {"status": status, "error": error, "output_url": output_url, "metrics": metrics})


class ProgressReporter:
    """Live, throttled, non-blocking progress for one job.

    :meth:`update` only records the state; a background thread POSTs it. At most one update is queued
    per ``min_interval`` unless the phase or status changes; a throttled state is kept and sent once the
    interval has passed (or by :meth:`close`), so the orchestrator always ends with the latest state.
    If the network falls behind, the oldest queued states are dropped (``max_pending``), never the newest.
    Without a client (no orchestrator configured) every method is a no-op.
    """

    def __init__(self, client: OrchestratorClient | None, job_id: str, *, min_interval: float = 0.5,
                 max_pending: int = 16, owns_client: bool = False, final_retry_sec: float = FINAL_RETRY_SEC):
        self.job_id = job_id
        self.final_retry_sec = final_retry_sec
        # read here, in the job's own context: updates also come from render threads, which do not see it
        self._listener = progress_listener.get()
        self._owns_client = owns_client
        self.min_interval = min_interval
        self._client = client if client is not None and client.base_url else None
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self._held: dict[str, Any] | None = None
        self._last_queued = float("-inf")
        self._last_key: tuple[str, str] | None = None
        self._progress = 0.0
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if self._client is not None:
            self._thread = threading.Thread(target=self._run, name=f"progress-{job_id}", daemon=True)
            self._thread.start()

    @classmethod
    def from_settings(cls, job_id: str, settings: Settings | None = None, **kwargs: Any) -> "ProgressReporter":
        return cls(OrchestratorClient.from_settings(settings), job_id, owns_client=True, **kwargs)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def update(self, phase: Phase, progress: float, *, status: Status = "running",
               metrics: dict[str, Any] | None = None, error: Any = None, output_url: str | None = None) -> None:
        """Record the job's state (never blocks on the network, never raises)."""
        listener = self._listener
        if listener is not None:
            try:
                listener(phase, progress)
            except Exception:  # a display of progress must never fail the job
                log.debug("progress listener failed", exc_info=True)
        if self._client is None:
            return
        state = {"status": status, "progress": progress, "phase": phase, "metrics": metrics, "error": error,
                 "output_url": output_url}
        with self._cond:
            if self._closed:
                return
            self._progress = progress
            now = time.monotonic()
            if (status, phase) != self._last_key or now - self._last_queued >= self.min_interval:
                self._queue(state, now)
            else:
                self._held = state

    def finish(self, metrics: dict[str, Any] | None = None, output_url: str | None = None) -> None:
        """The job succeeded; the final update carries where its result is (``output_url``)."""
        self.update("completed", 1.0, status="succeeded", metrics=metrics, output_url=output_url)

    def fail(self, error: Any, metrics: dict[str, Any] | None = None) -> None:
        """The job failed (progress stays where it was)."""
        self.update("failed", self._progress, status="failed", metrics=metrics, error=error)

    def close(self, timeout: float = 10.0) -> None:
        """Flush the last state and wait (at most ``timeout`` s) for the sends to finish."""
        if self._thread is None:
            return
        with self._cond:
            if self._held is not None:
                self._queue(self._held, time.monotonic())
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("progress for %s: %d updates still unsent after %.0f s", self.job_id,
                        len(self._pending), timeout)
        elif self._owns_client and self._client is not None:
            self._client.close()

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _queue(self, state: dict[str, Any], now: float) -> None:
        """Append a state (lock held)."""
        self._pending.append(state)
        self._held = None
        self._last_queued = now
        self._last_key = (state["status"], state["phase"])
        self._cond.notify()

    def _run(self) -> None:
        assert self._client is not None
        while True:
            with self._cond:
                while not self._pending:
                    if self._closed:
                        return
                    if self._held is not None:
                        wait = self._last_queued + self.min_interval - time.monotonic()
                        if wait <= 0:
                            self._queue(self._held, time.monotonic())
                            continue
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                state = self._pending.popleft()
            if state["status"] in TERMINAL_STATUSES:
                self._send_final(state)
            else:
                self._client.progress(self.job_id, **state)

    def _send_final(self, state: dict[str, Any]) -> None:
        """Send the terminal update, retrying (bounded) while no answer or a 5xx comes back."""
        assert self._client is not None
        outage = lambda code: code is None or code >= 500  # noqa: E731 - a refusal (4xx) is final
        retrying = Retrying(stop=stop_after_delay(self.final_retry_sec), wait=wait_exponential(0.25, max=4.0),
                            retry=retry_if_result(outage), retry_error_callback=lambda rs: rs.outcome.result())
        code = retrying(self._client.send_progress, self.job_id, **state)
        if outage(code):
            log.warning("final progress for %s not delivered within %.0f s", self.job_id, self.final_retry_sec)
