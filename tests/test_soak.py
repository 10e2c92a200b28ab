"""Soak: 50 tiny jobs through ``run_job`` in one process (one flow run), measuring resident memory, open
file descriptors and threads after every job. Leaks of sockets (downloads, the orchestrator client),
ffmpeg pipes, temp files, reporter threads or per-job tensors would show up as growth.

Each job is the full path (download from a 127.0.0.1 server, probe, cached avatar, cached audio features,
render, encode, upload to B2 — b2sdk's in-memory simulator —, live progress to a fake orchestrator) on the
same avatar and a 0.5 s speech clip. To keep 50 renders within about two minutes on a shared CPU, jobs ask for ``fps: 2`` (a valid job
parameter): one UNet frame each (the tiny UNet is most of a frame's cost here), so the per-job machinery
dominates, which is what a leak would live in.
The first ``WARMUP`` jobs are excluded from the bounds (caches, thread pools and allocator arenas fill).
Growth is measured from the lowest value after warm-up: resources that earlier test modules leave to the
garbage collector may be released during the soak, which is not a leak of the soak's jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prefect import flow

from deployments.serve import start_prefect_api
from tests import hostile_media as hm

pytest_plugins = ["tests.fixtures_engine"]

JOBS = 50
WARMUP = 5
MIB = 1024 * 1024


@dataclass
class Sample:
    job: int
    status: int
    wall_s: float
    rss: int
    fds: int
    threads: int


@flow(name="soak", log_prints=False)
def soak(jobs: list[dict]) -> list[dict]:
    """Run the jobs back to back, sampling this process's RSS, open fds and threads after each."""
    from flows.generate import run_job

    proc = psutil.Process()
    samples = []
    for i, job in enumerate(jobs):
        started = time.perf_counter()
        outcome = run_job(job)
        wall = time.perf_counter() - started
        samples.append({"job": i, "status": outcome.http_status, "wall_s": round(wall, 2),
                        "rss": proc.memory_info().rss, "fds": proc.num_fds(), "threads": proc.num_threads()})
    return samples


BUCKET = "musetalk-soak"


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_models) -> tuple[list[Sample], Path, hm.FakeOrchestrator, float, object]:
    import tasks.storage

    base = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("soak-work")
    media = tmp_path_factory.mktemp("soak-media")
    # 1 s of video is 2 source frames at 2 fps; 0.5 s of speech is 1 output frame
    video, audio = hm.avatar_clip(media / "avatar.mp4", seconds=1.0), hm.speech(media / "speech.wav", seconds=0.5)
    mp = pytest.MonkeyPatch()
    raw, key_id = hm.simulated_b2(mp, BUCKET, "K005-soak-app-key-0000")
    try:
        with hm.MediaServer() as server, hm.FakeOrchestrator("ok") as orchestrator:
            hm.worker_env(mp, work, tiny_models, MUSETALK_CACHE_DIR=str(base / "shared-engine-cache"),
                          ORCHESTRATOR_BASE_URL=orchestrator.url, INTERNAL_API_KEY="soak-key-123456",
                          B2_KEY_ID=key_id, B2_APP_KEY="K005-soak-app-key-0000", B2_BUCKET_NAME=BUCKET)
            v, a = server.file("/avatar.mp4", video), server.file("/speech.wav", audio)
            jobs = [{"musetalk_job_id": f"soak-{i:02d}", "video_url": v, "audio_url": a, "params": {"fps": 2}}
                    for i in range(JOBS)]
            start_prefect_api()
            started = time.perf_counter()
            rows = soak(jobs)
            wall = time.perf_counter() - started
            yield [Sample(**s) for s in rows], work, orchestrator, wall, raw
    finally:
        mp.undo()
        tasks.storage.clear_storage_cache()
        from tasks.settings import get_settings
        get_settings.cache_clear()


def test_all_jobs_succeed(samples):
    rows, work, orchestrator, _, raw = samples
    assert [s.status for s in rows] == [200] * JOBS
    names = {f.name for f in raw.bucket_name_to_bucket[BUCKET].file_id_to_file.values()}
    assert names == {f"avatar/outputs/soak-{i:02d}.{ext}" for i in range(JOBS) for ext in ("mp4", "json")}
    assert len(orchestrator.bodies("soak-49")) >= 2  # progress was reported live for every job
    assert list((work / "tmp").iterdir()) == []  # no temp files left by any job


def test_memory_fds_and_threads_stay_flat(samples):
    rows, work, _, wall, _ = samples
    steady = rows[WARMUP - 1:]
    rss = [s.rss for s in rows]
    fds = [s.fds for s in rows]
    threads = [s.threads for s in rows]
    report = (f"soak: {JOBS} jobs in {wall:.1f} s (median {sorted(s.wall_s for s in rows)[JOBS // 2]} s/job); "
              f"RSS first {rss[0] / MIB:.1f} MiB, after warm-up {steady[0].rss / MIB:.1f}, "
              f"last {rss[-1] / MIB:.1f}, max {max(rss) / MIB:.1f}; "
              f"fds first {fds[0]}, after warm-up {steady[0].fds}, last {fds[-1]}, min {min(fds)}, max {max(fds)}; "
              f"threads first {threads[0]}, after warm-up {steady[0].threads}, last {threads[-1]}, max {max(threads)}")
    print("\n" + report)  # shown with -s
    (work / "soak-report.txt").write_text(report)
    assert steady[-1].fds - min(s.fds for s in steady) <= 2, fds
    assert max(s.fds for s in steady) - min(s.fds for s in steady) <= 6, fds
    assert steady[-1].rss - min(s.rss for s in steady) < 150 * MIB, rss
    assert steady[-1].threads - min(s.threads for s in steady) <= 2, threads
