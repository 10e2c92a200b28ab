"""Property-based fuzzing of the orchestrator's HTTP API (DESIGN §11 public API, §5 internal protocol) with
hypothesis, against the real app (in-process TestClient) on a real Prefect server (``prefect_test_harness``,
SQLite, as tests/test_orchestrator.py): bodies of random bytes and random JSON in several encodings and
content types, job-shaped bodies with hostile fields (malformed and private URLs, deep metadata, NaN,
NUL, lone surrogates, huge fields), path ids with ``/``, ``..``, ``%``, control characters and any length,
list queries with any ``status``/``limit``/``cursor``, and garbled ``Authorization``, ``Idempotency-Key`` and
``X-Internal-API-Key`` headers, on every endpoint.

Properties: never a 5xx; every 4xx is the contract's error body ``{"error": {"type", "message"}}``; a
rejected request creates no job (at the end, Prefect holds exactly the jobs that were answered 200/202);
with the service's own logging (tasks/logs.py), every line of its log is a log line of its own, with no raw
control character, even when a worker relays hostile text; the app still answers ``/hc``. A table pins the
defect classes the probes found (``test_known_hostile_requests``).

Bounded for CI as tests/test_fuzz_generate.py: ``derandomize`` and ``MUSETALK_FUZZ_EXAMPLES`` examples per
property (default 60: about 500 requests, 5 s; the module takes about 25-35 s on a 2-core machine, most of
it the Prefect server's and the app's start-up). ``MUSETALK_FUZZ_EXAMPLES=1000 MUSETALK_FUZZ_RANDOM=1`` for a
longer, randomised hunt."""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLES = int(os.environ.get("MUSETALK_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("MUSETALK_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck), database=None)
REPO = Path(__file__).resolve().parent.parent
KEY, INTERNAL = "fuzz-key", "fuzz-internal"
MEASURED = "ed563892-aacd-40f5-80b7-90c9be6c759b"  # gpu_targets.json's first class, given a benchmark here
LIMIT = 16 * 1024  # MUSETALK_MAX_REQUEST_BYTES for this app: a few examples go past it
SEEN: Counter[int] = Counter()
ACCEPTED: set[str] = set()  # ids of the jobs the API answered 200/202 to
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
FORGED_AT = "2001-01-01T00:00:00.000Z"  # a log line no real record starts with
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+: ")  # tasks/logs.TextFormatter


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Any]:
    """The app on a temporary Prefect server, logging as the ``musetalk-flow orchestrator`` command does
    (tasks/logs.configure_logging), into ``api.log``."""
    from fastapi.testclient import TestClient
    from prefect.testing.utilities import prefect_test_harness

    from orchestrator.api import create_app
    from orchestrator.settings import OrchestratorSettings
    from tests.log_capture import captured
    from tasks.settings import Settings

    work = tmp_path_factory.mktemp("orch")
    # one measured Salad class, so that estimates and the salad:<class> route succeed too
    targets = json.loads((REPO / "gpu_targets.json").read_text())
    targets[0] = {**targets[0], "benchmark": {"real_time_factor": 0.5, "fps": 60, "price_per_hour": 0.3,
                                              "job_overhead_s": 3.0}}
    (work / "gpu_targets.json").write_text(json.dumps(targets))
    with prefect_test_harness(server_startup_timeout=180):
        settings = OrchestratorSettings(musetalk_api_keys=SecretStr(KEY), musetalk_worker_offline_sec=60.0,
                                        musetalk_gpu_targets=work / "gpu_targets.json",
                                        musetalk_salad_prices=REPO / "salad_prices.json")
        workdir = Settings(internal_api_key=SecretStr(INTERNAL), musetalk_workdir=work,
                           musetalk_max_request_bytes=LIMIT)
        app = create_app(settings, workdir, sweep=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            # the test client's own request lines hidden
            with captured(levels={"httpx2": logging.WARNING}) as client.log:
                yield client


def check(r: Any) -> None:
    """The properties every answer has."""
    SEEN[r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, (r.status_code, body)
        assert isinstance(body["error"]["type"], str) and re.fullmatch(r"[a-z_]+", body["error"]["type"]), body
        message = body["error"]["message"]
        assert isinstance(message, str) and 0 < len(message) <= 1000, body
    else:
        r.json()


def submitted(r: Any) -> None:
    check(r)
    if r.status_code in (200, 202):
        body = r.json()
        assert body["status"] in ("queued", "running", "succeeded", "failed", "cancelled"), body
        ACCEPTED.add(body["id"])
    else:
        assert r.status_code in (401, 409, 413, 422), (r.status_code, r.text[:300])


# ------------------------------------------------------------------------------------------- strategies

def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` about three times in four, else ``bad``: most examples then get far enough to test what
    lies past their first mistake. (Not one_of: it flattens ``bad``'s own branches and weighs them all alike.)"""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: good if ok else bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
hostile_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", "..", "../etc/passwd", "a/b", "%2F", "\x00", "a\nb", "\x1b[31m", "\ud800", "é", "😀", " ", "x" * 300])
PRIVATE = ["127.0.0.1", "127.1", "2130706433", "10.1.2.3", "192.168.0.7", "[::1]", "169.254.169.254",
           "[fd00::5]", "localhost", "0", "[::ffff:127.0.0.1]"]


GOOD_URLS = st.sampled_from(["https://media.example/avatar.mp4", "http://cdn.example:8080/a/b.wav?sig=1",
                             "https://xn--bcher-kva.example/%C3%A9.mp4", "https://hooks.example/musetalk"])


@st.composite
def bad_urls(draw) -> Any:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(json_values)
    if kind == 1:
        return draw(hostile_text)
    if kind == 2:
        return f"http://{draw(st.sampled_from(PRIVATE))}/{draw(st.text(string.ascii_letters, max_size=8))}"
    scheme = draw(st.sampled_from(["http", "https", "HTTPS", "ftp", "file", "javascript", "", "h\ttp"]))
    host = draw(st.sampled_from(["media.example", "hooks.example", "xn--", "-a-", "a" * 70, ""]) | hostile_text)
    port = draw(st.sampled_from(["", ":443", ":0", ":99999", ":x", ":-1"]))
    query = draw(st.sampled_from(["", "?X-Amz-Signature=abc", "#f", "?%zz"]))
    return f"{scheme}://{host}{port}/{draw(hostile_text)}{query}"


# well-formed ones get the request as far as Prefect
urls = mostly(GOOD_URLS, bad_urls())
job_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True) | hostile_text | json_values


def deep(levels: int) -> dict:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


# each field of a job: (a good value, a bad one)
FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "video_url": (GOOD_URLS, bad_urls()),
    "audio_url": (GOOD_URLS, bad_urls()),
    "musetalk_job_id": (st.uuids().map(str), job_ids),  # a repeated id is a 409
    "webhook_url": (GOOD_URLS, bad_urls()),
    "aspect_ratio": (st.sampled_from(["9:16", "16:9", "1:1"]), json_values),
    "resolution": (st.sampled_from(["720p", "1080p"]), json_values | st.just("9000p")),
    "priority": (st.sampled_from(["urgent", "normal"]), json_values | st.just("asap")),
    "route": (st.sampled_from(["auto", "gpu", "buffer", f"salad:{MEASURED}"]),
              st.sampled_from(["salad:", "salad:nope", "moon"]) | hostile_text),
    "params": (st.fixed_dictionaries({}, optional={"batch_size": st.integers(1, 256), "fps": st.integers(1, 60)}),
               st.fixed_dictionaries({}, optional={"batch_size": st.integers(-5, 10**20) | json_values,
                                                   "fps": json_values, "unknown": json_values}) | json_values),
    "metadata": (st.dictionaries(st.text(max_size=10), json_values, max_size=4),
                 json_values | st.dictionaries(hostile_text, hostile_text, max_size=3)
                 | st.sampled_from([31, 32, 33, 300, 700]).map(deep)
                 | st.sampled_from([LIMIT // 2, LIMIT, LIMIT * 2]).map(lambda n: {"pad": "x" * n})),
}


@st.composite
def jobs(draw) -> dict:
    """A valid job with none, one or a few fields made bad, dropped, or added: a third or so are accepted,
    and a refused one is mostly refused for one thing, so every rule past the first is reached too."""
    job = {key: draw(good) for key, (good, _) in FIELDS.items()
           if key in ("video_url", "audio_url") or draw(st.booleans())}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        key = draw(st.sampled_from(list(FIELDS) + ["extra"]))
        action = draw(st.sampled_from(["bad", "bad", "drop"]))
        if key == "extra":
            job.update(draw(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=2)))
        elif action == "drop":
            job.pop(key, None)
        else:
            job[key] = draw(FIELDS[key][1])
    return job


# "ascii": UTF-8 with every non-ASCII character escaped (so a lone surrogate arrives as valid JSON "\\ud800")
encodings = st.sampled_from(["utf-8", "ascii", "utf-16", "utf-32", "latin-1"])
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", ""])
# header values as bytes: anything but CR, LF and NUL (which no HTTP server passes on)
header_values = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00")) | st.sampled_from(
    [b"", b" ", b"x" * 300, b"x" * 9000, "é".encode("latin-1")])
# mostly the right key, so that most examples get past authentication
auths = mostly(st.just(f"Bearer {KEY}".encode()), st.sampled_from(
    [None, b"Bearer", b"Basic eA==", f"bearer {KEY}".encode(), f"Bearer {KEY} x".encode()])
    | header_values.map(lambda v: b"Bearer " + v))
internal_keys = mostly(st.just(INTERNAL.encode()), st.sampled_from([None, b"wrong"]) | header_values)


def encode(value: Any, encoding: str) -> bytes:
    text = json.dumps(value, allow_nan=True, ensure_ascii=encoding in ("ascii", "latin-1"))
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


def headers_of(auth: bytes | None = None, internal: bytes | None = None, content_type: str | None = None,
               idempotency: bytes | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if auth is not None:
        headers["authorization"] = auth
    if internal is not None:
        headers["x-internal-api-key"] = internal
    if content_type:
        headers["content-type"] = content_type
    if idempotency is not None:
        headers["idempotency-key"] = idempotency
    return headers


def segment(value: Any) -> str:
    """One path segment as a client would send it: percent-encoded (so ``/`` becomes ``%2F``) or raw."""
    if isinstance(value, bytes):  # raw: a "/" or ".." stays one
        return quote(value, safe="/.")
    return quote(str(value).encode("utf-8", "surrogatepass"), safe="")


query_text = hostile_text.filter(lambda v: "\ud800" not in v)  # a client cannot put it in a URL
path_ids = hostile_text | st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True) | st.sampled_from(
    [128, 129, 2000, 6000]).map(lambda n: "i" * n) | st.binary(max_size=20)
ENDPOINTS = ["/v1/avatar/jobs", "/v1/avatar/estimate", "/internal/buffer/jobs/claim",
             "/internal/jobs/x/progress", "/internal/buffer/workers/w/heartbeat", "/internal/buffer/jobs/x.y/status"]


# ------------------------------------------------------------------------------------------- properties


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), content=st.binary(max_size=2000), content_type=content_types,
       auth=auths, internal=internal_keys)
def test_random_bytes_to_every_endpoint(api, path, content, content_type, auth, internal):
    r = api.post(path, content=content, headers=headers_of(auth, internal, content_type))
    submitted(r) if path == "/v1/avatar/jobs" else check(r)


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), value=json_values, encoding=encodings, content_type=content_types,
       auth=auths, internal=internal_keys)
def test_random_json_to_every_endpoint(api, path, value, encoding, content_type, auth, internal):
    r = api.post(path, content=encode(value, encoding), headers=headers_of(auth, internal, content_type))
    submitted(r) if path == "/v1/avatar/jobs" else check(r)


@FUZZ
@given(job=jobs(), encoding=encodings, auth=auths,
       idempotency=mostly(st.sampled_from([None, None, b"order-1", b"order-2", b"x" * 255]), header_values))
def test_job_shaped_submissions(api, job, encoding, auth, idempotency):
    submitted(api.post("/v1/avatar/jobs", content=encode(job, encoding),
                       headers=headers_of(auth, content_type="application/json", idempotency=idempotency)))


@FUZZ
@given(job_id=path_ids, method=st.sampled_from(["GET", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]),
       tail=st.sampled_from(["", "/", "/x", "/..", "/%2e%2e"]), auth=auths)
def test_job_paths(api, job_id, method, tail, auth):
    r = api.request(method, f"/v1/avatar/jobs/{segment(job_id)}{tail}", headers=headers_of(auth))
    if method == "HEAD":  # no body to check
        SEEN[r.status_code] += 1
        assert r.status_code < 500
        return
    check(r)


# times at the ends of the calendar, some with no UTC equivalent (a 500 from Prefect's database once)
EDGE_TIMES = ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59-23:59",
              "9999-12-31T23:59:59.999999+00:00", "0001-01-01T00:00:00"]


@st.composite
def cursors(draw) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(query_text)
    when = draw(st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()) | hostile_text
                | st.sampled_from(EDGE_TIMES))
    run_id = draw(st.uuids().map(str) | hostile_text)
    raw = f"{when}|{run_id}" if kind < 3 else draw(hostile_text)
    return base64.urlsafe_b64encode(raw.encode("utf-8", "surrogatepass")).decode().rstrip("=" if kind == 1 else "")


@FUZZ
@given(status=st.none() | query_text | st.sampled_from(["queued", "running", "succeeded"]),
       limit=st.none() | st.integers(-10, 10**30).map(str) | query_text, cursor=st.none() | cursors(),
       extra=st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8), query_text, max_size=2),
       auth=auths)
def test_list_queries(api, status, limit, cursor, extra, auth):
    params = {k: v for k, v in (("status", status), ("limit", limit), ("cursor", cursor)) if v is not None}
    check(api.get("/v1/avatar/jobs", params={**extra, **params}, headers=headers_of(auth)))


@FUZZ
@given(body=st.fixed_dictionaries({}, optional={"audio_seconds": json_values | st.floats() | st.integers(-5, 10**30),
                                               "resolution": json_values | st.sampled_from(["720p", "9000p"])}),
       encoding=encodings, auth=auths)
def test_estimates(api, body, encoding, auth):
    check(api.post("/v1/avatar/estimate", content=encode(body, encoding),
                   headers=headers_of(auth, content_type="application/json")))


progress_bodies = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["running", "succeeded", "failed"]) | json_values,
    "progress": st.floats(-1, 2) | json_values, "phase": st.sampled_from(["inferring", "x"]) | json_values,
    "metrics": json_values, "error": json_values, "worker_id": hostile_text | json_values})
heartbeats = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["idle", "busy"]) | json_values, "gpu_class": hostile_text | json_values,
    "capacity": st.integers(-2, 10**20) | json_values,
    "error": hostile_text | st.sampled_from([1000, 1001, 6000, 12000]).map(lambda n: "e" * n)})
reports = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["succeeded", "failed"]) | json_values, "output_url": urls,
    "error": json_values, "metrics": json_values})


@FUZZ
@given(which=st.sampled_from(["progress", "heartbeat", "status", "claim"]), target=path_ids, data=st.data(),
       internal=internal_keys)
def test_internal_protocol(api, which, target, data, internal):
    """Hostile §5 calls (never a real lease or job of this module: nothing here may change a job)."""
    if which == "progress":
        path, body = f"/internal/jobs/{segment(target)}/progress", data.draw(progress_bodies)
    elif which == "heartbeat":
        path, body = f"/internal/buffer/workers/{segment(target)}/heartbeat", data.draw(heartbeats)
    elif which == "status":
        path, body = f"/internal/buffer/jobs/{segment(target)}/status", data.draw(reports)
    else:
        path, body = "/internal/buffer/jobs/claim", data.draw(st.fixed_dictionaries(
            {}, optional={"worker_id": hostile_text | json_values | st.just("w" * 200)}))
    r = api.post(path, content=encode(body, "utf-8"), headers=headers_of(internal=internal,
                                                                          content_type="application/json"))
    check(r)


RAW = "@@raw@@"  # a string replaced in the encoded body by a token json.dumps cannot write
# One hostile value: each is a class that once got past the API (a 5xx, or a run Prefect could not store).
HOSTILE: dict[str, Any] = {
    "deep 33": deep(33), "deep 300": deep(300), "deep 700": deep(700), "nan": math.nan, "inf": -math.inf,
    "1e400": RAW + "1e400", "big int": RAW + "9" * 5000, "lone surrogate": "\ud800", "NUL": "a\x00b",
    "over the limit": "x" * (2 * LIMIT), "6000 chars": "e" * 6000, "control chars": "a\nb\x1b[31m",
    "private url": "http://127.1:9/x", "long key": {"k" * 3000: 1},
}
VALID_BODIES: dict[str, tuple[str, dict[str, Any], list[str]]] = {  # endpoint: (path, a valid body, its fields)
    "submit": ("/v1/avatar/jobs",
               {"video_url": "https://media.example/v.mp4", "audio_url": "https://media.example/a.wav"},
               ["metadata", "params", "webhook_url", "video_url", "musetalk_job_id", "route"]),
    "estimate": ("/v1/avatar/estimate", {"audio_seconds": 10}, ["audio_seconds", "resolution"]),
    "heartbeat": ("/internal/buffer/workers/fuzz-w/heartbeat", {"status": "busy"}, ["error", "gpu_class", "capacity"]),
    "claim": ("/internal/buffer/jobs/claim", {"worker_id": "fuzz-w"}, ["worker_id"]),
    "progress": ("/internal/jobs/no-such-job/progress", {"status": "running", "progress": 0.5, "phase": "inferring"},
                 ["metrics", "error", "worker_id"]),
    "status": ("/internal/buffer/jobs/00000000-0000-0000-0000-000000000000.x/status", {"status": "failed"},
               ["metrics", "error", "output_url"]),
}


def hostile_body(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, allow_nan=True)  # ASCII: a lone surrogate arrives as the valid JSON "\ud800"
    return re.sub(r'"@@raw@@([^"]*)"', r"\1", text).encode()


@FUZZ
@given(endpoint=st.sampled_from(list(VALID_BODIES)), data=st.data(), hostile=st.sampled_from(list(HOSTILE)),
       nested=st.booleans())
def test_one_hostile_value_in_one_field(api, endpoint, data, hostile, nested):
    """Every endpoint's valid body with one field replaced by (or, ``nested``, wrapped around) a hostile value."""
    path, body, fields = VALID_BODIES[endpoint]
    field = data.draw(st.sampled_from(fields))
    value = {"v": [HOSTILE[hostile]]} if nested else HOSTILE[hostile]
    headers = {"authorization": f"Bearer {KEY}", "x-internal-api-key": INTERNAL, "content-type": "application/json"}
    r = api.post(path, content=hostile_body({**body, field: value}), headers=headers)
    submitted(r) if endpoint == "submit" else check(r)


# The defect classes found by hand and by the properties above, pinned: (what, method, path, headers, body,
# status, type). Before the front door each of these was a 5xx or a body outside the contract.
J = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
I = {"x-internal-api-key": INTERNAL, "content-type": "application/json"}
GOOD = '"video_url": "https://media.example/v.mp4", "audio_url": "https://media.example/a.wav"'
REGRESSIONS = [
    ("invalid UTF-8 (was 400 {detail})", "POST", "/v1/avatar/jobs", J, b"\x80", 422, "invalid_request"),
    ("nesting past the parser (was 400 {detail})", "POST", "/v1/avatar/jobs", J, b"[" * 5000 + b"]" * 5000, 422,
     "invalid_request"),
    ("metadata 500 deep (was 500)", "POST", "/v1/avatar/jobs", J,
     ("{" + GOOD + ', "metadata": ' + '{"a":' * 500 + "1" + "}" * 500 + "}").encode(), 422, "invalid_request"),
    ("lone surrogate (was 500)", "POST", "/v1/avatar/jobs", J,
     ("{" + GOOD + ', "metadata": {"x": "\\ud800"}}').encode(), 422, "invalid_request"),
    ("NaN stored as a parameter (was 202)", "POST", "/v1/avatar/jobs", J,
     ("{" + GOOD + ', "metadata": {"x": NaN}}').encode(), 422, "invalid_request"),
    ("NUL, which PostgreSQL cannot store (was 202)", "POST", "/v1/avatar/jobs", J,
     ("{" + GOOD + ', "metadata": {"x": "\\u0000"}}').encode(), 422, "invalid_request"),
    ("1 MB of metadata (was 500 from Prefect)", "POST", "/v1/avatar/jobs", J,
     ("{" + GOOD + ', "metadata": {"x": "' + "y" * 1_000_000 + '"}}').encode(), 413, "too_large"),
    ("malformed media URL (was 202, failed at the worker)", "POST", "/v1/avatar/jobs", J,
     b'{"video_url": "not a url", "audio_url": "ftp://a.example/a.wav"}', 422, "invalid_request"),
    ("loopback webhook (was 202, never delivered)", "POST", "/v1/avatar/jobs", J,
     ("{" + GOOD + ', "webhook_url": "http://2130706433/hook"}').encode(), 422, "invalid_request"),
    ("9000-character Idempotency-Key (was 202)", "POST", "/v1/avatar/jobs", {**J, "idempotency-key": "k" * 9000},
     ("{" + GOOD + "}").encode(), 422, "invalid_request"),
    ("a cursor at 0001-01-01T00:00+14:00, before UTC's calendar (was 500)", "GET", "/v1/avatar/jobs?cursor="
     + base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|00000000-0000-0000-0000-000000000000").decode(), J, b"",
     422, "invalid_request"),
    ("%2F in a job id (was 404 {detail})", "GET", "/v1/avatar/jobs/a%2Fb", J, b"", 404, "not_found"),
    ("wrong method (was 405 {detail})", "PUT", "/v1/avatar/jobs", J, b"", 405, "method_not_allowed"),
    ("unknown path (was 404 {detail})", "GET", "/v1/nope", J, b"", 404, "not_found"),
    ("NUL in a job id: never sent to Prefect", "GET", "/v1/avatar/jobs/a%00b", J, b"", 404, "not_found"),
    ("6000-character worker id (was 500)", "POST", "/internal/buffer/workers/" + "w" * 6000 + "/heartbeat", I,
     b'{"status": "idle"}', 422, "invalid_request"),
    ("newline in a worker id, later logged (was 200)", "POST", "/internal/buffer/workers/w%0Aforged/heartbeat", I,
     b'{"status": "idle"}', 422, "invalid_request"),
    ("invalid UTF-8 to the internal API (was 400 {detail})", "POST", "/internal/buffer/jobs/claim", I, b"\xff",
     422, "invalid_request"),
]


@pytest.mark.parametrize("what, method, path, headers, content, status, type_", REGRESSIONS,
                         ids=[row[0] for row in REGRESSIONS])
def test_known_hostile_requests(api, what, method, path, headers, content, status, type_):
    r = api.request(method, path, content=content, headers=headers)
    check(r)
    assert (r.status_code, r.json()["error"]["type"]) == (status, type_), r.text[:300]


def test_a_long_heartbeat_error_or_gpu_class_is_cut_not_refused(api):
    """Refusing it would make a live worker look offline; Prefect's variable holds at most 5000 characters
    (a 6000-character error was a 500)."""
    r = api.post("/internal/buffer/workers/fuzz-w/heartbeat", json={"status": "busy", "error": "e" * 6000,
                                                                    "gpu_class": "g" * 6000},
                 headers={"x-internal-api-key": INTERNAL})
    assert r.status_code == 200, r.text


def test_an_idempotency_key_sent_twice_is_refused(api):
    """The front door and the handler could read different copies: a long key hidden behind a short one
    reached Prefect (found by review)."""
    headers = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json"),
               ("idempotency-key", "k" * 6000), ("idempotency-key", "ok")]
    r = api.post("/v1/avatar/jobs", content=("{" + GOOD + "}").encode(), headers=headers)
    check(r)
    assert r.status_code == 422 and "once" in r.json()["error"]["message"], r.text


def test_hostile_text_a_worker_relays_stays_on_its_log_line(api):
    """A worker's failure message (which may quote a customer's media) is logged when its job is requeued."""
    submitted(api.post("/v1/avatar/jobs", json={"video_url": "https://media.example/v.mp4", "route": "buffer",
                                                 "audio_url": "https://media.example/a.wav"},
                       headers={"authorization": f"Bearer {KEY}"}))
    internal = {"x-internal-api-key": INTERNAL}
    assert api.post("/internal/buffer/workers/fuzz-logs/heartbeat", json={"status": "idle", "capacity": 1000},
                    headers=internal).status_code == 200
    job = api.post("/internal/buffer/jobs/claim", json={"worker_id": "fuzz-logs"}, headers=internal).json()["job"]
    forged = f"boom\n{FORGED_AT} INFO orchestrator.api: forged\x1b[31m\u2028"
    r = api.post(f"/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=internal, json={
        "status": "failed", "error": {"error_type": "processing_error", "error_message": forged, "retryable": True}})
    assert r.status_code == 200 and r.json()["job_status"] == "queued", r.text
    assert f"requeued after attempt 1: boom\\n{FORGED_AT}" in api.log.getvalue()


def test_the_app_is_still_healthy_and_created_only_accepted_jobs(api):
    """After every example: /hc answers, Prefect holds exactly the accepted jobs and answers each of them,
    and every line of the log is a log line of its own (no client or worker text forged one) with no raw
    control character."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from orchestrator.jobs import JOB_TAG, job_id_of
    from tasks.logs import CONTINUATION

    if not SEEN:
        pytest.skip("it sums up this module's properties: run it with them")
    assert api.get("/hc").json() == {"status": "ok"}
    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        while page := client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[JOB_TAG])),
                                            limit=200, offset=len(runs)):  # Prefect answers 200 at most
            runs += page
    assert {job_id_of(r) for r in runs} == ACCEPTED and len(runs) == len(ACCEPTED)
    # and every accepted job reads back, one by one and page by page (what was stored can be answered)
    auth = {"authorization": f"Bearer {KEY}"}
    for job_id in ACCEPTED:
        r = api.get(f"/v1/avatar/jobs/{job_id}", headers=auth)
        assert r.status_code == 200 and r.json()["id"] == job_id, r.text[:300]
    listed, cursor = [], None
    while True:
        page = api.get("/v1/avatar/jobs", params={"limit": 100, **({"cursor": cursor} if cursor else {})},
                       headers=auth).json()
        listed += [item["id"] for item in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert sorted(listed) == sorted(ACCEPTED)
    lines = api.log.getvalue().splitlines()
    broken = [line for line in lines if not (LINE.match(line) or line.startswith(CONTINUATION))
              or CONTROL.search(line) or line.startswith(FORGED_AT)]
    assert lines and not broken, broken[:3]
    total = sum(SEEN.values())
    print(f"\nfuzz: {total} requests, statuses {dict(sorted(SEEN.items()))}, {len(ACCEPTED)} jobs accepted, "
          f"{len(lines)} log lines")
    assert total >= 8 * EXAMPLES * 0.9
    assert SEEN[202] > 0 and SEEN[422] > 0 and SEEN[401] > 0 and SEEN[404] > 0 and SEEN[413] > 0
