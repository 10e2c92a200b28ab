"""The v1.5 face box rule, borrowing boxes for faceless frames, and the forward/backward frame cycle."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk_engine.cycle import cycle_indices
from musetalk_engine.facebox import EXTRA_MARGIN, face_box, fill_missing, landmark_box


def _landmarks(xs=(100, 200), nose=(150, 160), chin_y=220, top_y=130) -> np.ndarray:
    """68 points spanning x ∈ xs, y ∈ [top_y, chin_y], with landmark 29 (nose) at ``nose``."""
    pts = np.zeros((68, 2), np.float32)
    pts[:, 0] = np.linspace(xs[0], xs[1], 68)
    pts[:, 1] = np.linspace(top_y, chin_y, 68)
    pts[29] = nose
    return pts


def test_landmark_box_rule():
    lm = _landmarks(xs=(100, 200), nose=(150, 160), chin_y=220)
    # y2 = 220 (max y); y1 = 2·160 − 220 = 100; x from min/max
    assert landmark_box(lm) == (100, 100, 200, 220)


def test_landmark_box_top_clamped_at_zero():
    lm = _landmarks(nose=(150, 40), chin_y=120, top_y=30)
    assert landmark_box(lm) == (100, 0, 200, 120)  # 2·40 − 120 = −40 → 0


def test_face_box_adds_extra_margin_below_the_chin():
    lm = _landmarks()
    assert EXTRA_MARGIN == 10
    assert face_box(lm, None, (640, 480)) == (100, 100, 200, 230)
    assert face_box(lm, None, (640, 480), extra_margin=25) == (100, 100, 200, 245)
    assert face_box(lm, None, (640, 480), extra_margin=0) == (100, 100, 200, 220)


def test_extra_margin_clamped_to_frame_height():
    lm = _landmarks(chin_y=235)  # y1 = 2·160 − 235 = 85
    assert face_box(lm, None, (640, 240)) == (100, 85, 200, 240)  # 235 + 10 → clamped to 240


def test_degenerate_landmarks_fall_back_to_detector_box():
    flat = np.tile(np.float32([[150, 160]]), (68, 1))  # every point the same: zero-size box
    assert landmark_box(flat) is None
    assert face_box(flat, (90, 80, 210, 200), (640, 480)) == (90, 80, 210, 210)  # margin applies too
    # no horizontal spread, or the nose as the lowest point (then y1 = y2), degenerate too
    assert landmark_box(_landmarks(nose=(150, 220), chin_y=220)) is None
    thin = _landmarks(xs=(150, 150))
    assert landmark_box(thin) is None
    assert face_box(thin, (90, 80, 210, 200), (640, 480)) == (90, 80, 210, 210)
    # landmarks off the left edge are not trusted either
    assert landmark_box(_landmarks(xs=(-5, 200))) is None


def test_no_landmarks_uses_detector_and_neither_gives_none():
    assert face_box(None, (10, 20, 110, 140), (640, 480)) == (10, 20, 110, 150)
    assert face_box(None, None, (640, 480)) is None
    assert face_box(np.tile(np.float32([[5, 5]]), (68, 1)), None, (640, 480)) is None


def test_detector_box_is_clamped_to_the_frame():
    assert face_box(None, (-10, -5, 700, 470), (640, 480)) == (0, 0, 640, 480)


def test_fill_missing_borrows_the_nearest_box():
    a, b = (1, 2, 3, 4), (5, 6, 7, 8)
    assert fill_missing([None, a, None, None, None, b, None]) == [a, a, a, a, b, b, b]
    assert fill_missing([a]) == [a]
    assert fill_missing([None, None, b]) == [b, b, b]
    with pytest.raises(ValueError):
        fill_missing([None, None])


def test_cycle_indices_ping_pong():
    assert cycle_indices(3, 10).tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]
    assert cycle_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert cycle_indices(5, 3).tolist() == [0, 1, 2]  # audio shorter than the video: plain forward
    assert cycle_indices(4, 0).tolist() == []
    with pytest.raises(ValueError):
        cycle_indices(0, 5)
