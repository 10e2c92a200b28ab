"""The whole system end to end (issue 14's acceptance), every part a real process on 127.0.0.1:

a Prefect server (SQLite), the orchestrator (``musetalk-flow orchestrator``), two ``musetalk-flow serve``
processes in buffer mode, a Prefect process worker on pool ``gpu``, and a fake Salad API whose job-queue
worker forwards its queue's jobs to a third serve process's ``/generate``. Tiny random-weight models,
short clips, so a render takes seconds on a CPU.

One scenario, in order: six jobs with mixed routes through the public API (one repeated with its
Idempotency-Key, one cancelled while queued), the orchestrator restarted mid-batch, all six succeed with
outputs and sidecars, one flow run per job with its progress artifact, a signed webhook; then a buffer
worker SIGKILLed mid-job: its job is requeued to the other buffer worker and its late report gets 409."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
import pytest
from fastapi import FastAPI, Request

from musetalk_engine.sample_media import make_speech
from tests.fake_salad import FakeSalad
from tests.hostile_media import UNSET_ENV, avatar_clip
from tests.servers import free_port, media_server, serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
pytest_plugins = ["tests.fixtures_engine"]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY, INTERNAL, WEBHOOK_SECRET = "system-key", "system-internal", "system-webhook-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OFFLINE_SEC = 15
RTX_4090 = "ed563892-aacd-40f5-80b7-90c9be6c759b"
RTX_4080 = "0d062939-7c01-4aae-a2b1-30e315124e51"


class Proc:
    """A child process in its own session (so a SIGKILL takes its children too), output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name, self.args, self.env = name, args, env
        self.log_path = logs / f"{name}.log"
        self.start()

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, chars: int = 2500) -> str:
        return f"--- {self.name} (rc={self.proc.poll()}) ---\n{self.log_path.read_text(errors='replace')[-chars:]}"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Prefect workers stop on SIGINT; uvicorn too
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self._log.close()


class System:
    def __init__(self, root: Path, models: Path):
        self.root, self.t0 = root, time.monotonic()
        self.procs: dict[str, Proc] = {}
        self.logs = root / "logs"
        self.logs.mkdir()
        self.results = root / "results"
        env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV and not k.startswith(("PREFECT_", "SALAD_"))}
        self.prefect_port, self.orch_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.base = f"http://127.0.0.1:{self.orch_port}"
        env.update({
            "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "PYTHONUNBUFFERED": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            # SQLite takes one writer at a time: on a loaded 2-core machine, fewer writes (no run logs shipped,
            # no Late marking) and a longer lock wait keep it answering (a fleet uses PostgreSQL)
            "PREFECT_LOGGING_TO_API_ENABLED": "false", "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
            "MUSETALK_MODELS_DIR": str(models), "MUSETALK_ALLOW_PRIVATE_URLS": "true",
            "MUSETALK_RESULT_DIR": str(self.results), "MUSETALK_DOWNLOAD_RETRY_BASE_SEC": "0.05",
            "INTERNAL_API_KEY": INTERNAL, "ORCHESTRATOR_BASE_URL": self.base, "MUSETALK_REPO_DIR": str(REPO),
        })
        self.env = env

    def mark(self, what: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {what}", flush=True)

    def spawn(self, name: str, args: list[str], drop: tuple[str, ...] = (), **extra: str) -> Proc:
        env = dict(self.env, MUSETALK_WORKDIR=str(self.root / name), **extra)
        for key in drop:
            env.pop(key, None)
        (self.root / name).mkdir(exist_ok=True)
        self.procs[name] = Proc(name, args, env, self.logs)
        return self.procs[name]

    def wait(self, check, timeout: float, what: str, step: float = 0.3):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            for p in self.procs.values():
                if p.proc.poll() is not None and not getattr(p, "expected_dead", False):
                    pytest.fail(f"{p.name} exited while waiting for {what}\n{p.tail()}")
            time.sleep(step)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n" +
                    "\n".join(p.tail() for p in self.procs.values()))

    def answers(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def start_orchestrator(self, salad_env: dict[str, str]) -> None:
        self.spawn("orchestrator", [PY, "-m", "deployments.cli", "orchestrator", "--host", "127.0.0.1",
                                    "--port", str(self.orch_port), "--log-level", "warning"],
                   MUSETALK_API_KEYS=API_KEY, MUSETALK_WORKER_OFFLINE_SEC=str(OFFLINE_SEC),
                   MUSETALK_SWEEP_INTERVAL_SEC="1", MUSETALK_WEBHOOK_SECRET=WEBHOOK_SECRET,
                   MUSETALK_WEBHOOK_RETRY_BASE_SEC="0.2", MUSETALK_GPU_TARGETS=str(REPO / "gpu_targets.json"),
                   MUSETALK_SALAD_PRICES=str(REPO / "salad_prices.json"), **salad_env)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()


@pytest.fixture()
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("system-media")
    avatar_clip(d / "avatar.mp4")
    make_speech(d / "speech.wav", seconds=0.6)
    make_speech(d / "long.wav", seconds=6.0)  # the job a worker dies in the middle of
    with media_server(d) as url:
        yield url


def prefect_runs(api: str, tag: str) -> list[Any]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with SyncPrefectClient(api) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def progress_artifacts(api: str, run_id) -> list[Any]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with SyncPrefectClient(api) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["progress"])))


