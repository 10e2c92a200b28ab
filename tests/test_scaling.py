"""Autoscaling: the decision table, the Salad client against a local fake API, and the scale flow."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tasks.salad import (
    MERGE_PATCH,
    SaladApiError,
    SaladClient,
    _worth_retrying,
    read_queue_length,
    read_replicas,
    salad_client_from_env,
    write_replicas,
)
from tasks.scaling import decide_scaling, decision_markdown, run_scaling_pass
from tests.servers import serve_in_thread

API_KEY = "test-key-9f3a1c-do-not-leak"
ORG, PROJECT = "acme", "lipsync"
PREFIX = f"/api/public/organizations/{ORG}/projects/{PROJECT}"

# ----------------------------------------------------------------------------- decision table


def bench(rtf: float, fps: float, price: float | None) -> dict[str, Any]:
    cost = None if price is None else price / 60 * rtf
    return {"real_time_factor": rtf, "fps": fps, "price_per_hour": price, "cost_per_output_minute": cost}


TARGETS: list[dict[str, Any]] = [
    {"id": "a", "name": "RTX 4090 (24 GB)", "benchmark": bench(0.5, 60, 0.16)},  # 0.00133 $/min
    {"id": "b", "name": "RTX 3090 (24 GB)", "benchmark": bench(0.8, 40, 0.09)},  # 0.00120 $/min
    {"id": "c", "name": "RTX 3060 (12 GB)", "benchmark": bench(1.6, 20, 0.04)},  # 0.00107, too slow at 1.0
    {"id": "d", "name": "RTX 4080 (16 GB)", "benchmark": bench(0.6, 50, None)},  # price unknown
    {"id": "e", "name": "RTX 4070 (12 GB)"},  # never measured
    {"id": None, "name": "NVIDIA H200", "local": True, "benchmark": bench(0.1, 300, None)},
]
GROUPS = {"a": "mt-4090", "b": "mt-3090", "c": "mt-3060", "d": "mt-4080", "e": "mt-4070"}
CURRENT = {"mt-4090": 2, "mt-3090": 1, "mt-3060": 0, "mt-4080": 0, "mt-4070": 0}


def others_zero(group: str, n: int, groups: dict[str, str] = GROUPS) -> dict[str, int]:
    desired = {g: 0 for g in groups.values()}
    desired[group] = n
    return desired


CASES = [
    # id, queue, overrides, chosen class, desired replicas (None: unchanged)
    ("empty queue -> min", 0, {}, "b", others_zero("mt-3090", 0)),
    ("empty queue, min 1", 0, {"min_replicas": 1}, "b", others_zero("mt-3090", 1)),
    ("queue 5 / 2 per replica -> 3", 5, {}, "b", others_zero("mt-3090", 3)),
    ("big queue capped at max", 1000, {"max_replicas": 10}, "b", others_zero("mt-3090", 10)),
    ("too-slow cheap class wins once rtf allows", 4, {"target_rtf": 2.0}, "c", others_zero("mt-3060", 2)),
    ("cheapest qualifying when b unmapped", 1, {"container_groups": {"a": "mt-4090", "d": "mt-4080"}},
     "a", {"mt-4090": 1, "mt-4080": 0}),
    ("unknown price ranked last but usable", 3, {"container_groups": {"c": "mt-3060", "d": "mt-4080"}},
     "d", {"mt-3060": 0, "mt-4080": 2}),
    ("today's price overrides the recorded one", 2, {"prices": {"b": 0.5}}, "a", others_zero("mt-4090", 1)),
    ("no class fast enough -> no change", 9, {"target_rtf": 0.3}, None, None),
    ("only unmeasured class mapped -> no change", 9, {"container_groups": {"e": "mt-4070"}}, None, None),
    ("others go to others_min", 0, {"others_min_replicas": 1}, "b",
     {g: (0 if g == "mt-3090" else 1) for g in GROUPS.values()}),
]


@pytest.mark.parametrize(("queue", "overrides", "chosen", "desired"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_decision_table(queue, overrides, chosen, desired) -> None:
    kwargs: dict[str, Any] = {
        "container_groups": GROUPS,
        "current_replicas": CURRENT,
        "min_replicas": 0,
        "max_replicas": 10,
        "jobs_per_replica": 2,
        "target_rtf": 1.0,
    }
    kwargs.update(overrides)
    decision = decide_scaling(queue, TARGETS, **kwargs)
    assert decision.chosen_class_id == chosen
    if desired is None:
        assert decision.desired_replicas == CURRENT
        assert decision.changes(CURRENT) == {}
        assert "keeping current replicas" in decision.reason
    else:
        assert decision.desired_replicas == desired
        assert decision.container_group == kwargs["container_groups"][chosen]
        assert decision.chosen_class_name in decision.reason


def test_tie_on_cost_goes_to_higher_fps() -> None:
    targets = [
        {"id": "x", "name": "X", "benchmark": bench(0.5, 30, 0.1)},
        {"id": "y", "name": "Y", "benchmark": bench(0.5, 45, 0.1)},
    ]
    decision = decide_scaling(3, targets, container_groups={"x": "gx", "y": "gy"}, current_replicas={})
    assert decision.chosen_class_id == "y"


def test_local_entry_is_never_chosen() -> None:
    decision = decide_scaling(5, TARGETS, container_groups=GROUPS, current_replicas=CURRENT, target_rtf=0.2)
    assert decision.chosen_class_id is None
    assert all(c.class_id for c in decision.candidates)


def test_too_slow_reason_and_bounds_check() -> None:
    only_c = {"c": "mt-3060"}
    decision = decide_scaling(4, TARGETS, container_groups=only_c, current_replicas={"mt-3060": 1})
    assert "too slow: RTX 3060 (12 GB)" in decision.reason
    with pytest.raises(ValueError):
        decide_scaling(1, TARGETS, container_groups=GROUPS, current_replicas=CURRENT,
                       min_replicas=5, max_replicas=2)


def test_changes_only_lists_differences_and_markdown() -> None:
    decision = decide_scaling(5, TARGETS, container_groups=GROUPS, current_replicas=CURRENT)
    assert decision.changes(CURRENT) == {"mt-4090": 0, "mt-3090": 3}
    md = decision_markdown(decision, CURRENT, {}, dry_run=True)
    assert "would patch" in md and "mt-3090" in md and "RTX 3090 (24 GB)" in md


# ------------------------------------------------------------------------------ fake Salad API


class FakeSalad:
    """Records every request; serves container groups and one queue; scripted failures per path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replicas: dict[str, int] = dict(CURRENT)
        self.queue_length = 5
        self.jobs: dict[str, dict[str, Any]] = {}
        self.fail: dict[tuple[str, str], list[int]] = {}  # (method, path) -> statuses to return first
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self.handle, methods=["GET", "POST", "PATCH"])

    def patches(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "PATCH"]

    async def handle(self, path: str, request: Request) -> Response:
        raw = await request.body()
        full = "/" + path
        self.requests.append({
            "method": request.method, "path": full, "headers": dict(request.headers),
            "body": json.loads(raw) if raw else None,
        })
        if request.headers.get("salad-api-key") != API_KEY:
            return JSONResponse({"title": "Unauthorized"}, status_code=401)
        queued = self.fail.get((request.method, full))
        if queued:
            status = queued.pop(0)
            # a hostile body that echoes the key: the client must redact it
            return JSONResponse({"title": "fault", "detail": f"bad key? {API_KEY}"}, status_code=status)
        if not full.startswith(PREFIX + "/"):
            return JSONResponse({"title": "Not Found"}, status_code=404)
        parts = full[len(PREFIX) + 1:].split("/")
        if parts[0] == "containers" and parts[1] in self.replicas:
            name = parts[1]
            if len(parts) == 2 and request.method == "GET":
                return JSONResponse({"name": name, "replicas": self.replicas[name]})
            if len(parts) == 2 and request.method == "PATCH":
                if request.headers.get("content-type") != MERGE_PATCH:
                    return JSONResponse({"title": "Unsupported Media Type"}, status_code=415)
                self.replicas[name] = int(json.loads(raw)["replicas"])
                return JSONResponse({"name": name, "replicas": self.replicas[name]})
            if len(parts) == 3 and parts[2] in ("start", "stop") and request.method == "POST":
                return Response(status_code=202)
            if len(parts) == 3 and parts[2] == "instances":
                return JSONResponse({"instances": [{"id": "i-1", "state": "running"}]})
        if parts[0] == "queues" and parts[1] == "render":
            if len(parts) == 2:
                return JSONResponse({"name": "render", "current_queue_length": self.queue_length})
            if len(parts) == 3 and request.method == "POST":
                job = {"id": f"job-{len(self.jobs) + 1}", "status": "pending", **json.loads(raw)}
                self.jobs[job["id"]] = job
                return JSONResponse(job, status_code=201)
            if len(parts) == 4 and parts[3] in self.jobs:
                return JSONResponse(self.jobs[parts[3]])
        return JSONResponse({"title": "Not Found"}, status_code=404)


