"""`gpu_targets.json`: the operator's list of Salad GPU classes, plus measured results per class.

The file stays a JSON list of `{"id", "name", …}` objects. Merging a `BenchmarkResult` adds or replaces
one `benchmark` object on the measured class and touches nothing else (other classes, their results,
unknown keys, the order).

Class matching, in order: an explicit class id; the result's Salad class name (`gpu.gpu_class`); the
NVML device name normalised and checked against the class names (memory picks among same-model
classes). A GPU that is no Salad class (e.g. "NVIDIA H200" on a local box) is appended as
`{"id": null, "name": <NVML name>, "local": true, "benchmark": …}`: its numbers stay visible in tables
and charts, while scaling ignores it (no id → no container group). Re-merging it replaces that entry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from benchmarks.schema import BenchmarkResult
from musetalk_engine.files import atomic_write
from tasks.scaling import ClassPrice, PathLike, PriceList, read_prices, read_targets

_NAME_RE = re.compile(r"^\s*(?P<model>.+?)\s*\(\s*(?P<gb>\d+(?:\.\d+)?)\s*GB\s*\)\s*$", re.IGNORECASE)
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}

__all__ = [
    "ClassPrice",
    "PriceList",
    "benchmark_summary",
    "match_class",
    "merge_into_file",
    "merge_results",
    "normalise_gpu_name",
    "results_table",
    "write_targets",
]


# ---------------------------------------------------------------------------------------- files


def write_targets(path: PathLike, targets: list[dict[str, Any]]) -> Path:
    """Write the list atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(targets, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=True)


# ------------------------------------------------------------------------------------- matching


def normalise_gpu_name(name: str) -> str:
    """"NVIDIA GeForce RTX 4070 Ti SUPER" → "rtx 4070 ti super"; "RTX 4090 (24 GB)" → "rtx 4090"."""
    m = _NAME_RE.match(name)
    if m:
        name = m.group("model")
    words = [w for w in re.split(r"[\s_]+", name.strip().lower()) if w and w not in _VENDOR_WORDS]
    return " ".join(words)


def class_memory_gb(name: str) -> Optional[float]:
    """The "(24 GB)" part of a Salad class name, or None."""
    m = _NAME_RE.match(name)
    return float(m.group("gb")) if m else None


def match_class(
    gpu_name: str, memory_mib: Optional[int], targets: Iterable[dict[str, Any]]
) -> Optional[dict[str, Any]]:
    """The Salad class entry for an NVML device name, or None.

    The model part must match exactly ("RTX 4070" never matches "RTX 4070 Ti"). When several classes
    share the model (e.g. 8 and 16 GB variants) the memory picks the closest; without memory that is
    ambiguous and gives None. A lone same-model class is accepted when the memory is within 15 %
    (NVML reports a little under the nominal size).
    """
    wanted = normalise_gpu_name(gpu_name)
    candidates = [
        t for t in targets if t.get("id") is not None and normalise_gpu_name(t["name"]) == wanted
    ]
    if not candidates:
        return None
    sized = [(t, class_memory_gb(t["name"])) for t in candidates]
    if memory_mib is None:
        return candidates[0] if len(candidates) == 1 else None
    have_gb = memory_mib / 1024.0
    best, best_gb = min(
        sized, key=lambda tg: abs((tg[1] if tg[1] is not None else have_gb) - have_gb)
    )
    if best_gb is not None and abs(best_gb - have_gb) > 0.15 * best_gb:
        return None
    return best


def _find_entry(
    targets: list[dict[str, Any]], result: BenchmarkResult, class_id: Optional[str]
) -> Optional[int]:
    if class_id:
        for i, t in enumerate(targets):
            if t.get("id") == class_id:
                return i
        raise ValueError(f"class id {class_id!r} is not in gpu_targets.json")
    if result.gpu.gpu_class:
        for i, t in enumerate(targets):
            if t.get("id") is not None and t["name"] == result.gpu.gpu_class:
                return i
    matched = match_class(result.gpu.name, result.gpu.memory_mib, targets)
    if matched is not None:
        return next(i for i, t in enumerate(targets) if t is matched)
    for i, t in enumerate(targets):  # a local (non-Salad) entry from an earlier merge
        if t.get("id") is None and t.get("local") and t["name"] == result.gpu.name:
            return i
    return None


# -------------------------------------------------------------------------------------- merging


