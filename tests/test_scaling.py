"""Autoscaling: the class ranking, the per-class decision, the Salad client against a local fake API, and
the scale flow (Prefect + the fake Salad API of tests/fake_salad.py)."""

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
from tasks.scaling import (
    ClassDemand,
    ScalePass,
    ScalingPolicy,
    cheapest_salad_class,
    decide_fleet,
    decision_markdown,
    fleet_changes,
    measured_classes,
    run_scaling_pass,
)
from tests.servers import serve_in_thread

API_KEY = "test-key-9f3a1c-do-not-leak"
ORG, PROJECT = "acme", "lipsync"
PREFIX = f"/api/public/organizations/{ORG}/projects/{PROJECT}"

# ----------------------------------------------------------------------------- ranking


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
CURRENT = {"mt-4090": 2, "mt-3090": 1, "mt-3060": 0, "mt-4080": 0, "mt-4070": 0}

RANKING_CASES = [
    # id, targets (ids), overrides, chosen
    ("cheapest meeting the target", "abcde", {}, "b"),
    ("too-slow cheap class wins once rtf allows", "abcde", {"target_rtf": 2.0}, "c"),
    ("cheapest qualifying when b is absent", "ad", {}, "a"),
    ("unknown price ranked last but usable", "cd", {}, "d"),
    ("today's price overrides the recorded one", "abcde", {"prices": {"b": 0.5}}, "a"),
    ("no class fast enough", "abcde", {"target_rtf": 0.3}, None),
    ("only an unmeasured class", "e", {}, None),
]


@pytest.mark.parametrize(("ids", "overrides", "chosen"), [c[1:] for c in RANKING_CASES],
                         ids=[c[0] for c in RANKING_CASES])
def test_ranking_table(ids, overrides, chosen) -> None:
    targets = [t for t in TARGETS if t["id"] and t["id"] in ids]
    best = cheapest_salad_class(targets, overrides.get("prices"), overrides.get("target_rtf", 1.0))
    assert (best.class_id if best else None) == chosen


def test_tie_on_cost_goes_to_higher_fps_and_local_is_never_ranked() -> None:
    targets = [
        {"id": "x", "name": "X", "benchmark": bench(0.5, 30, 0.1)},
        {"id": "y", "name": "Y", "benchmark": bench(0.5, 45, 0.1)},
    ]
    assert cheapest_salad_class(targets).class_id == "y"
    ranked = measured_classes(TARGETS, target_rtf=0.2)
    assert [c.class_id for c in ranked] == ["c", "b", "a", "d"] and not any(c.meets_target for c in ranked)


# ----------------------------------------------------------------------------- per-class decision


def demand(cid: str, group: str, runs: int | None, waiting: int | None, error: str | None = None) -> ClassDemand:
    return ClassDemand(class_id=cid, name=cid.upper(), queue=f"q-{cid}", container_group=group,
                       prefect_runs=runs, salad_waiting=waiting, error=error)


def test_each_class_is_sized_to_its_own_demand() -> None:
    policy = ScalingPolicy(min_replicas=0, max_replicas=10, jobs_per_replica=2)
    decisions = decide_fleet([
        demand("a", "mt-4090", 5, 3),      # max(5, 3) = 5 → ceil(5 / 2) = 3
        demand("b", "mt-3090", 0, 0),      # idle → min
        demand("c", "mt-3060", None, 40),  # Prefect unreadable: Salad's count alone; capped at 10
        demand("d", "mt-4080", 4, None, error="Salad queue q-d unreadable"),  # keep as is
    ], CURRENT, policy)
    assert [(d.container_group, d.demand, d.desired) for d in decisions] == [
        ("mt-4090", 5, 3), ("mt-3090", 0, 0), ("mt-3060", 40, 10), ("mt-4080", None, 0)]
    assert "keeping the current count" in decisions[3].reason
    assert fleet_changes(decisions) == {"mt-4090": 3, "mt-3090": 0, "mt-3060": 10}
    assert decide_fleet([demand("a", "mt-4090", 0, 0)], CURRENT,
                        ScalingPolicy(min_replicas=1))[0].desired == 1
    assert decide_fleet([demand("a", "unknown", 3, 3)], CURRENT, policy)[0].desired is None
    with pytest.raises(ValueError):
        decide_fleet([], CURRENT, ScalingPolicy(min_replicas=5, max_replicas=2))


def test_markdown_names_every_group_and_what_changed() -> None:
    decisions = decide_fleet([demand("a", "mt-4090", 1, 0), demand("b", "mt-3090", 1, 0)], CURRENT,
                             ScalingPolicy())
    md = decision_markdown(ScalePass(decisions=decisions, changes=fleet_changes(decisions), applied={},
                                     dry_run=True))
    assert "would patch" in md and "mt-4090" in md and "| B | mt-3090 | 1 | 0 | 1 | 1 | — |" in md


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