@pytest.fixture(scope="module")
def fake_salad():
    fake = FakeSalad()
    with serve_in_thread(fake.app) as (url, _, _):
        fake.base_url = f"{url}/api/public"
        yield fake


@pytest.fixture()
def fake(fake_salad):
    fake_salad.requests.clear()
    fake_salad.replicas = dict(CURRENT)
    fake_salad.queue_length = 5
    fake_salad.fail.clear()
    return fake_salad


@pytest.fixture()
def client(fake):
    with SaladClient(API_KEY, ORG, PROJECT, base_url=fake.base_url, backoff_s=0.0) as c:
        yield c


def test_client_calls_and_headers(fake, client) -> None:
    assert client.get_queue_length("render") == 5
    assert client.get_container_group("mt-3090")["replicas"] == 1
    assert client.set_replicas("mt-3090", 4)["replicas"] == 4
    client.start("mt-3090")
    client.stop("mt-3090")
    assert client.list_instances("mt-3090") == [{"id": "i-1", "state": "running"}]
    job = client.create_job("render", {"musetalk_job_id": "j1"}, metadata={"k": "v"}, webhook="https://h")
    assert client.get_job("render", job["id"])["input"] == {"musetalk_job_id": "j1"}

    methods = [(r["method"], r["path"][len(PREFIX):]) for r in fake.requests]
    assert methods == [
        ("GET", "/queues/render"), ("GET", "/containers/mt-3090"), ("PATCH", "/containers/mt-3090"),
        ("POST", "/containers/mt-3090/start"), ("POST", "/containers/mt-3090/stop"),
        ("GET", "/containers/mt-3090/instances"), ("POST", "/queues/render/jobs"),
        ("GET", f"/queues/render/jobs/{job['id']}"),
    ]
    assert all(r["headers"]["salad-api-key"] == API_KEY for r in fake.requests)
    patch = fake.patches()[0]
    assert patch["headers"]["content-type"] == MERGE_PATCH and patch["body"] == {"replicas": 4}
    assert fake.requests[6]["body"] == {"input": {"musetalk_job_id": "j1"}, "metadata": {"k": "v"},
                                        "webhook": "https://h"}
    assert API_KEY not in repr(client)


