"""`POST /v1/avatar/estimate` (DESIGN §11): which GPU class a job would run on, how long, and what it costs.

* Class: the one the `auto` route would send Salad work to — the cheapest measured class whose
  real-time factor meets the target (tasks.scaling.cheapest_salad_class, the same ranking the router
  reads) — else, when no class meets it, the fastest measured class (the job still runs, just slower).
* Seconds: audio seconds × that class's measured real_time_factor + its measured per-job overhead
  (`benchmark.job_overhead_s`; 0 for a benchmark recorded before that field existed).
* Price: USD per hour from salad_prices.json at batch priority (the priority the container groups run
  at), else the price recorded with the benchmark in gpu_targets.json; `cost_usd` is null when neither
  knows the class. cost = seconds / 3600 × price.
* No measured class at all → :class:`NoMeasuredClass` (the API answers 422 with its message).

The benchmark is not per resolution: `resolution` is validated and echoed, and the numbers are those of
the benchmark workload. Pure functions; the caller reads the two files (tasks.scaling.read_targets/prices).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, Field, field_validator

from musetalk_engine.framing import validate_framing
from orchestrator.schemas import media_rule
from tasks.scaling import Candidate, PriceList, cheapest_salad_class, measured_classes


class NoMeasuredClass(ValueError):
    """gpu_targets.json has no benchmarked Salad class, so no estimate can be made."""


class EstimateRequest(BaseModel):
    """The request body."""

    audio_seconds: float = Field(gt=0, le=24 * 3600, description="length of the speech audio")
    resolution: Optional[str] = Field(default=None, description='one a job takes, e.g. "720p", "1080p"')

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: Optional[str]) -> Optional[str]:
        # the rule a job's own resolution meets: an estimate for one that POST /v1/avatar/jobs refuses is no use
        media_rule(validate_framing, None, value)
        return value


class Estimate(BaseModel):
    """The answer: `gpu_class`, `seconds`, `cost_usd` (the contract) and the numbers behind them."""

    gpu_class: str
    gpu_class_id: str
    seconds: float
    cost_usd: Optional[float]
    real_time_factor: float
    job_overhead_s: float
    price_per_hour: Optional[float]
    price_source: Optional[Literal["salad_prices.json", "gpu_targets.json"]]
    basis: Literal["cheapest meeting the real-time target", "fastest measured"]
    resolution: Optional[str] = None


def _entry(targets: list[Mapping[str, Any]], class_id: str) -> Mapping[str, Any]:
    return next(t for t in targets if t.get("id") == class_id)


def estimate_job(
    request: EstimateRequest,
    targets: list[Mapping[str, Any]],
    prices: Optional[PriceList] = None,
    *,
    target_rtf: float = 1.0,
) -> Estimate:
    """The estimate for one job (see the module doc); raises NoMeasuredClass when nothing was measured."""
    batch_prices = prices.per_hour("batch") if prices else {}
    chosen: Optional[Candidate] = cheapest_salad_class(targets, batch_prices, target_rtf)
    basis = "cheapest meeting the real-time target"
    if chosen is None:
        measured = measured_classes(targets, batch_prices, target_rtf)
        if not measured:
            raise NoMeasuredClass(
                "no GPU class in gpu_targets.json has benchmark results yet; run the benchmark flow "
                "(python -m benchmarks) for at least one Salad class before asking for an estimate")
        chosen = max(measured, key=lambda c: (-c.real_time_factor, c.fps))
        basis = "fastest measured"
    bench = _entry(targets, chosen.class_id).get("benchmark") or {}
    overhead = float(bench.get("job_overhead_s") or 0.0)
    seconds = request.audio_seconds * chosen.real_time_factor + overhead
    if chosen.class_id in batch_prices:
        source: Optional[str] = "salad_prices.json"
    elif chosen.price_per_hour is not None:
        source = "gpu_targets.json"
    else:
        source = None
    price = chosen.price_per_hour
    return Estimate(
        gpu_class=chosen.name,
        gpu_class_id=chosen.class_id,
        seconds=round(seconds, 3),
        cost_usd=None if price is None else round(seconds / 3600.0 * price, 6),
        real_time_factor=chosen.real_time_factor,
        job_overhead_s=overhead,
        price_per_hour=price,
        price_source=source,
        basis=basis,
        resolution=request.resolution,
    )
