"""Worker faults, injected into real jobs run by ``run_job`` inside ONE flow run (plus one killed subprocess).

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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


@dataclass
class Faults:
    rows: dict[str, dict]
    work: Path
    raw: object
    counters: dict[str, int]
    orchestrators: dict[str, hm.FakeOrchestrator]
    tmpfs: Path | None
    killed: dict
    watch: dict
    engine_loads: int
    wall_s: float


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


def _register_hooks(raw, counters: dict[str, int], watch: dict, final: Path) -> None:
    from b2sdk.v2.exception import ServiceError

    from tasks.engine import get_engine

    @contextmanager
    def oom(times: int, device: bool = False):
        engine = get_engine()
        generator = engine.generator
        original = generator.generate
        left = {"n": times}

        def flaky(*args, **kwargs):
            counters["generate_calls"] = counters.get("generate_calls", 0) + 1
            if left["n"] > 0:
                left["n"] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return original(*args, **kwargs)

        generator.generate = flaky
        saved_blend = engine.blend_on
        if device:
            engine.blend_on = "device"  # the CUDA default path, run on the CPU
        try:
            yield
        finally:
            del generator.generate
            engine.blend_on = saved_blend

    @contextmanager
    def b2_down():
        raw.set_upload_errors([ServiceError("503 service_unavailable") for _ in range(15)])
        try:
            yield
        finally:
            counters["b2_errors_left"] = len(raw.upload_errors)
            raw.upload_errors = []

    @contextmanager
    def b2_slow():
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

    @contextmanager
    def enospc_on_store():
        import shutil
        import types

        import tasks.storage

        def full(src, dst, *args, **kwargs):
            counters["store_attempts"] = counters.get("store_attempts", 0) + 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

        # only tasks.storage sees the full disk (patching shutil itself would hit every caller)
        tasks.storage.shutil = types.SimpleNamespace(**{**vars(shutil), "copyfile": full})
        try:
            yield
        finally:
            tasks.storage.shutil = shutil

    @contextmanager
    def watch_final():
        with KeyWatcher(final) as watcher:
            yield
        watch["sizes"] = set(watcher.sizes)

    hm.HOOKS.update({"oom_once": lambda: oom(1), "oom_twice": lambda: oom(2),
                     "oom_once_device": lambda: oom(1, device=True), "b2_down": b2_down, "b2_slow": b2_slow,
                     "enospc_on_store": enospc_on_store, "watch_final": watch_final})


# ---------------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_models) -> Faults:
    import tasks.storage
    from musetalk_engine.engine import Engine
    from tasks.progress import OrchestratorClient

    base = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("faults-work")
    media = tmp_path_factory.mktemp("faults-media")
    video, audio = hm.avatar_clip(media / "avatar.mp4"), hm.speech(media / "speech.wav")
    mp = pytest.MonkeyPatch()
    hm.worker_env(mp, work, tiny_models, MUSETALK_CACHE_DIR=str(base / "shared-engine-cache"))
    raw, key_id = hm.simulated_b2(mp, BUCKET, APP_KEY)
    from_settings = OrchestratorClient.from_settings.__func__
    mp.setattr(OrchestratorClient, "from_settings",
               classmethod(lambda cls, settings=None, **kw: from_settings(cls, settings, **{"timeout": 0.5, **kw})))
    counters: dict[str, int] = {}
    watch: dict = {}
    final = work / "results" / "job_queue" / PREFIX / f"{KILLED_ID}.mp4"
    _register_hooks(raw, counters, watch=watch, final=final)
    tmpfs = base / "faults-tmpfs"
    mounted = _mount_tmpfs(tmpfs)
    b2_env = {"B2_KEY_ID": key_id, "B2_APP_KEY": APP_KEY, "B2_BUCKET_NAME": BUCKET,
              "MUSETALK_B2_UPLOAD_TIMEOUT_SEC": str(B2_TIMEOUT)}
    try:
        with hm.MediaServer() as server, hm.FakeOrchestrator("error") as failing, \
                hm.FakeOrchestrator("slow", delay=3.0) as slow:
            v, a = server.file("/avatar.mp4", video), server.file("/speech.wav", audio)

            def case(name, hook=None, env=None, job_id=None, **params):
                job = {"musetalk_job_id": job_id or name.replace("_", "-"), "video_url": v, "audio_url": a}
                if params:
                    job["params"] = params
                return {"name": name, "job": job, "env": env or {}, "hook": hook}

            api_url = start_prefect_api()
            killed = _kill_mid_render(case("killed", job_id=KILLED_ID, batch_size=1)["job"], work, api_url, final)
            cases = [
                case("oom_once", "oom_once", batch_size=4),
                case("oom_twice", "oom_twice", batch_size=4),
                case("oom_once_device_path", "oom_once_device", batch_size=4),
                case("orchestrator_500", env={"ORCHESTRATOR_BASE_URL": failing.url,
                                              "INTERNAL_API_KEY": "orchestrator-key-500"}),
                case("orchestrator_timeout", env={"ORCHESTRATOR_BASE_URL": slow.url}),
                case("b2_unavailable", "b2_down", env=b2_env),
                case("b2_slow", "b2_slow", env=b2_env),
                case("b2_recovered", env=b2_env, job_id="b2-slow"),
                case("b2_job_id_traversal", env=b2_env, job_id="../../outside/evil"),
                case("disk_full_on_store", "enospc_on_store"),
                case("rerun_after_kill", "watch_final", job_id=KILLED_ID),
            ]
            if mounted:
                _fill(tmpfs / "filler")
                cases.append(case("disk_full_real_tmpfs", env={"MUSETALK_WORKDIR": str(tmpfs)}))
            cases.append(case("health"))
            loads = Engine.loads
            started = time.perf_counter()
            results = hm.run_jobs(cases)
            wall = time.perf_counter() - started
            yield Faults(rows={r["name"]: r for r in results}, work=work, raw=raw, counters=counters,
                         orchestrators={"error": failing, "slow": slow}, tmpfs=tmpfs if mounted else None,
                         killed=killed, watch=watch, engine_loads=Engine.loads - loads, wall_s=wall)
    finally:
        if mounted:
            subprocess.run(["umount", str(tmpfs)], check=False)
        for name in ("oom_once", "oom_twice", "oom_once_device", "b2_down", "b2_slow", "enospc_on_store",
                     "watch_final"):
            hm.HOOKS.pop(name, None)
        mp.undo()
        tasks.storage.clear_storage_cache()
        from tasks.settings import get_settings
        get_settings.cache_clear()


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


# ------------------------------------------------------------------------------------------- tests


def test_oom_once_halves_the_batch_and_succeeds(faults):
    body = _ok(faults.rows["oom_once"])
    assert body["metrics"]["batch_size"] == 2  # asked for 4, halved once
    assert body["metrics"]["frames"] == round(hm.CLIP_SEC * 25)


def test_oom_on_the_device_blend_path_halves_too(faults):
    body = _ok(faults.rows["oom_once_device_path"])
    assert body["metrics"]["batch_size"] == 2


def test_oom_twice_is_a_retryable_processing_error(faults):
    body = _failed(faults.rows["oom_twice"], stage="inference")
    assert body["retryable"] is True
    assert body["error_message"] == "ran out of CPU memory while rendering at batch size 2 (already halved once)"
    assert body["details"] == {"batch_size": 2}


def test_orchestrator_errors_do_not_stop_the_job(faults):
    _ok(faults.rows["orchestrator_500"])
    posts = faults.orchestrators["error"].bodies("orchestrator-500")
    assert len(posts) >= 3, posts  # it kept reporting through the 500s …
    assert posts[-1]["status"] == "succeeded" and posts[-1]["phase"] == "completed"  # … to the end
    assert [p["phase"] for p in posts].index("inferring") > 0


def test_orchestrator_timeouts_do_not_stop_the_job(faults):
    row = faults.rows["orchestrator_timeout"]
    _ok(row)
    assert faults.orchestrators["slow"].bodies("orchestrator-timeout")  # it was tried (and timed out)
    # each update gives up after 0.5 s on a background thread; the close waits at most 10 s in all
    health = faults.rows["health"]["wall_s"]
    assert row["wall_s"] < health + 15, (row["wall_s"], health)


def test_b2_unavailable_is_retried_then_500_retryable(faults):
    body = _failed(faults.rows["b2_unavailable"], stage="upload")
    assert body["retryable"] is True
    assert body["error_message"].startswith(f"B2 upload of {PREFIX}/b2-unavailable.mp4 failed")
    # 3 task attempts × 5 b2sdk attempts consumed every injected 503
    assert faults.counters["b2_errors_left"] == 0
    assert APP_KEY not in json.dumps(body)


def test_b2_hanging_is_bounded_retried_then_500_retryable(faults):
    row = faults.rows["b2_slow"]
    body = _failed(row, stage="upload")
    assert body["retryable"] is True
    assert body["error_message"] == f"B2 upload of {PREFIX}/b2-slow.mp4 did not finish within {B2_TIMEOUT:g} s"
    assert faults.counters["b2_slow_attempts"] == 3  # three task attempts, each cut off at the deadline
    assert faults.counters["b2_hung_calls"] >= 1  # … while B2 sat on the upload
    assert body["stage_times"]["upload"] < 3 * B2_TIMEOUT + 5  # bounded: no hung worker


def test_same_job_succeeds_once_b2_is_back(faults):
    body = _ok(faults.rows["b2_recovered"])
    assert body["b2_bucket"] == BUCKET and body["b2_file_name"] == f"{PREFIX}/b2-slow.mp4"
    sidecar = json.loads(hm.b2_read(faults.raw, BUCKET, f"{PREFIX}/b2-slow.json"))
    assert sidecar["musetalk_job_id"] == "b2-slow" and sidecar["b2_file_name"] == f"{PREFIX}/b2-slow.mp4"
    assert hm.b2_read(faults.raw, BUCKET, f"{PREFIX}/b2-slow.mp4")[4:8] == b"ftyp"


def test_hostile_job_id_never_becomes_a_b2_key(faults):
    body = _failed(faults.rows["b2_job_id_traversal"], status=422, stage="validation")
    assert body["error_message"].startswith("musetalk_job_id may only contain")
    names = [f.name for f in faults.raw.bucket_name_to_bucket[BUCKET].file_id_to_file.values()]
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


def test_disk_full_while_storing_says_so(faults):
    body = _failed(faults.rows["disk_full_on_store"], stage="upload")
    assert body["retryable"] is True
    assert body["error_message"] == ("the worker's disk is full (no space left on device) during upload; "
                                     "the job can be retried on another worker")
    assert faults.counters["store_attempts"] == 3  # retried like any storage fault, then reported


def test_disk_full_for_real(faults):
    if faults.tmpfs is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC case still runs")
    body = _failed(faults.rows["disk_full_real_tmpfs"], stage="download")
    assert body["error_message"].startswith("the worker's disk is full (no space left on device) during download")
    assert body["retryable"] is True
    assert "No space left on device" in body["details"]["reason"]
    assert list((faults.tmpfs / "tmp").iterdir()) == []  # its workspace was still cleaned up


def test_killed_worker_leaves_no_partial_result_and_rerun_overwrites(faults):
    killed = faults.killed
    assert killed["rendering"], killed["output"]  # SIGKILL landed while the render ran
    assert killed["returncode"] == -signal.SIGKILL, killed
    assert killed["sizes_seen"] == set()  # nothing ever appeared under the final key
    assert len(killed["leftovers"]) == 1  # the dead worker's workspace, cleaned by the re-run below

    body = _ok(faults.rows["rerun_after_kill"])
    final = Path(unquote(urlsplit(body["output_url"]).path))
    assert body["b2_file_name"] == f"{PREFIX}/{KILLED_ID}.mp4"
    assert final == faults.work / "results" / "job_queue" / PREFIX / f"{KILLED_ID}.mp4"
    assert faults.watch["sizes"] <= {final.stat().st_size}  # only ever the whole file under the key
    assert not list((faults.work / "tmp").glob(f"job-{KILLED_ID}-*"))  # the stale workspace is gone
    outputs = sorted(p.name for p in final.parent.iterdir() if p.name.startswith(KILLED_ID))
    assert outputs == [f"{KILLED_ID}.json", f"{KILLED_ID}.mp4"]


def test_worker_healthy_and_clean_after_every_fault(faults):
    _ok(faults.rows["health"])
    assert faults.engine_loads <= 1
    assert list((faults.work / "tmp").iterdir()) == []  # no temp files, whether jobs failed or not
    assert not list(faults.work.rglob("*.part"))


def test_report_faults(faults):
    """Not a check: prints the observed outcomes (shown with -s)."""
    lines = [f"{'case':24} {'status':>6}  {'stage':10} {'retry':5} {'wall_s':>6}  message / metrics"]
    for name, row in faults.rows.items():
        b = row["body"]
        info = b.get("error_message") or f"batch_size={b['metrics']['batch_size']} frames={b['metrics']['frames']}"
        lines.append(f"{name:24} {row['http_status']:>6}  {str(b.get('stage', '-')):10} "
                     f"{str(b.get('retryable', '-')):5} {row['wall_s']:>6}  {info}")
    k = faults.killed
    lines.append(f"killed subprocess: rendering={k['rendering']} rc={k['returncode']} in {k['seconds']} s, "
                 f"leftovers={k['leftovers']}, sizes under final key while dying={sorted(k['sizes_seen'])}")
    lines.append(f"total {faults.wall_s:.1f} s for {len(faults.rows)} jobs in one flow run")
    print("\n" + "\n".join(lines))
