"""Route `salad:<class>`: submit to the class's queue, follow to the end, the /generate body is the result.

The fake Salad API's job-queue worker POSTs each job to a real HTTP `/generate` on 127.0.0.1 (a scripted
stand-in here; the end-to-end test uses a serve process) and records the outcome as Salad does."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tasks.salad import SaladClient
from tasks.salad_dispatch import dispatch_to_salad, follow_salad_job, salad_input, submit_salad_job
from tests.fake_salad import FakeSalad
from tests.servers import serve_in_thread

QUEUE = "musetalk-rtx-4090-24gb"
JOB = {"musetalk_job_id": "job-7", "video_url": "https://media.example/v.mp4",
       "audio_url": "https://media.example/a.wav", "resolution": "720p", "aspect_ratio": None,
       "webhook_url": "https://hooks.example/x", "metadata": {"customer": "c-1"}}


def ok_body(job_id: str) -> dict[str, Any]:
    return {"status": "ok", "musetalk_job_id": job_id, "output_url": f"https://cdn.example/{job_id}.mp4",
            "b2_bucket": "b", "b2_file_name": f"avatar/outputs/{job_id}.mp4",
            "metrics": {"GENERATION_TIME_SEC": 1.0, "gpu_class": "RTX 4090 (24 GB)"}}


def media_error(job_id: str) -> dict[str, Any]:
    return {"status": "failed", "error_type": "media_error", "error_message": "no face detected",
            "stage": "preprocessing", "details": {}, "retryable": False, "stage_times": {},
            "musetalk_job_id": job_id}


class Generate:
    """A scripted /generate: each POST pops the next (status, body) (the last one repeats)."""

    def __init__(self, script: list[tuple[int, Any]]):
        self.script = list(script)
        self.received: list[tuple[dict[str, Any], str | None]] = []
        self.lock = threading.Lock()
        self.app = FastAPI()

        @self.app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.received.append((body, request.headers.get("Salad-Job-Id")))
            with self.lock:
                status, answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            return JSONResponse(answer(body["musetalk_job_id"]) if callable(answer) else answer,
                                status_code=status)


@pytest.fixture()
def salad():
    fake = FakeSalad(poll_s=0.02)
    with serve_in_thread(fake.app) as (url, _, _):
        env = fake.env(url)
        fake.add_queue(QUEUE)
        with SaladClient(env["SALAD_API_KEY"], fake.org, fake.project, base_url=env["SALAD_API_BASE_URL"],
                         backoff_s=0.0) as client:
            yield fake, client
    fake.close()


def run(fake: FakeSalad, client: SaladClient, script, **kwargs):
    worker = Generate(script)
    with serve_in_thread(worker.app) as (url, _, _):
        fake.connect(QUEUE, url)
        outcome = dispatch_to_salad(JOB, QUEUE, client, poll_s=0.02, timeout_s=30, **kwargs)
    return outcome, worker


def test_success_body_becomes_the_result(salad) -> None:
    fake, client = salad
    submitted, statuses = [], []
    outcome, worker = run(fake, client, [(200, ok_body)], on_submitted=submitted.append,
                          on_status=statuses.append)
    assert outcome.status == "succeeded" and outcome.body == ok_body("job-7")
    assert submitted == [outcome.salad_job_id] and statuses[-1] == "succeeded"
    (body, salad_job_id), = worker.received
    assert salad_job_id == outcome.salad_job_id  # Salad's worker adds the header
    assert body == salad_input(JOB) and "webhook_url" not in body and "metadata" not in body
    assert fake.job(QUEUE, outcome.salad_job_id)["metadata"] == {"musetalk_job_id": "job-7"}


def test_final_non_2xx_fails_with_the_generate_failure_body(salad) -> None:
    fake, client = salad
    outcome, worker = run(fake, client, [(422, media_error)])
    assert outcome.status == "failed" and outcome.body == media_error("job-7")
    assert len(worker.received) == 1  # a 422 is final: Salad does not retry it


def test_busy_worker_is_retried_by_the_queue(salad) -> None:
    fake, client = salad
    busy = {"status": "failed", "error_type": "processing_error", "error_message": "busy", "stage": "inference",
            "details": {"reason": "busy"}, "retryable": True, "stage_times": {}}
    outcome, worker = run(fake, client, [(503, busy), (200, ok_body)])
    assert outcome.status == "succeeded" and len(worker.received) == 2
    assert [d[2] for d in fake.deliveries] == [503, 200]


def test_retries_exhausted_fail_with_the_last_body(salad) -> None:
    fake, client = salad
    crash = {"status": "failed", "error_type": "processing_error", "error_message": "CUDA out of memory",
             "stage": "inference", "details": {}, "retryable": True, "stage_times": {}}
    outcome, worker = run(fake, client, [(500, crash)])
    assert outcome.status == "failed" and outcome.body["error_message"] == "CUDA out of memory"
    assert len(worker.received) == fake.max_attempts


def test_cancel_before_any_container_takes_it(salad) -> None:
    fake, client = salad  # no worker connected: the job stays pending
    outcome = dispatch_to_salad(JOB, QUEUE, client, poll_s=0.02, timeout_s=30,
                                is_cancelled=lambda: len(fake.calls) > 3)
    assert outcome.status == "cancelled" and outcome.body is None
    assert fake.job(QUEUE, outcome.salad_job_id)["status"] == "cancelled"


def test_deadline_cancels_the_salad_job_and_fails_retryable(salad) -> None:
    fake, client = salad
    outcome = dispatch_to_salad(JOB, QUEUE, client, poll_s=0.02, timeout_s=0.2)
    assert outcome.status == "failed" and outcome.body["retryable"] is True
    assert outcome.body["details"]["reason"] == "timeout"
    assert fake.job(QUEUE, outcome.salad_job_id)["status"] == "cancelled"


def test_follow_resumes_a_submitted_job_without_resubmitting(salad) -> None:
    fake, client = salad
    salad_job_id = submit_salad_job(JOB, QUEUE, client)  # e.g. the dispatcher restarted after this
    worker = Generate([(200, ok_body)])
    with serve_in_thread(worker.app) as (url, _, _):
        fake.connect(QUEUE, url)
        outcome = follow_salad_job(QUEUE, salad_job_id, client, job_id="job-7", poll_s=0.02, timeout_s=30)
    assert outcome.status == "succeeded" and len(fake.jobs[QUEUE]) == 1 and len(worker.received) == 1
