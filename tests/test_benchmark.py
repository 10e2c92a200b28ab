"""The benchmark: `python -m benchmarks` writes a valid result with the overhead keys (and imports no
Prefect); the `benchmark` flow measures locally, fans out per class (deployment and Salad paths, with the
dispatch faked), merges into a copy of the operator's 10-class gpu_targets.json and draws the chart.

Settings are deliberately tiny (320×240 source, under a second of speech, one batch size) so the whole
module stays within a few minutes on a busy 2-core CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image

from flows.benchmark import benchmark, queue_for
from benchmarks.run import floor_command
from benchmarks.schema import BenchmarkResult, json_schema
from tasks.salad import SaladClient

REPO = Path(__file__).resolve().parents[1]
SMALL = {"width": 320, "height": 240, "audio_seconds": 0.48, "video_seconds": 0.4, "batch_sizes": [4]}
FRAMES = 12  # floor(0.48 s · 25 fps)
SOURCE_FRAMES = 10  # 0.4 s · 25 fps
ISSUE7_KEYS = ("end_to_end_s", "model_only_s", "floor_s", "overhead_ratio", "frames", "fps")
ID_4090 = "ed563892-aacd-40f5-80b7-90c9be6c759b"
ID_3090 = "a5db5c50-cbcb-4596-ae80-6a0c8090d80f"
ID_4080 = "0d062939-7c01-4aae-a2b1-30e315124e51"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Models, media and avatars shared by every run of this module (made by the first one)."""
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture()
def targets_copy(tmp_path) -> Path:
    dest = tmp_path / "gpu_targets.json"
    shutil.copy(REPO / "gpu_targets.json", dest)
    return dest


@pytest.fixture(scope="module")
def cli_run(work, tmp_path_factory) -> dict[str, Any]:
    """`python -m benchmarks` in a subprocess, with every import it makes listed (-X importtime)."""
    out_dir = tmp_path_factory.mktemp("bench-cli")
    out, chart, targets = out_dir / "results.json", out_dir / "chart.png", out_dir / "gpu_targets.json"
    shutil.copy(REPO / "gpu_targets.json", targets)
    shutil.copy(REPO / "salad_prices.json", out_dir / "salad_prices.json")  # found beside --merge
    cmd = [sys.executable, "-X", "importtime", "-m", "benchmarks", "--profile", "tiny", "--out", str(out),
           "--work-dir", str(work), "--batch-sizes", "4", "--audio-seconds", str(SMALL["audio_seconds"]),
           "--video-seconds", str(SMALL["video_seconds"]), "--width", "320", "--height", "240",
           "--device", "cpu", "--chart", str(chart), "--merge", str(targets), "--class-id", ID_4090]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "chart": chart, "targets": targets, "stderr": proc.stderr}


def _imported_modules(importtime_stderr: str) -> set[str]:
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, "chart missing or nearly empty"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= 800 and img.size[1] >= 400
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 16  # not blank


def _check_entry(entry: dict[str, Any], frames: int) -> None:
    for key in ISSUE7_KEYS:
        assert key in entry, key
    assert entry["frames"] == frames
    assert entry["end_to_end_s"] > 0 and entry["model_only_s"] > 0 and entry["floor_s"] > 0
    expected = entry["end_to_end_s"] / (entry["floor_s"] + entry["model_only_s"])
    assert entry["overhead_ratio"] == pytest.approx(expected, rel=1e-6)
    assert entry["fps"] == pytest.approx(frames / entry["end_to_end_s"], rel=1e-6)
    # a warm one-frame job's cost outside the model: something, and well under the whole render's
    assert 0 < entry["job_overhead_s"] < entry["end_to_end_s"] + entry["floor_s"]
    stages = entry["stage_times"]
    assert stages["unet"] > 0 and stages["vae_decode"] > 0 and stages["encode"] > 0


# ------------------------------------------------------------------------------------ CLI


def test_cli_writes_a_valid_result_with_the_overhead_keys(cli_run):
    data = json.loads(cli_run["out"].read_text())
    jsonschema.validate(data, json_schema())
    result = BenchmarkResult.model_validate(data)
    assert result.profile == "tiny" and result.gpu.name == "cpu"
    assert result.workload.width == 320 and result.workload.audio_seconds == pytest.approx(0.48)
    assert result.software.torch and result.software.ffmpeg
    assert result.cold_start_s is not None and result.cold_start_s > 0
    assert [(e["batch_size"], e["mode"]) for e in data["sweep"]] == [(4, "eager")]
    for entry in (*data["sweep"], data["best"]):
        _check_entry(entry, FRAMES)
    assert data["sweep"][0]["peak_rss_kb"] > 0
    _assert_png(cli_run["chart"])


