"""`python -m benchmarks`: measure this machine and write a `BenchmarkResult` JSON (no Prefect).

    python -m benchmarks --profile tiny --out results.json
    python -m benchmarks --profile full-random --batch-sizes 8,16,32,64 --out r.json \\
        --merge gpu_targets.json --chart gpu_targets.png
"""

from __future__ import annotations

import time

_IMPORTED_AT = time.time()  # fallback anchor for the cold start when psutil cannot tell

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive integers")
    return sizes


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("eager", "graphs", "compiled")]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are eager, graphs, compiled; not {text!r}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=["tiny", "full-random", "real"], default="tiny",
                   help="tiny: small random models (CPU, CI); full-random: released sizes, random weights; "
                        "real: the released weights in --models")
    p.add_argument("--out", type=Path, required=True, help="result JSON to write")
    p.add_argument("--config", type=Path, default=None,
                   help="a BenchmarkConfig JSON file: what to measure (the measurement flags below are ignored)")
    p.add_argument("--models", type=Path, default=None, help="models directory for 'real' (default $MUSETALK_MODELS_DIR)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where generated models and media are kept (default $MUSETALK_CACHE_DIR/benchmark)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None, help="e.g. 4,8 (default per profile)")
    p.add_argument("--modes", type=_modes, default=None,
                   help="eager,graphs,compiled (default: eager on CPU, eager,graphs on CUDA)")
    p.add_argument("--audio-seconds", type=float, default=10.0)
    p.add_argument("--video-seconds", type=float, default=2.0)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU intra-op threads (default: torch's own choice)")
    p.add_argument("--repeats", type=int, default=1, help="median of this many runs per measurement")
    p.add_argument("--gpu-class", default=None, help="Salad class name (default $GPU_CLASS_NAME)")
    p.add_argument("--merge", type=Path, default=None, help="gpu_targets.json to merge the result into")
    p.add_argument("--class-id", default=None, help="Salad class id to merge into (default: matched by name)")
    p.add_argument("--prices", type=Path, default=None,
                   help="salad_prices.json (default: beside the --merge file, when present)")
    p.add_argument("--chart", type=Path, default=None, help="PNG chart of the (merged) targets")
    return p


def _process_start() -> float:
    from benchmarks.run import process_start_time

    try:
        return process_start_time()
    except Exception:  # psutil missing or /proc unreadable: module import is the next best anchor
        return _IMPORTED_AT


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM as an exception: the ``subprocess.run`` calls (ffmpeg, espeak) and the encoder kill their
    child while it unwinds, so a stopped benchmark leaves no process behind (the default action would end
    this process and orphan them)."""
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    from tasks.logs import configure_logging

    configure_logging(logging.INFO)  # before the benchmark imports Prefect (telemetry off, one log format)
    from benchmarks.run import BenchmarkConfig, run_benchmark, write_result

    if args.config is not None:
        config = BenchmarkConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    else:
        config = BenchmarkConfig(
            profile=args.profile, models_dir=args.models, work_dir=args.work_dir,
            batch_sizes=args.batch_sizes or [], modes=args.modes or [], audio_seconds=args.audio_seconds,
            video_seconds=args.video_seconds, width=args.width, height=args.height, fps=args.fps,
            device=args.device, torch_threads=args.torch_threads, repeats=args.repeats, gpu_class=args.gpu_class)
    say = logging.getLogger("benchmarks").info
    result = run_benchmark(config, process_start=_process_start(), say=say)
    write_result(result, args.out)
    say(f"wrote {args.out}")

    targets = None
    if args.merge is not None:
        from benchmarks.targets import merge_into_file

        prices_path = args.prices or args.merge.with_name("salad_prices.json")
        targets = merge_into_file(args.merge, [(args.class_id, result)], prices_path)
        say(f"merged into {args.merge}" + ("" if prices_path.is_file() else " (no price list found)"))
    if args.chart is not None:
        from benchmarks.chart import plot_targets
        from benchmarks.targets import merge_results

        plot_targets(targets if targets is not None else merge_results([], result), args.chart)
        say(f"chart {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
