"""A warm job's fixed costs that were cut (issue 13, "per-job fixed cost"): a second probe of an unchanged
file, the tag concurrency-slot calls before each task run, the flow run's wait for its heartbeat thread."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import musetalk_engine.probe as probe_mod
from musetalk_engine.probe import ProbeFailed, ffprobe, forget_probes
from tests.media import lavfi_video
from tests.servers import wait_until


@pytest.fixture()
def probe_calls(monkeypatch):
    """How many ffprobe processes ran (the real ones still run)."""
    calls: list[list[str]] = []
    real = subprocess.run

    def counting(args, *a, **kw):
        if args and args[0] == "ffprobe":
            calls.append(list(args))
        return real(args, *a, **kw)

    monkeypatch.setattr(probe_mod.subprocess, "run", counting)
    forget_probes()
    yield calls
    forget_probes()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return lavfi_video(tmp_path_factory.mktemp("probe") / "clip.mp4", "testsrc=size=64x48:rate=25", seconds=0.2)


# ------------------------------------------------------------------------------------------- probe


def test_an_unchanged_file_is_probed_once_and_each_caller_gets_its_own_copy(clip, probe_calls):
    first = ffprobe(clip)
    first["streams"].clear()  # a caller's change must not reach the next caller
    second = ffprobe(clip)
    assert len(probe_calls) == 1
    assert second["streams"] and second["streams"][0]["width"] == 64


def test_a_rewritten_file_is_probed_again_even_with_its_old_size_and_mtime(clip, tmp_path, probe_calls):
    path = tmp_path / "input.mp4"
    shutil.copyfile(clip, path)
    ffprobe(path)
    before = os.stat(path)
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes(len(data) - 100))  # same size, the video gone
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old modification time
    with pytest.raises(ProbeFailed):
        ffprobe(path)
    assert len(probe_calls) == 2


def test_a_copy_is_a_new_file_and_failures_are_never_remembered(clip, tmp_path, probe_calls):
    copy = tmp_path / "copy.mp4"
    shutil.copyfile(clip, copy)
    ffprobe(clip)
    ffprobe(copy)  # a job's download is a new file: probed, whatever was probed before
    assert len(probe_calls) == 2
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    for _ in range(2):
        with pytest.raises(ProbeFailed):
            ffprobe(garbage)
    assert len(probe_calls) == 4


# ------------------------------------------------------------------------------------- Prefect costs


class _Engine:
    """What Prefect's heartbeat context reads from a flow-run engine."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger("test-heartbeats")

    def __init__(self) -> None:
        self.beats = 0

    def _build_heartbeat_event_template(self):
        return None, None

    def _emit_flow_run_heartbeat(self, resource, related) -> None:
        self.beats += 1


def test_a_flow_run_ends_without_waiting_for_its_heartbeat_thread():
    """Prefect's heartbeat thread sleeps in 1 s steps and a sync run joined it: each run ended up to a
    second after its final state. Now the exit is immediate and the thread still stops by itself."""
    from prefect import flow_engine

    from tasks.run_overhead import heartbeats_end_without_join

    assert heartbeats_end_without_join() and heartbeats_end_without_join()  # installed, idempotent
    engine = _Engine()
    before = set(threading.enumerate())
    with flow_engine._send_heartbeats(engine):
        # the first beat is sent (waited for: a loaded machine may start the thread late), the thread sleeps
        assert wait_until(lambda: engine.beats >= 1, 30, step=0.01)
        time.sleep(0.1)
        started = set(threading.enumerate()) - before
        beats = engine.beats
        exit_at = time.perf_counter()
    exited = time.perf_counter() - exit_at
    assert beats == 1 and len(started) == 1
    assert exited < 0.5, f"the run's end waited {exited:.2f}s for its heartbeat thread"
    (thread,) = started
    thread.join(10)  # it checks its stop flag every second; its next beat would be due after 30 s
    assert not thread.is_alive() and engine.beats == 1  # stopped by itself, no beat after the end


def test_task_runs_of_a_job_carry_none_of_the_callers_tags():
    """The serve process tags each job's flow run `attempt-of:<id>`; on its task runs a tag costs an
    API round trip for concurrency slots before every task, so they run untagged (the run keeps it)."""
    from prefect import flow, tags, task
    from prefect.runtime import flow_run, task_run

    from tasks.run_overhead import untagged_task_runs

    @task
    def seen() -> list[str]:
        return sorted(task_run.tags)

    @flow
    def job() -> dict[str, list[str]]:
        inherited = seen()
        with untagged_task_runs():
            return {"run": sorted(flow_run.tags), "inherited": inherited, "untagged": seen()}

    with tags("attempt-of:j1"):
        out = job()
    assert out == {"run": ["attempt-of:j1"], "inherited": ["attempt-of:j1"], "untagged": []}
