"""Blending: crop rule, feathered masks, in-place compositing (checked against PIL's masked paste)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from musetalk_engine.avatar import Avatar
from musetalk_engine.blend import (
    blend_mask, crop_with_padding, expanded_crop_box, feather_kernel_size, paste_face, prepare_blend_material,
)
from musetalk_engine.device_blend import DeviceBlendMaterial, paste_faces
from musetalk_engine.parsing import SKIN, FaceParser


def _reference_paste(frame, face, face_box, mask, crop_box):
    """The released pipeline's composite, written with PIL: paste face into the crop, paste crop with mask."""
    x0, y0, x1, y1 = face_box
    cx0, cy0 = crop_box[:2]
    body = Image.fromarray(frame)
    large = body.crop(tuple(crop_box))
    large.paste(Image.fromarray(cv2.resize(face, (x1 - x0, y1 - y0))), (x0 - cx0, y0 - cy0))
    body.paste(large, (cx0, cy0), Image.fromarray(mask))
    return np.asarray(body)


def test_crop_box_rule():
    assert expanded_crop_box((100, 120, 200, 260)) == (45, 85, 255, 295)  # s = int(140 // 2 * 1.5) = 105
    assert expanded_crop_box((10, 10, 21, 31)) == (0, 5, 30, 35)  # s = int(21 // 2 * 1.5) = 15
    assert expanded_crop_box((0, 0, 40, 50), expand=1.2) == (-10, -5, 50, 55)  # may leave the frame


def test_crop_with_padding_zero_fills_outside():
    frame = np.random.default_rng(0).integers(1, 256, (40, 50, 3), dtype=np.uint8)
    crop = crop_with_padding(frame, (-5, -3, 20, 10))
    assert crop.shape == (13, 25, 3)
    assert not crop[:3].any() and not crop[:, :5].any()
    np.testing.assert_array_equal(crop[3:, 5:], frame[:10, :20])
    assert crop_with_padding(frame, (45, 35, 60, 45))[5:, 5:].sum() == 0
    assert np.array_equal(np.asarray(Image.fromarray(frame).crop((-5, -3, 20, 10))), crop)


def test_feather_kernel_size():
    assert [feather_kernel_size(w, 0.1) for w in (5, 200, 256, 300, 315)] == [1, 21, 25, 31, 31]
    assert [feather_kernel_size(w) for w in (5, 200, 256, 300, 315)] == [1, 11, 13, 15, 15]  # 0.05


def test_blend_mask_keeps_face_box_lower_half_and_feathers():
    crop_box = (0, 0, 200, 200)
    face_box = (40, 30, 160, 170)
    m = blend_mask(np.full((200, 200), 255, np.uint8), face_box, crop_box)
    assert m.shape == (200, 200) and m.dtype == np.uint8
    r = feather_kernel_size(200) // 2  # 10: feathering reaches at most this far
    assert m[: 100 - r].max() == 0  # upper half of the crop
    assert m[:, : 40 - r].max() == 0 and m[:, 160 + r:].max() == 0 and m[170 + r:].max() == 0  # outside the box
    assert m[100 + r:170 - r, 40 + r:160 - r].min() == 255  # interior untouched by the blur
    assert 0 < m[100, 100] < 255 and 0 < m[150, 40] < 255  # feathered edges
    # Crop offset: the same geometry shifted into frame coordinates gives the same mask.
    shifted = blend_mask(np.full((200, 200), 255, np.uint8), (540, 330, 660, 470), (500, 300, 700, 500))
    np.testing.assert_array_equal(shifted, m)
    with pytest.raises(ValueError, match="crop size"):
        blend_mask(np.zeros((10, 10), np.uint8), face_box, crop_box)


def test_blend_mask_takes_parse_mask_content():
    parse = np.zeros((200, 200), np.uint8)
    parse[120:160, 60:100] = 255
    m = blend_mask(parse, (40, 30, 160, 170), (0, 0, 200, 200), blur_factor=0.0)  # k = 1: no blur
    np.testing.assert_array_equal(m, parse)


