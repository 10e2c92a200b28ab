"""Task: the avatar of a video (face boxes, latents, blend masks; DESIGN §3's precomputation split),
prepared once per video content + preparation parameters + weights.

The heavy artifact lives in the engine's own content-addressed cache under ``MUSETALK_CACHE_DIR/avatars``
(shareable between machines); Prefect persists a small JSON summary per cache key, so a second run with
the same video shows this task as ``Cached``. A Prefect hit whose file has gone (another machine, a
cleaned disk) simply recomputes in :func:`tasks.render.render_video`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from musetalk_engine.avatar import PrepareParams, avatar_key

from .engine import get_engine


def _avatar_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    # from the parameters alone: computing a key never loads a model
    params = PrepareParams.model_validate(parameters["params"])
    return "avatar-" + avatar_key(parameters["video_sha256"], params, parameters["weights_fingerprint"])


@task(name="cache-avatar", cache_key_fn=_avatar_cache_key, persist_result=True, result_serializer="json")
def cache_avatar(video: Path, video_sha256: str, params: dict[str, Any], weights_fingerprint: str) -> dict[str, Any]:
    """Prepare the video's avatar into the engine's cache (unless it is there); a summary for the flow."""
    engine = get_engine()
    prepare = PrepareParams.model_validate(params)
    avatar, cached = engine.prepare(video, prepare, video_sha256=video_sha256)
    return {"avatar_key": avatar_key(video_sha256, prepare, weights_fingerprint),
            "frames": avatar.n_frames, "width": avatar.width, "height": avatar.height,
            "faces_found": int(avatar.face_found.sum()), "engine_cache_hit": cached}
