"""MuseTalk v1.5's face box rule: from the 68 landmarks, the box spans the jaw line horizontally and, vertically,
from as far above the nose tip (landmark 29) as the chin is below it, down to the chin plus a margin."""

from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive ends, pixel coordinates)

NOSE_POINT = 29
EXTRA_MARGIN = 10  # v1.5: pixels added below the chin so the jaw moves freely


def landmark_box(landmarks: np.ndarray) -> Box | None:
    """The box from landmarks alone; None when it is degenerate (then the detector box is used)."""
    pts = np.asarray(landmarks).astype(np.int64)
    nose_y = int(pts[NOSE_POINT, 1])
    y2 = int(pts[:, 1].max())
    y1 = max(0, 2 * nose_y - y2)  # as far above the nose as the chin is below it
    x1, x2 = int(pts[:, 0].min()), int(pts[:, 0].max())
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        return None
    return x1, y1, x2, y2


def face_box(landmarks: np.ndarray | None, detector_box: Box | None, frame_size: tuple[int, int],
             extra_margin: int = EXTRA_MARGIN) -> Box | None:
    """The v1.5 face box for one frame (``frame_size`` = (width, height)), or None without a usable face."""
    box = landmark_box(landmarks) if landmarks is not None else None
    if box is None:
        if detector_box is None:
            return None
        box = tuple(int(v) for v in detector_box)
    width, height = frame_size
    x1, y1, x2, y2 = box
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2 + extra_margin)
    if x2 - x1 <= 1 or y2 - y1 <= 1:
        return None
    return x1, y1, x2, y2


def fill_missing(boxes: list[Box | None]) -> list[Box]:
    """Frames without a face borrow the box of the nearest frame that has one (the face keeps still
    rather than the video losing frames); raises ValueError when no frame has a face."""
    found = [i for i, b in enumerate(boxes) if b is not None]
    if not found:
        raise ValueError("no frame has a face")
    idx = np.asarray(found)
    out = []
    for i, b in enumerate(boxes):
        if b is None:
            b = boxes[int(idx[np.abs(idx - i).argmin()])]
        out.append(b)
    return out
