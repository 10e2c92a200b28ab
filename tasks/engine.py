"""The warm engine of this process: built once per configuration, shared by every job and flow run.

The serve process loads its engine itself (from the settings it was created with, or a loader a test
passes) and runs each job's flow inside :func:`serving`, so the flow's tasks use that very engine instead of
building a second one from the environment."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from musetalk_engine.engine import Engine, EngineConfig

from .settings import Settings, get_settings

_engines: dict[str, Engine] = {}
# _lock guards the two dicts and is never held while an engine loads, so a caller of a loaded configuration
# never waits behind another's load; the per-configuration lock makes a second caller of the same one wait
# for the first's engine instead of building a twin (builds themselves take turns: musetalk_engine.engine)
_lock = threading.Lock()
_loading: dict[str, threading.Lock] = {}
# a context variable, not a global: it holds for the flow run inside the block (same thread, or a thread
# Prefect starts with a copy of the context) and for nothing after it
_serving: ContextVar[Engine | None] = ContextVar("serving_engine", default=None)


def engine_config(settings: Settings) -> EngineConfig:
    models = settings.resolve(settings.musetalk_models_dir)
    default_unet = Settings.model_fields["musetalk_unet_model_path"].default
    default_cfg = Settings.model_fields["musetalk_unet_config"].default
    return EngineConfig(
        models_dir=models,
        device=settings.musetalk_device,
        gpu_lock_dir=settings.musetalk_gpu_lock_dir,
        landmarks=settings.musetalk_landmarks,
        cache_dir=settings.resolve(settings.musetalk_cache_dir) / "avatars",
        batch_size=settings.musetalk_batch_size,
        # only explicit overrides: the defaults already point into the models dir
        unet_weights=None if settings.musetalk_unet_model_path == default_unet
        else settings.resolve(settings.musetalk_unet_model_path),
        unet_config=None if settings.musetalk_unet_config == default_cfg
        else settings.resolve(settings.musetalk_unet_config),
    )


@contextmanager
def serving(engine: Engine) -> Iterator[Engine]:
    """Within the block, :func:`get_engine` returns ``engine`` whatever settings it is asked with (the
    serve process's warm engine, for the job it runs)."""
    token = _serving.set(engine)
    try:
        yield engine
    finally:
        _serving.reset(token)


def get_engine(settings: Settings | None = None, *, instance: int = 0) -> Engine:
    """The engine of this job: the serving one inside :func:`serving`, else the process's engine for
    ``settings`` (default: the environment's), loaded on first use only. ``instance`` tells apart engines
    of one configuration that must not be shared: a serve process with two render slots on the CPU gives
    each its own (an engine renders one job at a time)."""
    engine = _serving.get()
    if engine is not None:
        return engine
    config = engine_config(settings or get_settings())
    key = config.model_dump_json() + (f"#{instance}" if instance else "")
    with _lock:
        engine = _engines.get(key)
        if engine is not None:
            return engine
        loading = _loading.setdefault(key, threading.Lock())
    with loading:  # a second caller of the same configuration waits for the first's engine
        with _lock:
            engine = _engines.get(key)
        if engine is None:
            engine = Engine(config)
            with _lock:
                _engines[key] = engine
        return engine
