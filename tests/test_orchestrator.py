"""The orchestrator (DESIGN §11) against a real Prefect server (``prefect_test_harness``, SQLite): jobs as
flow runs, idempotency, auth, buffer claims as leases, requeue of a lost worker's job, cancel, listing,
routing and the offline ``/docs``. No renders: buffer workers are played by the test over HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY, OTHER_KEY, INTERNAL = "key-one", "key-two", "internal-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
INT = {"X-Internal-API-Key": INTERNAL}
JOB = {"video_url": "https://media.example/avatar.mp4", "audio_url": "https://media.example/speech.wav"}
# Generous for the module's app (a loaded CI machine must not look like a dead worker); the lost-worker
# tests run their own orchestrator with a short window. Short, but not 3 s: at two busy loops a claim took
# 4.3 s and a heartbeat 1.6 s, and the sweeper judges a roster read that may be a second old.
REPO = Path(__file__).resolve().parent.parent
OFFLINE_SEC = 60.0
SHORT_OFFLINE_SEC = 6.0


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def make_app(tmp_path, **overrides):
    from orchestrator.api import create_app
    from orchestrator.settings import OrchestratorSettings
    from tasks.settings import Settings

    options = {"musetalk_worker_offline_sec": OFFLINE_SEC, "musetalk_sweep_interval_sec": 0.3,
               "musetalk_gpu_targets": REPO / "gpu_targets.json", "musetalk_salad_prices": REPO / "salad_prices.json",
               **overrides}
    settings = OrchestratorSettings(musetalk_api_keys=SecretStr(f"{KEY},{OTHER_KEY}"), **options)
    return create_app(settings, Settings(internal_api_key=SecretStr(INTERNAL), musetalk_workdir=tmp_path))


@pytest.fixture(scope="module")
def api(prefect_api, tmp_path_factory):
    with TestClient(make_app(tmp_path_factory.mktemp("orch"))) as client:
        yield client


def submit(api, headers=AUTH, **fields):
    response = api.post("/v1/avatar/jobs", json={**JOB, **fields}, headers=headers)
    assert response.status_code in (200, 202), response.text
    return response.json()["id"]


def beat(api, worker, status="idle", capacity=1):
    r = api.post(f"/internal/buffer/workers/{worker}/heartbeat",
                 json={"status": status, "gpu_class": "test", "capacity": capacity}, headers=INT)
    assert r.status_code == 200, r.text


@contextmanager
def beating(api, worker: str, status: str = "idle") -> Iterator[dict[str, str]]:
    """A live buffer worker: heartbeats every 0.5 s on their own thread, as the real one sends them, also
    while one of its requests is slow; the yielded ``{"status": ...}`` says what they report. Silent (the
    worker dies or hangs) once the block ends."""
    state, stop, failures = {"status": status}, threading.Event(), []
    beat(api, worker, status)

    def run() -> None:
        while not stop.wait(0.5):
            r = api.post(f"/internal/buffer/workers/{worker}/heartbeat", headers=INT,
                         json={"status": state["status"], "gpu_class": "test", "capacity": 1})
            if r.status_code != 200:
                failures.append(r.text)

    thread = threading.Thread(target=run, name=f"beats-{worker}", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(120)
    assert not failures, failures


def claim(api, worker):
    r = api.post("/internal/buffer/jobs/claim", json={"worker_id": worker}, headers=INT)
    assert r.status_code == 200, r.text
    return r.json()["job"]


def drain(api, worker="drainer"):
    """Claim and finish whatever buffer jobs earlier tests left queued."""
    beat(api, worker, capacity=1000)
    while (job := claim(api, worker)) is not None:
        api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status",
                 json={"status": "succeeded", "output_url": "https://out/x.mp4"}, headers=INT)


def test_buffer_job_lifecycle_idempotency_and_result(api):
    drain(api)
    headers = {**AUTH, "Idempotency-Key": "order-17"}
    first = api.post("/v1/avatar/jobs", json={**JOB, "route": "buffer", "metadata": {"order": 17}}, headers=headers)
    assert first.status_code == 202 and first.json()["status"] == "queued"
    job_id = first.json()["id"]
    again = api.post("/v1/avatar/jobs", json={**JOB, "route": "buffer", "metadata": {"order": 17}}, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == job_id
    changed = api.post("/v1/avatar/jobs", json={**JOB, "route": "buffer"}, headers=headers)
    assert changed.status_code == 409 and changed.json()["error"]["type"] == "conflict"
    # the key is scoped per API key: another client's same key is another job
    theirs = api.post("/v1/avatar/jobs", json={**JOB, "route": "buffer"}, headers={**OTHER, "Idempotency-Key": "order-17"})
    assert theirs.status_code == 202 and theirs.json()["id"] != job_id

    view = api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()
    assert view["status"] == "queued" and view["route"] == "buffer" and view["metadata"] == {"order": 17}
    assert api.get(f"/v1/avatar/jobs/{job_id}", headers=OTHER).status_code == 404

    beat(api, "gpu-a")
    job = claim(api, "gpu-a")
    assert job["musetalk_job_id"] in (job_id, theirs.json()["id"])
    if job["musetalk_job_id"] != job_id:  # the other client's job was older: finish it, take ours
        api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status",
                 json={"status": "failed", "error": {"error_type": "media_error", "error_message": "bad"}}, headers=INT)
        job = claim(api, "gpu-a")
    assert job["musetalk_job_id"] == job_id and job["video_url"] == JOB["video_url"]
    assert claim(api, "gpu-a") is None  # capacity 1, already holding one
    lease = job["buffer_job_id"]

    for value in (0.2, 0.6):
        r = api.post(f"/internal/jobs/{job_id}/progress", headers=INT,
                     json={"status": "running", "progress": value, "phase": "inferring", "worker_id": "gpu-a"})
        assert r.status_code == 200, r.text
        view = api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()
        assert view["status"] == "running" and view["progress"] == value and view["worker_id"] == "gpu-a"
    stranger = api.post(f"/internal/jobs/{job_id}/progress", headers=INT,
                        json={"status": "running", "progress": 0.7, "phase": "inferring", "worker_id": "gpu-z"})
    assert stranger.status_code == 409

    no_url = api.post(f"/internal/buffer/jobs/{lease}/status", json={"status": "succeeded"}, headers=INT)
    assert no_url.status_code == 422
    done = {"status": "succeeded", "output_url": "https://cdn.example/out.mp4",
            "metrics": {"GENERATION_TIME_SEC": 1.5, "total_time": 2.0}}
    assert api.post(f"/internal/buffer/jobs/{lease}/status", json=done, headers=INT).status_code == 200
    assert api.post(f"/internal/buffer/jobs/{lease}/status", json=done, headers=INT).status_code == 200  # repeat
    view = api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()
    assert view["status"] == "succeeded" and view["output_url"] == done["output_url"]
    assert view["metrics"]["GENERATION_TIME_SEC"] == 1.5 and view["progress"] == 1.0 and view["attempt"] == 1
    assert api.delete(f"/v1/avatar/jobs/{job_id}", headers=AUTH).status_code == 409

    # Prefect is the record: one run with the job's tag, Completed, its persisted result and progress artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"job:{job_id}"])))
        assert len(runs) == 1 and runs[0].state.is_completed()
        assert runs[0].state.result()["body"]["output_url"] == done["output_url"]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
        progress = [a for a in artifacts if a.type == "progress"]
        assert len(progress) == 1 and progress[0].data == 60.0


def test_auth_and_validation(api):
    assert api.get("/v1/avatar/jobs").status_code == 401
    assert api.get("/v1/avatar/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert api.post("/v1/avatar/jobs", json=JOB).json()["error"]["type"] == "unauthorized"
    for path, body in (("/internal/buffer/jobs/claim", {"worker_id": "w"}),
                       ("/internal/buffer/workers/w/heartbeat", {"status": "idle"}),
                       ("/internal/jobs/x/progress", {"status": "running", "progress": 0, "phase": "preparing"})):
        assert api.post(path, json=body).status_code == 401
        assert api.post(path, json=body, headers={"X-Internal-API-Key": "wrong"}).status_code == 401
    for bad in ({"route": "moon"}, {"route": "salad:not-a-class"}, {"priority": "asap"}, {"resolution": "9000p"},
                {"musetalk_job_id": "../etc"}, {"video_url": ""}):
        r = api.post("/v1/avatar/jobs", json={**JOB, **bad}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request", (bad, r.text)
    assert api.get("/v1/avatar/jobs/nope", headers=AUTH).status_code == 404
    assert api.get("/v1/avatar/jobs?cursor=@@", headers=AUTH).status_code == 422
    job_id = submit(api, route="gpu", musetalk_job_id="fixed-id-1")
    dup = api.post("/v1/avatar/jobs", json={**JOB, "musetalk_job_id": "fixed-id-1"}, headers=AUTH)
    assert job_id == "fixed-id-1" and dup.status_code == 409


def test_cancel_queued_job_never_claimed(api):
    drain(api)
    job_id = submit(api, route="buffer")
    r = api.delete(f"/v1/avatar/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 202 and r.json() == {"id": job_id, "status": "cancelled"}
    beat(api, "gpu-c")
    assert claim(api, "gpu-c") is None
    assert api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] == "cancelled"
    assert api.delete(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] == "cancelled"


def test_cancel_running_buffer_job_refuses_its_worker(api):
    drain(api)
    job_id = submit(api, route="buffer")
    beat(api, "gpu-d")
    job = claim(api, "gpu-d")
    assert job["musetalk_job_id"] == job_id
    assert api.delete(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] == "cancelled"
    progress = api.post(f"/internal/jobs/{job_id}/progress", headers=INT,
                        json={"status": "running", "progress": 0.5, "phase": "inferring", "worker_id": "gpu-d"})
    assert progress.status_code == 409
    late = api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
                    json={"status": "succeeded", "output_url": "https://out/x.mp4"})
    assert late.status_code == 409
    assert api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] == "cancelled"


def test_concurrent_claimers_and_two_replicas_never_share_a_job(api, tmp_path):
    drain(api)
    ids = {submit(api, route="buffer", priority="urgent" if i % 3 == 0 else "normal") for i in range(10)}
    workers = [f"race-{i}" for i in range(5)]
    with TestClient(make_app(tmp_path)) as replica:  # a second orchestrator on the same Prefect
        clients = [api, replica]
        for w in workers:
            beat(api, w, capacity=100)
        claimed: list[tuple[str, str]] = []
        lock = threading.Lock()

        def work(i: int) -> None:
            client, worker = clients[i % 2], workers[i % len(workers)]
            while True:
                beat(client, worker, capacity=100)  # a live worker: heartbeats between its claims
                if (job := claim(client, worker)) is None:
                    break
                with lock:
                    claimed.append((job["musetalk_job_id"], job["buffer_job_id"]))
                done = client.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
                                   json={"status": "succeeded", "output_url": "https://out/x.mp4"})
                assert done.status_code == 200, done.text

        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(work, range(len(workers))))
    got = [job_id for job_id, _ in claimed]
    assert sorted(got) == sorted(ids), "every job claimed exactly once"


def test_priority_first_then_oldest(api):
    drain(api)
    older = submit(api, route="buffer")
    newer = submit(api, route="buffer")
    urgent = submit(api, route="buffer", priority="urgent")
    beat(api, "gpu-p", capacity=10)
    jobs = [claim(api, "gpu-p") for _ in range(3)]
    assert [job["musetalk_job_id"] for job in jobs] == [urgent, older, newer]
    for job in jobs:  # finished, so no later test sees them requeued
        api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
                 json={"status": "succeeded", "output_url": "https://out/x.mp4"})


def test_lost_worker_requeue_stale_lease_and_max_attempts(prefect_api, tmp_path):
    with TestClient(make_app(tmp_path, musetalk_worker_offline_sec=SHORT_OFFLINE_SEC)) as api:
        lost_worker_attempts(api)


def lost_worker_attempts(api):
    drain(api)
    job_id = submit(api, route="buffer")
    leases = []
    for attempt in (1, 2, 3):
        worker = f"doomed-{attempt}"
        with beating(api, worker):  # alive until its claim is answered (a slow one too), then it dies
            job = claim(api, worker)
        assert job["musetalk_job_id"] == job_id
        leases.append(job["buffer_job_id"])
        assert api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["attempt"] == attempt
        # no more heartbeats: the sweep requeues it after the offline window (the last time: fails it)
        want = "failed" if attempt == 3 else "queued"
        deadline = time.monotonic() + SHORT_OFFLINE_SEC + 30
        while api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] != want:
            assert time.monotonic() < deadline, f"attempt {attempt}: not {want}"
            time.sleep(0.3)
        late = api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
                        json={"status": "succeeded", "output_url": "https://out/late.mp4"})
        assert late.status_code == 409
    assert len(set(leases)) == 3  # a lease per claim, not per job
    view = api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()
    assert view["error"]["type"] == "processing_error" and "3 attempt" in view["error"]["message"]


def test_retryable_failure_is_requeued_media_error_is_final(api):
    drain(api)
    job_id = submit(api, route="buffer")
    beat(api, "gpu-r", capacity=5)
    job = claim(api, "gpu-r")
    oom = {"status": "failed", "error": {"error_type": "processing_error", "error_message": "CUDA OOM",
                                          "stage": "inference", "retryable": True}}
    assert api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", json=oom, headers=INT).json()["job_status"] == "queued"
    job = claim(api, "gpu-r")
    assert job["musetalk_job_id"] == job_id
    bad = {"status": "failed", "error": {"error_type": "media_error", "error_message": "no face in the video",
                                          "stage": "preprocessing", "retryable": False}}
    assert api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", json=bad, headers=INT).json()["job_status"] == "failed"
    view = api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()
    assert view["error"] == {"type": "media_error", "message": "no face in the video", "stage": "preprocessing",
                             "retryable": False}
    assert view["attempt"] == 2


def test_list_newest_first_with_a_stable_cursor(api):
    mine = [submit(api, headers=OTHER, route="gpu") for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        url = "/v1/avatar/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = api.get(url, headers=OTHER).json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        if pages == 1:
            submit(api, headers=OTHER, route="gpu")  # a job added meanwhile must not shift later pages
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert [j for j in seen if j in mine] == list(reversed(mine))
    queued = api.get("/v1/avatar/jobs?status=queued&limit=100", headers=OTHER).json()["items"]
    assert {i["id"] for i in queued} >= set(mine)


def test_auto_route_prefers_an_idle_buffer_worker(api, tmp_path):
    drain(api)
    beat(api, "idle-one", capacity=1)
    job_id = submit(api)
    assert api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["route"] == "buffer"
    beat(api, "idle-one", status="busy")
    beat(api, "drainer", status="busy")
    for name in ("gpu-a", "gpu-c", "gpu-d", "gpu-p", "gpu-r", *[f"race-{i}" for i in range(5)],
                 *[f"doomed-{i}" for i in (1, 2, 3)]):  # every worker earlier tests made, now busy
        beat(api, name, status="busy")
    time.sleep(0.1)
    # nothing idle, no gpu worker, no Salad, but buffer workers online: queued for their claims (on one
    # machine, `musetalk-flow up`, the gpu pool has no worker at all and would keep the job forever)
    job_id = submit(api)
    assert api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["route"] == "buffer"
    api.delete(f"/v1/avatar/jobs/{job_id}", headers=AUTH)
    # once every buffer worker has gone quiet for the offline window: the gpu pool, queued for a worker
    with TestClient(make_app(tmp_path, musetalk_worker_offline_sec=SHORT_OFFLINE_SEC)) as quiet:
        time.sleep(SHORT_OFFLINE_SEC + 0.5)
        # online, but its models failed to load: it heartbeats busy for ever and will never claim
        assert quiet.post("/internal/buffer/workers/broken-loader/heartbeat", headers=INT, json={
            "status": "busy", "error": "model load failed: MissingWeightsError: unet.pth"}).status_code == 200
        job_id = submit(quiet)
        assert quiet.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["route"] == "gpu"
        quiet.delete(f"/v1/avatar/jobs/{job_id}", headers=AUTH)


def test_health_and_offline_docs(api):
    assert api.get("/hc").json() == {"status": "ok"}
    page = api.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert api.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    schema = api.get("/openapi.json").json()
    assert {"/v1/avatar/jobs", "/v1/avatar/jobs/{job_id}", "/internal/buffer/jobs/claim"} <= set(schema["paths"])


def test_generate_flow_persists_its_result():
    from flows.generate import generate

    assert generate.persist_result is True and generate.result_serializer == "json"


RTX_4090 = "ed563892-aacd-40f5-80b7-90c9be6c759b"  # in gpu_targets.json


def test_salad_route_submits_follows_and_records_the_generate_body(api, monkeypatch):
    """A ``salad:<class>`` job goes to the class's Salad queue; the fake Salad worker POSTs it to a
    /generate that answers like the serve process; that body becomes the job's result."""
    from fastapi import FastAPI

    from tasks.salad_provision import names_by_class
    from tests.fake_salad import FakeSalad
    from tests.servers import serve_in_thread

    generate = FastAPI()
    seen = []

    @generate.post("/generate")
    async def fake_generate(body: dict):
        seen.append(body)
        return {"status": "ok", "output_url": f"https://cdn.example/{body['musetalk_job_id']}.mp4",
                "musetalk_job_id": body["musetalk_job_id"], "b2_bucket": "b", "b2_file_name": "f",
                "metrics": {"GENERATION_TIME_SEC": 0.5, "total_time": 0.6}}

    import json as _json
    queue = names_by_class(_json.loads((REPO / "gpu_targets.json").read_text()))[RTX_4090].queue
    fake = FakeSalad()
    with serve_in_thread(fake.app) as (salad_url, _, _), serve_in_thread(generate) as (gen_url, _, _):
        for name, value in fake.env(salad_url).items():
            monkeypatch.setenv(name, value)
        fake.connect(queue, gen_url)
        job_id = submit(api, route=f"salad:{RTX_4090}", resolution="720p")
        deadline = time.monotonic() + 60
        while (view := api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json())["status"] != "succeeded":
            assert view["status"] in ("queued", "running"), view
            assert time.monotonic() < deadline, view
            time.sleep(0.3)
        fake.close()
    assert view["output_url"] == f"https://cdn.example/{job_id}.mp4" and view["route"] == f"salad:{RTX_4090}"
    assert seen == [{"musetalk_job_id": job_id, **JOB, "resolution": "720p", "params": {}}]
    # it waited for its dispatch as a buffer run waits for its claim: never a "Scheduled" the late-runs service marks
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        run, = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"job:{job_id}"])))
        history = [state.name for state in client.read_flow_run_states(run.id)]
    assert history[0] == "AwaitingClaim" and "Late" not in history, history


