"""Blending as tensor ops on the model's device: the generated faces never leave the GPU; only finished
frames cross to the CPU. The same math as :func:`musetalk_engine.blend.paste_face` (bilinear resize to the
face box, alpha composite with the crop's feathered mask), so both paths give the same frames."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .avatar import Avatar


class DeviceBlendMaterial:
    """An avatar's blend regions on the device: per frame the face box ∩ crop ∩ frame, and the alpha there
    (rows that are fully transparent trimmed away, as the CPU path does)."""

    def __init__(self, avatar: Avatar, device: torch.device):
        self.regions: list[tuple[int, int, int, int] | None] = []
        self.alphas: list[torch.Tensor | None] = []
        for i in range(avatar.n_frames):
            region, alpha = _region_alpha(avatar, i)
            self.regions.append(region)
            self.alphas.append(None if alpha is None else
                               torch.from_numpy(alpha).to(device).float().div_(255).unsqueeze(-1))


def _region_alpha(avatar: Avatar, i: int):
    x0, y0, x1, y1 = (int(v) for v in avatar.boxes[i])
    cx0, cy0, cx1, cy1 = (int(v) for v in avatar.crop_boxes[i])
    rx0, ry0 = max(x0, cx0, 0), max(y0, cy0, 0)
    rx1, ry1 = min(x1, cx1, avatar.width), min(y1, cy1, avatar.height)
    if rx1 <= rx0 or ry1 <= ry0:
        return None, None
    alpha = avatar.masks[i][ry0 - cy0:ry1 - cy0, rx0 - cx0:rx1 - cx0]
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None, None
    ry0, ry1 = ry0 + int(rows[0]), ry0 + int(rows[-1]) + 1
    return (rx0, ry0, rx1, ry1), np.ascontiguousarray(alpha[rows[0]:rows[-1] + 1])


def paste_faces(frames: torch.Tensor, faces: torch.Tensor, indices, avatar: Avatar,
                material: DeviceBlendMaterial) -> torch.Tensor:
    """Composite ``faces`` [B,256,256,3] uint8 into ``frames`` [B,H,W,3] uint8 (same device, modified in
    place: pass a copy) for source frames ``indices``; returns ``frames``."""
    for j, i in enumerate(indices):
        i = int(i)
        region = material.regions[i]
        if region is None or not avatar.face_found[i]:
            continue
        x0, y0, x1, y1 = (int(v) for v in avatar.boxes[i])
        rx0, ry0, rx1, ry1 = region
        face = faces[j].permute(2, 0, 1).unsqueeze(0).float()
        # cv2.resize's INTER_LINEAR uses half-pixel centres: align_corners=False, no antialias
        face = F.interpolate(face, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        face = face[0, :, ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0].permute(1, 2, 0)
        alpha = material.alphas[i]
        dst = frames[j, ry0:ry1, rx0:rx1].float()
        frames[j, ry0:ry1, rx0:rx1] = (face * alpha + dst * (1 - alpha)).round_().clamp_(0, 255).to(torch.uint8)
    return frames
