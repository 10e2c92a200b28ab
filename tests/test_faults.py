"""Worker faults, injected into real jobs run by ``run_job`` (a flow run per scenario, plus one killed
subprocess). Each test runs its own scenario, with the fault it injects defined just above it; the
world they share (environment, simulated B2, media server, orchestrators) is the module fixture ``world``.

* B2 unavailable (b2sdk's RawSimulator failing every upload) and B2 hanging (uploads slower than a lowered
  ``MUSETALK_B2_UPLOAD_TIMEOUT_SEC``): bounded, retried, then 500 ``processing_error`` with
  ``retryable: true``; the same job succeeds once B2 is back.
* The orchestrator answering 500, or too slowly (client timeout lowered to 0.5 s): the job still succeeds.
* ``torch.OutOfMemoryError`` from the generator once: the batch is halved and the job succeeds (CPU
  streaming path and the device-blend path); twice: 500 ``processing_error`` naming the batch size.
* A full disk: a real one (a 1 MB tmpfs as the work dir, when this runs as root and may mount) and an
  injected ENOSPC while storing the result: 500 whose message says the disk is full.
* A worker SIGKILLed mid-render (a subprocess, its whole process group, as a container kill): nothing ever
  appears under the final key; re-running the same job id gives the same keys and a whole file.

Upload retry delays are shortened for the test (``upload_result`` normally waits 5 s and 10 s).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch

from deployments.serve import start_prefect_api
from tests import hostile_media as hm

pytest_plugins = ["tests.fixtures_engine"]

BUCKET = "musetalk-faults"
APP_KEY = "K005-fault-test-app-key-7Hq2ZpW9"
B2_TIMEOUT = 1.0
PREFIX = "avatar/outputs"
KILLED_ID = "killed-mid-render"


# ---------------------------------------------------------------------------------------- helpers


def _mount_tmpfs(path: Path, size: str = "1m") -> bool:
    """A tiny tmpfs at ``path``; False where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no mount binary, or a hung one
        return False
    return proc.returncode == 0


def _fill(path: Path) -> None:
    """Write zeros into ``path`` until the file system says ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


class KeyWatcher:
    """Polls a result path every 20 ms and records each size seen (a partial object would show up)."""

    def __init__(self, path: Path):
        self.path, self.sizes = path, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="key-watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sizes.add(self.path.stat().st_size)
            except FileNotFoundError:
                pass
            time.sleep(0.02)

    def __enter__(self) -> "KeyWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


CHILD = r"""
import json, pathlib, sys, time
marker, job = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
from musetalk_engine.face_generator import FaceGenerator
original = FaceGenerator.generate
def slow(self, *args, **kwargs):  # a render long enough to be killed in the middle of
    marker.touch()
    time.sleep(0.4)
    return original(self, *args, **kwargs)
