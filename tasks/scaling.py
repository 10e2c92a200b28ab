"""Autoscaling decision: which Salad GPU class serves the queue, and how many replicas.

Rule (pure, no I/O — `decide_scaling`):

1. Qualifying classes have an id, a measured `benchmark` with real_time_factor ≤ target_rtf, and a
   container group mapped to their id. Local (id-less) entries never qualify.
2. The price per hour is `prices[class_id]` when given (today's price), else the price recorded with the
   benchmark; cost per output minute = price / 60 × real_time_factor. Candidates are ranked by that cost,
   ties → higher fps; a class with no known price ranks after every priced one (it is still usable when
   nothing priced qualifies), among those → higher fps.
3. The chosen group gets clamp(ceil(queue_length / jobs_per_replica), min_replicas, max_replicas); every
   other mapped group goes to `others_min_replicas` (0 by default), so one class serves the queue at a time.
4. No candidate → keep every current replica count unchanged and say why (never scale down blindly).

`run_scaling_pass` wires the rule to injected I/O (read queue, read replicas, write replicas) for the
flow (Prefect tasks) and for tests (a client). `read_targets`/`read_prices` load gpu_targets.json and
salad_prices.json here so that flows need not import `benchmarks/`.

`changes()` lists only the groups whose replica count differs from the current one, so an unchanged
group is never PATCHed. Known limit: the queue length counts waiting jobs only; the scale-down to
`min_replicas` may stop instances whose running jobs Salad then re-queues (jobs are idempotent per id).
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
    """Bounds and target of the scaler."""

    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=10, ge=0)
    jobs_per_replica: int = Field(default=2, ge=1, description="waiting jobs one replica should absorb")
    target_rtf: float = Field(default=1.0, gt=0, description="max wall seconds per output second")
    others_min_replicas: int = Field(default=0, ge=0)


class Candidate(BaseModel):
    """A class considered by the decision, with the numbers it was ranked on."""

    class_id: str
    name: str
    container_group: Optional[str] = None  # None where only the class is ranked (routing, estimates)
    fps: float
    real_time_factor: float
    price_per_hour: Optional[float] = None
    cost_per_output_minute: Optional[float] = None
    meets_target: bool = False


class ScalingDecision(BaseModel):
    """What the scaler wants, and why."""

    queue_length: int
    chosen_class_id: Optional[str] = None
    chosen_class_name: Optional[str] = None
    container_group: Optional[str] = None
    desired_replicas: dict[str, int] = Field(default_factory=dict)
    reason: str
    candidates: list[Candidate] = Field(default_factory=list)

    def changes(self, current_replicas: Mapping[str, int]) -> dict[str, int]:
        """Groups whose desired count differs from the current one (what to PATCH)."""
        return {
            group: n
            for group, n in self.desired_replicas.items()
            if current_replicas.get(group) != n
        }


def _candidate(
    entry: Mapping[str, Any],
    group: Optional[str],
    prices: Optional[Mapping[str, float]],
) -> Optional[Candidate]:
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
        container_group=group,
        fps=fps,
        real_time_factor=rtf,
        price_per_hour=None if price is None else float(price),
        cost_per_output_minute=cost,
    )


def _rank_key(c: Candidate) -> tuple[int, float, float]:
    unknown = c.cost_per_output_minute is None
    return (1 if unknown else 0, 0.0 if unknown else c.cost_per_output_minute, -c.fps)


def desired_count(queue_length: int, policy: ScalingPolicy) -> int:
    """clamp(ceil(queue_length / jobs_per_replica), min, max)."""
    want = math.ceil(max(0, queue_length) / policy.jobs_per_replica)
    return max(policy.min_replicas, min(policy.max_replicas, want))


def measured_classes(
    targets: list[Mapping[str, Any]],
    prices: Optional[Mapping[str, float]] = None,
    target_rtf: float = 1.0,
) -> list[Candidate]:
    """Every Salad class (an id, not local) with a benchmark, cheapest per output minute first (rule 2).

    `meets_target` marks the classes with real_time_factor ≤ target_rtf. The routing policy and the
    estimate read the same ranking, so `auto` and `/v1/avatar/estimate` name the same class.
    """
    out = []
    for entry in targets:
        if not entry.get("id") or entry.get("local"):
            continue
        cand = _candidate(entry, None, prices)
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


def decide_scaling(
    queue_length: int,
    targets: list[Mapping[str, Any]],
    *,
    container_groups: Mapping[str, str],
    current_replicas: Mapping[str, int],
    min_replicas: int = 0,
    max_replicas: int = 10,
    jobs_per_replica: int = 2,
    target_rtf: float = 1.0,
    prices: Optional[Mapping[str, float]] = None,
    others_min_replicas: int = 0,
) -> ScalingDecision:
    """Pick the cheapest class that meets `target_rtf` and size its group for the queue (see module doc)."""
    policy = ScalingPolicy(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        jobs_per_replica=jobs_per_replica,
        target_rtf=target_rtf,
        others_min_replicas=others_min_replicas,
    )
    if policy.min_replicas > policy.max_replicas:
        raise ValueError("min_replicas must not exceed max_replicas")

    considered: list[Candidate] = []
    too_slow: list[str] = []
    for entry in targets:
        class_id = entry.get("id")
        if not class_id or entry.get("local") or class_id not in container_groups:
            continue
        cand = _candidate(entry, container_groups[class_id], prices)
        if cand is None:
            continue
        cand.meets_target = cand.real_time_factor <= policy.target_rtf
        considered.append(cand)
        if not cand.meets_target:
            too_slow.append(f"{cand.name} (rtf {cand.real_time_factor:.2f})")

    qualifying = sorted((c for c in considered if c.meets_target), key=_rank_key)
    if not qualifying:
        why = (
            f"no class with a container group and a benchmark meets rtf ≤ {policy.target_rtf:g}"
            + (f"; too slow: {', '.join(too_slow)}" if too_slow else "")
            + "; keeping current replicas"
        )
        return ScalingDecision(
            queue_length=queue_length,
            desired_replicas=dict(current_replicas),
            reason=why,
            candidates=considered,
        )

    chosen = qualifying[0]
    n = desired_count(queue_length, policy)
    desired = {group: policy.others_min_replicas for group in container_groups.values()}
    desired[chosen.container_group] = n
    cost = (
        f"{chosen.cost_per_output_minute * 100:.3f}¢/output min"
        if chosen.cost_per_output_minute is not None
        else "price unknown"
    )
    reason = (
        f"{chosen.name}: cheapest of {len(qualifying)} class(es) meeting rtf ≤ {policy.target_rtf:g} "
        f"(rtf {chosen.real_time_factor:.2f}, {chosen.fps:.0f} fps, {cost}); queue {queue_length} / "
        f"{policy.jobs_per_replica} per replica → {n} replica(s) "
        f"(bounds {policy.min_replicas}..{policy.max_replicas})"
    )
    return ScalingDecision(
        queue_length=queue_length,
        chosen_class_id=chosen.class_id,
        chosen_class_name=chosen.name,
        container_group=chosen.container_group,
        desired_replicas=desired,
        reason=reason,
        candidates=considered,
    )


class ScalePass(BaseModel):
    """The outcome of one scaling pass."""

    decision: ScalingDecision
    current_replicas: dict[str, int]
    changes: dict[str, int]
    applied: dict[str, int]
    dry_run: bool


def run_scaling_pass(
    *,
    queue_name: str,
    container_groups: Mapping[str, str],
    targets: list[Mapping[str, Any]],
    read_queue_length: Callable[[str], int],
    read_replicas: Callable[[list[str]], dict[str, int]],
    write_replicas: Callable[[str, int], int],
    dry_run: bool = True,
    prices: Optional[Mapping[str, float]] = None,
    **policy: Any,
) -> ScalePass:
    """Read the queue and replicas, decide, and (unless dry_run) write only the changed groups.

    The three I/O operations are injected: the flow passes its Prefect tasks, tests a client's methods.
    `policy` takes decide_scaling's keyword bounds (min_replicas, max_replicas, jobs_per_replica, …).
    """
    queue_length = read_queue_length(queue_name)
    current = read_replicas(sorted(set(container_groups.values())))
    decision = decide_scaling(
        queue_length,
        targets,
        container_groups=container_groups,
        current_replicas=current,
        prices=prices,
        **policy,
    )
    changes = decision.changes(current)
    log.debug("scale decision: %s; changes %s%s", decision.reason, changes or "none",
             " (dry run)" if dry_run else "")
    applied: dict[str, int] = {}
    if not dry_run:
        for group, n in changes.items():
            applied[group] = write_replicas(group, n)
    return ScalePass(
        decision=decision, current_replicas=current, changes=changes, applied=applied, dry_run=dry_run
    )


def decision_markdown(
    decision: ScalingDecision,
    current_replicas: Mapping[str, int],
    applied: Mapping[str, int],
    dry_run: bool,
) -> str:
    """A markdown report of one scaling pass (for a Prefect artifact)."""
    mode = "dry run (nothing changed)" if dry_run else "applied"
    lines = [
        "# Autoscaling decision",
        "",
        f"- queue length: **{decision.queue_length}**",
        f"- chosen class: **{decision.chosen_class_name or '—'}**"
        + (f" → `{decision.container_group}`" if decision.container_group else ""),
        f"- mode: {mode}",
        f"- reason: {decision.reason}",
        "",
        "| container group | current | desired | change |",
        "|---|---:|---:|---|",
    ]
    for group in sorted(set(current_replicas) | set(decision.desired_replicas)):
        cur = current_replicas.get(group)
        want = decision.desired_replicas.get(group, cur)
        if group in applied:
            change = "patched"
        elif cur != want:
            change = "would patch" if dry_run else "pending"
        else:
            change = "—"
        lines.append(f"| {group} | {cur if cur is not None else '?'} | {want} | {change} |")
    if decision.candidates:
        lines += [
            "",
            "| class | rtf | meets target | fps | $/h | ¢/output min |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for c in sorted(decision.candidates, key=_rank_key):
            price = f"{c.price_per_hour:.2f}" if c.price_per_hour is not None else "?"
            cost = (
                f"{c.cost_per_output_minute * 100:.3f}" if c.cost_per_output_minute is not None else "?"
            )
            ok = "yes" if c.meets_target else "no"
            lines.append(
                f"| {c.name} | {c.real_time_factor:.2f} | {ok} | {c.fps:.0f} | {price} | {cost} |"
            )
    return "\n".join(lines) + "\n"
