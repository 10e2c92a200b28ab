"""Salad classes, prices, and the autoscaling decision.

Each Salad GPU class has its own job queue and container group (tasks.salad_provision); a job's route
(`salad:<class id>`) is fixed when it is submitted, by the ranking below (`cheapest_salad_class`). The
scaler therefore sizes every class's group for that class's own demand.

Ranking (`measured_classes`): a class qualifies with an id (not local) and a measured `benchmark`; its
price per hour is today's price (salad_prices.json, batch priority) when given, else the one recorded with
the benchmark; cost per output minute = price / 60 × real_time_factor. Cheapest first, ties → higher fps;
an unknown price ranks after every known one. `meets_target` marks real_time_factor ≤ the target.

Demand of a class (`ClassDemand.demand`) = the larger of its Prefect runs that are not finished
(Scheduled, Pending or Running in pool `salad`, work queue = class id: queued for dispatch or dispatched
and not done, each needing a container) and the Salad queue's `current_queue_length` (waiting jobs,
which also counts work queued in Salad by anything but the orchestrator). The orchestrator's own jobs
appear in both counts, so the larger one is taken rather than the sum.

Rule (pure, `decide_fleet`): desired = clamp(ceil(demand / jobs_per_replica), min_replicas, max_replicas)
per class. A class whose demand or replica count could not be read keeps its current count (never scale
blindly). Only groups whose count changes are PATCHed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from pydantic import BaseModel, Field

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)


# ------------------------------------------------------------------- inputs: targets and prices


class ClassPrice(BaseModel):
    """One class's recorded price, USD per GPU-hour, per Salad priority."""

    id: Optional[str] = None
    name: str
    high: Optional[float] = Field(default=None, ge=0)
    batch: Optional[float] = Field(default=None, ge=0)


class PriceList(BaseModel):
    """`salad_prices.json`: {"source": …, "prices": [ClassPrice, …]}."""

    source: Optional[str] = None
    prices: list[ClassPrice] = Field(default_factory=list)

    def lookup(self, class_id: Optional[str], name: Optional[str] = None) -> Optional[ClassPrice]:
        """The price of a class by id, else by exact name; None when not listed."""
        if class_id:
            for price in self.prices:
                if price.id == class_id:
                    return price
        if name:
            for price in self.prices:
                if price.name == name:
                    return price
        return None

    def per_hour(self, priority: str = "batch") -> dict[str, float]:
        """class id → USD per hour at one priority (classes without that price are left out)."""
        out: dict[str, float] = {}
        for price in self.prices:
            value = getattr(price, priority)
            if price.id and value is not None:
                out[price.id] = float(value)
        return out


def read_targets(path: PathLike) -> list[dict[str, Any]]:
    """Read gpu_targets.json: a list of objects that each have at least a string `name`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of GPU classes")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{path}: entry {i} is not an object with a string 'name'")
    return data


def read_prices(path: PathLike) -> PriceList:
    """Read salad_prices.json."""
    return PriceList.model_validate_json(Path(path).read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------- the decision


class ScalingPolicy(BaseModel):
    """Bounds of the scaler, per class."""

    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=10, ge=0)
    jobs_per_replica: int = Field(default=1, ge=1, description="unfinished jobs one replica should absorb")


class GpuClassRef(BaseModel):
    """Which GPU class a record is about: Salad's class id, and the name people read in reports."""

    class_id: str
    name: str


class Candidate(GpuClassRef):
    """A measured class, with the numbers it is ranked on."""

    fps: float
    real_time_factor: float
    price_per_hour: Optional[float] = None
    cost_per_output_minute: Optional[float] = None
    meets_target: bool = False


