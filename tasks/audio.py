"""Task: the Whisper encoder states of a speech track, computed once per audio content + weights and
stored under ``MUSETALK_CACHE_DIR/audio``; the render cuts its per-frame windows from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from safetensors.torch import load_file, save_file

from musetalk_engine.engine import Engine
from musetalk_engine.files import atomic_write

from .engine import get_engine


def audio_states_path(cache_dir: Path, audio_sha256: str, weights_fingerprint: str) -> Path:
    return Path(cache_dir) / "audio" / f"{audio_sha256[:32]}-{weights_fingerprint}.safetensors"


def _audio_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    # from the parameters alone: computing a key never loads a model
    return f"audio-{parameters['audio_sha256'][:32]}-{parameters['weights_fingerprint']}"


@task(name="cache-audio-features", cache_key_fn=_audio_cache_key, persist_result=True, result_serializer="json")
def cache_audio_features(audio: Path, audio_sha256: str, weights_fingerprint: str, cache_dir: Path,
                         max_seconds: float) -> dict[str, Any]:
    """Encode the speech (at most ``max_seconds``) and store the states where every worker finds them."""
    path = audio_states_path(cache_dir, audio_sha256, weights_fingerprint)
    states, n_samples = get_engine().encode_audio(audio, max_seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"states": states.to("cpu", torch.float16).contiguous(), "n_samples": torch.tensor([n_samples])}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))  # the cache may be shared by workers
    return {"path": str(path), "n_samples": n_samples, "steps": int(states.shape[0])}


def audio_windows(engine: Engine, audio: Path, audio_sha256: str, fps: float, cache_dir: Path) -> torch.Tensor:
    """Per-frame windows from the stored states; recomputed when the file is gone."""
    path = audio_states_path(cache_dir, audio_sha256, engine.fingerprint)
    if path.is_file():
        stored = load_file(str(path))
        return engine.windows_from_states(stored["states"], int(stored["n_samples"][0]), fps)
    return engine.audio_windows(audio, fps)
