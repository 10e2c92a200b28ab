"""SaladCloud public API client (container groups, instances, job queues) and Prefect tasks over it.

Every call carries the `Salad-Api-Key` header; the key is a `SecretStr` and never appears in logs,
exceptions, task parameters or results. Tasks build their client from the environment
(`salad_client_from_env`), so no secret is ever a Prefect parameter.

Retries (tenacity): GET/PATCH/DELETE/start/stop are idempotent and are retried (bounded, with backoff that honours
`Retry-After`) on 429, 5xx and connection errors. Job creation is retried only on 429 and on failures to
connect, where the server cannot have created the job; a 5xx there is raised, not repeated, so a job is
never queued twice. Creating a queue or a container group follows the same rule.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional, Union
from urllib.parse import quote

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type, stop_after_attempt

from tasks.http_client import PooledClient
from tasks.settings import Settings, read_settings, redact

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.salad.com/api/public"
MERGE_PATCH = "application/merge-patch+json"
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_EXCERPT = 300

# Environment names (DESIGN §7); SALAD_API_BASE_URL is an optional extra for staging and tests.
ENV_API_KEY = "SALAD_API_KEY"
ENV_ORG = "SALAD_ORG_NAME"
ENV_PROJECT = "SALAD_PROJECT_NAME"
ENV_BASE_URL = "SALAD_API_BASE_URL"


class SaladApiError(RuntimeError):
    """A failed Salad API call: HTTP status (None: no response), method, path and a body excerpt."""

    def __init__(self, method: str, path: str, status: Optional[int], excerpt: str) -> None:
        self.method = method
        self.path = path
        self.status_code = status
        self.excerpt = excerpt
        where = f"{method} {path}"
        what = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"Salad API {where} failed: {what}: {excerpt}")

    @property
    def retryable(self) -> bool:
        return self.status_code is None or self.status_code in _RETRY_STATUSES


class _Again(Exception):
    """A failure worth another attempt; ``error`` is what the caller gets when none is left."""

    def __init__(self, error: SaladApiError, response: Optional[httpx.Response]):
        super().__init__(str(error))
        self.error = error
        self.response = response


class SaladClient(PooledClient):
    """Synchronous client for one organization/project of the SaladCloud public API."""

    def __init__(
        self,
        api_key: Union[SecretStr, str],
        org: str,
        project: str,
        base_url: str = DEFAULT_BASE_URL,
        transport: Optional[httpx.BaseTransport] = None,
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        if not self._key.get_secret_value():
            raise ValueError("Salad API key is empty")
        if not org or not project:
            raise ValueError("Salad organization and project names are required")
        self.org = org
        self.project = project
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            timeout=timeout_s,
            headers={"Salad-Api-Key": self._key.get_secret_value(), "Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"SaladClient(org={self.org!r}, project={self.project!r}, base_url={self.base_url!r})"

    # -- container groups
    def get_container_group(self, name: str) -> dict[str, Any]:
        return self._request("GET", self._project_path("containers", name))

    def set_replicas(self, name: str, replicas: int) -> dict[str, Any]:
        """PATCH the replica count (JSON merge patch)."""
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        return self._request(
            "PATCH",
            self._project_path("containers", name),
            body={"replicas": int(replicas)},
            content_type=MERGE_PATCH,
        )

    def start(self, name: str) -> None:
        self._request("POST", self._project_path("containers", name, "start"))

    def stop(self, name: str) -> None:
        self._request("POST", self._project_path("containers", name, "stop"))

    def create_container_group(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """POST a new container group (see tasks.salad_provision for the spec). Not repeated on a 5xx:
        provisioning reads the group back first, so a group that was created anyway is found next run."""
        return self._request("POST", self._project_path("containers"), body=dict(spec), idempotent=False)

    def update_container_group(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """PATCH a container group with a JSON merge patch (image, resources, probes, …)."""
        return self._request(
            "PATCH", self._project_path("containers", name), body=dict(patch), content_type=MERGE_PATCH
        )

    def list_instances(self, name: str) -> list[dict[str, Any]]:
        body = self._request("GET", self._project_path("containers", name, "instances"))
        return list(body.get("instances", [])) if isinstance(body, dict) else list(body or [])

    # -- queues and jobs
    def get_queue(self, queue: str) -> dict[str, Any]:
        return self._request("GET", self._project_path("queues", queue))

    def create_queue(
        self, name: str, display_name: Optional[str] = None, description: Optional[str] = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if display_name is not None:
            body["display_name"] = display_name
        if description is not None:
            body["description"] = description
        return self._request("POST", self._project_path("queues"), body=body, idempotent=False)

    def get_queue_length(self, queue: str) -> int:
        """The queue's `current_queue_length` (jobs waiting)."""
        body = self.get_queue(queue)
        value = body.get("current_queue_length") if isinstance(body, dict) else None
        if value is None:
            raise SaladApiError("GET", self._project_path("queues", queue), 200,
                                "response has no current_queue_length")
        return int(value)

    def create_job(
        self,
        queue: str,
        input: Mapping[str, Any],  # noqa: A002 - the API's field name
        metadata: Optional[Mapping[str, Any]] = None,
        webhook: Optional[str] = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"input": dict(input)}
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if webhook is not None:
            body["webhook"] = webhook
        return self._request(
            "POST", self._project_path("queues", queue, "jobs"), body=body, idempotent=False
        )

    def get_job(self, queue: str, job_id: str) -> dict[str, Any]:
        """A queue job; `status` is one of pending|running|succeeded|cancelled|failed."""
        return self._request("GET", self._project_path("queues", queue, "jobs", job_id))

    def cancel_job(self, queue: str, job_id: str) -> None:
        """Cancel a queue job (DELETE): a pending job is never handed to a container."""
        self._request("DELETE", self._project_path("queues", queue, "jobs", job_id))

    # -- plumbing
    def _project_path(self, *parts: str) -> str:
        segs = ["organizations", self.org, "projects", self.project, *parts]
        return "/" + "/".join(quote(str(s), safe="") for s in segs)

    def _delay(self, attempt: int, response: Optional[httpx.Response]) -> float:
        delay = self.backoff_s * (2 ** (attempt - 1))
        if response is not None:
            try:
                delay = max(delay, float(response.headers.get("Retry-After", "")))
            except ValueError:
                pass
        return min(delay, self.max_backoff_s)

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Optional[Any] = None,
        content_type: str = "application/json",
        idempotent: bool = True,
    ) -> Any:
        content = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if content is not None else None

        def once() -> Any:
            try:
                resp = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                # a request that never reached Salad is safe to repeat even when it is not idempotent
                may_retry = idempotent or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                log.warning("Salad API %s %s: %s", method, path, type(exc).__name__)
                error = SaladApiError(method, path, None, type(exc).__name__)
                raise (_Again(error, None) if may_retry else error) from None
            if resp.is_success:
                log.info("Salad API %s %s -> %d", method, path, resp.status_code)
                if not resp.content:
                    return {}
                try:
                    return resp.json()
                except ValueError:
                    return {"raw": resp.text[:_EXCERPT]}
            may_retry = resp.status_code == 429 or (idempotent and resp.status_code in _RETRY_STATUSES)
            log.warning("Salad API %s %s -> %d", method, path, resp.status_code)
            excerpt = redact(" ".join(resp.text.split()), [self._key.get_secret_value()])[:_EXCERPT]
            error = SaladApiError(method, path, resp.status_code, excerpt)
            raise _Again(error, resp) if may_retry else error

        def wait(state: RetryCallState) -> float:
            return self._delay(state.attempt_number, state.outcome.exception().response)

        try:
            return Retrying(stop=stop_after_attempt(self.max_attempts), wait=wait,
                            retry=retry_if_exception_type(_Again))(once)
        except RetryError as exc:  # out of attempts: the last answer is the error
            raise exc.last_attempt.exception().error from None