def test_salad_credentials_come_from_dotenv_like_every_other_setting(monkeypatch) -> None:
    """The dotenv file configures Salad too (it was read straight from os.environ); an exported variable
    wins over it."""
    import os
    from pathlib import Path

    from tasks.salad import salad_configured
    from tasks.settings import env_file

    for name in ("SALAD_API_KEY", "SALAD_ORG_NAME", "SALAD_PROJECT_NAME", "SALAD_API_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    dotenv = Path(env_file())  # the file every settings class reads (the tests' own, normally absent)
    assert not dotenv.exists() and os.environ.get("MUSETALK_ENV_FILE")
    dotenv.write_text(f"SALAD_API_KEY={API_KEY}\nSALAD_ORG_NAME=dotenv-org\nSALAD_PROJECT_NAME={PROJECT}\n"
                      "SALAD_API_BASE_URL=http://127.0.0.1:9/api/public\n")
    try:
        assert salad_configured()
        monkeypatch.setenv("SALAD_ORG_NAME", ORG)
        with salad_client_from_env(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={}))) as c:
            assert (c.org, c.project, c.base_url) == (ORG, PROJECT, "http://127.0.0.1:9/api/public")
        dotenv.write_text("SALAD_API_KEY=\n")
        monkeypatch.delenv("SALAD_ORG_NAME")
        assert not salad_configured()
    finally:
        dotenv.unlink()


# ------------------------------------------------------------------------ scaling pass and flow


def test_prefect_tasks_build_their_client_from_env(fake, monkeypatch) -> None:
    for name, value in {"SALAD_API_KEY": API_KEY, "SALAD_ORG_NAME": ORG, "SALAD_PROJECT_NAME": PROJECT,
                        "SALAD_API_BASE_URL": fake.base_url}.items():
        monkeypatch.setenv(name, value)
    assert read_queue_length.fn("render") == 5
    assert read_replicas.fn("mt-3090") == 1
    assert write_replicas.fn("mt-3090", 3) == 3
    assert fake.patches()[0]["headers"]["content-type"] == MERGE_PATCH


@pytest.fixture()
def salad_fleet(monkeypatch):
    """The fake Salad API with two provisioned classes of the operator's file; SALAD_* set."""
    from tasks.salad_provision import ProvisionConfig, names_by_class, provision
    from tasks.scaling import read_targets
    from tests.fake_salad import FakeSalad

    targets = read_targets(Path(__file__).resolve().parent.parent / "gpu_targets.json")
    ids = [targets[0]["id"], targets[6]["id"]]  # RTX 4090, RTX 3090
    fake = FakeSalad()
    with serve_in_thread(fake.app) as (url, _, _):
        env = fake.env(url)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with salad_client_from_env(backoff_s=0.0) as client:
            provision(client, targets, ProvisionConfig(image="img:1"), class_ids=ids)
            names = names_by_class(targets)
            classes = [ClassDemand(class_id=i, name=i, queue=names[i].queue,
                                   container_group=names[i].container_group) for i in ids]
            yield SimpleNamespace(fake=fake, client=client, targets=targets, ids=ids, classes=classes)
    fake.close()


def _pass(fleet, prefect_runs, dry_run: bool, classes=None) -> ScalePass:
    client = fleet.client
    return run_scaling_pass(
        classes=classes or fleet.classes,
        read_prefect_runs=lambda ids: {i: prefect_runs.get(i, 0) for i in ids},
        read_queue_length=client.get_queue_length,
        read_replicas=lambda g: client.get_container_group(g)["replicas"],
        write_replicas=lambda g, n: client.set_replicas(g, n)["replicas"],
        policy=ScalingPolicy(max_replicas=10, jobs_per_replica=1), dry_run=dry_run)


def _writes(fake) -> list[tuple[str, str]]:
    return [c for c in fake.calls if c[0] not in ("GET",)]


def test_pass_reads_prefect_and_salad_and_patches_only_changes(salad_fleet) -> None:
    f = salad_fleet
    g4090, g3090 = (c.container_group for c in f.classes)
    for i in range(3):  # jobs waiting in the 4090 queue (submitted by anything)
        f.client.create_job(f.classes[0].queue, {"musetalk_job_id": f"j{i}"})
    before = len(_writes(f.fake))
    dry = _pass(f, {f.ids[1]: 2}, dry_run=True)
    assert [(d.prefect_runs, d.salad_waiting, d.desired) for d in dry.decisions] == [(0, 3, 3), (2, 0, 2)]
    assert dry.changes == {g4090: 3, g3090: 2} and len(_writes(f.fake)) == before  # nothing written
    applied = _pass(f, {f.ids[1]: 2}, dry_run=False)
    assert applied.applied == {g4090: 3, g3090: 2}
    assert f.fake.groups[g4090]["replicas"] == 3 and f.fake.groups[g3090]["replicas"] == 2
    patches = [c for c in f.fake.calls if c[0] == "PATCH"]
    assert _pass(f, {f.ids[1]: 2}, dry_run=False).changes == {}  # converged: nothing more to patch
    assert [c for c in f.fake.calls if c[0] == "PATCH"] == patches


