"""Output framing: crop around the face for another aspect ratio, then scale to the named resolution."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk_engine.errors import MediaError
from musetalk_engine.framing import output_shape


@pytest.mark.parametrize("face_x, face_w, expected_x", [(101, 121, 0), (333, 120, 190), (334, 121, 192),
                                                        (1151, 121, 876)])
def test_wide_source_to_portrait_crops_evenly_around_the_face(face_x, face_w, expected_x):
    boxes = np.array([[face_x, 201, face_x + face_w, 341]])
    shape = output_shape("9:16", "720p", 1280, 720, boxes)
    x, y, w, h = shape.crop
    assert (w, h) == (404, 720) and y == 0
    assert x == expected_x  # centred on the face, then down to an even pixel (191 → 190 for the second)
    assert x <= face_x and face_x + face_w <= x + w + 1  # the face stays in (within the one-pixel rounding)
    assert shape.size == (720, 1280)


def test_tall_source_to_landscape_keeps_the_whole_face():
    boxes = np.array([[100, 501, 260, 693], [110, 511, 270, 703]])
    x, y, w, h = output_shape("16:9", None, 360, 1280, boxes).crop
    assert (x, w, h) == (0, 360, 202) and y % 2 == 0
    assert y <= 501 and 703 <= y + h + 1  # a face exactly as tall as the crop may lose one row


def test_same_aspect_only_scales_and_unknown_values_name_the_accepted_ones():
    boxes = np.array([[10, 10, 50, 50]])
    assert output_shape(None, None, 640, 360, boxes) is None
    shape = output_shape("16:9", "1080p", 640, 360, boxes)
    assert shape.crop is None and shape.size == (1920, 1080)
    with pytest.raises(MediaError, match="accepted: 9:16"):
        output_shape("21:9", None, 640, 360, boxes)
    with pytest.raises(MediaError, match="720p"):
        output_shape(None, "4k", 640, 360, boxes)