def salad_classes(targets: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The entries of gpu_targets.json that are Salad classes (have an id, are not a local GPU)."""
    return [t for t in targets if t.get("id") and not t.get("local")]


def _candidate(entry: Mapping[str, Any], prices: Optional[Mapping[str, float]]) -> Optional[Candidate]:
    bench = entry.get("benchmark") or {}
    try:
        rtf = float(bench["real_time_factor"])
        fps = float(bench.get("fps") or 0.0)
    except (KeyError, TypeError, ValueError):
        return None
    price = prices.get(entry["id"]) if prices else None
    if price is None:
        price = bench.get("price_per_hour")
    cost = None if price is None else float(price) / 60.0 * rtf
    return Candidate(
        class_id=entry["id"],
        name=entry["name"],
        fps=fps,
        real_time_factor=rtf,
        price_per_hour=None if price is None else float(price),
        cost_per_output_minute=cost,
    )


def _rank_key(c: Candidate) -> tuple[int, float, float]:
    unknown = c.cost_per_output_minute is None
    return (1 if unknown else 0, 0.0 if unknown else c.cost_per_output_minute, -c.fps)


def measured_classes(
    targets: list[Mapping[str, Any]],
    prices: Optional[Mapping[str, float]] = None,
    target_rtf: float = 1.0,
) -> list[Candidate]:
    """Every Salad class (an id, not local) with a benchmark, cheapest per output minute first.

    The routing policy and the estimate read the same ranking, so `auto` and `/v1/avatar/estimate`
    name the same class.
    """
    out = []
    for entry in salad_classes(targets):
        cand = _candidate(entry, prices)
        if cand is None:
            continue
        cand.meets_target = cand.real_time_factor <= target_rtf
        out.append(cand)
    return sorted(out, key=_rank_key)


def cheapest_salad_class(
    targets: list[Mapping[str, Any]],
    prices: Optional[Mapping[str, float]] = None,
    target_rtf: float = 1.0,
) -> Optional[Candidate]:
    """The class `auto` routes Salad work to: the cheapest measured class meeting target_rtf, or None."""
    return next((c for c in measured_classes(targets, prices, target_rtf) if c.meets_target), None)


def desired_count(demand: int, policy: ScalingPolicy) -> int:
    """clamp(ceil(demand / jobs_per_replica), min, max)."""
    want = math.ceil(max(0, demand) / policy.jobs_per_replica)
    return max(policy.min_replicas, min(policy.max_replicas, want))


class ClassDemand(GpuClassRef):
    """What one class has to do; None where a count could not be read."""

    queue: str
    container_group: str
    prefect_runs: Optional[int] = None
    salad_waiting: Optional[int] = None
    error: Optional[str] = None

    @property
    def demand(self) -> Optional[int]:
        if self.error or (self.prefect_runs is None and self.salad_waiting is None):
            return None
        return max(self.prefect_runs or 0, self.salad_waiting or 0)


class ClassScale(GpuClassRef):
    """The decision for one class's container group."""

    container_group: str
    prefect_runs: Optional[int]
    salad_waiting: Optional[int]
    demand: Optional[int]
    current: Optional[int]
    desired: Optional[int]
    reason: str


def decide_fleet(
    demands: list[ClassDemand],
    current_replicas: Mapping[str, Optional[int]],
    policy: ScalingPolicy,
) -> list[ClassScale]:
    """Size each class's group for its demand (see the module doc); pure."""
    if policy.min_replicas > policy.max_replicas:
        raise ValueError("min_replicas must not exceed max_replicas")
    out = []
    for d in demands:
        current = current_replicas.get(d.container_group)
        demand = d.demand
        if demand is None or current is None:
            why = d.error or "replica count unreadable"
            desired, reason = current, f"{why}; keeping the current count"
        else:
            desired = desired_count(demand, policy)
            reason = (f"{demand} unfinished job(s) / {policy.jobs_per_replica} per replica → {desired} "
                      f"(bounds {policy.min_replicas}..{policy.max_replicas})")
        out.append(ClassScale(class_id=d.class_id, name=d.name, container_group=d.container_group,
                              prefect_runs=d.prefect_runs, salad_waiting=d.salad_waiting, demand=demand,
                              current=current, desired=desired, reason=reason))
    return out


def fleet_changes(decisions: list[ClassScale]) -> dict[str, int]:
    """Groups whose desired count differs from the current one (what to PATCH)."""
    return {d.container_group: d.desired for d in decisions
            if d.desired is not None and d.current is not None and d.desired != d.current}


class ScalePass(BaseModel):
    """The outcome of one scaling pass."""

    decisions: list[ClassScale]
    changes: dict[str, int]
    applied: dict[str, int]
    dry_run: bool


def run_scaling_pass(
    *,
    classes: list[ClassDemand],
    read_prefect_runs: Callable[[list[str]], dict[str, int]],
    read_queue_length: Callable[[str], int],
    read_replicas: Callable[[str], int],
    write_replicas: Callable[[str, int], int],
    policy: ScalingPolicy,
    dry_run: bool = True,
) -> ScalePass:
    """Read every class's demand and replicas, decide, and (unless dry_run) PATCH the changed groups.

    `classes` name each class's queue and group (counts unset). The I/O is injected: the flow passes
    Prefect tasks, tests plain functions. A failed read of one class is recorded on that class only.
    """
    try:
        runs = read_prefect_runs([c.class_id for c in classes])
        runs_error = None
    except Exception as exc:  # noqa: BLE001 - Salad's count still sizes the groups
        runs, runs_error = {}, f"Prefect unreadable ({type(exc).__name__})"
        log.warning("scale: %s: %s", runs_error, exc)
    demands, current = [], {}
    for c in classes:
        d = c.model_copy(update={"prefect_runs": runs.get(c.class_id, 0) if runs_error is None else None})
        try:
            d.salad_waiting = read_queue_length(c.queue)
        except Exception as exc:  # noqa: BLE001 - one unprovisioned class must not stop the others
            d.error = f"Salad queue {c.queue} unreadable ({exc})"
        try:
            current[c.container_group] = read_replicas(c.container_group)
        except Exception as exc:  # noqa: BLE001
            current[c.container_group] = None
            d.error = d.error or f"container group {c.container_group} unreadable ({exc})"
        demands.append(d)
    decisions = decide_fleet(demands, current, policy)
    changes = fleet_changes(decisions)
    applied: dict[str, int] = {}
    if not dry_run:
        for group, n in changes.items():
            applied[group] = write_replicas(group, n)
    return ScalePass(decisions=decisions, changes=changes, applied=applied, dry_run=dry_run)


def decision_markdown(result: ScalePass) -> str:
    """A markdown report of one scaling pass (for a Prefect artifact)."""
    mode = "dry run (nothing changed)" if result.dry_run else "applied"
    lines = [
        "# Autoscaling decision",
        "",
        f"- mode: {mode}",
        "",
        "| class | container group | Prefect runs | Salad waiting | current | desired | change | why |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]

    def show(v: Optional[int]) -> str:
        return "?" if v is None else str(v)

    for d in result.decisions:
        if d.container_group in result.applied:
            change = "patched"
        elif d.container_group in result.changes:
            change = "would patch" if result.dry_run else "pending"
        else:
            change = "—"
        lines.append(f"| {d.name} | {d.container_group} | {show(d.prefect_runs)} | {show(d.salad_waiting)} | "
                     f"{show(d.current)} | {show(d.desired)} | {change} | {d.reason} |")
    return "\n".join(lines) + "\n"
