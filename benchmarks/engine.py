"""Engine micro-benchmark: one clip rendered twice on one warm engine — cold (avatar prepared) then cached.

    python -m benchmarks.engine [--models DIR] [--seconds S] [--width W --height H] [--batch-size B]

Without ``--models`` it writes tiny random-weight models to a temporary directory (CPU-friendly). The
sample media (astronaut clip, espeak speech of S seconds) are made on the spot; the avatar cache is a
fresh temporary directory, so the first render always prepares. Prints one JSON document: the machine,
engine load time, and per render its stage times and metrics."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path


def run(models: Path | None, seconds: float, width: int, height: int, batch_size: int | None,
        device: str) -> dict:
    from musetalk_engine.engine import Engine, EngineConfig
    from musetalk_engine.sample_media import make_avatar_video, make_speech
    from musetalk_engine.tiny import make_models

    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as tmp:
        work = Path(tmp)
        if models is None:
            models = work / "tiny-models"
            make_models(models, "tiny")
        video = make_avatar_video(work / "avatar.mp4", seconds=seconds, width=width, height=height)
        speech = make_speech(work / "speech.wav", seconds=seconds)

        started = time.perf_counter()
        engine = Engine(EngineConfig(models_dir=models, cache_dir=work / "avatars", device=device,
                                     batch_size=batch_size))
        load_s = time.perf_counter() - started
        renders = []
        for label in ("cold", "cached"):
            result = engine.render(video, speech, work / f"{label}.mp4")
            renders.append({"render": label, **result.metrics.as_dict(),
                            "output_mib": round(result.output.stat().st_size / (1 << 20), 3)})
        return {
            "models": "tiny (temporary)" if models.is_relative_to(work) else str(models),
            "landmarks": engine.landmarks_backend,
            "video": {"seconds": seconds, "width": width, "height": height, "fps": 25.0},
            "audio_seconds": seconds,
            "engine_load_s": round(load_s, 3),
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": _cpus()},
            "renders": renders,
        }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=None, help="models directory (default: tiny, temporary)")
    p.add_argument("--seconds", type=float, default=2.0, help="clip and speech length (default 2)")
    p.add_argument("--width", type=int, default=360)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from tasks.logs import configure_logging

    configure_logging(logging.WARNING)
    report = run(args.models, args.seconds, args.width, args.height, args.batch_size, args.device)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
