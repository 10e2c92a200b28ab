"""The front door of /generate and /benchmark (deployments/front_door.py) through a real socket: every
customer mistake — whatever the body, encoding, size, field or URL — is a final 4xx with the contract's
failure body, decided before the job reaches the render queue (so before Prefect and before any log line
that would carry it). Also: the rule for a job id already in flight (same request joins, another is 409),
malformed URLs inside the download itself, and the input-resolution limit.

The app here has a stand-in engine and no Prefect: what runs on the render thread is a counted fake."""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest

from musetalk_engine.errors import JOB_STAGES, MediaError
from tasks.contract import JobOutcome
from tasks.settings import Settings
from tests.servers import serve_in_thread, wait_until

LIMIT = 8192


class FakeRuns:
    """The render thread's work: counts runs; ``gate`` holds a run until the test opens it."""

    def __init__(self) -> None:
        self.jobs: list[dict] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, job: dict, queue_job_id: str | None) -> JobOutcome:
        self.jobs.append(job)
        self.started.set()
        assert self.gate.wait(60)
        return JobOutcome(http_status=200, body={"status": "ok", "musetalk_job_id": job["musetalk_job_id"],
                                                 "run": len(self.jobs)})


@pytest.fixture(scope="module")
def door() -> Iterator[SimpleNamespace]:
    from deployments.serve import create_app, make_server

    settings = Settings(musetalk_max_request_bytes=LIMIT, musetalk_max_url_chars=512)
    app = create_app(settings, engine_loader=lambda s: SimpleNamespace(warm=True, gpu={}),
                     prefect_warmup=lambda: "no prefect here")
    runs = FakeRuns()
    service = app.state.service
    service.queue._run = runs
    with serve_in_thread(app, lambda a: make_server(a, log_level="warning")) as (url, _, _):
        assert service.wait_ready(30)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield SimpleNamespace(http=http, runs=runs, service=service, url=url)
    runs.gate.set()


def good(job_id: str = "job-1", **extra: Any) -> dict[str, Any]:
    return {"musetalk_job_id": job_id, "video_url": "https://media.example.com/a.mp4",
            "audio_url": "https://media.example.com/a.wav", **extra}


def assert_contract(r: httpx.Response, status: int | tuple[int, ...], fragment: str = "") -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert body["status"] == "failed" and body["error_type"] == "media_error" and body["retryable"] is False
    assert body["stage"] in JOB_STAGES and isinstance(body["error_message"], str)
    assert len(body["error_message"]) <= 1000
    assert fragment in body["error_message"], body["error_message"]
    return body