def test_a_lost_claim_answer_is_requeued_while_its_worker_stays_idle(prefect_api, tmp_path):
    """The server completed a claim whose answer the worker never got (its request timed out): the worker
    goes on heartbeating idle, so after a whole window of that the job goes back to the queue."""
    with TestClient(make_app(tmp_path, musetalk_worker_offline_sec=SHORT_OFFLINE_SEC)) as api:
        drain(api)
        job_id = submit(api, route="buffer")
        with beating(api, "forgetful"):  # alive and idle: it does not know it holds the job
            job = claim(api, "forgetful")
            assert job["musetalk_job_id"] == job_id
            deadline = time.monotonic() + SHORT_OFFLINE_SEC + 30
            while api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] != "queued":
                assert time.monotonic() < deadline, "the orphaned claim was never requeued"
                time.sleep(0.5)
        late = api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
                        json={"status": "succeeded", "output_url": "https://out/x.mp4"})
        assert late.status_code == 409
        # a busy worker is never judged that way: it renders what it claimed
        with beating(api, "forgetful") as worker:
            job = claim(api, "forgetful")
            worker["status"] = "busy"
            time.sleep(SHORT_OFFLINE_SEC + 3)
            assert api.get(f"/v1/avatar/jobs/{job_id}", headers=AUTH).json()["status"] == "running"
        assert api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
                        json={"status": "succeeded", "output_url": "https://out/x.mp4"}).status_code == 200


