"""Chart of gpu_targets.json results: fps and cost per output minute per GPU class."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.targets import results_table  # noqa: E402

FIGSIZE_IN = (12.0, 6.0)
DPI = 100  # → 1200 × 600 px


def plot_targets(targets: Iterable[dict[str, Any]], out_png: Union[str, Path]) -> Path:
    """Two panels (fps; USD per output minute) over the measured classes; returns the PNG path.

    Classes without results are omitted; a class without a known price appears in the fps panel only.
    With no results at all, the figure says so in its title.
    """
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = results_table(list(targets))
    fig, (ax_fps, ax_cost) = plt.subplots(1, 2, figsize=FIGSIZE_IN, dpi=DPI)
    try:
        if df.empty:
            fig.suptitle("No GPU benchmark results yet", fontsize=14)
            for ax in (ax_fps, ax_cost):
                ax.text(0.5, 0.5, "no measured classes", ha="center", va="center", fontsize=12)
                ax.set_axis_off()
        else:
            _fps_panel(ax_fps, df)
            _cost_panel(ax_cost, df)
            fig.suptitle("MuseTalk v1.5 on SaladCloud GPU classes (best batch per class)", fontsize=14)
            if df["id"].isna().any():
                fig.text(0.01, 0.01, "* local device, not a Salad class (no price)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    return out


def _label(row: Any) -> str:
    suffix = " *" if pd.isna(row["id"]) else ""  # local, non-Salad device
    return f"{row['name']}{suffix}"


def _fps_panel(ax: Any, df: Any) -> None:
    data = df.sort_values("fps", ascending=True)
    labels = [_label(r) for _, r in data.iterrows()]
    bars = ax.barh(labels, data["fps"], color="#4C72B0")
    for bar, (_, row) in zip(bars, data.iterrows()):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {row['fps']:.0f} fps · rtf {row['real_time_factor']:.2f} · b{int(row['best_batch_size'])}"
            f" {row['mode']}",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("output frames per second (end to end)")
    ax.set_title("Throughput")
    ax.set_xlim(0, float(data["fps"].max()) * 1.6 or 1.0)
    ax.grid(axis="x", alpha=0.3)


def _cost_panel(ax: Any, df: Any) -> None:
    data = df.dropna(subset=["cost_per_output_minute"]).sort_values(
        "cost_per_output_minute", ascending=False
    )
    if data.empty:
        ax.text(0.5, 0.5, "no prices known", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        return
    labels = [_label(r) for _, r in data.iterrows()]
    cents = data["cost_per_output_minute"] * 100.0
    bars = ax.barh(labels, cents, color="#55A868")
    for bar, (_, row) in zip(bars, data.iterrows()):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {row['cost_per_output_minute'] * 100:.3f}¢ · ${row['price_per_hour']:.2f}/h",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("US cents per output minute (batch priority)")
    ax.set_title("Cost")
    ax.set_xlim(0, float(cents.max()) * 1.45 or 1.0)
    ax.grid(axis="x", alpha=0.3)
