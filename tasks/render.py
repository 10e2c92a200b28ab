"""Task: the streamed render of one job on the warm engine — frames decoded, lips generated, blended and
encoded to the MP4 (no image file on the way), framed to the job's aspect ratio and resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from musetalk_engine.avatar import PrepareParams
from musetalk_engine.engine import RenderResult
from musetalk_engine.framing import output_shape

from .audio import audio_windows
from .engine import get_engine


@task(name="render-video", cache_policy=NO_CACHE)
def render_video(video: Path, audio: Path, out: Path, *, video_sha256: str, audio_sha256: str,
                 params: dict[str, Any], cache_dir: Path, batch_size: int | None = None,
                 aspect_ratio: str | None = None, resolution: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> RenderResult:
    """Render ``out``: the avatar from the engine's cache, the windows from the stored audio states (both
    recomputed when gone); ``aspect_ratio`` and ``resolution`` both None keep the source frame."""
    engine = get_engine()
    prepare = PrepareParams.model_validate(params)
    avatar, _ = engine.prepare(video, prepare, video_sha256=video_sha256)
    shape = output_shape(aspect_ratio, resolution, avatar.width, avatar.height, avatar.boxes)
    windows = audio_windows(engine, audio, audio_sha256, prepare.fps, cache_dir)
    return engine.render(video, audio, out, params=prepare, batch_size=batch_size, shape=shape,
                         windows=windows, avatar=avatar, on_progress=on_progress)