RAW_BODIES = {
    "not_json": (b"{not json", "not valid JSON"),
    "bad_utf8": (b'{"musetalk_job_id": "\xff\xfe"}', "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "deep_nesting": (b"[" * 3000 + b"]" * 3000, "not valid JSON"),  # under the size limit, past recursion
    "huge_integer": (b'{"musetalk_job_id": ' + b"9" * 4400 + b"}", "not valid JSON"),
    "null": (b"null", "JSON object"),
    "array": (json.dumps([good()]).encode(), "JSON object"),
    "string": (b'"job"', "JSON object"),
    "nan_id": (b'{"musetalk_job_id": NaN, "video_url": "https://a/b", "audio_url": "https://a/c"}',
               "musetalk_job_id"),
    "utf16_with_bad_id": (json.dumps(good("a/../b")).encode("utf-16"), "musetalk_job_id may only contain"),
}


@pytest.mark.parametrize("name", sorted(RAW_BODIES))
def test_unparseable_and_non_object_bodies_are_422_contract(door, name):
    content, fragment = RAW_BODIES[name]
    before = len(door.runs.jobs)
    r = door.http.post("/generate", content=content, headers={"content-type": "application/json"})
    assert_contract(r, 422, fragment)
    assert len(door.runs.jobs) == before


FIELDS = {
    "id_newline": (good("job\nINFO forged"), "musetalk_job_id may only contain"),
    "id_traversal": (good("../etc"), "musetalk_job_id may only contain"),
    "id_too_long": (good("j" * 500), "musetalk_job_id is longer than"),
    "id_not_string": ({**good(), "musetalk_job_id": 12}, "musetalk_job_id"),
    "id_missing": ({k: v for k, v in good().items() if k != "musetalk_job_id"}, "musetalk_job_id"),
    "url_not_string": (good(video_url=["x"]), "video_url"),
    "url_too_long": (good(video_url="https://a.example/" + "x" * 600), "the video URL is longer than 512"),
    "url_unclosed_ipv6": (good(video_url="http://[::1/a.mp4"), "the video URL is not a valid URL"),
    "url_port_not_number": (good(audio_url="http://a.example:port/a.wav"), "the audio URL is not a valid URL"),
    "url_port_out_of_range": (good(audio_url="http://a.example:99999/a.wav"), "the audio URL is not a valid URL"),
    "url_label_too_long": (good(video_url=f"http://{'a' * 70}.example/a.mp4"), "the video URL is not a valid URL"),
    "url_empty_label": (good(video_url="http://a..example/a.mp4"), "the video URL is not a valid URL"),
    "url_bad_idna": (good(video_url="http://xn--zz.example/a.mp4"), "the video URL is not a valid URL"),
    "url_nul_in_host": (good(video_url="http://exa\x00mple.com/a.mp4"), "the video URL is not a valid URL"),
    "url_control_in_path": (good(video_url="http://a.example/\x7f.mp4"), "the video URL is not a valid URL"),
    "url_no_host": (good(video_url="http:///a.mp4"), "the video URL has no host name"),
    "url_ftp": (good(video_url="ftp://a.example/a.mp4"), "must use http or https"),
    "url_file": (good(video_url="file:///etc/passwd"), "local files are not accepted"),
    "url_plain_path": (good(audio_url="/etc/passwd"), "local files are not accepted"),
    "aspect_ratio": (good(aspect_ratio="21:9"), "aspect_ratio"),
    "aspect_ratio_huge": (good(aspect_ratio="9" * 3000), "aspect_ratio"),
    "params_bad": (good(params={"batch_size": 0}), "params.batch_size"),
    "params_unknown_key": (good(params={"k" * 3000: 1}), "Extra inputs are not permitted"),
    "params_not_object": (good(params="fast"), "params"),
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_invalid_fields_are_422_before_the_queue(door, name):
    job, fragment = FIELDS[name]
    before = len(door.runs.jobs)
    body = assert_contract(door.http.post("/generate", json=job), 422, fragment)
    assert len(door.runs.jobs) == before
    valid_id = None if name.startswith("id_") else job["musetalk_job_id"]
    assert body["musetalk_job_id"] == valid_id  # echoed only once it is known to be a safe id


def test_body_size_limit_is_413_declared_or_streamed(door):
    big = good(padding="x" * LIMIT)
    body = assert_contract(door.http.post("/generate", json=big), 413, f"larger than {LIMIT} bytes")
    assert body["details"]["limit_bytes"] == LIMIT

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield json.dumps(good())[:-1].encode() + b', "padding": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    assert_contract(door.http.post("/generate", content=chunks(), headers={"content-type": "application/json"}),
                    413)
    assert_contract(door.http.post("/benchmark", content=b"[" * (LIMIT + 1)), 413)
    assert not door.runs.jobs or all(j.get("padding") is None for j in door.runs.jobs)


def test_other_encodings_and_headers(door):
    form = door.http.post("/generate", data={"musetalk_job_id": "j"})
    assert_contract(form, 422, "not valid JSON")
    plain = door.http.post("/generate", content=json.dumps(good("j-text")).encode(),
                           headers={"content-type": "text/plain"})
    assert_contract(plain, 422)
    bad_header = door.http.post("/generate", json=good(), headers={"Salad-Job-Id": "x y%0a"})
    assert_contract(bad_header, 422, "Salad-Job-Id")
    assert_contract(door.http.get("/generate"), 405)
    assert_contract(door.http.post("/benchmark", content=b"{oops"), 422, "not valid JSON")
    assert_contract(door.http.post("/benchmark", json={"profile": 12345}), 422)


def test_same_job_in_flight_joins_a_different_one_is_409(door, caplog):
    caplog.set_level(logging.INFO, logger="deployments.serve")
    runs = door.runs
    runs.gate.clear()
    runs.started.clear()
    first_count = len(runs.jobs)
    answers: dict[str, httpx.Response] = {}

    def post(key: str, job: dict) -> None:
        answers[key] = door.http.post("/generate", json=job)

    first = threading.Thread(target=post, args=("first", good("dup-1")))
    first.start()
    assert runs.started.wait(30)
    again = threading.Thread(target=post, args=("again", good("dup-1")))
    again.start()
    assert wait_until(lambda: any("already in flight" in r.getMessage() for r in caplog.records), 30)
    conflict = door.http.post("/generate", json=good("dup-1", aspect_ratio="1:1"))
    body = assert_contract(conflict, 409, "already queued or rendering")
    assert body["details"]["reason"] == "duplicate_job_id" and body["musetalk_job_id"] == "dup-1"
    runs.gate.set()
    first.join(30)
    again.join(30)
    assert answers["first"].status_code == answers["again"].status_code == 200
    assert answers["first"].json() == answers["again"].json()  # one render, one outcome
    assert len(runs.jobs) == first_count + 1
    # once it has its outcome, the id is free: a re-run renders again
    assert door.http.post("/generate", json=good("dup-1")).json()["run"] == first_count + 2


def test_a_valid_request_passes_the_door(door):
    door.runs.gate.set()
    r = door.http.post("/generate", json=good("fine-1", aspect_ratio="9:16", resolution="720p"),
                       headers={"Salad-Job-Id": "3f1c2a9e-0b7d-4d7e-9a51-2f0c8c1d4e55"})
    assert r.status_code == 200 and r.json()["musetalk_job_id"] == "fine-1"
    assert door.http.get("/hc").status_code == 200


# -------------------------------------------------------------------------- inside the download itself


@pytest.mark.parametrize("url", ["http://[::1/a", "http://127.0.0.1:port/a", "http://xn--zz.example/a",
                                 f"http://{'a' * 70}.example/a", "http://a..b/a", "gopher://127.0.0.1/a",
                                 "http://127.0.0.1/\x00", "https://127.0.0.1/" + "x" * 9000])
def test_malformed_urls_are_final_media_errors_in_download(tmp_path, url):
    from tasks.fetch import download

    settings = Settings(musetalk_allow_private_urls=True, musetalk_download_retry_base_sec=0)
    with pytest.raises(MediaError) as err:
        download(url, tmp_path / "in.mp4", "video", settings,
                 transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"\0" * 64)))
    assert err.value.stage == "download" and not err.value.retryable


