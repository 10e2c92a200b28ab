"""The benchmark's fixed workload: the models of a profile and the input media, made by the code itself.

Everything is deterministic (seeded random weights, the astronaut clip, espeak-ng speech), so two
machines given the same settings render the same frames, and the files are reused between runs from a
work directory keyed by their settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from benchmarks.schema import Profile, Workload

# Random-weight sizes of musetalk_engine.tiny per profile; "real" uses the released weights.
_RANDOM_SIZES = {"tiny": "tiny", "full-random": "full"}


def default_work_dir() -> Path:
    """``benchmark/`` in the project's cache (``MUSETALK_CACHE_DIR`` under ``MUSETALK_WORKDIR``), the
    same place the CLI and the workers keep their avatars."""
    from tasks.settings import get_settings

    settings = get_settings()
    return settings.resolve(settings.musetalk_cache_dir) / "benchmark"


@dataclass(frozen=True)
class WorkloadMedia:
    """The files of one workload."""

    video: Path
    audio: Path
    spec: Workload


def make_workload(work_dir: Path, spec: Workload) -> WorkloadMedia:
    """Avatar clip + speech for `spec`, made once per settings under `work_dir/media/`."""
    from musetalk_engine.sample_media import make_avatar_video, make_speech

    tag = f"{spec.width}x{spec.height}-{spec.video_seconds:g}s-{spec.fps:g}fps"
    media = Path(work_dir) / "media"
    media.mkdir(parents=True, exist_ok=True)
    video = media / f"avatar-{tag}.mp4"
    audio = media / f"speech-{spec.audio_seconds:g}s.wav"
    if not video.is_file():
        tmp = video.with_name(f".{video.name}.tmp.mp4")  # ffmpeg picks the muxer from the suffix
        make_avatar_video(tmp, seconds=spec.video_seconds, fps=spec.fps, width=spec.width,
                          height=spec.height)
        tmp.replace(video)  # atomic: a killed run never leaves half a clip behind
    if not audio.is_file():
        tmp = audio.with_name(f".{audio.name}.tmp.wav")
        make_speech(tmp, seconds=spec.audio_seconds)
        tmp.replace(audio)
    return WorkloadMedia(video=video, audio=audio, spec=spec)


def profile_models(profile: Profile, work_dir: Path, models_dir: Optional[Path] = None) -> Path:
    """The models directory of a profile.

    `tiny` / `full-random`: seeded random weights in the released layout, written once under
    `work_dir/models-<size>/` (`full` writes ≈ 3.5 GB). `real`: `models_dir`, else the configured
    ``MUSETALK_MODELS_DIR`` (the released weights, as the workers use them). An explicit `models_dir`
    wins for every profile.
    """
    if models_dir is not None:
        return Path(models_dir)
    if profile == "real":
        from tasks.settings import get_settings

        settings = get_settings()
        return settings.resolve(settings.musetalk_models_dir)
    size = _RANDOM_SIZES[profile]
    root = Path(work_dir) / f"models-{size}"
    marker = root / "tiny.json"  # written last by make_models: its presence means complete
    if _complete(marker, size):
        return root
    from musetalk_engine.tiny import make_models

    make_models(root, size)
    return root


def _complete(marker: Path, size: str) -> bool:
    try:
        return json.loads(marker.read_text()).get("size") == size
    except (OSError, ValueError):
        return False
