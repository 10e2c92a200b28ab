"""Prefect tasks over the warm engine: avatar preparation and audio features (both cached across flow
runs by content hash), and the render itself.

The heavy artifacts live in the engine's own content-addressed caches under ``MUSETALK_CACHE_DIR``
(shareable between machines); Prefect persists a small JSON record per cache key, so a second run with
the same video shows the avatar task as ``Cached`` and skips the work. A Prefect hit whose file has gone
(another machine, a cleaned disk) simply recomputes in the render task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from musetalk_engine.avatar import PrepareParams, avatar_key
from musetalk_engine.engine import RenderResult
from musetalk_engine.framing import output_shape

from .engine import get_engine
from .settings import get_settings
from .storage import atomic_write


def cache_root() -> Path:
    return get_settings().resolve(get_settings().musetalk_cache_dir)


def result_storage() -> Path:
    """Where Prefect persists cached task records (a ``Path``: Prefect treats a str as a block slug)."""
    return cache_root() / "prefect-results"


def _avatar_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    params = PrepareParams.model_validate(parameters["params"])
    return "avatar-" + avatar_key(parameters["video_sha256"], params, get_engine().fingerprint)


def _audio_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"audio-{parameters['audio_sha256'][:32]}-{get_engine().fingerprint}"


@task(name="prepare-avatar", cache_key_fn=_avatar_cache_key, persist_result=True, result_serializer="json")
def prepare_avatar(video: Path, video_sha256: str, params: dict[str, Any]) -> dict[str, Any]:
    """Boxes, latents and blend masks of the video (engine cache), summarised for the flow."""
    engine = get_engine()
    prepare = PrepareParams.model_validate(params)
    avatar, cached = engine.prepare(video, prepare, video_sha256=video_sha256)
    return {"avatar_key": avatar_key(video_sha256, prepare, engine.fingerprint),
            "frames": avatar.n_frames, "width": avatar.width, "height": avatar.height,
            "faces_found": int(avatar.face_found.sum()), "engine_cache_hit": cached}


def audio_states_path(audio_sha256: str) -> Path:
    return cache_root() / "audio" / f"{audio_sha256[:32]}-{get_engine().fingerprint}.safetensors"


@task(name="audio-features", cache_key_fn=_audio_cache_key, persist_result=True, result_serializer="json")
def audio_features(audio: Path, audio_sha256: str) -> dict[str, Any]:
    """Whisper encoder states of the speech, stored once per audio content."""
    path = audio_states_path(audio_sha256)
    states, n_samples = get_engine().encode_audio(audio, get_settings().musetalk_max_audio_sec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"states": states.to("cpu", torch.float16).contiguous(), "n_samples": torch.tensor([n_samples])}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))  # the cache may be shared by workers
    return {"path": str(path), "n_samples": n_samples, "steps": int(states.shape[0])}


def load_windows(audio: Path, audio_sha256: str, fps: float) -> torch.Tensor:
    """Per-frame windows from the stored states; recomputed when the file is gone."""
    engine = get_engine()
    path = audio_states_path(audio_sha256)
    if path.is_file():
        stored = load_file(str(path))
        return engine.windows_from_states(stored["states"], int(stored["n_samples"][0]), fps)
    return engine.audio_windows(audio, fps)


@task(name="render", cache_policy=NO_CACHE)
def render(video: Path, audio: Path, out: Path, *, video_sha256: str, audio_sha256: str, params: dict[str, Any],
           batch_size: int | None = None, aspect_ratio: str | None = None, resolution: str | None = None,
           on_progress: Callable[[int, int], None] | None = None) -> RenderResult:
    """The streamed render on the warm engine (avatar from its cache, windows from the feature store),
    framed to the job's aspect ratio and resolution (both None keeps the source frame)."""
    engine = get_engine()
    prepare = PrepareParams.model_validate(params)
    avatar, _ = engine.prepare(video, prepare, video_sha256=video_sha256)
    shape = output_shape(aspect_ratio, resolution, avatar.width, avatar.height, avatar.boxes)
    windows = load_windows(audio, audio_sha256, prepare.fps)
    return engine.render(video, audio, out, params=prepare, batch_size=batch_size, shape=shape,
                         windows=windows, avatar=avatar, on_progress=on_progress)