@pytest.mark.parametrize("location", ["http://[::1", "http://a:bad/x", "gopher://x/y"])
def test_a_redirect_to_a_malformed_url_is_a_media_error(tmp_path, location):
    from tasks.fetch import download

    settings = Settings(musetalk_allow_private_urls=True, musetalk_download_retry_base_sec=0)
    transport = httpx.MockTransport(lambda r: httpx.Response(302, headers={"location": location}))
    with pytest.raises(MediaError) as err:
        download("http://127.0.0.1/a.mp4", tmp_path / "in.mp4", "video", settings, transport=transport)
    assert err.value.stage == "download"


# ---------------------------------------------------------------------------------- resolution limit


@pytest.mark.parametrize("width, height, ok", [(3840, 2160, True), (2160, 3840, True), (1920, 1080, True),
                                               (4096, 2160, False), (2160, 4096, False), (7680, 4320, False),
                                               (3000, 3000, False)])
def test_input_resolution_limit(width, height, ok):
    from tasks.fetch import MediaInfo, check_media

    info = MediaInfo(duration=2.0, has_video=True, width=width, height=height, fps=25.0)
    if ok:
        check_media(info, "video", Settings())
        return
    with pytest.raises(MediaError, match=rf"is {width}x{height}; the largest accepted picture is 3840x2160"):
        check_media(info, "video", Settings())


def test_resolution_limit_applies_to_a_real_file_before_preparing(tmp_path):
    from musetalk_engine.sample_media import make_avatar_video
    from tasks.fetch import probe_media

    video = make_avatar_video(tmp_path / "a.mp4", seconds=0.4, width=360, height=360)
    with pytest.raises(MediaError) as err:
        probe_media(video, "video", Settings(musetalk_max_input_long_side=320, musetalk_max_input_short_side=240))
    assert err.value.stage == "validation" and "360x360" in err.value.message
    assert probe_media(video, "video", Settings()).width == 360