def test_cli_merges_into_an_explicit_class(cli_run):
    original = json.loads((REPO / "gpu_targets.json").read_text())
    merged = json.loads(cli_run["targets"].read_text())
    assert [(t["id"], t["name"]) for t in merged] == [(t["id"], t["name"]) for t in original]
    bench = {t["id"]: t.get("benchmark") for t in merged}
    assert [cid for cid, b in bench.items() if b] == [ID_4090]
    assert bench[ID_4090]["price_per_hour"] == 0.16  # from salad_prices.json beside the targets
    assert bench[ID_4090]["cost_per_output_minute"] > 0 and bench[ID_4090]["profile"] == "tiny"


def test_cli_path_imports_no_prefect(cli_run):
    modules = _imported_modules(cli_run["stderr"])
    assert "benchmarks.run" in modules and "torch" in modules  # the listing worked
    assert not [m for m in modules if m == "prefect" or m.startswith("prefect.")]


def test_floor_encodes_the_requested_frames_with_audio(work, cli_run, tmp_path):
    video = next((work / "media").glob("avatar-320x240-*.mp4"))
    audio = next((work / "media").glob("speech-*.wav"))
    out = tmp_path / "floor.mp4"
    cmd = floor_command(video, audio, out, frames=40, n_source=SOURCE_FRAMES, fps=25.0, encoder="libx264")
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(out)],
        capture_output=True, text=True, check=True).stdout)
    kinds = {s["codec_type"]: s for s in probe["streams"]}
    assert int(kinds["video"]["nb_read_frames"]) == 40  # cycled past the 10 source frames
    assert kinds["video"]["width"] == 320 and "audio" in kinds


# ------------------------------------------------------------------------------------ flow


def test_flow_local_run_merges_into_the_targets_and_draws_the_chart(work, targets_copy, tmp_path):
    before = json.loads(targets_copy.read_text())
    chart = tmp_path / "chart.png"
    out = benchmark(profile="tiny", device="cpu", work_dir=str(work), targets_path=str(targets_copy),
                    prices_path=str(REPO / "salad_prices.json"), chart_path=str(chart), **SMALL)
    assert len(out["results"]) == 1 and not out["failed"]
    _check_entry(out["results"][0]["sweep"][0], FRAMES)

    after = json.loads(targets_copy.read_text())
    assert len(before) == 10 and after[:10] == before  # every Salad class kept, untouched
    assert len(after) == 11
    local = after[10]  # a CPU matches no Salad class: appended as a local entry without a price
    assert local["id"] is None and local["local"] is True and local["name"] == "cpu"
    assert local["benchmark"]["profile"] == "tiny" and local["benchmark"]["price_per_hour"] is None
    assert local["benchmark"]["fps"] > 0 and local["benchmark"]["best_batch_size"] == 4
    assert [row["name"] for row in out["table"]] == ["cpu"]
    _assert_png(chart)


class _FakeRun:
    """What `run_deployment` returns: a flow run whose state holds the child's return value."""

    def __init__(self, value: Any, ok: bool = True):
        self.id = "00000000-0000-0000-0000-000000000001"
        self.state = self
        self._value, self._ok = value, ok
        self.name = "Completed" if ok else "Crashed"

    def is_completed(self) -> bool:
        return self._ok

    def is_final(self) -> bool:
        return True

    def result(self) -> Any:
        return self._value


def _result_as(data: dict[str, Any], gpu_name: str, memory_mib: int, scale: float) -> dict[str, Any]:
    """The CLI's result as if measured on another GPU, `scale` × its times."""
    d = json.loads(json.dumps(data))
    d.pop("best", None)
    d["gpu"].update(name=gpu_name, memory_mib=memory_mib)
    for e in d["sweep"]:
        for key in ("end_to_end_s", "model_only_s", "floor_s"):
            e[key] *= scale
        for key in ("overhead_ratio", "fps", "model_fps", "real_time_factor", "warm_wall_over_generation"):
            e.pop(key, None)
    return d


