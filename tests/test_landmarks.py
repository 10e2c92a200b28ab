"""Face detection (S3FD) and 68-point landmarks (DWPose ONNX, dlib) on self-made inputs."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from musetalk_engine.detector import (S3FD, S3FDDetector, decode_level, load_s3fd, nms,
                                      write_tiny_s3fd)
from musetalk_engine.errors import MissingWeightsError, ProcessingError
from musetalk_engine.landmarks import (DlibAnalyzer, DWPoseOnnx, DWPoseS3FDAnalyzer, FaceObservation,
                                       bbox_center_scale, build_analyzer, decode_simcc, input_to_image,
                                       warp_matrix, write_tiny_dwpose_onnx)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- dlib: a real face ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dlib_analyzer() -> DlibAnalyzer:
    return DlibAnalyzer()


def test_dlib_finds_astronaut_face(dlib_analyzer):
    skdata = pytest.importorskip("skimage.data")
    (obs,) = dlib_analyzer.analyze([skdata.astronaut()])
    assert isinstance(obs, FaceObservation)
    lm = obs.landmarks
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    x1, y1, x2, y2 = obs.detector_box
    assert x1 <= lm[29, 0] <= x2 and y1 <= lm[29, 1] <= y2  # nose inside the box
    assert lm[48:68, 1].min() > lm[36:48, 1].max()  # mouth below the eyes
    assert int(np.argmax(lm[:, 1])) in range(6, 11)  # lowest point is on the chin
    assert lm[:, 1].max() - lm[8, 1] < 3


def test_dlib_blank_image_has_no_face(dlib_analyzer):
    assert dlib_analyzer.analyze([np.full((240, 320, 3), 128, np.uint8)]) == [None]


# --- S3FD ---------------------------------------------------------------------------------------

def test_s3fd_full_size_layout_matches_release():
    with torch.device("meta"):
        sd = S3FD().state_dict()
    expected = {
        "conv1_1.weight": (64, 3, 3, 3), "conv3_3.weight": (256, 256, 3, 3),
        "conv5_3.bias": (512,), "fc6.weight": (1024, 512, 3, 3), "fc7.weight": (1024, 1024, 1, 1),
        "conv6_1.weight": (256, 1024, 1, 1), "conv6_2.weight": (512, 256, 3, 3),
        "conv7_1.weight": (128, 512, 1, 1), "conv7_2.weight": (256, 128, 3, 3),
        "conv3_3_norm.weight": (256,), "conv4_3_norm.weight": (512,), "conv5_3_norm.weight": (512,),
        "conv3_3_norm_mbox_conf.weight": (4, 256, 3, 3), "conv3_3_norm_mbox_loc.weight": (4, 256, 3, 3),
        "conv4_3_norm_mbox_conf.weight": (2, 512, 3, 3), "fc7_mbox_loc.weight": (4, 1024, 3, 3),
        "conv7_2_mbox_conf.weight": (2, 256, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # 13 VGG convs + fc6/fc7 + conv6_x/conv7_x (w, b) + 3 norms + 12 heads (w, b)
    assert len(sd) == 19 * 2 + 3 + 12 * 2
    assert sum(v.numel() for v in sd.values()) == 22_459_110  # ≈ 89.8 MB of fp32, the .pth's size


def test_tiny_s3fd_roundtrip(tmp_path):
    path = write_tiny_s3fd(tmp_path / "s3fd.pth", seed=3)
    net = load_s3fd(path)
    ref = S3FD(base=4)
    assert net.state_dict().keys() == ref.state_dict().keys()
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert not net.training


def test_s3fd_missing_and_corrupt(tmp_path):
    with pytest.raises(MissingWeightsError, match="s3fd-619a316812.pth") as err:
        load_s3fd(tmp_path / "s3fd" / "s3fd-619a316812.pth")
    assert "musetalk-flow models download" in str(err.value)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MissingWeightsError, match="bad.pth"):
        load_s3fd(bad)


def test_nms_suppresses_overlaps():
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [7, 0, 16, 9], [40, 40, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # IoU(0,1) = 50/150 > 0.3 (suppressed); IoU(0,2) = 30/170 (kept); box 3 is apart.
    assert nms(boxes, scores, 0.3) == [3, 0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0)) == []


def test_decode_level_prior_boxes():
    conf = torch.zeros(1, 2, 2, 3)
    conf[0, 1] = math.log(3.0)  # softmax → 0.75 face
    loc = torch.zeros(1, 4, 2, 3)
    loc[0, :, 1, 2] = torch.tensor([1.0, -1.0, 0.0, 5 * math.log(2.0)])
    out = decode_level(conf, loc, stride=8).numpy()
    assert out.shape == (1, 6, 5)
    np.testing.assert_allclose(out[0, 0], [4 - 16, 4 - 16, 4 + 16, 4 + 16, 0.75], rtol=1e-5)
    # cell (y=1, x=2): centre (20, 12) shifted by ±0.1·32; width 32, height 32·exp(0.2·5·ln2) = 64
    cx, cy = 20 + 3.2, 12 - 3.2
    np.testing.assert_allclose(out[0, 5], [cx - 16, cy - 32, cx + 16, cy + 32, 0.75], rtol=1e-5)


def test_tiny_s3fd_detect_is_well_formed(tmp_path):
    net = load_s3fd(write_tiny_s3fd(tmp_path / "s3fd.pth"))
    frames = [_noise(64, 96, i) for i in range(3)]
    results = S3FDDetector(net, threshold=0.3, batch_size=2).detect(frames)
    assert len(results) == 3 and any(results)
    for faces in results:
        scores = [f[4] for f in faces]
        assert scores == sorted(scores, reverse=True) and all(s > 0.3 for s in scores)
        for x1, y1, x2, y2, _ in faces:
            assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 64
    # batching does not change the answer (up to float rounding: oneDNN picks different conv kernels per
    # batch size, so compare each face with a tolerance, in any order among near-equal scores)
    single = S3FDDetector(net, threshold=0.3, batch_size=1).detect(frames)
    assert [len(f) for f in single] == [len(f) for f in results]
    for ours, theirs in zip(single, results):
        for face in ours:
            assert any(np.allclose(face, other, atol=1e-3) for other in theirs), face


# --- DWPose ONNX --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return write_tiny_dwpose_onnx(tmp_path_factory.mktemp("dw") / "dw-ll_ucoco_384.onnx")


def test_tiny_onnx_matches_export_io(tiny_onnx):
    model = DWPoseOnnx(tiny_onnx)
    (inp,) = model.session.get_inputs()
    assert (inp.name, inp.shape, inp.type) == ("input", [1, 3, 384, 288], "tensor(float)")
    outs = {o.name: o.shape for o in model.session.get_outputs()}
    assert outs == {"simcc_x": [1, 133, 576], "simcc_y": [1, 133, 768]}
    assert model.input_hw == (384, 288)


def test_center_scale_and_inverse_affine():
    # 200 wide × 400 tall frame: padded (250, 500), widened to 288:384 → (375, 500)
    center, scale = bbox_center_scale((0, 0, 200, 400))
    np.testing.assert_allclose(center, [100, 200])
    np.testing.assert_allclose(scale, [375, 500])
    pts = input_to_image(np.array([[144, 192], [0, 0], [288, 384]], np.float32), center, scale)
    np.testing.assert_allclose(pts, [[100, 200], [-87.5, -50], [287.5, 450]], atol=1e-4)
    m = warp_matrix(center, scale)
    p = np.array([30.0, 310.0])
    q = m @ np.r_[p, 1.0]
    np.testing.assert_allclose(input_to_image(q[None].astype(np.float32), center, scale)[0], p, atol=1e-3)


def test_warp_puts_a_dot_where_the_matrix_says():
    img = np.zeros((400, 200, 3), np.uint8)
    cv2.circle(img, (60, 300), 3, (255, 255, 255), -1)
    center, scale = bbox_center_scale((0, 0, 200, 400))
    m = warp_matrix(center, scale)
    crop = cv2.warpAffine(img, m, (288, 384), flags=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    np.testing.assert_allclose([xs.mean(), ys.mean()], m @ [60, 300, 1], atol=1.0)


def test_decode_simcc_argmax_and_split():
    sx, sy = np.zeros((3, 576), np.float32), np.zeros((3, 768), np.float32)
    sx[0, 288], sy[0, 384] = 0.9, 0.7
    sx[1, 10], sy[1, 101] = 0.4, 0.8
    locs, scores = decode_simcc(sx, sy)  # keypoint 2 is all zeros → invalid (-1 bins)
    np.testing.assert_allclose(locs, [[144, 192], [5, 50.5], [-0.5, -0.5]])
    np.testing.assert_allclose(scores, [0.7, 0.4, 0.0])


class _FixedSession:
    """Stands in for the ORT session: returns SimCC peaks at chosen bins."""

    def __init__(self, bins_xy: list[tuple[int, int]]):
        self.sx = np.zeros((1, 133, 576), np.float32)
        self.sy = np.zeros((1, 133, 768), np.float32)
        for k, (bx, by) in enumerate(bins_xy):
            self.sx[0, k, bx] = self.sy[0, k, by] = 1.0
        self.seen: dict = {}

    def run(self, names, feeds):
        self.seen = feeds
        return [self.sx, self.sy] if names[0] == "simcc_x" else [self.sy, self.sx]


def test_onnx_keypoints_map_known_bins_to_image(tiny_onnx):
    model = DWPoseOnnx(tiny_onnx)
    # frame 200×400 (w×h): input pixel (u, v) ↔ image (u·375/288 − 87.5, v·500/384 − 50)
    fake = _FixedSession([(288, 384)] + [(2 * 72, 2 * 96)] * 132)
    model.session = fake
    frame = _noise(400, 200, 0)
    kp, scores = model.keypoints(frame)
    assert kp.shape == (133, 2) and scores.shape == (133,)
    np.testing.assert_allclose(kp[0], [100, 200], atol=1e-3)
    np.testing.assert_allclose(kp[1], [72 * 375 / 288 - 87.5, 96 * 500 / 384 - 50], atol=1e-3)
    (x,) = fake.seen.values()
    assert x.shape == (1, 3, 384, 288) and x.dtype == np.float32
    # input is the RGB frame normalised with the RGB mean/std; the frame's centre pixel sits at
    # the centre of the input
    expect = (frame[200, 100].astype(np.float32) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np.testing.assert_allclose(x[0, :, 192, 144], expect, atol=0.05)


def test_tiny_onnx_face_landmarks_inside_frame(tiny_onnx):
    lm = DWPoseOnnx(tiny_onnx).face_landmarks(_noise(240, 320, 1))
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    assert (lm >= 0).all() and (lm[:, 0] <= 320).all() and (lm[:, 1] <= 240).all()


def test_corrupt_onnx_is_missing_weights(tmp_path):
    bad = tmp_path / "dw-ll_ucoco_384.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(MissingWeightsError, match="dw-ll_ucoco_384.onnx"):
        DWPoseOnnx(bad)


# --- combined analyzer and factory --------------------------------------------------------------

class _NoFaces:
    def detect(self, frames):
        return [[] for _ in frames]


def _models_dir(tmp_path: Path, onnx: bool = True, s3fd: bool = True) -> Path:
    if onnx:
        write_tiny_dwpose_onnx(tmp_path / "dwpose" / "dw-ll_ucoco_384.onnx")
    if s3fd:
        write_tiny_s3fd(tmp_path / "s3fd" / "s3fd-619a316812.pth")
    return tmp_path


def test_dwpose_s3fd_analyzer(tmp_path):
    analyzer = build_analyzer(_models_dir(tmp_path), backend="auto")
    assert isinstance(analyzer, DWPoseS3FDAnalyzer) and isinstance(analyzer.landmarker, DWPoseOnnx)
    analyzer.detector.threshold = 0.3  # a random detector: make sure something is "found"
    frames = [_noise(64, 96, i) for i in range(2)]
    expected = analyzer.detector.detect(frames)
    obs = analyzer.analyze(frames)
    assert len(obs) == 2
    for o, dets in zip(obs, expected):
        if not dets:
            assert o is None
            continue
        assert o.landmarks.shape == (68, 2)
        assert o.detector_box == tuple(int(v) for v in dets[0][:4])
    face_mode = DWPoseS3FDAnalyzer(analyzer.landmarker, analyzer.detector, pose_bbox="face")
    assert [o is None for o in face_mode.analyze(frames)] == [o is None for o in obs]
    assert DWPoseS3FDAnalyzer(analyzer.landmarker, _NoFaces()).analyze(frames) == [None, None]


def test_build_analyzer_names_missing_files(tmp_path):
    with pytest.raises(MissingWeightsError, match="dw-ll_ucoco_384.onnx"):
        build_analyzer(tmp_path / "empty")
    with pytest.raises(MissingWeightsError, match="s3fd-619a316812.pth"):
        build_analyzer(_models_dir(tmp_path, s3fd=False), backend="dwpose-onnx")


def test_build_analyzer_backends(tmp_path):
    assert isinstance(build_analyzer(tmp_path, backend="dlib"), DlibAnalyzer)
    with pytest.raises(ValueError, match="unknown face backend"):
        build_analyzer(tmp_path, backend="retinaface")
    try:
        import mmpose  # noqa: F401
    except Exception:
        with pytest.raises(ProcessingError, match="mmpose"):
            build_analyzer(tmp_path, backend="mmpose")
    else:
        with pytest.raises(MissingWeightsError, match="dw-ll_ucoco_384.pth"):
            build_analyzer(tmp_path, backend="mmpose")


def test_mmpose_backend_loads(tmp_path):
    pytest.importorskip("mmpose.apis")
    pth = Path("models/dwpose/dw-ll_ucoco_384.pth")
    if not pth.is_file():
        pytest.skip("real DWPose checkpoint not present")
    from musetalk_engine.landmarks import DWPoseMMPose

    lm = DWPoseMMPose(pth).face_landmarks(_noise(256, 256, 0))
    assert lm.shape == (68, 2)


def test_full_random_models_find_a_plausible_face_in_every_benchmark_frame(tmp_path):
    """Full-size random models (GPU benchmarks) use the ONNX DWPose backend with random weights: every
    frame of the benchmark's 720p clip must still get a face box of plausible size, or the benchmark
    would fail with no face."""
    from musetalk_engine.facebox import face_box
    from musetalk_engine.sample_media import make_avatar_video
    from musetalk_engine.tiny import RANDOM_MODEL_LANDMARKS
    from musetalk_engine.video import decode_frames

    backend = RANDOM_MODEL_LANDMARKS["full"]
    analyzer = build_analyzer(_models_dir(tmp_path), backend=backend)
    clip = make_avatar_video(tmp_path / "bench.mp4", seconds=0.4, width=1280, height=720)
    frames = list(decode_frames(clip, 25.0))
    for obs in analyzer.analyze(frames):
        assert obs is not None
        x0, y0, x1, y1 = face_box(obs.landmarks, obs.detector_box, (1280, 720))
        assert 0 <= x0 < x1 <= 1280 and 0 <= y0 < y1 <= 720
        assert 1280 / 10 < x1 - x0 < 1280 / 2 and 720 / 10 < y1 - y0 < 720 / 2
