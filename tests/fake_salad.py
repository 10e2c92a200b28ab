"""A fake SaladCloud public API (DESIGN §9) on 127.0.0.1 for tests, with a job-queue worker.

The API keeps container groups, queues and queue jobs in memory and checks the ``Salad-Api-Key`` header.
:meth:`FakeSalad.connect` plays Salad's HTTP job-queue worker for one queue: worker threads take pending
jobs in order, POST each job's ``input`` to ``<base_url><queue_connection.path>`` (``/generate`` of a real
serve process) with the ``Salad-Job-Id`` header, and record the outcome as Salad does: 2xx → succeeded
with the response body as ``output``; 408/429/5xx → the job is retried (up to ``max_attempts`` deliveries)
and then failed; any other status → failed at once, the response body as ``output``.

Usage::

    fake = FakeSalad()
    with serve_in_thread(fake.app) as (url, _, _):
        env = fake.env(url)                      # SALAD_API_BASE_URL, key, org, project
        fake.add_queue("musetalk-rtx-4090-24gb")
        fake.connect("musetalk-rtx-4090-24gb", "http://127.0.0.1:8123")
        ...
    fake.close()
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

API_KEY = "fake-salad-key-3e9a1f"
ORG, PROJECT = "acme", "lipsync"
TERMINAL = {"succeeded", "failed", "cancelled"}
_RETRY = {408, 429}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_patch(out[key], value)
        else:
            out[key] = value
    return out


class FakeSalad:
    def __init__(self, api_key: str = API_KEY, org: str = ORG, project: str = PROJECT, *,
                 max_attempts: int = 3, poll_s: float = 0.05) -> None:
        self.api_key, self.org, self.project = api_key, org, project
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.groups: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, dict[str, Any]]] = {}  # queue → job id → job
        self.calls: list[tuple[str, str]] = []  # (method, path below the project)
        self.deliveries: list[tuple[str, str, int]] = []  # (queue, job id, HTTP status)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.app = self._make_app()

    # ----------------------------------------------------------------------------- test helpers
    def env(self, base_url: str) -> dict[str, str]:
        """Environment for tasks.salad.salad_client_from_env against this fake."""
        return {"SALAD_API_KEY": self.api_key, "SALAD_ORG_NAME": self.org, "SALAD_PROJECT_NAME": self.project,
                "SALAD_API_BASE_URL": f"{base_url}/api/public"}

    def add_queue(self, name: str) -> None:
        with self._lock:
            self.queues.setdefault(name, {"name": name, "display_name": name, "description": None,
                                          "create_time": _now()})
            self.jobs.setdefault(name, {})

    def job(self, queue: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self.jobs[queue][job_id])

    def connect(self, queue: str, base_url: str, *, path: str = "/generate", workers: int = 1,
                timeout_s: float = 600.0) -> None:
        """Start ``workers`` job-queue workers delivering ``queue``'s jobs to ``base_url + path``."""
        self.add_queue(queue)
        for _ in range(workers):
            thread = threading.Thread(target=self._work, args=(queue, base_url.rstrip("/") + path, timeout_s),
                                      daemon=True, name=f"fake-salad-worker-{queue}")
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    # ----------------------------------------------------------------------------- the worker
    def _take(self, queue: str) -> Optional[dict[str, Any]]:
        with self._lock:
            for job in self.jobs.get(queue, {}).values():  # dicts keep insertion order: oldest first
                if job["status"] == "pending":
                    job["status"] = "running"
                    job["events"].append({"action": "started", "time": _now()})
                    job["update_time"] = _now()
                    return job
        return None

    def _finish(self, job: dict[str, Any], status: str, output: Any) -> None:
        with self._lock:
            if job["status"] == "cancelled":  # cancelled while running: the result is discarded
                return
            job["status"] = status
            job["output"] = output
            job["events"].append({"action": status, "time": _now()})
            job["update_time"] = _now()

    def _work(self, queue: str, url: str, timeout_s: float) -> None:
        with httpx.Client(timeout=timeout_s) as http:
            while not self._stop.is_set():
                job = self._take(queue)
                if job is None:
                    self._stop.wait(self.poll_s)
                    continue
                status, output = None, None
                for _attempt in range(self.max_attempts):
                    try:
                        resp = http.post(url, json=job["input"], headers={"Salad-Job-Id": job["id"]})
                    except httpx.TransportError as exc:
                        status, output = None, {"error": type(exc).__name__}
                        continue
                    status = resp.status_code
                    self.deliveries.append((queue, job["id"], status))
                    try:
                        output = resp.json()
                    except ValueError:
                        output = {"raw": resp.text[:500]}
                    if status not in _RETRY and status < 500:
                        break
                ok = status is not None and 200 <= status < 300
                self._finish(job, "succeeded" if ok else "failed", output)

    # ----------------------------------------------------------------------------- the API
    def _make_app(self) -> FastAPI:
        app = FastAPI()
        prefix = f"/api/public/organizations/{self.org}/projects/{self.project}"

        def error(status: int, title: str) -> JSONResponse:
            return JSONResponse({"type": "about:blank", "title": title, "status": status}, status_code=status)

        @app.middleware("http")
        async def auth(request: Request, call_next):
            if request.headers.get("Salad-Api-Key") != self.api_key:
                return error(401, "Unauthorized")
            path = request.url.path
            if not path.startswith(prefix):
                return error(404, "Not Found")
            self.calls.append((request.method, path[len(prefix):]))
            return await call_next(request)

        # -- container groups
        @app.post(prefix + "/containers")
        async def create_group(request: Request):
            body = await request.json()
            name = body.get("name")
            with self._lock:
                if name in self.groups:
                    return error(409, "Conflict")
                group = dict(body, id=str(uuid.uuid4()), create_time=_now(),
                             current_state={"status": "stopped"})
                self.groups[name] = group
            return JSONResponse(group, status_code=201)

        @app.get(prefix + "/containers/{name}")
        async def get_group(name: str):
            with self._lock:
                group = self.groups.get(name)
            return JSONResponse(group) if group is not None else error(404, "Not Found")

        @app.patch(prefix + "/containers/{name}")
        async def patch_group(name: str, request: Request):
            if request.headers.get("content-type", "").split(";")[0] != "application/merge-patch+json":
                return error(415, "Unsupported Media Type")
            patch = await request.json()
            with self._lock:
                if name not in self.groups:
                    return error(404, "Not Found")
                if "queue_connection" in patch or "name" in patch:
                    return error(400, "queue_connection and name cannot be changed")
                self.groups[name] = _merge_patch(self.groups[name], patch)
                return JSONResponse(self.groups[name])

        @app.post(prefix + "/containers/{name}/{action}")
        async def start_stop(name: str, action: str):
            with self._lock:
                if name not in self.groups or action not in ("start", "stop"):
                    return error(404, "Not Found")
                self.groups[name]["current_state"] = {"status": "running" if action == "start" else "stopped"}
            return Response(status_code=202)

        @app.get(prefix + "/containers/{name}/instances")
        async def instances(name: str):
            with self._lock:
                group = self.groups.get(name)
            if group is None:
                return error(404, "Not Found")
            n = int(group.get("replicas", 0))
            return {"instances": [{"instance_id": f"{name}-{i}", "state": "running", "ready": True}
                                  for i in range(n)]}

        # -- queues
        @app.post(prefix + "/queues")
        async def create_queue(request: Request):
            body = await request.json()
            with self._lock:
                if body.get("name") in self.queues:
                    return error(409, "Conflict")
            self.add_queue(body["name"])
            with self._lock:
                self.queues[body["name"]].update({k: body.get(k) for k in ("display_name", "description")})
                return JSONResponse(self.queues[body["name"]], status_code=201)

        @app.get(prefix + "/queues/{queue}")
        async def get_queue(queue: str):
            with self._lock:
                if queue not in self.queues:
                    return error(404, "Not Found")
                pending = sum(1 for j in self.jobs[queue].values() if j["status"] == "pending")
                return dict(self.queues[queue], current_queue_length=pending)

        @app.post(prefix + "/queues/{queue}/jobs")
        async def create_job(queue: str, request: Request):
            body = await request.json()
            with self._lock:
                if queue not in self.queues:
                    return error(404, "Not Found")
                if not isinstance(body.get("input"), dict):
                    return error(400, "input is required")
                job = {"id": str(uuid.uuid4()), "input": body["input"], "metadata": body.get("metadata"),
                       "webhook": body.get("webhook"), "status": "pending", "output": None,
                       "events": [{"action": "created", "time": _now()}], "create_time": _now(),
                       "update_time": _now()}
                self.jobs[queue][job["id"]] = job
                return JSONResponse(dict(job), status_code=201)

        @app.get(prefix + "/queues/{queue}/jobs/{job_id}")
        async def get_job(queue: str, job_id: str):
            with self._lock:
                job = self.jobs.get(queue, {}).get(job_id)
                return JSONResponse(dict(job)) if job is not None else error(404, "Not Found")

        @app.delete(prefix + "/queues/{queue}/jobs/{job_id}")
        async def cancel_job(queue: str, job_id: str):
            with self._lock:
                job = self.jobs.get(queue, {}).get(job_id)
                if job is None:
                    return error(404, "Not Found")
                if job["status"] not in TERMINAL:
                    job["status"] = "cancelled"
                    job["events"].append({"action": "cancelled", "time": _now()})
            return Response(status_code=202)

        return app


