"""MuseTalk v1.5 blending: expanded crop boxes, feathered parse masks, in-place face compositing.

Boxes are ``(x0, y0, x1, y1)`` in pixels, exclusive at x1/y1. Frames are H×W×3 uint8 RGB. Crop
boxes may extend past the frame; everything outside it reads as black (like PIL's ``crop``) and
writes are clipped to the frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:  # blending itself needs only numpy + cv2
    from .parsing import FaceParser

Box = tuple[int, int, int, int]

# Feathering width as a fraction of the crop's width. MuseTalk v1.5's `inference.py` (the script the old
# worker ran) blurs with 0.05; its realtime script's precomputed path uses 0.1. The default follows the
# one whose output the fleet's users know.
BLUR_FACTOR = 0.05


def expanded_crop_box(face_box: Sequence[int], expand: float = 1.5) -> Box:
    """Square of half side ``int(max(w, h) // 2 * expand)`` around the box centre (MuseTalk's rule)."""
    x0, y0, x1, y1 = (int(v) for v in face_box)
    xc, yc = (x0 + x1) // 2, (y0 + y1) // 2
    s = int(max(x1 - x0, y1 - y0) // 2 * expand)
    return xc - s, yc - s, xc + s, yc + s


def _intersect(a: Sequence[int], b: Sequence[int]) -> Box | None:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def crop_with_padding(frame: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """``frame[y0:y1, x0:x1]`` with zeros where the box leaves the frame."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop box {tuple(box)}")
    out = np.zeros((y1 - y0, x1 - x0) + frame.shape[2:], dtype=frame.dtype)
    h, w = frame.shape[:2]
    inter = _intersect((x0, y0, x1, y1), (0, 0, w, h))
    if inter is not None:
        ix0, iy0, ix1, iy1 = inter
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = frame[iy0:iy1, ix0:ix1]
    return out


def feather_kernel_size(crop_width: int, blur_factor: float = BLUR_FACTOR) -> int:
    """Odd Gaussian kernel side: ``int(blur_factor * w // 2 * 2) + 1`` (MuseTalk's formula)."""
    return int(blur_factor * crop_width // 2 * 2) + 1


def blend_mask(parse_mask: np.ndarray, face_box: Sequence[int], crop_box: Sequence[int],
               upper_boundary_ratio: float = 0.5, blur_factor: float = BLUR_FACTOR) -> np.ndarray:
    """Crop-size uint8 alpha: parse mask kept inside the face box and below ``upper_boundary_ratio``, feathered
    with a Gaussian ``blur_factor`` × the crop's width wide (see :data:`BLUR_FACTOR`)."""
    cx0, cy0, cx1, cy1 = (int(v) for v in crop_box)
    h, w = cy1 - cy0, cx1 - cx0
    if parse_mask.shape[:2] != (h, w):
        raise ValueError(f"parse mask {parse_mask.shape[:2]} does not match crop size {(h, w)}")
    fx0, fy0, fx1, fy1 = (int(face_box[0]) - cx0, int(face_box[1]) - cy0,
                          int(face_box[2]) - cx0, int(face_box[3]) - cy0)
    top = int(h * upper_boundary_ratio)
    out = np.zeros((h, w), np.uint8)
    keep = _intersect((fx0, max(fy0, top), fx1, fy1), (0, 0, w, h))
    if keep is not None:
        kx0, ky0, kx1, ky1 = keep
        out[ky0:ky1, kx0:kx1] = parse_mask[ky0:ky1, kx0:kx1]
    k = feather_kernel_size(w, blur_factor)
    return cv2.GaussianBlur(out, (k, k), 0) if k > 1 else out


def prepare_blend_material(frames: Sequence[np.ndarray], face_boxes: Sequence[Sequence[int]], parser: FaceParser,
                           expand: float = 1.5, upper_boundary_ratio: float = 0.5,
                           blur_factor: float = BLUR_FACTOR) -> list[tuple[np.ndarray, Box]]:
    """Per frame ``(alpha mask, crop box)``; the expanded crops are parsed in batches."""
    if len(frames) != len(face_boxes):
        raise ValueError(f"{len(frames)} frames but {len(face_boxes)} face boxes")
    crop_boxes = [expanded_crop_box(b, expand) for b in face_boxes]
    parse_masks = parser.masks([crop_with_padding(f, c) for f, c in zip(frames, crop_boxes)])
    return [(blend_mask(m, b, c, upper_boundary_ratio, blur_factor), c)
            for m, b, c in zip(parse_masks, face_boxes, crop_boxes)]


def blend_region(face_box: Sequence[int], crop_box: Sequence[int], mask: np.ndarray, width: int,
                 height: int) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Where a face is pasted: face box ∩ crop ∩ frame, less the rows where the crop-size ``mask`` is fully
    transparent (the crop's upper part always is), and the uint8 alpha there; None when nothing changes.
    Both blends (numpy here, tensors in :mod:`musetalk_engine.device_blend`) paste exactly here."""
    cx0, cy0 = int(crop_box[0]), int(crop_box[1])
    region = _intersect(tuple(int(v) for v in face_box), tuple(int(v) for v in crop_box))
    region = region and _intersect(region, (0, 0, width, height))
    if region is None:
        return None
    rx0, ry0, rx1, ry1 = region
    alpha = mask[ry0 - cy0:ry1 - cy0, rx0 - cx0:rx1 - cx0]
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    return (rx0, ry0 + int(rows[0]), rx1, ry0 + int(rows[-1]) + 1), alpha[rows[0]:rows[-1] + 1]


def paste_face(frame: np.ndarray, face: np.ndarray, face_box: Sequence[int], mask: np.ndarray,
               crop_box: Sequence[int]) -> None:
    """Composite a generated face into ``frame`` in place with the crop-size alpha ``mask``.

    ``face`` (e.g. 256×256) is resized to the face box with cv2's default (bilinear) interpolation.
    Outside the face box the composite source equals the frame itself, so only the rows of face box
    ∩ crop ∩ frame where the mask is non-zero are computed. Alpha 255 gives the face exactly, 0 the
    frame; in between it agrees with PIL's masked paste (the released pipeline) to ±1.
    """
    x0, y0, x1, y1 = (int(v) for v in face_box)
    cx0, cy0, cx1, cy1 = (int(v) for v in crop_box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty face box {tuple(face_box)}")
    if mask.shape[:2] != (cy1 - cy0, cx1 - cx0):
        raise ValueError(f"mask {mask.shape[:2]} does not match crop box size {(cy1 - cy0, cx1 - cx0)}")
    if frame.ndim != 3 or frame.dtype != np.uint8 or face.shape[2:] != frame.shape[2:]:
        raise ValueError(f"frame {frame.dtype} {frame.shape} and face {face.dtype} {face.shape} must be H×W×C uint8")
    h, w = frame.shape[:2]
    found = blend_region(face_box, crop_box, mask, w, h)
    if found is None:
        return
    (rx0, ry0, rx1, ry1), alpha = found
    alpha = alpha.astype(np.float32) * (1.0 / 255.0)
    if face.shape[:2] != (y1 - y0, x1 - x0):
        face = cv2.resize(face, (x1 - x0, y1 - y0))
    src = np.ascontiguousarray(face[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0])
    dst = frame[ry0:ry1, rx0:rx1]
    dst[...] = cv2.blendLinear(src, np.ascontiguousarray(dst), alpha, 1.0 - alpha)