def benchmark_summary(
    result: BenchmarkResult, price: Optional[ClassPrice]
) -> dict[str, Any]:
    """The `benchmark` object stored on a class, from the best sweep entry.

    price_per_hour is the Salad `batch` priority price (the cheapest, fine for queue work);
    `price_per_hour_high` is recorded too. cost_per_output_minute = price_per_hour / 60 ×
    real_time_factor (GPU-minutes per output minute × price per GPU-minute); null when no price.
    """
    best = result.best
    batch_price = price.batch if price else None
    high_price = price.high if price else None

    def cost(per_hour: Optional[float]) -> Optional[float]:
        return None if per_hour is None else round(per_hour / 60.0 * best.real_time_factor, 8)

    return {
        "fps": round(best.fps, 3),
        "model_fps": round(best.model_fps, 3),
        "real_time_factor": round(best.real_time_factor, 4),
        "warm_wall_over_generation": round(best.warm_wall_over_generation, 4),
        "overhead_ratio": round(best.overhead_ratio, 4),
        "peak_vram_mib": best.peak_vram_mib,
        "peak_vram_nvml_mib": best.peak_vram_nvml_mib,
        "best_batch_size": best.batch_size,
        "mode": best.mode,
        "stage_times": best.stage_times.model_dump(),
        "cold_start_s": result.cold_start_s,
        # The fixed part of a warm job, added once per job to audio seconds × real_time_factor by the
        # estimate: measured by the benchmark (a one-frame job less its model time); for results from
        # before that, the warm job's wall time beyond the streamed render
        "job_overhead_s": round(best.job_overhead_s if best.job_overhead_s is not None else
                                max(0.0, best.warm_wall_over_generation - best.real_time_factor)
                                * best.output_seconds, 3),
        "price_priority": "batch",
        "price_per_hour": batch_price,
        "price_per_hour_high": high_price,
        "cost_per_output_minute": cost(batch_price),
        "cost_per_output_minute_high": cost(high_price),
        "date": result.created_utc.isoformat(),
        "profile": result.profile,
        "gpu_name": result.gpu.name,
        "driver": result.gpu.driver,
        "software": result.software.model_dump(),
    }


def merge_results(
    targets: list[dict[str, Any]],
    result: BenchmarkResult,
    class_id: Optional[str] = None,
    prices: Optional[PriceList] = None,
) -> list[dict[str, Any]]:
    """A new list with `result` merged into its class (see the module docstring); input untouched."""
    out = [dict(t) for t in targets]
    index = _find_entry(out, result, class_id)
    if index is None:
        entry: dict[str, Any] = {"id": None, "name": result.gpu.name, "local": True}
        out.append(entry)
        index = len(out) - 1
    entry = out[index]
    price = prices.lookup(entry.get("id"), entry["name"]) if prices and entry.get("id") else None
    entry["benchmark"] = benchmark_summary(result, price)
    return out


# -------------------------------------------------------------------------------------- tables


RESULT_COLUMNS = [
    "name",
    "id",
    "fps",
    "real_time_factor",
    "cost_per_output_minute",
    "price_per_hour",
    "peak_vram_mib",
    "best_batch_size",
    "mode",
    "profile",
    "date",
]


def results_table(targets: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Measured classes only, cheapest per output minute first (unknown cost last, then by fps)."""
    rows = []
    for t in targets:
        bench = t.get("benchmark")
        if not bench:
            continue
        row = {"name": t["name"], "id": t.get("id")}
        row.update({c: bench.get(c) for c in RESULT_COLUMNS[2:]})
        rows.append(row)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if df.empty:
        return df
    for col in ("fps", "real_time_factor", "cost_per_output_minute", "price_per_hour", "peak_vram_mib"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.sort_values(
        ["cost_per_output_minute", "fps"], ascending=[True, False], na_position="last"
    )
    return df.reset_index(drop=True)


def merge_into_file(path: PathLike, results: Iterable[tuple[Optional[str], BenchmarkResult]],
                    prices_path: Optional[PathLike] = None) -> list[dict[str, Any]]:
    """Merge each (class id or None, result) into the gpu_targets.json at ``path``, keeping every other
    entry, with prices from ``prices_path`` when that file exists; returns what was written."""
    prices = read_prices(prices_path) if prices_path and Path(prices_path).is_file() else None
    targets = read_targets(path)
    for class_id, result in results:
        targets = merge_results(targets, result, class_id=class_id, prices=prices)
    write_targets(path, targets)
    return targets