def salad_credentials(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """SALAD_API_KEY, SALAD_ORG_NAME, SALAD_PROJECT_NAME and SALAD_API_BASE_URL (empty when unset): from
    ``env`` when given (tests), else from the project's settings — the environment and ``.env`` — read
    now rather than from the cached settings, so a process whose environment changed sees the change."""
    if env is not None:
        return {name: env.get(name) or "" for name in (ENV_API_KEY, ENV_ORG, ENV_PROJECT, ENV_BASE_URL)}
    settings = read_settings(Settings)
    key = settings.salad_api_key.get_secret_value() if settings.salad_api_key else ""
    return {ENV_API_KEY: key, ENV_ORG: settings.salad_org_name or "", ENV_PROJECT: settings.salad_project_name or "",
            ENV_BASE_URL: settings.salad_api_base_url or ""}


def _missing(found: Mapping[str, str]) -> list[str]:
    """The required Salad settings that are unset (the base URL has a default)."""
    return [name for name in (ENV_API_KEY, ENV_ORG, ENV_PROJECT) if not found[name]]


def salad_client_from_env(env: Optional[Mapping[str, str]] = None, **kwargs: Any) -> SaladClient:
    """Build a client from SALAD_API_KEY, SALAD_ORG_NAME, SALAD_PROJECT_NAME (and SALAD_API_BASE_URL), read
    as :func:`salad_credentials` says."""
    found = salad_credentials(env)
    missing = _missing(found)
    if missing:
        raise RuntimeError(f"Salad API settings missing from the environment and .env: {', '.join(missing)}")
    return SaladClient(SecretStr(found[ENV_API_KEY]), found[ENV_ORG], found[ENV_PROJECT],
                       base_url=found[ENV_BASE_URL] or DEFAULT_BASE_URL, **kwargs)


# ------------------------------------------------------------------------- Prefect tasks
# Reads are never cached (a stale queue length or replica count is worse than none). The client already
# retries transient faults; the task retries once more later, but never a final 4xx (bad key, no group).


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    exc = getattr(state, "data", None)
    return not (isinstance(exc, SaladApiError) and not exc.retryable)


_TASK_OPTS: dict[str, Any] = {
    "retries": 1,
    "retry_delay_seconds": 5,
    "retry_condition_fn": _worth_retrying,
    "cache_policy": NO_CACHE,
}


@task(name="salad-queue-length", **_TASK_OPTS)
def read_queue_length(queue_name: str) -> int:
    """Jobs waiting in a Salad job queue."""
    with salad_client_from_env() as client:
        return client.get_queue_length(queue_name)


@task(name="salad-replicas", **_TASK_OPTS)
def read_replicas(container_group: str) -> int:
    """Configured replica count of a container group."""
    with salad_client_from_env() as client:
        return int(client.get_container_group(container_group).get("replicas", 0))


def salad_configured(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when the Salad API key, organization and project are all set (see :func:`salad_credentials`)."""
    return not _missing(salad_credentials(env))


@task(name="salad-set-replicas", **_TASK_OPTS)
def write_replicas(container_group: str, replicas: int) -> int:
    """Set a container group's replica count; returns the count the API reports back."""
    with salad_client_from_env() as client:
        body = client.set_replicas(container_group, replicas)
    return int(body.get("replicas", replicas)) if isinstance(body, dict) else replicas
