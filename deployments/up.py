"""``musetalk-flow up``: the whole system on one machine, for a newcomer or a demo box.

It starts, as child processes stopped together on Ctrl-C, SIGTERM or SIGHUP (each child runs in a session
of its own, so only this process can stop it: a signal that ended this process alone would leave them all
running):

1. a Prefect server on embedded SQLite (``$PREFECT_HOME``), unless ``PREFECT_API_URL`` names one already;
2. the project's deployments and work pools (``musetalk-flow deploy``'s work);
3. the orchestrator (``musetalk-flow orchestrator``) — the public API and ``/docs``;
4. one local worker: ``musetalk-flow serve`` in buffer mode, so jobs routed ``auto`` or ``buffer`` render on
   this machine's warm engine (models from ``MUSETALK_MODELS_DIR``; ``--tiny`` makes random-weight ones);
5. with ``--gpu-worker``, a Prefect process worker on pool ``gpu`` too; where ``SALAD_API_KEY`` is set, a
   Prefect worker on pool ``control`` for the scheduled ``scale`` flow.

API keys: ``MUSETALK_API_KEYS`` and ``INTERNAL_API_KEY`` from the environment, else fresh ones printed
once at start (the internal key is shared with the local worker only)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from tasks.http_client import poll_http
from tasks.logs import disable_telemetry

log = logging.getLogger(__name__)

PY = sys.executable
START_TIMEOUT_S = 240
# real weights: loading, and on a GPU capturing graphs or compiling, can take minutes on a first start
WORKER_READY_TIMEOUT_S = 1200


class StartError(RuntimeError):
    """A part of the system did not start; the message says which, why and where its log is."""


class Child:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Prefect workers stop on SIGINT, not SIGTERM
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def wait_http(url: str, child: Child | None, timeout: float = START_TIMEOUT_S,
              not_yet: Callable[[httpx.Response], None] = lambda answer: None) -> None:
    outcome = poll_http(url, timeout, exited=lambda: child is not None and child.proc.poll() is not None,
                        request_timeout=2, not_yet=not_yet)
    if outcome == "exited":
        assert child is not None
        raise StartError(f"{child.name} exited (rc {child.proc.returncode}); see {child.log_path}")
    if outcome == "timeout":
        raise StartError(f"{url} did not answer within {timeout:.0f} s"
                         + (f"; see {child.log_path}" if child is not None else ""))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_worker_ready(url: str, child: Child, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
    """Until the worker's ``/hc`` is 200; StartError with the reason as soon as it says its models
    failed to load (it stays up, answering 503 ``error``, so only its answer tells), or it exits."""

    def load_failed(answer: httpx.Response) -> None:
        try:
            body = answer.json()
        except ValueError:
            return
        if isinstance(body, dict) and body.get("status") == "error":
            raise StartError(f"the worker could not start: {body.get('detail')}; see {child.log_path}")

    wait_http(url, child, timeout, not_yet=load_failed)


def up(*, host: str = "127.0.0.1", port: int = 8080, worker_port: int = 8001, prefect_port: int = 4200,
       log_dir: Path = Path("up-logs"), tiny: bool = False, gpu_worker: bool = False) -> int:
    # SIGTERM (systemd, docker stop, kill) and SIGHUP (the terminal closed) stop everything like Ctrl-C; SIGINT
    # too, even where it was ignored (a shell's background job)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    disable_telemetry(env)  # the Prefect server and every child started here
    api_keys = env.get("MUSETALK_API_KEYS") or f"mt-{secrets.token_urlsafe(18)}"
    env["MUSETALK_API_KEYS"] = api_keys
    env["INTERNAL_API_KEY"] = env.get("INTERNAL_API_KEY") or secrets.token_urlsafe(24)
    children: list[Child] = []
    try:
        if not env.get("PREFECT_API_URL"):
            server = Child("prefect-server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                              "--port", str(prefect_port)], env, log_dir)
            children.append(server)
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
            if not (env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or env.get("PREFECT_API_DATABASE_CONNECTION_URL")):
                # SQLite has one writer: the orchestrator queues its writes instead of meeting "database is locked"
                env.setdefault("MUSETALK_PREFECT_MAX_WRITES", "1")
            wait_http(f"{env['PREFECT_API_URL']}/health", server)
        print(f"Prefect: {env['PREFECT_API_URL'].removesuffix('/api')} (UI)", flush=True)
        subprocess.run([PY, "-m", "deployments.cli", "deploy"], env=env, check=True, stdout=subprocess.DEVNULL)
        orchestrator = Child("orchestrator", [PY, "-m", "deployments.cli", "orchestrator", "--host", host,
                                              "--port", str(port)], env, log_dir)
        children.append(orchestrator)
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_http(f"{base}/hc", orchestrator)
        worker_env = dict(env, BUFFER_WORKER_ID=env.get("BUFFER_WORKER_ID") or "local-gpu-0",
                          ORCHESTRATOR_BASE_URL=base, BUFFER_POLL_INTERVAL_SEC=env.get("BUFFER_POLL_INTERVAL_SEC") or "5")
        if tiny:
            models = log_dir.resolve() / "tiny-models"
            if not (models / "musetalkV15").is_dir():
                subprocess.run([PY, "-m", "deployments.cli", "models", "make-tiny", str(models)], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            worker_env["MUSETALK_MODELS_DIR"] = str(models)
        worker = Child("worker", [PY, "-m", "deployments.cli", "serve", "--host", "127.0.0.1",
                                  "--port", str(worker_port)], worker_env, log_dir)
        children.append(worker)
        # the banner means "submit now": a job routed while no worker had heartbeated yet would go to the
        # gpu pool, which has no worker here
        print("worker: loading and warming the models …", flush=True)
        wait_worker_ready(f"http://127.0.0.1:{worker_port}/hc", worker)
        if gpu_worker:
            children.append(Child("gpu-worker", [PY, "-m", "prefect", "worker", "start", "--pool", "gpu",
                                                 "--limit", "1"], dict(env, ORCHESTRATOR_BASE_URL=base), log_dir))
        if env.get("SALAD_API_KEY"):
            children.append(Child("control-worker", [PY, "-m", "prefect", "worker", "start", "--pool", "control"],
                                  env, log_dir))
        print(f"orchestrator: {base}  (API docs {base}/docs)\nAPI key: {api_keys.split(',')[0]}\n"
              f"logs: {log_dir}/  — Ctrl-C stops everything", flush=True)
        while all(c.proc.poll() is None for c in children):
            time.sleep(1)
        dead = next(c for c in children if c.proc.poll() is not None)
        print(f"{dead.name} exited (rc {dead.proc.returncode}); see {dead.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