def test_flow_fans_out_one_deployment_run_per_class(cli_run, targets_copy, tmp_path, monkeypatch):
    measured = json.loads(cli_run["out"].read_text())
    calls: list[dict[str, Any]] = []

    def fake_run_deployment(name, parameters=None, work_queue_name=None, timeout=None, **kw):
        calls.append({"name": name, "queue": work_queue_name, "parameters": parameters})
        if parameters["class_id"] == ID_4080:
            return _FakeRun(None, ok=False)  # no worker picked it up
        scale = 0.01 if parameters["class_id"] == ID_4090 else 0.02
        return _FakeRun({"results": [_result_as(measured, "gpu", 24564, scale)], "failed": {}, "table": []})

    monkeypatch.setattr("flows.benchmark.run_deployment", fake_run_deployment)
    out = benchmark(classes=[ID_4090, ID_3090, ID_4080], via="deployment", profile="tiny",
                    targets_path=str(targets_copy), prices_path=str(REPO / "salad_prices.json"),
                    chart_path=str(tmp_path / "chart.png"), deployment_name="benchmark/gpu-benchmark",
                    **SMALL)

    assert sorted(c["queue"] for c in calls) == sorted(queue_for(c) for c in (ID_4090, ID_3090, ID_4080))
    assert queue_for(ID_4090) == "gpu-ed563892"
    child = next(c["parameters"] for c in calls if c["parameters"]["class_id"] == ID_4090)
    assert child["targets_path"] is None and "classes" not in child  # children measure, never merge
    assert child["gpu_class"] == "RTX 4090 (24 GB)" and child["batch_sizes"] == [4]
    assert list(out["failed"]) == [ID_4080] and len(out["results"]) == 2

    after = {t["id"]: t for t in json.loads(targets_copy.read_text())}
    assert len(after) == 10  # merged by explicit class id: nothing appended
    b4090, b3090 = after[ID_4090]["benchmark"], after[ID_3090]["benchmark"]
    assert b4090["price_per_hour"] == 0.16 and b3090["price_per_hour"] == 0.09
    assert b4090["fps"] == pytest.approx(2 * b3090["fps"], rel=0.01)
    # real_time_factor is stored rounded to 4 decimals; the cost was computed before rounding
    assert b4090["cost_per_output_minute"] == pytest.approx(0.16 / 60 * b4090["real_time_factor"], rel=0.01)
    assert "benchmark" not in after[ID_4080]
    assert out["table"][0]["name"] == "RTX 4090 (24 GB)"  # cheapest per output minute first
    _assert_png(tmp_path / "chart.png")


def test_flow_salad_path_queues_one_job_per_class(cli_run, targets_copy, tmp_path, monkeypatch):
    measured = _result_as(json.loads(cli_run["out"].read_text()), "NVIDIA GeForce RTX 4090", 24564, 0.01)
    posted: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Salad-Api-Key"] == "test-key"
        queue = request.url.path.split("/queues/")[1].split("/")[0]
        if request.method == "POST":
            posted.append((queue, json.loads(request.content)))
            return httpx.Response(201, json={"id": f"job-{queue}", "status": "pending"})
        return httpx.Response(200, json={"id": f"job-{queue}", "status": "succeeded",
                                         "output": {"result": measured}})

    def fake_client(*a, **kw) -> SaladClient:
        return SaladClient("test-key", "org", "proj", base_url="http://salad.test",
                           transport=httpx.MockTransport(handler))

    monkeypatch.setattr("flows.benchmark.salad_client_from_env", fake_client)
    out = benchmark(classes=[ID_4090], via="salad", salad_queues={ID_4090: "bench-4090"}, profile="tiny",
                    targets_path=str(targets_copy), prices_path=str(REPO / "salad_prices.json"),
                    chart_path=None, **SMALL)
    assert [q for q, _ in posted] == ["bench-4090"]
    body = posted[0][1]
    assert body["input"]["benchmark"]["class_id"] == ID_4090
    assert body["metadata"] == {"purpose": "benchmark", "gpu_class_id": ID_4090}
    assert "test-key" not in json.dumps(body)
    assert len(out["results"]) == 1 and not out["failed"]
    after = {t["id"]: t for t in json.loads(targets_copy.read_text())}
    assert len(after) == 10 and after[ID_4090]["benchmark"]["price_per_hour"] == 0.16
