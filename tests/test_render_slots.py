"""Several GPUs in one serve process (deployments/serve.py, render_queue.py, buffer.py): one warm engine and
one render thread ("slot") per device, jobs on the first free slot, BUFFER_CAPACITY claims at once.

On this CPU machine two slots are two ``cpu`` devices (``MUSETALK_DEVICES=cpu,cpu``), each with its own
tiny-model engine; the CUDA-only checks (each slot's thread has its own GPU current) are skipped here."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from deployments.buffer import BufferLoop
from deployments.render_queue import QueueFull, RenderQueue
from musetalk_engine.engine import Engine
from tasks.contract import JobOutcome
from tasks.progress import OrchestratorClient
from tasks.settings import Settings, get_settings, parse_devices
from tests.servers import media_server, serve_in_thread, wait_until
from tests.fake_orchestrator import FakeOrchestrator
from tests.test_buffer import KEY

pytest_plugins = ["tests.fixtures_engine"]

INTERVAL = 0.2


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class Gated:
    """A render thread's work for the queue alone: records (job, slot, start, end); each job waits for its
    own gate, so the test decides when a slot frees up."""

    def __init__(self, queue_of: Any = None):
        self.queue_of = queue_of
        self.lock = threading.Lock()
        self.spans: dict[Any, tuple[int | None, float, float | None]] = {}
        self.gates: dict[Any, threading.Event] = {}

    def gate(self, key: Any) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(key, threading.Event())

    def started(self) -> set[Any]:
        with self.lock:
            return set(self.spans)

    def __call__(self, job: dict, queue_job_id: str | None) -> JobOutcome:
        key = job.get("i", queue_job_id)
        slot = self.queue_of().slot_index() if self.queue_of else None
        with self.lock:
            self.spans[key] = (slot, time.monotonic(), None)
        gate = self.gate(key)
        while not gate.wait(0.02):  # small steps: an abandon lands between them
            pass
        with self.lock:
            self.spans[key] = (slot, self.spans[key][1], time.monotonic())
        return JobOutcome(http_status=200, body={"status": "ok", "output_url": f"https://dl/{key}.mp4",
                                                 "slot": slot, "metrics": {}})


# ------------------------------------------------------------------------------------------- settings


def test_devices_setting_lists_gpus_once_each():
    assert parse_devices("") is None and parse_devices(" all ") == "all"
    assert parse_devices("cuda, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]  # CPU slots share the cores: allowed, for tests/dev
    for bad in ("cuda,cuda:0", "cuda:1,cuda:01", "gpu0", "all,cuda:1", "auto", "cuda:0,"):
        with pytest.raises(ValueError):
            parse_devices(bad)
    with pytest.raises(ValidationError, match="listed twice"):
        Settings(musetalk_devices="cuda:0,cuda:0")
    assert Settings(musetalk_devices="cuda:1,cuda:0").device_list == ["cuda:1", "cuda:0"]


def test_capacity_defaults_to_the_slots_and_never_exceeds_them(tmp_path):
    from deployments.serve import WorkerService

    def service(**kw: Any) -> WorkerService:
        settings = Settings(musetalk_workdir=tmp_path, buffer_worker_id="box", orchestrator_base_url="http://o",
                            **kw)
        return WorkerService(settings, engine_loader=lambda s: SimpleNamespace(warm=True, gpu={}),
                             prefect_warmup=lambda: "none")

    assert service().buffer.capacity == 1  # one slot: as before
    assert service(musetalk_devices="cpu,cpu").buffer.capacity == 2
    assert service(musetalk_devices="cpu,cpu", buffer_capacity=1).buffer.capacity == 1
    assert service(musetalk_devices="cpu,cpu", buffer_capacity=5).buffer.capacity == 2
    assert service(buffer_capacity=3).buffer.capacity == 1
    two = service(musetalk_devices="cpu,cpu")
    assert [s.device for s in two.slots] == ["cpu", "cpu"] and [s.instance for s in two.slots] == [0, 1]
    assert two.queue.slots == 2


# ------------------------------------------------------------------------------------- the queue alone


def test_two_slots_run_two_jobs_at_once_and_a_third_waits_for_the_first_free_one():
    runs = Gated()
    queue = RenderQueue(runs, max_queued=1, slots=2)
    runs.queue_of = lambda: queue
    tickets = [queue.submit({"i": i}) for i in range(3)]
    with pytest.raises(QueueFull):  # two rendering + MUSETALK_MAX_QUEUED=1 waiting
        queue.submit({"i": 9})
    assert wait_until(lambda: runs.started() == {0, 1}, 10)
    assert queue.full and not tickets[2].started
    time.sleep(0.3)
    assert runs.started() == {0, 1}  # the third waits while both slots render
    assert {t.ran_on for t in tickets[:2]} == {0, 1}

    runs.gate(1).set()  # the slot of job 1 frees first: job 2 goes there, not behind job 0
    assert tickets[1].future.result(10).http_status == 200
    assert wait_until(lambda: 2 in runs.started(), 10)
    assert tickets[2].ran_on == tickets[1].ran_on
    assert runs.spans[0][2] is None  # job 0 still renders beside it
    runs.gate(0).set()
    runs.gate(2).set()
    assert [t.future.result(10).body["slot"] for t in tickets] == [t.ran_on for t in tickets]
    assert queue.wait_idle(10) and not queue.busy

    # a ticket pinned to a slot waits for that slot (a warm-up must run on its own engine's thread)
    runs.gates.clear()
    first = queue.submit({"i": "a"}, slot=1)
    assert wait_until(lambda: "a" in runs.started(), 10) and first.ran_on == 1
    pinned = queue.submit({"i": "b"}, slot=1)
    free = queue.submit({"i": "c"})
    assert wait_until(lambda: "c" in runs.started(), 10) and free.ran_on == 0
    time.sleep(0.2)
    assert "b" not in runs.started()
    runs.gate("a").set()
    assert wait_until(lambda: "b" in runs.started(), 10) and pinned.ran_on == 1
    for key in ("b", "c"):
        runs.gate(key).set()
    assert queue.wait_idle(10)


def test_abandon_one_slot_leaves_the_other_rendering_and_shutdown_abandons_all():
    runs = Gated()
    queue = RenderQueue(runs, slots=2)
    runs.queue_of = lambda: queue
    a, b = queue.submit({"i": "a"}), queue.submit({"i": "b"})
    assert wait_until(lambda: runs.started() == {"a", "b"}, 10)
    assert queue.abandon(wait=10, ticket=a)
    assert a.future.result(1).body["details"]["reason"] == "abandoned"
    assert not b.future.done() and queue.current is b
    c = queue.submit({"i": "c"})  # the abandoned slot lives on and takes the next job
    assert wait_until(lambda: "c" in runs.started(), 10) and c.ran_on == a.ran_on
    assert queue.abandon(wait=10)  # every running job (shutdown past its grace)
    assert all(t.future.result(1).http_status == 503 for t in (b, c))
    assert queue.wait_idle(5)


def test_service_is_ready_only_once_every_slot_is_and_names_a_slot_that_failed(tmp_path):
    from deployments.serve import WorkerService

    settings = Settings(musetalk_workdir=tmp_path, musetalk_devices="cpu,cpu")
    gate, loaded = threading.Event(), []

    def loader(slot_settings: Settings) -> Any:
        assert slot_settings.musetalk_device == "cpu"
        loaded.append(slot_settings)
        if len(loaded) == 2:
            assert gate.wait(30)
        return SimpleNamespace(warm=True, gpu={}, n=len(loaded))

    service = WorkerService(settings, engine_loader=loader, prefect_warmup=lambda: "none")
    service.start()
    assert wait_until(lambda: len(loaded) == 2, 10)
    # the first engine is built, but no slot is ready before every engine is built and warm
    assert service.health() == (503, {"status": "loading",
                                      "detail": "loading and warming the models (0 of 2 render slots ready)"})
    assert service.admission("j").body["details"]["reason"] == "not_ready"
    gate.set()
    assert service.wait_ready(10), service.load_error
    assert service.health() == (200, {"status": "ok"}) and [e.n for e in service.engines] == [1, 2]
    service.stop()

    def second_fails(slot_settings: Settings) -> Any:
        if loaded:
            raise RuntimeError("CUDA error: an illegal memory access")
        loaded.append(1)
        return SimpleNamespace(warm=True, gpu={})

    loaded.clear()
    broken = WorkerService(Settings(musetalk_workdir=tmp_path, musetalk_devices="cpu,cpu"),
                           engine_loader=second_fails, prefect_warmup=lambda: "none")
    broken.start()
    assert not broken.wait_ready(10)
    status, body = broken.health()
    assert status == 503 and body["status"] == "error"
    assert body["detail"] == "cpu: RuntimeError: CUDA error: an illegal memory access"
    broken.stop()


def test_engines_build_in_turn_then_the_first_warms_alone_and_the_others_at_once(tmp_path):
    """N GPUs are ready in N builds and about two warm-ups: builds take turns and all come before any
    warm-up (model libraries patch torch process-wide while building); the first slot warms up alone (it
    imports the compiler's modules), then the others at once, each on its own render thread."""
    from deployments.serve import WorkerService

    lock, events = threading.Lock(), []
    warming = [0]
    together = threading.Barrier(2, timeout=20)  # breaks (a load error) unless slots 2 and 3 warm at once

    class Stand_in:
        warm, gpu = False, {}

        def __init__(self, n: int):
            self.n = n

        def warmup(self) -> None:
            with lock:
                warming[0] += 1
                events.append(("warm", self.n, warming[0], threading.current_thread().name))
            if self.n == 1:
                time.sleep(0.3)  # long enough for another warm-up to start, were it allowed to
            else:
                together.wait()
            with lock:
                warming[0] -= 1
            self.warm = True

    def loader(slot_settings: Settings) -> Any:
        with lock:
            n = sum(1 for e in events if e[0] == "build") + 1
            events.append(("build", n, warming[0], threading.current_thread().name))
        return Stand_in(n)

    service = WorkerService(Settings(musetalk_workdir=tmp_path, musetalk_devices="cpu,cpu,cpu"),
                            engine_loader=loader, prefect_warmup=lambda: "none")
    service.start()
    assert service.wait_ready(30), service.load_error
    kinds = [e[0] for e in events]
    assert kinds == ["build"] * 3 + ["warm"] * 3, events  # every build before any warm-up
    assert len({e[3] for e in events if e[0] == "build"}) == 1  # one loader thread: builds take turns
    warms = [e for e in events if e[0] == "warm"]
    assert warms[0][1:3] == (1, 1) and max(e[2] for e in warms[1:]) == 2  # the first alone, then two at once
    assert len({e[3] for e in warms}) == 3  # each on its own slot's render thread
    assert [e.n for e in service.engines] == [1, 2, 3]
    service.stop()


def test_get_engine_loads_two_configurations_at_once_and_one_configuration_once(tmp_path, monkeypatch):
    """The process's engine cache never holds its lock while an engine loads: two slots' engines load side
    by side, and two callers of one configuration share a single load."""
    import tasks.engine as cache

    lock, in_flight, peak, made = threading.Lock(), [0], [0], []

    class SlowEngine:
        def __init__(self, config):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
                made.append(config.device)
            # loads until all three are in flight (waited for, not a fixed 0.5 s a slow machine's late thread
            # start could miss); a cache that loads one at a time never gets there, each load gives up after 10 s
            wait_until(lambda: in_flight[0] >= 3, 10, step=0.01)
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(cache, "_engines", {})
    monkeypatch.setattr(cache, "_loading", {})
    monkeypatch.setattr(cache, "Engine", SlowEngine)
    settings = Settings(musetalk_workdir=tmp_path, musetalk_device="cpu")
    got: list[Any] = [None] * 4
    calls = [lambda: cache.get_engine(settings), lambda: cache.get_engine(settings),
             lambda: cache.get_engine(settings, instance=1), lambda: cache.get_engine(settings, instance=2)]

    def call(i: int) -> None:
        got[i] = calls[i]()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(made) == 3 and peak[0] == 3  # three configurations, loaded at once; the repeated one once
    assert got[0] is got[1] and len({id(e) for e in got}) == 3


def test_engines_built_from_several_threads_have_real_weights(tiny_models, tmp_path):
    """diffusers/transformers build models under context managers that patch torch for every thread (meta
    parameters, skipped init): builds take turns, so no engine comes out empty and nothing stays patched.
    (Any thread making modules during a build is still hit: so the serve process warms up no slot before
    every engine is built.)"""
    import torch

    from musetalk_engine.engine import EngineConfig

    built: list[Any] = []

    def build(i: int) -> None:
        built.append(Engine(EngineConfig(models_dir=tiny_models, device="cpu", cache_dir=tmp_path / f"c{i}")))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(built) == 3
    for engine in built:
        for model in (engine.unet, engine.vae, engine.whisper):
            assert not any(p.is_meta for p in model.parameters())
    assert not any(p.is_meta for p in torch.nn.Linear(2, 2).parameters())  # nothing left patched


def test_shutdown_gives_each_running_job_the_grace_then_abandons_each(tmp_path):
    from deployments.serve import ServeOptions, WorkerService

    service = WorkerService(Settings(musetalk_workdir=tmp_path, musetalk_devices="cpu,cpu"),
                            engine_loader=lambda s: SimpleNamespace(warm=True, gpu={}),
                            options=ServeOptions(musetalk_shutdown_grace_sec=1, musetalk_max_queued=2),
                            prefect_warmup=lambda: "none")
    runs = Gated(lambda: service.queue)
    service.queue._run = runs
    service.start()
    assert service.wait_ready(10)
    tickets = [service.queue.submit({"i": i}) for i in range(3)]
    assert wait_until(lambda: runs.started() == {0, 1}, 10)
    started = time.monotonic()
    service.stop()
    assert 0.9 <= time.monotonic() - started < 15
    assert tickets[2].future.cancelled()  # queued: answered 503 by the HTTP layer
    reasons = [t.future.result(1).body["details"]["reason"] for t in tickets[:2]]
    assert reasons == ["abandoned", "abandoned"]
    assert service.queue.current is None


def test_a_benchmark_job_measures_the_gpu_of_the_slot_that_runs_it(tmp_path, monkeypatch):
    import torch

    import deployments.benchmark_job as bj
    from deployments.serve import create_app
    from fastapi.testclient import TestClient

    assert bj.benchmark_config({"device": "cuda:7"}, Settings(musetalk_workdir=tmp_path), cuda=True,
                               device="cuda:1").device == "cuda:1"  # the worker's slot, never the request's
    asked: list[tuple[str | None, bool]] = []

    def measure(job, settings, timeout_s, *, cuda, release=None, device=None):
        asked.append((device, cuda))
        release()
        return JobOutcome(http_status=200, body={"status": "ok", "device": device})

    monkeypatch.setattr("deployments.serve.run_benchmark_job", measure)
    released: list[int] = []
    loaded: list[int] = []

    def loader(_settings: Settings) -> Any:  # stand-ins for two GPU engines (no GPU here)
        n = len(loaded)
        loaded.append(n)
        return SimpleNamespace(warm=True, gpu={}, device=torch.device("cuda", n),
                               release_gpu_memory=lambda: released.append(n))

    settings = Settings(musetalk_workdir=tmp_path, musetalk_devices="cpu,cpu")
    app = create_app(settings, engine_loader=loader, prefect_warmup=lambda: "none")
    service = app.state.service
    with TestClient(app) as http:
        assert service.wait_ready(30), service.load_error
        hold = threading.Event()
        blocker = service.queue.submit({"i": "busy"}, run=lambda job, qid: hold.wait(30) and JobOutcome(
            http_status=200, body={}))
        assert wait_until(lambda: blocker.ran_on is not None, 10)
        r = http.post("/benchmark", json={"benchmark": {"profile": "tiny"}})
        hold.set()
    other = 1 - blocker.ran_on  # the slot left free took the benchmark
    assert r.status_code == 200 and r.json()["device"] == f"cuda:{other}"
    assert asked == [(f"cuda:{other}", True)] and released == [other]


# ------------------------------------------------------------------------------ buffer mode, capacity


@pytest.fixture(scope="module")
def orchestrator() -> Iterator[tuple[FakeOrchestrator, str]]:
    fake = FakeOrchestrator()
    with serve_in_thread(fake.app) as (url, _, _):
        yield fake, url


def buffer_jobs(n: int) -> list[dict[str, Any]]:
    return [{"buffer_job_id": f"b-{i}", "musetalk_job_id": f"m-{i}", "video_url": "v", "audio_url": "a"}
            for i in range(n)]


def two_slot_buffer(fake: FakeOrchestrator, url: str, worker_id: str, *, capacity: int,
                    jobs: int) -> tuple["Gated", BufferLoop]:
    """A buffer loop over a two-slot queue of gated renders, ``jobs`` jobs waiting at the fake orchestrator
    (the loop is not started)."""
    fake.reset()
    runs = Gated()
    queue = RenderQueue(runs, max_queued=0, slots=2)
    runs.queue_of = lambda: queue
    loop = BufferLoop(OrchestratorClient(url, SecretStr(KEY), worker_id), interval=INTERVAL, capacity=capacity,
                      submit=queue.submit, ready=lambda: True, busy=lambda: queue.full)
    fake.jobs = buffer_jobs(jobs)
    return runs, loop


# A beat's status is read before its POST, which arrives later: on a loaded machine, by up to a second or
# two. Beats that arrive this long after the state changed were read after it.
SETTLE_S = 2.0


def statuses_after(fake: FakeOrchestrator, changed: float, at_least: int = 3) -> set[str]:
    """The statuses of the heartbeats that arrived ``SETTLE_S`` after ``changed`` (waits for ``at_least`` of
    them; the state the test holds does not change meanwhile)."""
    start = changed + SETTLE_S
    beats = lambda: [r["body"]["status"] for r in fake.of("/heartbeat") if r["at"] > start]  # noqa: E731
    assert wait_until(lambda: len(beats()) >= at_least, 60), "no heartbeats"
    return set(beats())


def test_buffer_holds_up_to_capacity_claims_and_heartbeats_busy_only_when_every_slot_is_taken(orchestrator):
    fake, url = orchestrator
    runs, loop = two_slot_buffer(fake, url, "box-2gpu", capacity=2, jobs=3)
    loop.start()
    try:
        assert wait_until(lambda: runs.started() == {"b-0", "b-1"}, 10), runs.started()
        both = time.monotonic()
        time.sleep(INTERVAL * 5)
        assert len(fake.jobs) == 1 and loop.held == 2  # two claims held at once, no third
        assert statuses_after(fake, both) == {"busy"}
        assert runs.spans["b-0"][2] is None and runs.spans["b-1"][2] is None  # both still rendering

        runs.gate("b-0").set()  # a slot frees: reported, then the third job is claimed onto it
        assert wait_until(lambda: "b-2" in runs.started(), 10)
        assert fake.of("/status")[0]["path"].endswith("/b-0/status")
        runs.gate("b-1").set()
        assert wait_until(lambda: len(fake.of("/status")) == 2, 10)
        one_free = time.monotonic()  # b-2 renders on one slot; the other is free: a claim could be made
        assert statuses_after(fake, one_free) == {"idle"}
        assert loop.held == 1 and "b-2" not in {r["path"].split("/")[-2] for r in fake.of("/status")}
        runs.gate("b-2").set()
        assert wait_until(lambda: len(fake.of("/status")) == 3, 10)
    finally:
        loop.stop()
    reports = {r["path"].split("/")[-2]: r["body"] for r in fake.of("/status")}
    assert {k: v["status"] for k, v in reports.items()} == {"b-0": "succeeded", "b-1": "succeeded", "b-2": "succeeded"}
    assert reports["b-2"]["output_url"] == "https://dl/b-2.mp4"
    assert all(r["body"]["capacity"] == 2 for r in fake.of("/heartbeat"))
    fake.reset()


def test_capacity_below_the_slots_leaves_the_rest_to_http_and_capacity_one_claims_after_each_report(orchestrator):
    fake, url = orchestrator
    runs, loop = two_slot_buffer(fake, url, "box-cap1", capacity=1, jobs=2)
    loop.start()
    try:
        assert wait_until(lambda: runs.started() == {"b-0"}, 10)
        held = time.monotonic()
        # a slot is free, but the one claim BUFFER_CAPACITY allows is taken: no claim, and the heartbeat is busy
        assert statuses_after(fake, held) == {"busy"}
        assert runs.started() == {"b-0"} and len(fake.jobs) == 1
        claims_while_held = [r for r in fake.of("/claim") if r["at"] > held]
        assert claims_while_held == []
        runs.gate("b-0").set()
        assert wait_until(lambda: "b-1" in runs.started(), 10)
        runs.gate("b-1").set()
        assert wait_until(lambda: len(fake.of("/status")) == 2, 10)
    finally:
        loop.stop()
    # as with one GPU: the next claim only after the previous job's report
    first_report = fake.of("/status")[0]["at"]
    claims = [r["at"] for r in fake.of("/claim")]
    assert not any(claims[0] < at < first_report for at in claims[1:])
    fake.reset()


# ------------------------------------------------------------------ the real worker: two CPU engines


@pytest.fixture(scope="module")
def two_slot_env(tiny_models, tmp_path_factory) -> Iterator[str]:
    import tests.hostile_media as hm

    work, video, _ = hm.worker_inputs(tmp_path_factory, "slots")
    mp = pytest.MonkeyPatch()
    hm.worker_env(mp, work, tiny_models, MUSETALK_DEVICES="cpu,cpu", MUSETALK_MAX_QUEUED="2")
    with media_server(video.parent) as media:
        yield media
    mp.undo()
    get_settings.cache_clear()


def test_two_cpu_slots_render_two_jobs_at_once_each_on_its_own_engine(two_slot_env, monkeypatch):
    from deployments.serve import create_app, make_server

    media = two_slot_env
    spans: list[tuple[int, float, float]] = []
    both_rendering = threading.Barrier(2, timeout=120)
    calls = []
    original = Engine.render

    def render(engine, *args, **kwargs):
        calls.append(engine)
        start = time.monotonic()
        if len(calls) <= 2:
            both_rendering.wait()  # breaks (the test fails) unless the first two renders run at once
        try:
            return original(engine, *args, **kwargs)
        finally:
            spans.append((id(engine), start, time.monotonic()))

    monkeypatch.setattr(Engine, "render", render)
    loads_before = Engine.loads
    app = create_app()
    service = app.state.service
    with serve_in_thread(app, lambda a: make_server(a, log_level="warning")) as (url, _, _):
        assert service.wait_ready(300), service.load_error
        assert httpx.get(f"{url}/hc").json() == {"status": "ok"}
        engines = service.engines
        assert len(engines) == 2 and engines[0] is not engines[1]
        assert all(str(e.device) == "cpu" for e in engines)
        assert Engine.loads - loads_before == 2  # one engine per slot, each loaded once

        results: dict[str, httpx.Response] = {}

        def post(job_id: str) -> None:
            body = {"musetalk_job_id": job_id, "video_url": f"{media}/avatar.mp4", "audio_url": f"{media}/speech.wav"}
            results[job_id] = httpx.post(f"{url}/generate", json=body, timeout=300)

        threads = [threading.Thread(target=post, args=(f"slot-{i}",)) for i in range(3)]
        threads.append(threading.Thread(target=post, args=("slot-0",)))  # same id, same request: joins
        for t in threads[:2]:
            t.start()
        assert wait_until(lambda: len(service.queue.running()) == 2, 120)
        for t in threads[2:]:
            t.start()
        for t in threads:
            t.join(300)

    assert {k: r.status_code for k, r in results.items()} == {f"slot-{i}": 200 for i in range(3)}, \
        {k: r.text[:300] for k, r in results.items()}
    assert len(calls) == 3  # the duplicate joined slot-0's render instead of taking the free slot
    for r in results.values():
        metrics = r.json()["metrics"]
        assert {"GENERATION_TIME_SEC", "PEAK_RAM_KB", "stage_times", "total_time"} <= set(metrics)
        assert metrics["PEAK_VRAM_MIB"] is None and metrics["GENERATION_TIME_SEC"] > 0
    first, second, third = sorted(spans, key=lambda s: s[1])
    assert first[0] != second[0] and overlap(first[1:], second[1:])  # two engines at the same time
    assert third[1] >= min(first[2], second[2])  # the third waited for a free slot


def test_all_without_a_gpu_fails_the_load_instead_of_rendering_on_the_cpu(tmp_path):
    from deployments.serve import WorkerService

    if _gpus():
        pytest.skip("this machine has a GPU")
    service = WorkerService(Settings(musetalk_workdir=tmp_path, musetalk_devices="all"),
                            engine_loader=lambda s: pytest.fail("no engine may load"), prefect_warmup=lambda: "none")
    assert [s.device for s in service.slots] == ["cuda"]
    service.start()
    assert not service.wait_ready(30)
    status, body = service.health()
    assert status == 503 and body["status"] == "error" and "CUDA is not available" in body["detail"]
    service.stop()


# ------------------------------------------------------------------------------------------ CUDA only


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA GPUs")
def test_each_slot_thread_has_its_own_gpu_current(tmp_path):
    import torch

    from deployments.serve import WorkerService

    service = WorkerService(Settings(musetalk_workdir=tmp_path, musetalk_devices="cuda:0,cuda:1"),
                            engine_loader=lambda s: SimpleNamespace(warm=True, gpu={},
                                                                    device=torch.device(s.musetalk_device)),
                            prefect_warmup=lambda: "none")
    seen: dict[int, int] = {}
    barrier = threading.Barrier(2, timeout=30)

    def run(job: dict, _qid: str | None) -> JobOutcome:
        barrier.wait()  # both slots at once, so each job really is on its own thread
        seen[service.queue.slot_index()] = torch.cuda.current_device()
        return JobOutcome(http_status=200, body={"device": str(service.slot_here().engine.device)})

    service.queue._run = run
    service.start()
    assert service.wait_ready(60), service.load_error
    tickets = [service.queue.submit({"i": i}) for i in range(2)]
    devices = {t.ran_on: t.future.result(30).body["device"] for t in tickets}
    service.stop()
    assert seen == {0: 0, 1: 1} and devices == {0: "cuda:0", 1: "cuda:1"}


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU")
def test_all_means_one_slot_per_visible_gpu(tmp_path):
    from deployments.serve import WorkerService

    service = WorkerService(Settings(musetalk_workdir=tmp_path, musetalk_devices="all"),
                            engine_loader=lambda s: SimpleNamespace(warm=True, gpu={}), prefect_warmup=lambda: "none")
    assert [s.device for s in service.slots] == [f"cuda:{i}" for i in range(_gpus())]


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_engines_rendering_at_once_give_what_each_gives_alone(tiny_models, media, tmp_path):
    """Two engines of one process on cuda:0 and cuda:1, each on its own thread with its GPU current (what
    two render slots are), rendering at the same time: each output matches that engine's render alone. A
    cross-device mistake (a graph captured on the other GPU's stream, a buffer on the wrong device) shows
    as faces that differ from the lone render, or as an error."""
    import numpy as np

    from musetalk_engine.device import make_current
    from musetalk_engine.engine import EngineConfig
    from musetalk_engine.video import decode_frames

    engines = [Engine(EngineConfig(models_dir=tiny_models, device=f"cuda:{i}", cache_dir=tmp_path / f"cache-{i}"))
               for i in range(2)]
    barrier = threading.Barrier(2, timeout=120)
    outputs: dict[tuple[str, int], Any] = {}
    errors: list[BaseException] = []

    def slot(i: int, together: bool) -> None:
        try:
            make_current(engines[i].device)
            out = tmp_path / f"{'together' if together else 'alone'}-{i}.mp4"
            if together:
                barrier.wait()
            engines[i].render(media.video, media.short_speech, out, batch_size=4)
            outputs[("together" if together else "alone", i)] = np.stack(list(decode_frames(out, 25.0)))
        except BaseException as exc:  # noqa: BLE001 — re-raised below, on the test's thread
            errors.append(exc)

    for i in range(2):  # alone, one after the other (this also warms both engines at batch size 4)
        t = threading.Thread(target=slot, args=(i, False))
        t.start()
        t.join(300)
    threads = [threading.Thread(target=slot, args=(i, True)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i in range(2):
        alone, together = outputs[("alone", i)].astype(int), outputs[("together", i)].astype(int)
        assert alone.shape == together.shape
        diff = np.abs(alone - together)
        assert diff.max() <= 8 and diff.mean() <= 0.5, (i, diff.max(), diff.mean())