def gpu_worker_online(api: str) -> bool:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api) as client:
        try:
            return any(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool("gpu"))
        except Exception:  # noqa: BLE001 — the pool is not there yet
            return False


def test_the_whole_system(tmp_path, tiny_models, inputs):
    from orchestrator.webhooks import SIGNATURE_HEADER, verify_signature
    from tasks.salad_provision import names_by_class

    system = System(tmp_path, tiny_models)
    hooks: list[tuple[dict, bool]] = []
    receiver = FastAPI()

    @receiver.post("/hook")
    async def hook(request: Request):
        raw = await request.body()
        hooks.append((json.loads(raw), verify_signature(WEBHOOK_SECRET, raw, request.headers.get(SIGNATURE_HEADER))))
        return {"ok": True}

    targets = json.loads((REPO / "gpu_targets.json").read_text())
    queues = names_by_class(targets)
    fake = FakeSalad()
    try:
        with serve_in_thread(fake.app) as (salad_url, _, _), serve_in_thread(receiver) as (hook_url, _, _):
            salad_env = fake.env(salad_url)
            # ---- start everything; the slow starts overlap
            system.spawn("prefect-server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                            "--port", str(system.prefect_port)], drop=("PREFECT_API_URL",))
            system.wait(lambda: system.answers(f"{system.api}/health"), 180, "the Prefect server")
            system.mark("prefect server up")
            system.start_orchestrator(salad_env)
            serve_ports = {name: free_port() for name in ("buffer-1", "buffer-2", "salad-gpu")}
            for name in ("buffer-1", "buffer-2"):
                system.spawn(name, [PY, "-m", "deployments.cli", "serve", "--host", "127.0.0.1",
                                    "--port", str(serve_ports[name])], BUFFER_WORKER_ID=name, BUFFER_POLL_INTERVAL_SEC="2")
            system.spawn("salad-gpu", [PY, "-m", "deployments.cli", "serve", "--host", "127.0.0.1",
                                       "--port", str(serve_ports["salad-gpu"])], GPU_CLASS_NAME="RTX 4090 (24 GB)")
            system.wait(lambda: system.answers(f"{system.base}/hc"), 180, "the orchestrator")
            system.mark("orchestrator up (deployments registered)")
            system.spawn("gpu-worker", [PY, "-m", "prefect", "worker", "start", "--pool", "gpu", "--limit", "1"])
            for name, port in serve_ports.items():
                system.wait(lambda: system.answers(f"http://127.0.0.1:{port}/hc"), 300, f"serve {name}")
            fake.add_queue(queues[RTX_4080].queue)  # a queue no container serves: the cancelled job's
            fake.connect(queues[RTX_4090].queue, f"http://127.0.0.1:{serve_ports['salad-gpu']}")
            system.wait(lambda: gpu_worker_online(system.api), 120, "the gpu pool's worker")
            system.mark("workers ready")

            api = httpx.Client(base_url=system.base, timeout=120)  # a loaded CI machine is slow
            # ---- authentication
            assert api.get("/v1/avatar/jobs").status_code == 401
            assert api.post("/v1/avatar/jobs", json={}).status_code == 401
            assert api.post("/internal/buffer/jobs/claim", json={"worker_id": "x"},
                            headers={"X-Internal-API-Key": "wrong"}).status_code == 401

            # ---- six jobs, mixed routes
            media = {"video_url": f"{inputs}/avatar.mp4", "audio_url": f"{inputs}/speech.wav"}
            specs = [{"route": "buffer", "webhook_url": f"{hook_url}/hook", "metadata": {"n": 1}},
                     {"route": "buffer"}, {"route": "gpu"}, {"route": "gpu", "priority": "urgent"},
                     {"route": f"salad:{RTX_4090}", "resolution": "720p"}, {"route": "auto"}]
            ids, seen = [], {}
            for i, spec in enumerate(specs):
                headers = {**AUTH, "Idempotency-Key": "first-job"} if i == 0 else AUTH
                r = api.post("/v1/avatar/jobs", json={**media, **spec}, headers=headers)
                assert r.status_code == 202 and r.json()["status"] == "queued", r.text
                ids.append(r.json()["id"])
                seen[ids[-1]] = [("queued", 0.0)]
            again = api.post("/v1/avatar/jobs", json={**media, **specs[0]}, headers={**AUTH, "Idempotency-Key": "first-job"})
            assert again.status_code == 200 and again.json()["id"] == ids[0]
            cancelled = api.post("/v1/avatar/jobs", json={**media, "route": f"salad:{RTX_4080}"}, headers=AUTH).json()["id"]
            assert api.delete(f"/v1/avatar/jobs/{cancelled}", headers=AUTH).json() == {"id": cancelled, "status": "cancelled"}
            system.mark("6 jobs submitted, 1 cancelled")

            def look() -> dict[str, dict]:
                views = {}
                for job_id in ids:
                    try:
                        r = api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH)
                    except httpx.HTTPError:
                        continue  # the orchestrator is restarting
                    if r.status_code == 200:
                        views[job_id] = v = r.json()
                        if (v["status"], v["progress"]) != seen[job_id][-1]:
                            seen[job_id].append((v["status"], v["progress"]))
                return views

            # ---- restart the orchestrator mid-batch
            system.wait(lambda: any(v["status"] == "running" for v in look().values()), 120, "a running job")
            orchestrator = system.procs["orchestrator"]
            orchestrator.proc.send_signal(signal.SIGTERM)
            orchestrator.proc.wait(60)
            system.mark("orchestrator stopped mid-batch")
            system.start_orchestrator(salad_env)
            system.wait(lambda: system.answers(f"{system.base}/hc"), 120, "the restarted orchestrator")
            system.mark("orchestrator restarted")

            views = system.wait(lambda: (v := look()) and len(v) == len(ids) and all(
                x["status"] in ("succeeded", "failed", "cancelled") for x in v.values()) and v, 300, "all six jobs")
            system.mark("all six finished")
            for job_id, view in views.items():
                assert view["status"] == "succeeded", (view, seen[job_id])
                assert view["progress"] == 1.0 and view["metrics"] and view["output_url"].startswith("file://")
                video = Path(url2pathname(urlsplit(view["output_url"]).path))
                assert video.is_file() and video.stat().st_size > 0 and video.with_suffix(".json").is_file()
                sidecar = json.loads(video.with_suffix(".json").read_text())
                assert sidecar["musetalk_job_id"] == job_id
                runs = prefect_runs(system.api, f"job:{job_id}")
                assert len(runs) == 1 and runs[0].state.is_completed(), runs
                assert progress_artifacts(system.api, runs[0].id), f"job {job_id} has no progress artifact"
            routes = [views[j]["route"] for j in ids]
            assert routes[:5] == ["buffer", "buffer", "gpu", "gpu", f"salad:{RTX_4090}"]
            assert routes[5] in ("buffer", "gpu")
            assert views[ids[4]]["metrics"].get("gpu_class") == "RTX 4090 (24 GB)"
            running_seen = [j for j in ids if any(s == "running" and 0 < p < 1 for s, p in seen[j])]
            assert running_seen, f"no job was seen running with partial progress: {seen}"
            for j in ids:  # progress only rises within one attempt
                values = [p for s, p in seen[j] if s == "running"]
                assert values == sorted(values), seen[j]
            gone = api.get(f"/v1/avatar/jobs/{cancelled}", headers=AUTH).json()
            assert gone["status"] == "cancelled" and gone["output_url"] is None
            assert not list(system.results.rglob(f"*{cancelled}*")), "the cancelled job rendered"
            system.wait(lambda: hooks, 60, "the webhook")
            body, signed = hooks[0]
            assert signed and body["id"] == ids[0] and body["status"] == "succeeded" and body["metadata"] == {"n": 1}

            # ---- a buffer worker dies mid-job: requeued to the other one; its late report is refused
            job_id = api.post("/v1/avatar/jobs", json={**media, "audio_url": f"{inputs}/long.wav", "route": "buffer"},
                              headers=AUTH).json()["id"]
            view = system.wait(lambda: (v := api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json())["status"]
                               == "running" and v["worker_id"] and v, 120, "the long job to start", step=0.1)
            victim = view["worker_id"]
            lease = (prefect_runs(system.api, f"job:{job_id}")[0].labels or {})["musetalk.lease"]
            system.procs[victim].expected_dead = True
            system.procs[victim].kill()
            system.mark(f"SIGKILLed {victim} mid-job")
            final = system.wait(lambda: (v := api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json())["status"]
                                in ("succeeded", "failed") and v, OFFLINE_SEC + 180, "the requeued job")
            system.mark("requeued job finished")
            assert final["status"] == "succeeded" and final["attempt"] == 2 and final["worker_id"] != victim, final
            late = api.post(f"/internal/buffer/jobs/{lease}/status", headers={"X-Internal-API-Key": INTERNAL},
                            json={"status": "succeeded", "output_url": "file:///nowhere.mp4"})
            assert late.status_code == 409, late.text
    finally:
        fake.close()
        system.stop()
