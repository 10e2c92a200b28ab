"""The warm engine of this process: built once per configuration, shared by every job and flow run."""

from __future__ import annotations

import threading

from musetalk_engine.engine import Engine, EngineConfig

from .settings import Settings, get_settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def engine_config(settings: Settings) -> EngineConfig:
    models = settings.resolve(settings.musetalk_models_dir)
    default_unet = Settings.model_fields["musetalk_unet_model_path"].default
    default_cfg = Settings.model_fields["musetalk_unet_config"].default
    return EngineConfig(
        models_dir=models,
        landmarks=settings.musetalk_landmarks,
        cache_dir=settings.resolve(settings.musetalk_cache_dir) / "avatars",
        batch_size=settings.musetalk_batch_size,
        # only explicit overrides: the defaults already point into the models dir
        unet_weights=None if settings.musetalk_unet_model_path == default_unet
        else settings.resolve(settings.musetalk_unet_model_path),
        unet_config=None if settings.musetalk_unet_config == default_cfg
        else settings.resolve(settings.musetalk_unet_config),
    )


def get_engine(settings: Settings | None = None) -> Engine:
    """The process's engine for these settings; loads the models on first use only."""
    config = engine_config(settings or get_settings())
    key = config.model_dump_json()
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine(config)
        return engine
