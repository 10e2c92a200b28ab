"""The fleet path end to end, every process real and on 127.0.0.1:

- one machine: `prefect server start` (SQLite), the work pools and queues, then
  `prefect deploy --all --prefect-file deployments/prefect.yaml`, one `prefect worker start --limit 1`, and a
  3-job batch started with `prefect deployment run 'batch/gpu' --params ...`;
- the scale path: the server on a throwaway PostgreSQL, deployments made with `musetalk-flow deploy` (the
  Python API), TWO workers, and a batch with fan_out=2 whose shares run on both of them.

Renders use tiny random-weight models and a short clip, so each job takes seconds on a CPU. Skips only
when PostgreSQL cannot be started (the reason is in the skip message)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from benchmarks.control_plane import Process
from musetalk_engine.sample_media import make_avatar_video, make_speech
from tests.pg import start_postgres
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
pytest_plugins = ["tests.fixtures_engine"]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Variables that would send the runs to real services (or another Prefect) if the caller had them set.
_SCRUB = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
          "ORCHESTRATOR_BASE_URL", "BUFFER_ORCHESTRATOR_BASE_URL", "BUFFER_WORKER_ID", "INTERNAL_API_KEY",
          "B2_KEY_ID", "B2_APP_KEY", "B2_BUCKET_NAME", "B2_PREFIX", "MUSETALK_RESULT_DIR")


# ------------------------------------------------------------------------------------------ processes

class Service(Process):
    """A long-lived subprocess (server, worker): the benchmark's Process, with a whole-log read and a stop
    that waits ``timeout`` for a SIGINT'd worker to finish its run."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        """SIGINT (workers ignore SIGTERM), then the whole session group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # flow-run processes a worker left behind share its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


