"""gpu_targets.json: result schema, merging benchmark results into the operator's classes, table, chart."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from benchmarks.chart import plot_targets
from benchmarks.schema import BenchmarkResult, SweepEntry, json_schema
from benchmarks.targets import (
    benchmark_summary,
    match_class,
    merge_results,
    normalise_gpu_name,
    results_table,
    write_targets,
)
from tasks.scaling import read_prices, read_targets

REPO = Path(__file__).resolve().parents[1]
ID_4090 = "ed563892-aacd-40f5-80b7-90c9be6c759b"
ID_3060 = "f51baccc-dc95-40fb-a5d1-6d0ee0db31d2"

# The operator's salad_prices.json (2026-03), the entries these tests use.
PRICES = {
    "source": "SaladCloud price list as recorded by the operator, 2026-03 (USD per GPU-hour)",
    "prices": [
        {"id": ID_4090, "name": "RTX 4090 (24 GB)", "high": 0.3, "batch": 0.16},
        {"id": ID_3060, "name": "RTX 3060 (12 GB)", "high": 0.08, "batch": 0.04},
    ],
}


def make_result(
    gpu_name: str = "NVIDIA GeForce RTX 4090",
    memory_mib: int = 24564,
    scale: float = 1.0,
    gpu_class: str | None = None,
) -> BenchmarkResult:
    """A three-point sweep; `scale` multiplies every time (2.0 → half the fps)."""
    sweep = [
        SweepEntry.from_measurements(
            batch_size=bs,
            mode="graphs",
            frames=250,
            output_fps=25.0,
            end_to_end_s=e2e * scale,
            model_only_s=model * scale,
            floor_s=2.0 * scale,
            stage_times={"decode": 0.5, "unet": model * 0.4, "vae_decode": model * 0.6, "encode": 1.0},
            peak_vram_mib=vram,
            peak_vram_nvml_mib=vram + 900,
            peak_rss_kb=3_000_000,
        )
        for bs, e2e, model, vram in [(8, 6.0, 3.0, 7000.0), (16, 5.0, 2.5, 9000.0), (32, 5.5, 2.4, 15000.0)]
    ]
    return BenchmarkResult(
        profile="full-random",
        gpu={"name": gpu_name, "memory_mib": memory_mib, "driver": "560.35", "gpu_class": gpu_class},
        software={"python": "3.11.9", "torch": "2.13.0", "cuda": "12.4", "diffusers": "0.42.0",
                  "transformers": "5.0.0", "musetalk_flow": "0.1.0", "ffmpeg": "5.1"},
        created_utc=datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc),
        workload={"video_seconds": 5.0, "audio_seconds": 10.0, "width": 720, "height": 1280, "fps": 25.0},
        cold_start_s=42.0,
        sweep=sweep,
    )


@pytest.fixture()
def targets() -> list[dict]:
    return read_targets(REPO / "gpu_targets.json")


@pytest.fixture()
def prices(tmp_path: Path):
    path = tmp_path / "salad_prices.json"
    path.write_text(json.dumps(PRICES))
    return read_prices(path)


# ------------------------------------------------------------------------------------ schema


def test_sweep_derived_numbers_and_best() -> None:
    result = make_result()
    best = result.best
    assert best.batch_size == 16  # 250 frames / 5.0 s is the fastest
    assert best.fps == pytest.approx(50.0)
    assert best.model_fps == pytest.approx(100.0)
    assert best.real_time_factor == pytest.approx(0.5)  # 5 s wall for 10 s of video
    assert best.overhead_ratio == pytest.approx(5.0 / (2.0 + 2.5))
    assert best.warm_wall_over_generation == pytest.approx(0.5)


def test_inconsistent_derived_numbers_are_rejected() -> None:
    entry = make_result().sweep[0].model_dump()
    entry["fps"] = entry["fps"] * 2
    with pytest.raises(ValidationError, match="fps"):
        SweepEntry.model_validate(entry)


def test_schema_export_validates_a_sample_and_round_trips() -> None:
    schema = json_schema()
    assert schema == BenchmarkResult.model_json_schema(mode="serialization")
    for key in ("profile", "gpu", "software", "created_utc", "workload", "cold_start_s", "sweep", "best"):
        assert key in schema["properties"]
    sample = make_result()
    doc = json.loads(sample.model_dump_json())
    jsonschema.validate(doc, schema)
    # the validation-mode schema (what a writer must supply) also accepts it, minus the computed field
    jsonschema.validate({k: v for k, v in doc.items() if k != "best"}, BenchmarkResult.model_json_schema())
    assert BenchmarkResult.model_validate(doc) == sample
    bad = dict(doc, profile="huge")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# -------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("nvml", "mib", "expected"),
    [
        ("NVIDIA GeForce RTX 4090", 24564, "RTX 4090 (24 GB)"),
        ("NVIDIA GeForce RTX 4070", 12282, "RTX 4070 (12 GB)"),
        ("NVIDIA GeForce RTX 4070 Ti", 12282, "RTX 4070 Ti (12 GB)"),
        ("NVIDIA GeForce RTX 4070 Ti SUPER", 16376, "RTX 4070 Ti Super (16 GB)"),
        ("NVIDIA GeForce RTX 3080", 10240, "RTX 3080 (10 GB)"),
        ("NVIDIA GeForce RTX 3080", None, "RTX 3080 (10 GB)"),
        ("NVIDIA GeForce RTX 4060 Ti", 8188, None),  # the 8 GB card is not a Salad class here
        ("NVIDIA H200", 143771, None),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", 16376, None),
    ],
)
def test_match_class(targets, nvml, mib, expected) -> None:
    found = match_class(nvml, mib, targets)
    assert (found["name"] if found else None) == expected


def test_normalise_gpu_name() -> None:
    assert normalise_gpu_name("NVIDIA GeForce RTX 4070 Ti SUPER") == "rtx 4070 ti super"
    assert normalise_gpu_name("RTX 4070 Ti Super (16 GB)") == "rtx 4070 ti super"


# --------------------------------------------------------------------------------- merging


def test_merge_keeps_all_classes_and_adds_results_to_the_measured_one(targets, prices) -> None:
    original = json.loads(json.dumps(targets))
    merged = merge_results(targets, make_result(), None, prices)

    assert targets == original  # input untouched
    assert [(t["id"], t["name"]) for t in merged] == [(t["id"], t["name"]) for t in original]
    assert len(merged) == 10
    measured = [t for t in merged if "benchmark" in t]
    assert [t["id"] for t in measured] == [ID_4090]

    bench = measured[0]["benchmark"]
    assert bench["fps"] == pytest.approx(50.0)
    assert bench["real_time_factor"] == pytest.approx(0.5)
    assert bench["best_batch_size"] == 16 and bench["mode"] == "graphs"
    assert bench["peak_vram_mib"] == 9000.0
    assert set(bench["stage_times"]) >= {"decode", "prepare", "audio", "unet", "vae_decode", "blend", "encode"}
    assert bench["price_per_hour"] == 0.16 and bench["price_per_hour_high"] == 0.3
    # 0.5 GPU-minutes per output minute × $0.16/60 per GPU-minute
    assert bench["cost_per_output_minute"] == pytest.approx(0.16 / 60 * 0.5, rel=1e-4)
    assert bench["cost_per_output_minute_high"] == pytest.approx(0.3 / 60 * 0.5, rel=1e-4)
    assert bench["date"].startswith("2026-11-01T12:00")
    assert bench["software"]["torch"] == "2.13.0" and bench["profile"] == "full-random"


def test_remerge_replaces_and_other_classes_stay(targets, prices) -> None:
    once = merge_results(targets, make_result(), ID_4090, prices)
    other = merge_results(once, make_result("NVIDIA GeForce RTX 3060", 12288, scale=2.0), None, prices)
    again = merge_results(other, make_result(scale=4.0), ID_4090, prices)

    assert len(again) == 10
    by_id = {t["id"]: t for t in again}
    assert by_id[ID_4090]["benchmark"]["fps"] == pytest.approx(12.5)  # replaced, not appended
    assert by_id[ID_3060]["benchmark"] == other[-1]["benchmark"]  # untouched by the 4090 re-merge
    assert by_id[ID_3060]["benchmark"]["cost_per_output_minute"] == pytest.approx(0.04 / 60 * 1.0, rel=1e-4)


def test_salad_class_name_wins_over_nvml_name(targets, prices) -> None:
    merged = merge_results(targets, make_result("weird device", None, gpu_class="RTX 3060 (12 GB)"), None, prices)
    assert [t["id"] for t in merged if "benchmark" in t] == [ID_3060]


def test_unknown_id_is_an_error(targets) -> None:
    with pytest.raises(ValueError, match="not in gpu_targets"):
        merge_results(targets, make_result(), "no-such-id", None)


def test_unknown_gpu_is_appended_as_local_and_price_is_null(targets, prices) -> None:
    h200 = make_result("NVIDIA H200", 143771, scale=0.5)
    merged = merge_results(targets, h200, None, prices)
    merged = merge_results(merged, h200, None, prices)  # re-merge does not duplicate
    assert len(merged) == 11
    local = merged[-1]
    assert local["id"] is None and local["local"] is True and local["name"] == "NVIDIA H200"
    assert local["benchmark"]["price_per_hour"] is None
    assert local["benchmark"]["cost_per_output_minute"] is None


def test_merge_without_prices_gives_null_cost(targets) -> None:
    merged = merge_results(targets, make_result(), ID_4090, None)
    assert merged[0]["benchmark"]["cost_per_output_minute"] is None


def test_write_targets_is_atomic_and_round_trips(tmp_path: Path, targets, prices) -> None:
    merged = merge_results(targets, make_result(), None, prices)
    out = tmp_path / "out" / "gpu_targets.json"
    out.parent.mkdir()
    out.write_text("[]")
    assert write_targets(out, merged) == out
    assert read_targets(out) == merged
    assert [p.name for p in out.parent.iterdir()] == ["gpu_targets.json"]  # no temp file left behind


def test_results_table_orders_by_cost(targets, prices) -> None:
    merged = merge_results(targets, make_result(), None, prices)
    merged = merge_results(merged, make_result("NVIDIA GeForce RTX 3060", 12288, scale=2.0), None, prices)
    merged = merge_results(merged, make_result("NVIDIA H200", 143771, scale=0.5), None, prices)
    df = results_table(merged)
    assert list(df["name"]) == ["RTX 3060 (12 GB)", "RTX 4090 (24 GB)", "NVIDIA H200"]
    assert {"fps", "real_time_factor", "cost_per_output_minute", "price_per_hour", "peak_vram_mib",
            "best_batch_size"} <= set(df.columns)
    assert results_table(targets).empty


# ----------------------------------------------------------------------------------- chart


def test_chart_is_a_real_png(tmp_path: Path, targets, prices) -> None:
    merged = merge_results(targets, make_result(), None, prices)
    merged = merge_results(merged, make_result("NVIDIA GeForce RTX 3060", 12288, scale=2.0), None, prices)
    merged = merge_results(merged, make_result("NVIDIA H200", 143771, scale=0.5), None, prices)
    png = plot_targets(merged, tmp_path / "charts" / "gpu_targets.png")
    assert png.stat().st_size > 10_000
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.size[0] == 1300 and img.size[1] >= 400


def test_chart_rows_align_and_every_class_is_shown(targets, prices) -> None:
    """Every class of gpu_targets.json has a row, measured or not; the fps and cost panels share one row
    order (a class's two bars on one line); profile, date and a real-time line are on the chart."""
    import matplotlib.pyplot as plt

    from benchmarks.chart import chart_table, draw_targets, real_time_fps

    merged = merge_results(targets, make_result(), None, prices)  # the 4090
    merged = merge_results(merged, make_result("NVIDIA GeForce RTX 3060", 12288, scale=2.0), None, prices)
    merged = merge_results(merged, make_result("NVIDIA H200", 143771, scale=0.5), None, prices)  # local
    fig = draw_targets(merged)
    try:
        ax_fps, ax_cost = fig.axes[:2]
        rows = [t.get_text() for t in ax_fps.get_yticklabels()]
        assert len(rows) == len(targets) + 1  # the 10 Salad classes + the local H200
        assert {r.rstrip(" *") for r in rows} == {t["name"] for t in merged}
        assert ax_cost.get_shared_y_axes().joined(ax_fps, ax_cost)  # one y axis: rows line up
        table = chart_table(merged)
        assert list(table["measured"][:3]) == [True] * 3 and not table["measured"][3:].any()
        assert list(table["fps"][:3]) == sorted(table["fps"][:3], reverse=True)
        # the cost panel's bars sit on the rows of their classes
        for bar in ax_cost.patches:
            row = round(bar.get_y() + bar.get_height() / 2)
            assert not pd.isna(table["cost_per_output_minute"][row])
        texts = " ".join([t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
                         + [fig._suptitle.get_text()])
        assert "not measured" in texts and "no price" in texts  # the local H200 has no Salad price
        assert "profile full-random" in texts and "3 of 11 classes measured" in texts
        assert "2026-11-01" in texts  # the date of the numbers
        realtime = real_time_fps(table)
        assert realtime == pytest.approx(25.0)
        assert any(list(line.get_xdata()) == [realtime, realtime] for line in ax_fps.get_lines())
    finally:
        plt.close(fig)


def test_chart_without_results(tmp_path: Path, targets) -> None:
    png = plot_targets(targets, tmp_path / "empty.png")
    with Image.open(png) as img:
        assert img.size[0] == 1300
    from benchmarks.chart import _provenance, chart_table

    table = chart_table(targets)
    assert len(table) == len(targets) and not table["measured"].any()
    assert _provenance(table[table["measured"]], len(table)) == "none of 10 classes measured yet"


def test_summary_records_the_fixed_per_job_overhead() -> None:
    """job_overhead_s = warm job wall − streamed render (what the estimate adds once per job)."""
    result = make_result()
    assert benchmark_summary(result, None)["job_overhead_s"] == 0.0  # no job wall measured: none known
    entry = SweepEntry.from_measurements(batch_size=16, mode="graphs", frames=250, output_fps=25.0,
                                         end_to_end_s=5.0, model_only_s=2.5, floor_s=2.0, warm_wall_s=7.5)
    result = result.model_copy(update={"sweep": [entry]})
    assert benchmark_summary(result, None)["job_overhead_s"] == pytest.approx(2.5)
    # measured by the benchmark (a one-frame job less its model time): that number wins
    measured = entry.model_copy(update={"job_overhead_s": 0.12})
    result = result.model_copy(update={"sweep": [measured]})
    assert benchmark_summary(result, None)["job_overhead_s"] == pytest.approx(0.12)
