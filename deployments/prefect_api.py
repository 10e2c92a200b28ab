"""The Prefect API this process talks to: the configured server, or a temporary one started here.

Every entry point that runs flows in-process (``musetalk-flow serve``, ``musetalk-flow batch`` without
``--submit``) calls :func:`start_prefect_api` first, so the temporary server starts once, with the
project's start timeout, and a broken API is one clear error before any model loads."""

from __future__ import annotations

from tasks.settings import get_settings


def start_prefect_api(timeout_s: float | None = None) -> str:
    """The API URL, once it answers: start the temporary server when no ``PREFECT_API_URL`` is set (the
    flows of this process reuse it), then health-check it.

    The start timeout is the larger of ``MUSETALK_PREFECT_START_TIMEOUT_SEC`` (default 120 s) and
    Prefect's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``: the server's first start (database
    migrations) takes 15-20 s on a loaded machine, at or past Prefect's default of 20 s."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    api = PREFECT_API_URL.value()
    if not api:
        from prefect.server.api.server import SubprocessASGIServer

        wait = timeout_s if timeout_s is not None else get_settings().musetalk_prefect_start_timeout_sec
        server = SubprocessASGIServer()  # the process-wide instance that the flows' clients use too
        server.start(timeout=max(wait, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        api = server.api_url
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise RuntimeError(f"the Prefect API at {api} is not healthy: {problem}")
    return api
