"""Blending as tensor ops on the model's device: the generated faces never leave the GPU; only finished
frames cross to the CPU. The same math as :func:`musetalk_engine.blend.paste_face` (bilinear resize to the
face box, alpha composite with the crop's feathered mask), so both paths give the same frames."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .avatar import Avatar
from .blend import blend_region


class DeviceBlendMaterial:
    """An avatar's blend regions on the device: per frame :func:`~musetalk_engine.blend.blend_region` (face
    box ∩ crop ∩ frame, fully transparent rows trimmed away) and the alpha there; None for frames without
    a face or with nothing to paste."""

    def __init__(self, avatar: Avatar, device: torch.device):
        self.regions: list[tuple[int, int, int, int] | None] = []
        self.alphas: list[torch.Tensor | None] = []
        for i in range(avatar.n_frames):
            found = None
            if avatar.face_found[i]:  # frames without a face pass through untouched
                found = blend_region(avatar.boxes[i], avatar.crop_boxes[i], avatar.masks[i], avatar.width,
                                     avatar.height)
            self.regions.append(None if found is None else found[0])
            self.alphas.append(None if found is None else
                               torch.from_numpy(np.ascontiguousarray(found[1])).to(device).float().div_(255)
                               .unsqueeze(-1))


def paste_faces(frames: torch.Tensor, faces: torch.Tensor, indices, avatar: Avatar,
                material: DeviceBlendMaterial) -> torch.Tensor:
    """Composite ``faces`` [B,256,256,3] uint8 into ``frames`` [B,H,W,3] uint8 (same device, modified in
    place: pass a copy) for source frames ``indices``; returns ``frames``."""
    for j, i in enumerate(indices):
        i = int(i)
        region = material.regions[i]
        if region is None:
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
