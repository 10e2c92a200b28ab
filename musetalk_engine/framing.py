"""Output framing from the job's ``aspect_ratio`` and ``resolution``: scale, and crop around the face when
the source's aspect differs, so the face stays whole and centred horizontally."""

from __future__ import annotations

import numpy as np

from .errors import MediaError
from .video import OutputShape

ASPECT_RATIOS = {"9:16": (9, 16), "16:9": (16, 9), "1:1": (1, 1), "4:5": (4, 5), "3:4": (3, 4), "4:3": (4, 3)}
RESOLUTIONS = {"480p": 480, "540p": 540, "720p": 720, "1080p": 1080, "1440p": 1440, "2160p": 2160}


def _even(v: float) -> int:
    return max(2, int(round(v / 2)) * 2)


def _even_down(v: int) -> int:
    """Crop offsets on even pixels: a 4:2:0 input (the GPU path's) can only be cut there, so both render
    paths cut the same pixels."""
    return v - v % 2


def validate_framing(aspect_ratio: str | None, resolution: str | None) -> None:
    """Raise a 422-class error naming the accepted values when either is unknown."""
    if aspect_ratio and aspect_ratio not in ASPECT_RATIOS:
        raise MediaError(f"unknown aspect_ratio {aspect_ratio!r}; accepted: {', '.join(ASPECT_RATIOS)}",
                         stage="validation", details={"field": "aspect_ratio"})
    if resolution and resolution not in RESOLUTIONS:
        raise MediaError(f"unknown resolution {resolution!r}; accepted: {', '.join(RESOLUTIONS)}",
                         stage="validation", details={"field": "resolution"})


def output_shape(aspect_ratio: str | None, resolution: str | None, width: int, height: int,
                 boxes: np.ndarray) -> OutputShape | None:
    """The crop (source pixels) and final size for a job; None keeps the source frame as it is.

    ``resolution`` names the short side ("720p" with "9:16" is 720×1280); without an aspect ratio the
    source's is kept; without a resolution the crop keeps the source's scale."""
    validate_framing(aspect_ratio, resolution)
    if not aspect_ratio and not resolution:
        return None
    aw, ah = ASPECT_RATIOS[aspect_ratio] if aspect_ratio else (width, height)
    target = aw / ah
    crop = None
    cw, ch = width, height
    if aspect_ratio and abs(width / height - target) > 0.01:
        x1, y1 = boxes[:, 0].min(), boxes[:, 1].min()
        x2, y2 = boxes[:, 2].max(), boxes[:, 3].max()
        if width / height > target:  # too wide: cut the sides, centred on the face
            cw = min(width, _even(height * target))
            cx = (x1 + x2) / 2
            x0 = int(np.clip(round(cx - cw / 2), 0, width - cw))
            crop = (_even_down(x0), 0, cw, height)
        else:  # too tall: cut top/bottom, keeping the whole face (centred when the frame allows)
            ch = min(height, _even(width / target))
            cy = (y1 + y2) / 2
            y0 = int(np.clip(round(cy - ch / 2), 0, height - ch))
            y0 = int(np.clip(y0, max(0, y2 - ch), min(y1, height - ch))) if y2 - y1 <= ch else y0
            crop = (0, _even_down(y0), width, ch)
    if resolution:
        short = RESOLUTIONS[resolution]
        if cw <= ch:
            size = (short, _even(short * ch / cw))
        else:
            size = (_even(short * cw / ch), short)
        if aspect_ratio:  # exact: 720p 9:16 is 720×1280 whatever rounding the crop needed
            size = (short, _even(short * ah / aw)) if aw <= ah else (_even(short * aw / ah), short)
    else:
        size = None
    return OutputShape(crop=crop, size=size)