def prefect_cli(*args: str, env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run([PY, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{out[-3000:]}"
    return out


def wait_until(check, timeout: float, what: str, services: list[Service], interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for s in services:
            assert s.proc.poll() is None, f"{s.name} exited while waiting for {what}\n{s.tail()}"
        time.sleep(interval)
    logs = "\n".join(s.tail() for s in services)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


class Stack:
    """A Prefect server plus workers for one test; everything stopped at teardown."""

    def __init__(self, root: Path, musetalk_env: dict[str, str]):
        self.t0 = time.monotonic()
        self.root = root
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(musetalk_env)
        env.update({"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                    "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
        self.env = env
        self.services: list[Service] = []
        self.workers: list[Service] = []

    def mark(self, what: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {what}", flush=True)

    def start_server(self, database_url: str | None = None) -> None:
        env = dict(self.env)
        env.pop("PREFECT_API_URL")
        if database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
        server = Service("server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(self.port)], env, self.root)
        self.services.append(server)

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.api}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 150, "the Prefect server", [server])
        self.mark("server up")

    def start_worker(self, name: str) -> Service:
        worker = Service(name, [PY, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type", "process",
                                "--limit", "1", "--name", name], self.env, self.root)
        self.services.append(worker)
        self.workers.append(worker)
        return worker

    def wait_workers_online(self) -> None:
        names = {w.name for w in self.workers}

        def online() -> bool:
            found = httpx.post(f"{self.api}/work_pools/gpu/workers/filter", json={}, timeout=10).json()
            return names <= {w["name"] for w in found}

        wait_until(online, 120, f"workers {sorted(names)} to poll the pool", self.services, 2.0)
        self.mark("workers online")

    def flow_run(self, run_id: str) -> dict:
        return httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=10).raise_for_status().json()

    def flow_runs(self, body: dict) -> list[dict]:
        return httpx.post(f"{self.api}/flow_runs/filter", json=body, timeout=10).raise_for_status().json()

    def wait_final(self, run_id: str, timeout: float) -> dict:
        def final():
            run = self.flow_run(run_id)
            return run if run["state"] and run["state"]["type"] in FINAL else None

        run = wait_until(final, timeout, f"flow run {run_id}", self.services, 2.0)
        self.mark(f"flow run {run_id} {run['state']['type']}")
        return run

    def table(self, run_id: str) -> list[dict]:
        found = httpx.post(f"{self.api}/artifacts/filter", timeout=10,
                           json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).raise_for_status().json()
        tables = [a for a in found if a["type"] == "table"]
        assert len(tables) == 1, found
        return json.loads(tables[0]["data"])

    def submitted_by(self) -> dict[str, str]:
        """flow run id -> name of the worker that started it (from the workers' own logs)."""
        runs = {}
        for w in self.workers:
            for run_id in re.findall(r"submitting flow run '([0-9a-f-]{36})'", w.log()):
                runs[run_id] = w.name
        return runs

    def stop(self) -> None:
        for s in reversed(self.services):  # workers first, the server last
            s.stop()


def run_batch_cli(stack: Stack, params: dict) -> str:
    """`prefect deployment run 'batch/gpu' --params '{...}'`; the new flow run's id."""
    out = prefect_cli("deployment", "run", "batch/gpu", "--params", json.dumps(params), env=stack.env)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    stack.mark(f"submitted batch {match.group(1)}")
    return match.group(1)


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Shortest media that still exercises everything: 0.4 s 256×256 avatar, 0.5 s of speech."""
    d = tmp_path_factory.mktemp("fleet-media")
    return {"video": make_avatar_video(d / "avatar.mp4", seconds=0.4, width=256, height=256),
            "speech": make_speech(d / "speech.wav", seconds=0.5), "models": tiny_models,
            "cache": d / "cache"}  # one avatar cache for both tests: the second one reuses the avatar


def _musetalk_env(work: Path, clip: dict[str, Path]) -> dict[str, str]:
    return {"MUSETALK_WORKDIR": str(work), "MUSETALK_MODELS_DIR": str(clip["models"]),
            "MUSETALK_CACHE_DIR": str(clip["cache"]), "MUSETALK_ALLOW_LOCAL_FILES": "true"}


def _jobs(clip: dict[str, Path], prefix: str, n: int = 3) -> list[dict]:
    return [{"musetalk_job_id": f"{prefix}-{i}", "video_url": str(clip["video"]), "audio_url": str(clip["speech"]),
             "params": {"keep_source_size": True}} for i in range(n)]


def _assert_outputs(work: Path, job_ids: list[str]) -> None:
    outputs = work / "results" / "job_queue" / "avatar" / "outputs"
    for job_id in job_ids:
        assert (outputs / f"{job_id}.mp4").stat().st_size > 1000, job_id
        sidecar = json.loads((outputs / f"{job_id}.json").read_text())
        assert sidecar["musetalk_job_id"] == job_id and sidecar["b2_file_name"] == f"avatar/outputs/{job_id}.mp4"


@pytest.fixture
def stack_factory(tmp_path):
    stacks: list[Stack] = []

    def make(work: Path, clip: dict[str, Path]) -> Stack:
        stacks.append(Stack(tmp_path, _musetalk_env(work, clip)))
        return stacks[-1]

    yield make
    for s in stacks:
        s.stop()


# ---------------------------------------------------------------------------------------------- tests

def test_batch_deployment_on_one_worker(stack_factory, clip, tmp_path):
    """The documented one-machine path: yaml deployments, one worker, a batch from the CLI."""
    work = tmp_path / "work"
    stack = stack_factory(work, clip)
    stack.start_server()
    prefect_cli("work-pool", "create", "gpu", "--type", "process", env=stack.env)
    # after the pool exists (a worker would create a missing pool itself and race the CLI); its start-up
    # overlaps the remaining CLI calls
    worker = stack.start_worker("gpu-0")
    prefect_cli("work-queue", "create", "urgent", "--pool", "gpu", "--priority", "1", env=stack.env)
    # the other pools prefect.yaml names (what `prefect work-pool create NAME --type process` does, without
    # a CLI start each): `prefect deploy` refuses a deployment whose pool does not exist
    for pool in ("buffer", "salad", "control"):
        httpx.post(f"{stack.api}/work_pools/", json={"name": pool, "type": "process"}, timeout=10).raise_for_status()
    prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=stack.env)
    stack.mark("pool, queues and deployments made with the CLI")
    queues = httpx.post(f"{stack.api}/work_pools/gpu/queues/filter", json={}, timeout=10).json()
    assert sorted((q["priority"], q["name"]) for q in queues)[0] == (1, "urgent")

    jobs = _jobs(clip, "one")
    run_id = run_batch_cli(stack, {"jobs": jobs})
    run = stack.wait_final(run_id, 360)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{worker.tail()}"
    assert run["work_queue_name"] == "default"

    _assert_outputs(work, [j["musetalk_job_id"] for j in jobs])
    rows = stack.table(run_id)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert {r["worker"] for r in rows} == {"gpu-0"}
    frame = pd.read_csv(work / "results" / "job_queue" / "batches" / f"{run_id}.csv")
    assert len(frame) == 3 and set(frame["musetalk_job_id"]) == {j["musetalk_job_id"] for j in jobs}
    assert stack.submitted_by() == {run_id: "gpu-0"}


def test_fan_out_over_two_workers_on_postgres(stack_factory, clip, tmp_path):
    """The scale path: PostgreSQL-backed server, Python-API deployments, two workers sharing one batch."""
    pg, why = start_postgres()
    if pg is None:
        pytest.skip(f"PostgreSQL could not be started: {why}")
    work = tmp_path / "work"
    stack = stack_factory(work, clip)
    try:
        stack.start_server(database_url=pg.url)
        done = subprocess.run([PY, "-m", "deployments.cli", "deploy"], cwd=REPO, env=stack.env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "deployed batch/gpu" in done.stdout
        stack.mark("deployed with the Python API")
        stack.start_worker("gpu-a")
        stack.start_worker("gpu-b")
        stack.wait_workers_online()

        jobs = _jobs(clip, "fan")
        # fan_out=2 asks for two children, but only one worker besides the parent's is online: one child is
        # all another worker can take, so the parent never waits on a share nobody runs. Three jobs cut into
        # two shares: two stay here, one goes to the child.
        parent_id = run_batch_cli(stack, {"jobs": jobs, "fan_out": 2, "pickup_timeout_s": 300})
        parent = stack.wait_final(parent_id, 480)
        assert parent["state"]["type"] == "COMPLETED", f"{parent['state']}\n" + \
            "\n".join(w.tail() for w in stack.workers)

        children = stack.flow_runs({"flow_runs": {"tags": {"all_": ["batch-share"]}}})
        assert len(children) == 1
        assert all(c["state"]["type"] == "COMPLETED" for c in children), [c["state"] for c in children]
        assert all(c["parameters"]["fan_out"] == 0 and len(c["parameters"]["jobs"]) == 1 for c in children)
        assert all(c["idempotency_key"].startswith(parent_id) for c in children)

        rows = stack.table(parent_id)  # the parent's table gathers the children's rows
        assert [r["status"] for r in rows] == ["ok"] * 3
        assert {r["share"] for r in rows} == {"local"} | {c["name"] for c in children}
        # each worker holds one render slot: the parent's worker is busy, the children went to the other
        ran_on = stack.submitted_by()
        assert set(ran_on) == {parent_id} | {c["id"] for c in children}
        assert set(ran_on.values()) == {"gpu-a", "gpu-b"}
        assert {r["worker"] for r in rows} == {"gpu-a", "gpu-b"}
        _assert_outputs(work, [j["musetalk_job_id"] for j in jobs])
    finally:
        stack.stop()  # the server lets go of PostgreSQL before PostgreSQL stops
        pg.stop()
