"""Chart of gpu_targets.json: fps and cost per output minute for every GPU class, measured or not.

Both panels share one row per class in one order (fastest measured first, unmeasured classes after, by
name), so a class's throughput and cost bars sit on the same line. Each bar says which benchmark profile
and date produced it — a ``tiny`` or ``full-random`` number is a plumbing check, not a production figure,
and is drawn pale. The fps panel has a real-time line: right of it a class renders faster than the video
plays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.targets import RESULT_COLUMNS  # noqa: E402

DPI = 100
WIDTH_IN = 13.0
ROW_IN = 0.42  # per class; the figure grows with the class list so labels never overlap
MIN_HEIGHT_IN = 4.0
# Random-weight profiles measure the pipeline, not a production model: drawn pale, and said so.
PROFILE_COLOURS = {"real": ("#4C72B0", "#55A868"), "full-random": ("#A9BCDB", "#AFD3B8"),
                   "tiny": ("#D5DCE8", "#D7E9DB")}
UNKNOWN_PROFILE_COLOURS = ("#8C8C8C", "#B0B0B0")
DEFAULT_VIDEO_FPS = 25.0


def chart_table(targets: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per class in the chart's order: measured classes by fps (fastest first), then the
    unmeasured ones by name. Unmeasured rows have NaN results."""
    rows = []
    for t in targets:
        bench = t.get("benchmark") or {}
        row = {"name": t.get("name") or str(t.get("id")), "id": t.get("id"), "local": bool(t.get("local"))}
        row.update({c: bench.get(c) for c in RESULT_COLUMNS[2:]})
        rows.append(row)
    df = pd.DataFrame(rows, columns=["name", "id", "local", *RESULT_COLUMNS[2:]])
    for col in ("fps", "real_time_factor", "cost_per_output_minute", "price_per_hour"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["measured"] = df["fps"].notna()
    measured = df[df["measured"]].sort_values("fps", ascending=False)
    unmeasured = df[~df["measured"]].sort_values("name")
    return pd.concat([measured, unmeasured]).reset_index(drop=True)


def draw_targets(targets: Iterable[dict[str, Any]]) -> Any:
    """The chart as a matplotlib Figure (the caller closes it)."""
    df = chart_table(list(targets))
    n = max(len(df), 1)
    fig, (ax_fps, ax_cost) = plt.subplots(1, 2, sharey=True, dpi=DPI,
                                          figsize=(WIDTH_IN, max(MIN_HEIGHT_IN, 1.6 + ROW_IN * n)))
    if df.empty:
        fig.suptitle("No GPU classes in gpu_targets.json", fontsize=14)
        for ax in (ax_fps, ax_cost):
            ax.set_axis_off()
        return fig
    y = list(range(len(df)))
    labels = [f"{r['name']} *" if r["local"] or pd.isna(r["id"]) else r["name"] for _, r in df.iterrows()]
    _fps_panel(ax_fps, df, y)
    _cost_panel(ax_cost, df, y)
    ax_fps.set_yticks(y, labels)
    # first row at the top (the y axis is shared, so this orders the cost panel too); the space above
    # row 0 holds the real-time label
    ax_fps.set_ylim(len(df) - 0.5, -1.3)
    measured = df[df["measured"]]
    fig.suptitle("MuseTalk v1.5 per GPU class (best batch per class)\n" + _provenance(measured, len(df)),
                 fontsize=12)
    notes = ["pale bars: random-weight profile (tiny / full-random), not a production number"]
    if df["local"].any() or df["id"].isna().any():
        notes.append("* local device, not a Salad class (no price)")
    fig.text(0.01, 0.005, ";  ".join(notes), fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_targets(targets: Iterable[dict[str, Any]], out_png: Union[str, Path]) -> Path:
    """Draw the chart of ``targets`` to ``out_png``; returns the path."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_targets(targets)
    try:
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    return out


def _provenance(measured: pd.DataFrame, total: int) -> str:
    """"4 of 10 classes measured · profile real · 2026-11-28 … 2026-12-01"."""
    profiles = sorted({str(p) for p in measured["profile"].dropna()}) or ["unknown"]
    dates = sorted({str(d)[:10] for d in measured["date"].dropna()})
    when = (dates[0] if len(dates) == 1 else f"{dates[0]} … {dates[-1]}") if dates else "date unknown"
    return (f"{len(measured)} of {total} classes measured · profile {', '.join(profiles)} · {when}"
            if len(measured) else f"none of {total} classes measured yet")


def _colours(profile: Any) -> tuple[str, str]:
    return PROFILE_COLOURS.get(str(profile), UNKNOWN_PROFILE_COLOURS)


def _not_measured(ax: Any, y: int, text: str) -> None:
    ax.text(0, y, f" {text}", va="center", fontsize=8, color="#7F7F7F", style="italic")


def real_time_fps(df: pd.DataFrame) -> float:
    """The output frame rate (fps × real-time factor = frames per second of video); 25 when unknown."""
    ok = df[df["measured"] & df["real_time_factor"].notna() & (df["real_time_factor"] > 0)]
    rates = (ok["fps"] * ok["real_time_factor"]).round(3)
    return float(rates.median()) if len(rates) else DEFAULT_VIDEO_FPS


def _fps_panel(ax: Any, df: pd.DataFrame, y: list[int]) -> None:
    peak = float(df["fps"].max()) if df["measured"].any() else 0.0
    realtime = real_time_fps(df)
    for row_y, (_, row) in zip(y, df.iterrows()):
        if not row["measured"]:
            _not_measured(ax, row_y, "not measured")
            continue
        ax.barh(row_y, row["fps"], color=_colours(row["profile"])[0])
        rtf = f" · rtf {row['real_time_factor']:.2f}" if pd.notna(row["real_time_factor"]) else ""
        batch = f" · b{int(row['best_batch_size'])}" if pd.notna(row["best_batch_size"]) else ""
        mode = f" {row['mode']}" if isinstance(row["mode"], str) else ""
        date = f" · {str(row['date'])[:10]}" if isinstance(row["date"], str) else ""
        ax.text(row["fps"], row_y, f" {row['fps']:.0f} fps{rtf}{batch}{mode} · {row['profile']}{date}",
                va="center", fontsize=8)
    ax.axvline(realtime, color="#C44E52", linestyle="--", linewidth=1.2)
    ax.text(realtime, -0.8, f" real time ({realtime:g} fps)", color="#C44E52", fontsize=8, va="center")
    ax.set_xlabel("output frames per second (end to end)")
    ax.set_title("Throughput")
    ax.set_xlim(0, max(peak, realtime) * 1.9 or 1.0)
    ax.grid(axis="x", alpha=0.3)


def _cost_panel(ax: Any, df: pd.DataFrame, y: list[int]) -> None:
    cents = df["cost_per_output_minute"] * 100.0
    for row_y, (_, row), c in zip(y, df.iterrows(), cents):
        if not row["measured"]:
            _not_measured(ax, row_y, "not measured")
        elif pd.isna(c):
            _not_measured(ax, row_y, "no price")
        else:
            ax.barh(row_y, c, color=_colours(row["profile"])[1])
            ax.text(c, row_y, f" {c:.3f}¢ · ${row['price_per_hour']:.2f}/h", va="center", fontsize=8)
    ax.set_xlabel("US cents per output minute (batch priority)")
    ax.set_title("Cost")
    top = float(cents.max()) if cents.notna().any() else 0.0
    ax.set_xlim(0, top * 1.6 or 1.0)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="y", left=False)
