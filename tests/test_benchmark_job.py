"""Benchmark jobs on a worker (the container side of the benchmark flow's Salad fan-out): the request is
measured on the worker's terms, in a child process, and the answer is what the flow merges."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from flows.benchmark import _single_result
from deployments.benchmark_job import benchmark_config, run_benchmark_job, run_in_child
from musetalk_engine.errors import MediaError
from tasks.settings import Settings

# What the flow sends (flows/benchmark.py: the child parameters), made small enough for a CPU test.
FLOW_REQUEST = {"profile": "tiny", "batch_sizes": [2], "modes": [], "audio_seconds": 0.4, "video_seconds": 0.4,
                "width": 160, "height": 128, "device": "auto", "torch_threads": None, "repeats": 1,
                "models_dir": None, "work_dir": None, "gpu_class": "RTX 4090 (24 GB)", "class_id": "ed563892",
                "targets_path": None, "chart_path": None}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(musetalk_workdir=tmp_path / "work", musetalk_cache_dir=tmp_path / "cache",
                    musetalk_models_dir=tmp_path / "models", gpu_class_name="L40S (48 GB)")


def test_the_worker_decides_paths_and_device_and_drops_the_flows_own_keys(settings, tmp_path):
    hostile = {**FLOW_REQUEST, "profile": None, "models_dir": "/etc", "work_dir": "/", "device": "cuda:7"}
    config = benchmark_config(hostile, settings, cuda=True)
    assert config.profile == "full-random"  # the flow's default on a GPU worker
    assert config.work_dir == tmp_path / "cache" / "benchmark"
    assert config.models_dir is None and config.device == "auto"
    assert config.gpu_class == "RTX 4090 (24 GB)" and config.batch_sizes == [2]
    assert benchmark_config({}, settings, cuda=False).profile == "tiny"
    assert benchmark_config({}, settings, cuda=False).gpu_class == "L40S (48 GB)"  # GPU_CLASS_NAME
    real = benchmark_config({"profile": "real"}, settings, cuda=True)
    assert real.models_dir == tmp_path / "models"  # the worker's own weights, never a path from the job


def test_a_bad_request_is_a_422_naming_the_field(settings):
    with pytest.raises(MediaError, match=r"invalid benchmark request: batch_sizes: .*between 1 and 512"):
        benchmark_config({"batch_sizes": [0]}, settings, cuda=False)
    outcome = run_benchmark_job({"benchmark": {"profile": "huge"}}, settings, 60, cuda=False)
    assert outcome.http_status == 422
    assert outcome.body["error_type"] == "media_error" and "profile" in outcome.body["error_message"]


def test_a_failed_or_overlong_measurement_is_a_retryable_500_and_leaves_no_child(settings, monkeypatch):
    outcome = run_benchmark_job({"benchmark": {"profile": "real"}}, settings, 300, cuda=False)  # no weights
    assert outcome.http_status == 500 and outcome.body["retryable"] is True
    message = outcome.body["error_message"]
    assert "exited with status 1: musetalk_engine.errors.MissingWeightsError" in message and "unet.pth" in message

    children = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: children.append(popen(*a, **kw)) or children[-1])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="within 2 s"):  # the tiny profile first writes its models
        run_in_child(benchmark_config({"profile": "tiny"}, settings, cuda=False), 2)
    assert time.monotonic() - started < 30 and children[0].poll() is not None  # killed, not waited for


def test_post_benchmark_measures_in_a_child_and_answers_what_the_flow_merges(settings):
    from deployments.serve import create_app

    worker_engine = SimpleNamespace(warm=True, device=torch.device("cpu"), gpu={"name": "cpu"})
    app = create_app(settings, engine_loader=lambda s: worker_engine)
    with TestClient(app) as http:
        assert app.state.service.wait_ready(240), app.state.service.load_error
        assert "/benchmark" in http.get("/openapi.json").json()["paths"]
        r = http.post("/benchmark", json={"benchmark": FLOW_REQUEST}, headers={"Salad-Job-Id": "sj-1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok"
        result = _single_result(body)  # the flow's own reading of a Salad job's output
        assert result["profile"] == "tiny"
        assert result["gpu"]["gpu_class"] == "RTX 4090 (24 GB)"
        assert [(e["batch_size"], e["mode"]) for e in result["sweep"]] == [(2, "eager")]
        assert result["sweep"][0]["frames"] == 10 and result["sweep"][0]["overhead_ratio"] > 0
        assert Path(settings.musetalk_cache_dir, "benchmark", "models-tiny", "tiny.json").is_file()
        bad = http.post("/benchmark", json={"benchmark": {"repeats": 99}})
        assert bad.status_code == 422 and "repeats" in bad.json()["error_message"]