def _frame_face(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


def test_paste_face_touches_only_face_region_and_honours_mask():
    frame, face = _frame_face()
    face_box = (50, 30, 110, 100)
    crop_box = expanded_crop_box(face_box)
    ch, cw = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
    mask = np.zeros((ch, cw), np.uint8)
    mask[ch // 2:, :] = 255  # lower half opaque, upper half transparent
    mask[ch // 2 - 5:ch // 2, :] = 128
    original = frame.copy()
    expected = _reference_paste(original, face, face_box, mask, crop_box)
    paste_face(frame, face, face_box, mask, crop_box)
    assert np.abs(frame.astype(int) - expected).max() <= 1  # PIL's masked paste up to rounding

    changed = np.any(frame != original, axis=2)
    inside = np.zeros_like(changed)
    inside[30:100, 50:110] = True
    assert not changed[~inside].any()  # nothing outside the face box (hence the crop) moves
    resized = cv2.resize(face, (60, 70))
    y_mid = crop_box[1] + ch // 2
    np.testing.assert_array_equal(frame[y_mid:100, 50:110], resized[y_mid - 30:, :])  # mask 255 → face
    np.testing.assert_array_equal(frame[30:y_mid - 5, 50:110], original[30:y_mid - 5, 50:110])  # mask 0 → frame


@pytest.mark.parametrize("face_box", [(0, 0, 40, 50), (130, 80, 160, 120), (-10, 90, 30, 140)])
def test_paste_face_at_frame_edges(face_box):
    frame, face = _frame_face(seed=1)
    crop_box = expanded_crop_box(face_box)
    ch, cw = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
    mask = np.full((ch, cw), 255, np.uint8)
    mask[: ch // 3] = 0
    mask = cv2.GaussianBlur(mask, (9, 9), 0)
    original = frame.copy()
    expected = _reference_paste(original, face, face_box, mask, crop_box)
    paste_face(frame, face, face_box, mask, crop_box)
    assert np.abs(frame.astype(int) - expected).max() <= 1
    assert (frame != original).any()


def test_paste_face_rejects_mismatched_mask():
    frame, face = _frame_face()
    with pytest.raises(ValueError, match="mask"):
        paste_face(frame, face, (50, 30, 110, 100), np.zeros((5, 5), np.uint8), expanded_crop_box((50, 30, 110, 100)))


class _AllSkin(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 19, 512, 512)
        logits[:, SKIN] = 1
        return logits


def test_prepare_blend_material_batches_frames():
    frames = [_frame_face(seed=s)[0] for s in range(3)]
    boxes = [(50, 30, 110, 100), (0, 0, 40, 50), (120, 70, 160, 120)]
    parser = FaceParser(_AllSkin(), mode="raw", batch_size=2)
    material = prepare_blend_material(frames, boxes, parser)
    assert len(material) == 3
    for (mask, crop_box), box in zip(material, boxes):
        assert crop_box == expanded_crop_box(box)
        assert mask.shape == (crop_box[3] - crop_box[1], crop_box[2] - crop_box[0])
        expected = blend_mask(np.full(mask.shape, 255, np.uint8), box, crop_box)
        np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="face boxes"):
        prepare_blend_material(frames, boxes[:2], parser)


def test_device_paste_gives_the_numpy_paste_for_a_batch():
    """The tensor-op blend (the CUDA path's) on the CPU: the same frames as ``paste_face`` within one level,
    faces at the frame edges included, and a frame without a face left as it was."""
    boxes = [(50, 30, 110, 100), (0, 0, 40, 50), (130, 80, 160, 120), (-10, 90, 30, 140)]
    crops = [expanded_crop_box(b) for b in boxes]
    masks = []
    for cx0, cy0, cx1, cy1 in crops:
        mask = np.full((cy1 - cy0, cx1 - cx0), 255, np.uint8)
        mask[: (cy1 - cy0) // 2] = 0
        masks.append(cv2.GaussianBlur(mask, (9, 9), 0))
    n = len(boxes)
    frames = np.stack([_frame_face(seed=s)[0] for s in range(n)])
    faces = np.stack([_frame_face(seed=10 + s)[1] for s in range(n)])
    h, w = frames.shape[1:3]
    face_found = np.array([True, True, True, False])
    avatar = Avatar(video_sha256="x", fps=25.0, width=w, height=h, boxes=np.array(boxes, np.int32),
                    crop_boxes=np.array(crops, np.int32), latents=np.zeros((n, 8, 32, 32), np.float16),
                    masks=masks, face_found=face_found)
    order = [2, 0, 3, 1]  # batches follow the cycle, not the source order
    out = paste_faces(torch.from_numpy(frames[order]), torch.from_numpy(faces[order]), order, avatar,
                      DeviceBlendMaterial(avatar, torch.device("cpu"))).numpy()
    for j, i in enumerate(order):
        expected = frames[i].copy()
        if face_found[i]:
            paste_face(expected, faces[i], boxes[i], masks[i], crops[i])
        assert np.abs(out[j].astype(int) - expected).max() <= 1, f"frame {i}"
    assert np.array_equal(out[order.index(3)], frames[3])