def test_retries_on_5xx_and_429_then_succeeds(fake, client) -> None:
    fake.fail[("GET", f"{PREFIX}/queues/render")] = [503, 429]
    assert client.get_queue_length("render") == 5
    assert len(fake.requests) == 3


def test_error_raises_without_the_key(fake, client) -> None:
    fake.fail[("PATCH", f"{PREFIX}/containers/mt-4090")] = [403]
    with pytest.raises(SaladApiError) as info:
        client.set_replicas("mt-4090", 3)
    err = info.value
    assert err.status_code == 403 and not err.retryable
    assert API_KEY not in str(err) and API_KEY not in repr(err.args)
    assert "***" in str(err) and "/containers/mt-4090" in str(err)
    assert len(fake.patches()) == 1  # a 4xx is final
    assert _worth_retrying(None, None, SimpleNamespace(data=err)) is False  # nor retried by the task
    assert _worth_retrying(None, None, SimpleNamespace(data=SaladApiError("GET", "/x", 503, ""))) is True


def test_retries_are_bounded_and_job_creation_is_not_repeated_on_5xx(fake, client) -> None:
    fake.fail[("GET", f"{PREFIX}/containers/mt-4090")] = [500] * 10
    with pytest.raises(SaladApiError) as info:
        client.get_container_group("mt-4090")
    assert info.value.status_code == 500 and info.value.retryable
    assert len(fake.requests) == client.max_attempts
    fake.requests.clear()
    fake.fail[("POST", f"{PREFIX}/queues/render/jobs")] = [500]
    with pytest.raises(SaladApiError):
        client.create_job("render", {"x": 1})
    assert len(fake.requests) == 1
    fake.requests.clear()
    fake.fail[("POST", f"{PREFIX}/queues/render/jobs")] = [429]
    assert client.create_job("render", {"x": 1})["status"] == "pending"
    assert len(fake.requests) == 2


def test_wrong_key_is_rejected(fake) -> None:
    with SaladClient("wrong-key", ORG, PROJECT, base_url=fake.base_url, backoff_s=0.0) as bad:
        with pytest.raises(SaladApiError) as info:
            bad.get_queue("render")
    assert info.value.status_code == 401 and "wrong-key" not in str(info.value)


