"""`/v1/avatar/estimate` logic: class choice (same ranking as `auto`), seconds, price sources, no data."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.estimate import EstimateRequest, NoMeasuredClass, estimate_job
from tasks.scaling import cheapest_salad_class, read_prices, read_targets

ROOT = Path(__file__).resolve().parent.parent
PRICES = read_prices(ROOT / "salad_prices.json")  # the operator's recorded prices
ID_4090 = "ed563892-aacd-40f5-80b7-90c9be6c759b"
ID_3090 = "a5db5c50-cbcb-4596-ae80-6a0c8090d80f"
ID_3060 = "f51baccc-dc95-40fb-a5d1-6d0ee0db31d2"


def bench(rtf: float, fps: float, price: float | None = None, overhead: float | None = None) -> dict:
    out = {"real_time_factor": rtf, "fps": fps, "price_per_hour": price}
    if overhead is not None:
        out["job_overhead_s"] = overhead
    return out


TARGETS = [
    {"id": ID_4090, "name": "RTX 4090 (24 GB)", "benchmark": bench(0.5, 60, 0.30, overhead=3.0)},
    {"id": ID_3090, "name": "RTX 3090 (24 GB)", "benchmark": bench(0.8, 40, 0.25, overhead=4.0)},
    {"id": ID_3060, "name": "RTX 3060 (12 GB)", "benchmark": bench(1.6, 20, 0.08, overhead=6.0)},
    {"id": "0798d5aa-2d17-42ee-81b8-ea92e3bc088e", "name": "RTX 4070 (12 GB)"},  # never measured
    {"id": None, "name": "NVIDIA H200", "local": True, "benchmark": bench(0.05, 900)},  # not a Salad class
]


def test_picks_the_class_auto_would_pick_and_prices_it_at_batch_priority() -> None:
    est = estimate_job(EstimateRequest(audio_seconds=60, resolution="720p"), TARGETS, PRICES)
    # batch $/h: 4090 0.16 × 0.5 = 0.080 per output hour, 3090 0.09 × 0.8 = 0.072, 3060 too slow (rtf 1.6)
    assert (est.gpu_class, est.gpu_class_id) == ("RTX 3090 (24 GB)", ID_3090)
    assert est.gpu_class_id == cheapest_salad_class(TARGETS, PRICES.per_hour("batch")).class_id
    assert est.seconds == pytest.approx(60 * 0.8 + 4.0)
    assert est.price_per_hour == 0.09 and est.price_source == "salad_prices.json"
    assert est.cost_usd == pytest.approx(52.0 / 3600 * 0.09, abs=1e-6)
    assert est.basis == "cheapest meeting the real-time target" and est.resolution == "720p"


def test_targets_file_price_when_the_price_list_lacks_the_class() -> None:
    est = estimate_job(EstimateRequest(audio_seconds=30), TARGETS, prices=None)
    # recorded prices: 4090 0.30 × 0.5 = 0.15, 3090 0.25 × 0.8 = 0.20 → the 4090
    assert est.gpu_class_id == ID_4090 and est.price_source == "gpu_targets.json"
    assert est.seconds == pytest.approx(30 * 0.5 + 3.0)
    assert est.cost_usd == pytest.approx(18.0 / 3600 * 0.30, abs=1e-6)


def test_fastest_measured_when_none_meets_the_target() -> None:
    est = estimate_job(EstimateRequest(audio_seconds=10), TARGETS, PRICES, target_rtf=0.2)
    assert est.gpu_class_id == ID_4090 and est.basis == "fastest measured"


def test_unknown_price_gives_no_cost_and_missing_overhead_counts_zero() -> None:
    targets = [{"id": "x-1", "name": "Some GPU (8 GB)", "benchmark": bench(0.9, 30)}]
    est = estimate_job(EstimateRequest(audio_seconds=100), targets, PRICES)
    assert est.seconds == pytest.approx(90.0) and est.job_overhead_s == 0.0
    assert est.cost_usd is None and est.price_per_hour is None and est.price_source is None


def test_no_measured_class_is_a_clear_error() -> None:
    operator_file = read_targets(ROOT / "gpu_targets.json")  # today: class list, no benchmarks yet
    with pytest.raises(NoMeasuredClass, match="no GPU class .* benchmark results"):
        estimate_job(EstimateRequest(audio_seconds=5), operator_file, PRICES)
    with pytest.raises(NoMeasuredClass):
        estimate_job(EstimateRequest(audio_seconds=5), [TARGETS[3], TARGETS[4]], PRICES)


@pytest.mark.parametrize("body", [{"audio_seconds": 0}, {"audio_seconds": -1}, {},
                                  {"audio_seconds": 5, "resolution": "big"}])
def test_bad_requests_are_validation_errors(body: dict) -> None:
    with pytest.raises(ValidationError):
        EstimateRequest.model_validate(body)