def test_a_waiting_buffer_run_awaits_its_claim_and_is_never_marked_late(api):
    """A buffer run waits (submitted or requeued) in a Scheduled state named ``AwaitingClaim``: Prefect's
    late-runs service rewrites only runs named "Scheduled", and no Prefect worker polls the buffer pool, so
    those rewrites would be nothing but writes competing with the claims."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType

    def state_of(job_id):
        with get_client(sync_client=True) as client:
            run, = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"job:{job_id}"])))
        return run.state_type, run.state_name

    drain(api)
    job_id = submit(api, route="buffer")
    assert state_of(job_id) == (StateType.SCHEDULED, "AwaitingClaim")
    beat(api, "gpu-w")
    job = claim(api, "gpu-w")
    oom = {"status": "failed", "error": {"error_type": "processing_error", "error_message": "CUDA OOM",
                                          "retryable": True}}
    requeued = api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", json=oom, headers=INT)
    assert requeued.json()["job_status"] == "queued"
    assert state_of(job_id) == (StateType.SCHEDULED, "AwaitingClaim")
    # the same report again, by the same holder: answered as before (idempotent), nothing changes
    assert api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", json=oom, headers=INT).status_code == 200
    job = claim(api, "gpu-w")
    assert job["musetalk_job_id"] == job_id
    api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=INT,
             json={"status": "succeeded", "output_url": "https://out/x.mp4"})


def test_a_heartbeat_that_says_nothing_new_writes_no_variable(api, monkeypatch):
    """A steady worker's beats cost Prefect one worker heartbeat, not a variable write each."""
    from prefect.client.orchestration import PrefectClient

    writes = []
    original = PrefectClient.update_variable

    async def counting(self, variable):
        writes.append(variable.name)
        return await original(self, variable)

    monkeypatch.setattr(PrefectClient, "update_variable", counting)
    beat(api, "steady")  # the first beat creates the worker's variable
    for _ in range(3):
        beat(api, "steady")
    assert writes == []
    beat(api, "steady", status="busy")
    assert len(writes) == 1
    beat(api, "steady", status="busy")
    assert len(writes) == 1


def test_the_orchestrator_command_logs_each_request_in_one_clean_line(api, tmp_path):
    """`musetalk-flow orchestrator` (what `up` and a fleet run) logs through the project's one logging
    configuration: an access line per request, with no query string, and never a logging error."""
    import os
    import subprocess
    import sys

    import httpx
    from prefect.settings import PREFECT_API_URL

    from tests.servers import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MUSETALK_API_KEYS": KEY,
           "MUSETALK_WORKDIR": str(tmp_path), "INTERNAL_API_KEY": INTERNAL}
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "orchestrator", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "info"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the orchestrator did not start"
            try:
                if httpx.get(f"{base}/hc", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(f"{base}/v1/avatar/jobs?cursor=secret-ish", headers=AUTH, timeout=30).status_code == 422
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert "Logging error" not in output and "Traceback" not in output, output[-3000:]
    assert '"GET /hc HTTP/1.1" 200' in output and "GET /v1/avatar/jobs?*** HTTP/1.1" in output, output[-3000:]
    assert "secret-ish" not in output