def test_client_from_env_names_missing_variables_only() -> None:
    with pytest.raises(RuntimeError, match="SALAD_ORG_NAME, SALAD_PROJECT_NAME"):
        salad_client_from_env({"SALAD_API_KEY": API_KEY})
    c = salad_client_from_env({"SALAD_API_KEY": API_KEY, "SALAD_ORG_NAME": ORG, "SALAD_PROJECT_NAME": PROJECT,
                               "SALAD_API_BASE_URL": "http://127.0.0.1:9/api/public"},
                              transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})))
    assert c.base_url == "http://127.0.0.1:9/api/public"
    c.close()


# ------------------------------------------------------------------------ scaling pass and flow


@pytest.fixture()
def salad_env(fake, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SALAD_API_KEY", API_KEY)
    monkeypatch.setenv("SALAD_ORG_NAME", ORG)
    monkeypatch.setenv("SALAD_PROJECT_NAME", PROJECT)
    monkeypatch.setenv("SALAD_API_BASE_URL", fake.base_url)
    return fake


def _pass(client: SaladClient, dry_run: bool):
    return run_scaling_pass(
        queue_name="render", container_groups=GROUPS, targets=TARGETS,
        read_queue_length=client.get_queue_length,
        read_replicas=lambda groups: {g: client.get_container_group(g)["replicas"] for g in groups},
        write_replicas=lambda g, n: client.set_replicas(g, n)["replicas"],
        dry_run=dry_run, max_replicas=10, jobs_per_replica=2, target_rtf=1.0,
    )


def test_dry_run_reads_the_queue_and_patches_nothing(fake, client) -> None:
    fake.queue_length = 7
    result = _pass(client, dry_run=True)
    assert ("GET", f"{PREFIX}/queues/render") in [(r["method"], r["path"]) for r in fake.requests]
    assert fake.patches() == []
    assert result.decision.queue_length == 7
    assert result.changes == {"mt-4090": 0, "mt-3090": 4} and result.applied == {}


def test_apply_patches_only_changed_groups(fake, client) -> None:
    fake.queue_length = 7
    result = _pass(client, dry_run=False)
    patches = {r["path"][len(PREFIX):]: r for r in fake.patches()}
    assert set(patches) == {"/containers/mt-4090", "/containers/mt-3090"}  # unchanged groups untouched
    for r in patches.values():
        assert r["headers"]["content-type"] == MERGE_PATCH
        assert r["headers"]["salad-api-key"] == API_KEY
    assert patches["/containers/mt-3090"]["body"] == {"replicas": 4}
    assert result.applied == {"mt-4090": 0, "mt-3090": 4}
    fake.requests.clear()
    assert _pass(client, dry_run=False).changes == {}  # converged: a second pass patches nothing
    assert fake.patches() == []


def test_prefect_tasks_build_their_client_from_env(salad_env) -> None:
    assert read_queue_length.fn("render") == 5
    assert read_replicas.fn(["mt-3090", "mt-4090"]) == {"mt-3090": 1, "mt-4090": 2}
    assert write_replicas.fn("mt-3090", 3) == 3
    assert salad_env.patches()[0]["headers"]["content-type"] == MERGE_PATCH


def test_scale_flow_end_to_end(salad_env, tmp_path: Path) -> None:
    """The Prefect flow once (starts a temporary local Prefect server)."""
    from flows.scale import scale, scale_deployment

    targets = tmp_path / "gpu_targets.json"
    targets.write_text(json.dumps(TARGETS))
    salad_env.queue_length = 3
    out = scale(queue_name="render", container_groups=GROUPS, max_replicas=10, jobs_per_replica=2,
                target_rtf=1.0, dry_run=False, targets_path=str(targets))
    assert out["applied"] == {"mt-4090": 0, "mt-3090": 2}
    assert salad_env.replicas["mt-3090"] == 2 and salad_env.replicas["mt-4090"] == 0
    assert {r["path"] for r in salad_env.patches()} == {f"{PREFIX}/containers/mt-4090",
                                                       f"{PREFIX}/containers/mt-3090"}
    assert API_KEY not in json.dumps(out)

    deployment = scale_deployment("render", GROUPS, interval_s=60)
    assert deployment.parameters["queue_name"] == "render"
    assert API_KEY not in json.dumps(deployment.parameters)
    assert deployment.schedules[0].schedule.interval.total_seconds() == 60
    assert deployment.concurrency_limit == 1