FaceGenerator.generate = slow
from flows.generate import generate
from tasks.contract import JobOutcome
print("outcome", JobOutcome.of_flow_state(generate(job, return_state=True)).http_status, flush=True)
"""


def _kill_mid_render(job: dict, work: Path, api_url: str, final: Path) -> dict:
    """Run ``job`` in a fresh interpreter, SIGKILL its process group once rendering has begun."""
    marker = work / "rendering.marker"
    env = {**os.environ, "PREFECT_API_URL": api_url}
    started = time.monotonic()
    log = work / "killed-child.log"  # a file, not a pipe: a full pipe would stall the child
    with KeyWatcher(final) as watcher, log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), json.dumps(job)], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            rendering = marker.exists()
        finally:
            if child.poll() is None:  # the container dies: the worker and its ffmpeg children at once
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    output = log.read_text(errors="replace")
    return {"rendering": rendering, "returncode": child.returncode, "output": output[-2000:],
            "leftovers": sorted(p.name for p in (work / "tmp").glob(f"job-{KILLED_ID}-*")),
            "sizes_seen": set(watcher.sizes), "seconds": round(time.monotonic() - started, 1)}


# ------------------------------------------------------------------------------------------ hooks


# ---------------------------------------------------------------------------------------- the world


@dataclass
class World:
    """What every scenario shares: the worker's environment (tiny models, simulated B2, a Prefect API),
    the media server with one avatar clip and one speech track, and two misbehaving orchestrators."""

    work: Path
    raw: Any
    b2_env: dict[str, str]
    orchestrators: dict[str, hm.FakeOrchestrator]
    video_url: str
    audio_url: str
    api_url: str
    engine_loads_before: int
    rows: dict[str, dict] = field(default_factory=dict)  # every scenario's outcome, for the report

    def job(self, job_id: str, **params: Any) -> dict:
        job: dict[str, Any] = {"musetalk_job_id": job_id, "video_url": self.video_url, "audio_url": self.audio_url}
        if params:
            job["params"] = params
        return job

    def run(self, name: str, hook: Any = None, env: dict[str, str] | None = None, job_id: str | None = None,
            **params: Any) -> dict:
        """One job through ``run_job`` in its own flow run; ``hook`` (a context manager) wraps it."""
        case = {"name": name, "job": self.job(job_id or name.replace("_", "-"), **params), "env": env or {}}
        with hook if hook is not None else nullcontext():
            row = hm.run_jobs([case])[0]
        self.rows[name] = row
        return row


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models) -> World:
    import tasks.storage
    from musetalk_engine.engine import Engine
    from tasks.progress import OrchestratorClient
    from tasks.settings import get_settings

    base = tmp_path_factory.getbasetemp()
    work, video, audio = hm.worker_inputs(tmp_path_factory, "faults")
    mp = pytest.MonkeyPatch()
    hm.worker_env(mp, work, tiny_models, MUSETALK_CACHE_DIR=str(base / "shared-engine-cache"))
    raw, key_id = hm.simulated_b2(mp, BUCKET, APP_KEY)
    # the orchestrator client gives up after 0.5 s, so a slow orchestrator shows within the test's time
    from_settings = OrchestratorClient.from_settings.__func__
    mp.setattr(OrchestratorClient, "from_settings",
               classmethod(lambda cls, settings=None, **kw: from_settings(cls, settings, **{"timeout": 0.5, **kw})))
    b2_env = {"B2_KEY_ID": key_id, "B2_APP_KEY": APP_KEY, "B2_BUCKET_NAME": BUCKET,
              "MUSETALK_B2_UPLOAD_TIMEOUT_SEC": str(B2_TIMEOUT)}
    try:
        with hm.MediaServer() as server, hm.FakeOrchestrator("error") as failing, \
                hm.FakeOrchestrator("slow", delay=3.0) as slow:
            yield World(work=work, raw=raw, b2_env=b2_env, orchestrators={"error": failing, "slow": slow},
                        video_url=server.file("/avatar.mp4", video), audio_url=server.file("/speech.wav", audio),
                        api_url=start_prefect_api(), engine_loads_before=Engine.loads)
    finally:
        mp.undo()
        tasks.storage.clear_storage_cache()
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def plain(world) -> dict:
    """A job with no fault: the baseline other scenarios are measured against."""
    return world.run("plain")


def _ok(row: dict) -> dict:
    assert row["http_status"] == 200, row["body"]
    assert row["body"]["status"] == "ok"
    return row["body"]


def _failed(row: dict, status: int = 500, stage: str | None = None) -> dict:
    body = row["body"]
    assert row["http_status"] == status, body
    assert body["status"] == "failed" and body["error_type"] == ("processing_error" if status == 500
                                                                  else "media_error")
    if stage:
        assert body["stage"] == stage, body
    return body


# ------------------------------------------------------------------------------------ out of memory


@contextmanager
def out_of_memory(times: int, device: bool = False):
    """The generator raises ``torch.OutOfMemoryError`` on its first ``times`` calls; ``device`` takes the
    device-blend path (the CUDA default) on the CPU."""
    from tasks.engine import get_engine

    engine = get_engine()
    generator = engine.generator
    original = generator.generate
    left = {"n": times}

    def flaky(*args, **kwargs):
        if left["n"] > 0:
            left["n"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(*args, **kwargs)

    generator.generate = flaky
    saved_blend = engine.blend_on
    if device:
        engine.blend_on = "device"
    try:
        yield
    finally:
        del generator.generate
        engine.blend_on = saved_blend


def test_oom_once_halves_the_batch_and_succeeds(world):
    body = _ok(world.run("oom_once", out_of_memory(1), batch_size=4))
    assert body["metrics"]["batch_size"] == 2  # asked for 4, halved once
    assert body["metrics"]["frames"] == round(hm.CLIP_SEC * 25)


def test_oom_on_the_device_blend_path_halves_too(world):
    body = _ok(world.run("oom_once_device_path", out_of_memory(1, device=True), batch_size=4))
    assert body["metrics"]["batch_size"] == 2


def test_oom_twice_is_a_retryable_processing_error(world):
    body = _failed(world.run("oom_twice", out_of_memory(2), batch_size=4), stage="inference")
    assert body["retryable"] is True
    assert body["error_message"] == "ran out of CPU memory while rendering at batch size 2 (already halved once)"
    assert body["details"] == {"batch_size": 2}


# ------------------------------------------------------------------------------------ the orchestrator


def test_orchestrator_errors_do_not_stop_the_job(world):
    failing = world.orchestrators["error"]
    _ok(world.run("orchestrator_500", env={"ORCHESTRATOR_BASE_URL": failing.url,
                                            "INTERNAL_API_KEY": "orchestrator-key-500"}))
    posts = failing.bodies("orchestrator-500")
    assert len(posts) >= 3, posts  # it kept reporting through the 500s …
    assert posts[-1]["status"] == "succeeded" and posts[-1]["phase"] == "completed"  # … to the end
    assert [p["phase"] for p in posts].index("inferring") > 0


def test_orchestrator_timeouts_do_not_stop_the_job(world, plain):
    slow = world.orchestrators["slow"]
    row = world.run("orchestrator_timeout", env={"ORCHESTRATOR_BASE_URL": slow.url})
    _ok(row)
    assert slow.bodies("orchestrator-timeout")  # it was tried (and timed out)
    # each update gives up after 0.5 s on a background thread; the close waits at most 10 s in all. The slack
    # beside those 10 s grows with the job's own time: at two busy loops the same job took 8.6 s, and its
    # repeats vary by seconds (a waited-out final retry would add 60 s)
    slack = max(5.0, plain["wall_s"])
    assert row["wall_s"] < plain["wall_s"] + 10 + slack, (row["wall_s"], plain["wall_s"])


# ------------------------------------------------------------------------------------ B2


@contextmanager
def b2_down(raw, counters: dict[str, int]):
    """Every upload fails with a 503 (15 of them queued); ``counters["b2_errors_left"]`` after."""
    from b2sdk.v2.exception import ServiceError

    raw.set_upload_errors([ServiceError("503 service_unavailable") for _ in range(15)])
    try:
        yield
    finally:
        counters["b2_errors_left"] = len(raw.upload_errors)
        raw.upload_errors = []


@contextmanager
def b2_hanging(raw, counters: dict[str, int]):
    """Uploads sit for 4× the upload timeout; counts the calls and the deadline-bounded attempts."""
    import tasks.storage

    original, deadline = raw.upload_file, tasks.storage._run_with_deadline

    def hang(*args, **kwargs):
        counters["b2_hung_calls"] = counters.get("b2_hung_calls", 0) + 1
        time.sleep(4 * B2_TIMEOUT)
        return original(*args, **kwargs)

    def attempt(fn, timeout, what):
        counters["b2_slow_attempts"] = counters.get("b2_slow_attempts", 0) + 1
        return deadline(fn, timeout, what)

    raw.upload_file = hang
    tasks.storage._run_with_deadline = attempt
    try:
        yield
    finally:
        del raw.upload_file
        tasks.storage._run_with_deadline = deadline


def test_b2_unavailable_is_retried_then_500_retryable(world):
    counters: dict[str, int] = {}
    body = _failed(world.run("b2_unavailable", b2_down(world.raw, counters), env=world.b2_env), stage="upload")
    assert body["retryable"] is True
    assert body["error_message"].startswith(f"B2 upload of {PREFIX}/b2-unavailable.mp4 failed")
    # 3 task attempts × 5 b2sdk attempts consumed every injected 503
    assert counters["b2_errors_left"] == 0
    assert APP_KEY not in json.dumps(body)


@pytest.fixture(scope="module")
def b2_hung_job(world) -> tuple[dict, dict[str, int]]:
    """Job ``b2-slow`` while B2 hangs (its outcome and the counters); the next test re-runs it."""
    counters: dict[str, int] = {}
    return world.run("b2_slow", b2_hanging(world.raw, counters), env=world.b2_env), counters


def test_b2_hanging_is_bounded_retried_then_500_retryable(b2_hung_job):
    row, counters = b2_hung_job
    body = _failed(row, stage="upload")
    assert body["retryable"] is True
    assert body["error_message"] == f"B2 upload of {PREFIX}/b2-slow.mp4 did not finish within {B2_TIMEOUT:g} s"
    assert counters["b2_slow_attempts"] == 3  # three task attempts, each cut off at the deadline
    assert counters["b2_hung_calls"] >= 1  # … while B2 sat on the upload
    assert body["stage_times"]["upload"] < 3 * B2_TIMEOUT + 5  # bounded: no hung worker


@pytest.fixture(scope="module")
def b2_back_job(world, b2_hung_job) -> dict:
    """The same job ``b2-slow`` again, B2 answering normally."""
    return world.run("b2_recovered", env=world.b2_env, job_id="b2-slow")


def test_same_job_succeeds_once_b2_is_back(world, b2_back_job):
    body = _ok(b2_back_job)
    assert body["b2_bucket"] == BUCKET and body["b2_file_name"] == f"{PREFIX}/b2-slow.mp4"
    sidecar = json.loads(hm.b2_read(world.raw, BUCKET, f"{PREFIX}/b2-slow.json"))
    assert sidecar["musetalk_job_id"] == "b2-slow" and sidecar["b2_file_name"] == f"{PREFIX}/b2-slow.mp4"
    assert hm.b2_read(world.raw, BUCKET, f"{PREFIX}/b2-slow.mp4")[4:8] == b"ftyp"


def test_hostile_job_id_never_becomes_a_b2_key(world, b2_back_job):  # the bucket holds a real key too
    body = _failed(world.run("b2_job_id_traversal", env=world.b2_env, job_id="../../outside/evil"),
                   status=422, stage="validation")
    assert body["error_message"].startswith("musetalk_job_id may only contain")
    names = [f.name for f in world.raw.bucket_name_to_bucket[BUCKET].file_id_to_file.values()]
    assert names and all(name.startswith(f"{PREFIX}/") and ".." not in name for name in names), names


def test_b2_storage_is_shared_per_configuration():
    """One signed-in B2 api per process and configuration (a new one per job re-authorized each time and
    left 10 upload threads behind until garbage collection); a rotated key gets a fresh one."""
    from tasks.settings import Settings
    from tasks.storage import clear_storage_cache, storage_from_settings

    clear_storage_cache()
    try:
        conf = {"b2_key_id": "kid", "b2_bucket_name": "bkt", "b2_prefix": "p"}
        first = storage_from_settings(Settings(b2_app_key="app-key-one", **conf))
        assert storage_from_settings(Settings(b2_app_key="app-key-one", **conf)) is first
        assert storage_from_settings(Settings(b2_app_key="app-key-two", **conf)) is not first
        assert storage_from_settings(Settings(b2_app_key="app-key-one", **{**conf, "b2_prefix": "q"})) is not first
    finally:
        clear_storage_cache()


# ------------------------------------------------------------------------------------ a full disk


@contextmanager
def disk_full_on_store(counters: dict[str, int]):
    """Only tasks.storage sees a full disk (patching shutil itself would hit every caller)."""
    import shutil
    import types

    import tasks.storage

    def full(src, dst, *args, **kwargs):
        counters["store_attempts"] = counters.get("store_attempts", 0) + 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    tasks.storage.shutil = types.SimpleNamespace(**{**vars(shutil), "copyfile": full})
    try:
        yield
    finally:
        tasks.storage.shutil = shutil


def test_disk_full_while_storing_says_so(world):
    counters: dict[str, int] = {}
    body = _failed(world.run("disk_full_on_store", disk_full_on_store(counters)), stage="upload")
    assert body["retryable"] is True
    assert body["error_message"] == ("the worker's disk is full (no space left on device) during upload; "
                                     "the job can be retried on another worker")
    assert counters["store_attempts"] == 3  # retried like any storage fault, then reported


@pytest.fixture
def full_tmpfs(tmp_path_factory) -> Iterator[Path]:
    """A 1 MB tmpfs filled to the brim (needs root and may mount), unmounted after the test."""
    path = tmp_path_factory.getbasetemp() / "faults-tmpfs"
    if not _mount_tmpfs(path):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC case still runs")
    try:
        _fill(path / "filler")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_disk_full_for_real(world, full_tmpfs):
    body = _failed(world.run("disk_full_real_tmpfs", env={"MUSETALK_WORKDIR": str(full_tmpfs)}), stage="download")
    assert body["error_message"].startswith("the worker's disk is full (no space left on device) during download")
    assert body["retryable"] is True
    assert "No space left on device" in body["details"]["reason"]
    assert list((full_tmpfs / "tmp").iterdir()) == []  # its workspace was still cleaned up


# ------------------------------------------------------------------------------------ a killed worker


def test_killed_worker_leaves_no_partial_result_and_rerun_overwrites(world):
    final = world.work / "results" / "job_queue" / PREFIX / f"{KILLED_ID}.mp4"
    killed = _kill_mid_render(world.job(KILLED_ID, batch_size=1), world.work, world.api_url, final)
    world.rows["killed"] = {"killed": killed}
    assert killed["rendering"], killed["output"]  # SIGKILL landed while the render ran
    assert killed["returncode"] == -signal.SIGKILL, killed
    assert killed["sizes_seen"] == set()  # nothing ever appeared under the final key
    assert len(killed["leftovers"]) == 1  # the dead worker's workspace, cleaned by the re-run below

    with KeyWatcher(final) as watcher:
        body = _ok(world.run("rerun_after_kill", job_id=KILLED_ID))
    assert Path(unquote(urlsplit(body["output_url"]).path)) == final
    assert body["b2_file_name"] == f"{PREFIX}/{KILLED_ID}.mp4"
    assert set(watcher.sizes) <= {final.stat().st_size}  # only ever the whole file under the key
    assert not list((world.work / "tmp").glob(f"job-{KILLED_ID}-*"))  # the stale workspace is gone
    outputs = sorted(p.name for p in final.parent.iterdir() if p.name.startswith(KILLED_ID))
    assert outputs == [f"{KILLED_ID}.json", f"{KILLED_ID}.mp4"]


# ------------------------------------------------------------------------------------ after them all


def test_worker_healthy_and_clean_after_every_fault(world):
    from musetalk_engine.engine import Engine

    _ok(world.run("health"))
    assert Engine.loads - world.engine_loads_before <= 1
    assert list((world.work / "tmp").iterdir()) == []  # no temp files, whether jobs failed or not
    assert not list(world.work.rglob("*.part"))


def test_report_faults(world):
    """Not a check: prints the observed outcomes (shown with -s)."""
    lines = [f"{'case':24} {'status':>6}  {'stage':10} {'retry':5} {'wall_s':>6}  message / metrics"]
    for name, row in world.rows.items():
        if "killed" in row:
            k = row["killed"]
            lines.append(f"killed subprocess: rendering={k['rendering']} rc={k['returncode']} in {k['seconds']} s, "
                         f"leftovers={k['leftovers']}, sizes under final key while dying={sorted(k['sizes_seen'])}")
            continue
        b = row["body"]
        info = b.get("error_message") or f"batch_size={b['metrics']['batch_size']} frames={b['metrics']['frames']}"
        lines.append(f"{name:24} {row['http_status']:>6}  {str(b.get('stage', '-')):10} "
                     f"{str(b.get('retryable', '-')):5} {row['wall_s']:>6}  {info}")
    print("\n" + "\n".join(lines))