def test_an_unprovisioned_class_is_kept_and_the_others_still_scale(salad_fleet) -> None:
    f = salad_fleet
    ghost = ClassDemand(class_id="ghost", name="ghost", queue="musetalk-ghost", container_group="musetalk-ghost")
    result = _pass(f, {f.ids[0]: 4, "ghost": 9}, dry_run=False, classes=[ghost, *f.classes])
    assert result.decisions[0].desired is None and "unreadable" in result.decisions[0].reason
    assert result.applied == {f.classes[0].container_group: 4}


def test_prefect_unreadable_falls_back_to_salad(salad_fleet) -> None:
    f = salad_fleet
    f.client.create_job(f.classes[1].queue, {"musetalk_job_id": "x"})

    def broken(_ids):
        raise httpx.ConnectError("no server")

    result = run_scaling_pass(
        classes=f.classes, read_prefect_runs=broken, read_queue_length=f.client.get_queue_length,
        read_replicas=lambda g: f.client.get_container_group(g)["replicas"],
        write_replicas=lambda g, n: n, policy=ScalingPolicy(), dry_run=True)
    assert [(d.prefect_runs, d.demand, d.desired) for d in result.decisions] == [(None, 0, 0), (None, 1, 1)]


def test_scale_flow_and_its_schedule(salad_fleet, tmp_path: Path, monkeypatch) -> None:
    """The Prefect flow once, counting real flow runs of a Salad route (a temporary local Prefect server),
    then the schedule `musetalk-flow deploy` registers from prefect.yaml."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from deployments.workpool import CONTROL_POOL, SALAD_POOL, deploy, ensure_work_pool
    from flows.scale import scale
    from tasks.route_depth import count_unfinished_runs

    f = salad_fleet
    cid = f.ids[0]
    ids = deploy(parameters={"salad-autoscale": {"targets_path": "config/gpu_targets.json"}})
    # two jobs on route salad:<4090>: runs of generate/salad with work queue = the class id, as the
    # orchestrator submits them
    ensure_work_pool(SALAD_POOL, queues={cid: 10})
    job = {"musetalk_job_id": "probe", "video_url": "https://example.com/v.mp4",
           "audio_url": "https://example.com/a.wav"}
    with get_client(sync_client=True) as pc:
        runs = [pc.create_flow_run_from_deployment(ids["generate/salad"], parameters={"job": job},
                                                   work_queue_name=cid) for _ in range(3)]
        pc.set_flow_run_state(runs[2].id, Cancelled(), force=True)  # a finished run is no demand
    assert count_unfinished_runs(SALAD_POOL, [cid, f.ids[1]]) == {cid: 2, f.ids[1]: 0}

    targets = tmp_path / "gpu_targets.json"
    targets.write_text(json.dumps(f.targets))
    out = scale(targets_path=str(targets), class_ids=f.ids, dry_run=False)
    assert out["applied"] == {f.classes[0].container_group: 2}
    assert f.fake.groups[f.classes[0].container_group]["replicas"] == 2
    assert API_KEY not in json.dumps(out) and f.fake.api_key not in json.dumps(out)

    with get_client(sync_client=True) as pc:
        dep = pc.read_deployment(ids["scale/salad-autoscale"])
    assert dep.work_pool_name == CONTROL_POOL and dep.parameters == {"dry_run": False,
                                                                     "targets_path": "config/gpu_targets.json"}
    assert dep.schedules[0].schedule.interval.total_seconds() == 60 and dep.schedules[0].active
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1  # one pass at a time

    monkeypatch.delenv("SALAD_API_KEY")
    assert scale(targets_path=str(targets), dry_run=False)["skipped"] == "salad not configured"


def test_schedules_can_be_registered_paused() -> None:
    """The orchestrator's own deploy (where Salad is not configured) registers the autoscale schedule
    paused, so no Late runs pile up on a machine without a control worker; `musetalk-flow deploy` keeps it on."""
    from deployments.workpool import definition_for

    def schedules(definition: dict) -> dict[str, list[bool]]:
        return {e["name"]: [bool(s.get("active", True)) for s in e["schedules"]]
                for e in definition["deployments"] if e.get("schedules")}

    assert schedules(definition_for()) == {"salad-autoscale": [True]}
    assert schedules(definition_for(schedules_active=False)) == {"salad-autoscale": [False]}
