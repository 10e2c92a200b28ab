"""68 face landmarks per frame (iBUG layout), plus the detector box that says a face is there.

MuseTalk takes the landmarks from DWPose (RTMPose-l whole-body, 133 COCO-WholeBody keypoints; the
face is keypoints 23..90) run top-down on the whole frame, and decides "face present" with S3FD.
Backends here:

* :class:`DWPoseOnnx` — the published ONNX export on onnxruntime (default, no mmcv needed);
* :class:`DWPoseMMPose` — the original .pth through mmpose (optional, when mmpose is installed);
* :class:`DlibAnalyzer` — dlib's HOG detector + 68-point predictor, for tests and demos only
  (its model data is licensed non-commercially).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import cv2
import numpy as np

from .detector import DOWNLOAD_HINT, S3FD_FILE, S3FDDetector, load_s3fd
from .errors import MissingWeightsError, ProcessingError

DWPOSE_ONNX = "dw-ll_ucoco_384.onnx"
DWPOSE_PTH = "dw-ll_ucoco_384.pth"
MMPOSE_CONFIG = "rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py"
NUM_KEYPOINTS = 133
FACE_KEYPOINTS = slice(23, 91)  # COCO-WholeBody face = iBUG 68 points, same order
INPUT_HW = (384, 288)
BBOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # RGB
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)

BoxInt = tuple[int, int, int, int]


@dataclass
class FaceObservation:
    """One frame's face: 68 landmarks [68, 2] float32 (x, y) and the detector's box, if any."""

    landmarks: np.ndarray
    detector_box: BoxInt | None


class FaceAnalyzer(Protocol):
    """Anything that turns RGB uint8 frames into face observations (None = no face)."""

    def analyze(self, frames: list[np.ndarray]) -> list[FaceObservation | None]: ...


class FaceLandmarker(Protocol):
    """A whole-body pose backend reduced to what the analyzers need."""

    def face_landmarks(self, frame: np.ndarray, bbox: Sequence[float] | None = None) -> np.ndarray: ...


# --- RTMPose top-down geometry -------------------------------------------------------------------

def bbox_center_scale(bbox: Sequence[float], input_hw: tuple[int, int] = INPUT_HW,
                      padding: float = BBOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """(x1,y1,x2,y2) → centre and (w,h) scale, padded, then widened to the model's w:h aspect."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2], np.float64)
    w, h = (x2 - x1) * padding, (y2 - y1) * padding
    aspect = input_hw[1] / input_hw[0]
    scale = np.array([w, w / aspect] if w > h * aspect else [h * aspect, h], np.float64)
    return center, scale


def warp_matrix(center: np.ndarray, scale: np.ndarray, input_hw: tuple[int, int] = INPUT_HW) -> np.ndarray:
    """2×3 affine taking the (aspect-fixed) box to the model input; no rotation.

    RTMPose builds it from three point pairs; with rotation 0 that reduces to a uniform scale
    ``input_w / box_w`` about the box centre, which is what we write directly.
    """
    s = input_hw[1] / scale[0]
    return np.array([[s, 0.0, input_hw[1] / 2 - s * center[0]],
                     [0.0, s, input_hw[0] / 2 - s * center[1]]], np.float64)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray,
                 split_ratio: float = SIMCC_SPLIT_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """SimCC [K, Wx], [K, Wy] → input-space points [K, 2] and scores [K] (argmax / split ratio).

    The score is the smaller of the two maxima; points whose score is ≤ 0 are set to bin -1
    before scaling, as RTMPose's decoder does.
    """
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], -1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1)).astype(np.float32)
    locs[scores <= 0] = -1
    return locs / split_ratio, scores


def input_to_image(points: np.ndarray, center: np.ndarray, scale: np.ndarray,
                   input_hw: tuple[int, int] = INPUT_HW) -> np.ndarray:
    """Inverse of :func:`warp_matrix` for points in model-input pixels."""
    wh = np.array([input_hw[1], input_hw[0]], np.float64)
    return (points / wh * scale + center - scale / 2).astype(np.float32)


def _full_frame(frame: np.ndarray) -> tuple[float, float, float, float]:
    return 0.0, 0.0, float(frame.shape[1]), float(frame.shape[0])


# --- DWPose backends ----------------------------------------------------------------------------

def _ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class DWPoseOnnx:
    """DWPose whole-body keypoints from the published ONNX export, on onnxruntime.

    By default the pose box is the whole frame (MuseTalk calls mmpose without boxes, which means
    the full image); callers may pass a tighter box, e.g. an expanded face-detector box, which
    gives the face more input pixels but no longer matches MuseTalk's reference landmarks.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        import onnxruntime as ort

        model_path = Path(model_path)
        if not model_path.is_file():
            raise MissingWeightsError(str(model_path), DOWNLOAD_HINT)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=_ort_providers(device))
        except Exception as exc:
            hint = f"cannot load ONNX model ({exc}); {DOWNLOAD_HINT}"
            raise MissingWeightsError(str(model_path), hint) from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        dims = inp.shape[2:]
        self.input_hw = tuple(dims) if all(isinstance(d, int) for d in dims) else INPUT_HW
        names = [o.name for o in self.session.get_outputs()]
        # The export names them simcc_x / simcc_y; otherwise trust the order (x first).
        self.output_names = (["simcc_x", "simcc_y"] if {"simcc_x", "simcc_y"} <= set(names) else names[:2])

    def keypoints(self, frame: np.ndarray, bbox: Sequence[float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """All 133 keypoints [133, 2] in image pixels and their scores [133]."""
        center, scale = bbox_center_scale(bbox if bbox is not None else _full_frame(frame), self.input_hw)
        h, w = self.input_hw
        matrix = warp_matrix(center, scale, self.input_hw)
        crop = cv2.warpAffine(frame, matrix, (w, h), flags=cv2.INTER_LINEAR)
        x = ((crop.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)[None]
        simcc_x, simcc_y = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x)})
        locs, scores = decode_simcc(simcc_x[0], simcc_y[0])
        return input_to_image(locs, center, scale, self.input_hw), scores

    def face_landmarks(self, frame: np.ndarray, bbox: Sequence[float] | None = None) -> np.ndarray:
        return self.keypoints(frame, bbox)[0][FACE_KEYPOINTS]


def _mmpose_config(checkpoint: Path, config: str | Path | None) -> Path:
    """The RTMPose-l config: given, beside the checkpoint, or from mmpose's packaged configs."""
    candidates = [Path(config)] if config else [checkpoint.parent / MMPOSE_CONFIG]
    spec = importlib.util.find_spec("mmpose")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(loc) / ".mim/configs/wholebody_2d_keypoint/rtmpose/ubody" / MMPOSE_CONFIG)
    for c in candidates:
        if c.is_file():
            return c
    raise MissingWeightsError(str(candidates[0]), "the mmpose RTMPose-l wholebody 384x288 config is needed")


class DWPoseMMPose:
    """DWPose through mmpose with the original .pth (optional extra; mmpose is imported lazily)."""

    def __init__(self, checkpoint: str | Path, config: str | Path | None = None, device: str = "cpu"):
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise MissingWeightsError(str(checkpoint), DOWNLOAD_HINT)
        cfg = _mmpose_config(checkpoint, config)
        apis = importlib.import_module("mmpose.apis")
        # The DWPose checkpoint holds non-tensor metadata that torch's weights-only load rejects.
        os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        self._inference = apis.inference_topdown
        self.model = apis.init_model(str(cfg), str(checkpoint), device=device)

    def keypoints(self, frame: np.ndarray, bbox: Sequence[float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        # mmpose's pipeline expects BGR arrays (its preprocessor converts to RGB).
        bgr = np.ascontiguousarray(frame[..., ::-1])
        boxes = None if bbox is None else np.asarray([bbox], np.float32)
        inst = self._inference(self.model, bgr, boxes)[0].pred_instances
        return np.asarray(inst.keypoints[0], np.float32), np.asarray(inst.keypoint_scores[0], np.float32)

    def face_landmarks(self, frame: np.ndarray, bbox: Sequence[float] | None = None) -> np.ndarray:
        return self.keypoints(frame, bbox)[0][FACE_KEYPOINTS]


# --- analyzers ----------------------------------------------------------------------------------

def _clip_box(box: Sequence[float], shape: tuple[int, ...]) -> BoxInt:
    h, w = shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)  # truncation, like MuseTalk's map(int, …)
    return max(0, x1), max(0, y1), min(w, x2), min(h, y2)


def expand_box(box: Sequence[float], factor: float,
               shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """Scale a box about its centre and clip it to the frame."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * factor / 2, (y2 - y1) * factor / 2
    return max(0.0, cx - hw), max(0.0, cy - hh), min(float(shape[1]), cx + hw), min(float(shape[0]), cy + hh)


class DWPoseS3FDAnalyzer:
    """MuseTalk's pairing: S3FD says whether (and where) a face is; DWPose gives the landmarks.

    ``pose_bbox="full"`` (default) runs DWPose on the whole frame as MuseTalk does;
    ``"face"`` runs it on the top S3FD box scaled by ``face_box_expand``.
    """

    def __init__(self, landmarker: FaceLandmarker, detector: S3FDDetector,
                 pose_bbox: Literal["full", "face"] = "full", face_box_expand: float = 2.0):
        self.landmarker = landmarker
        self.detector = detector
        self.pose_bbox = pose_bbox
        self.face_box_expand = face_box_expand

    def analyze(self, frames: list[np.ndarray]) -> list[FaceObservation | None]:
        out: list[FaceObservation | None] = []
        for frame, faces in zip(frames, self.detector.detect(frames)):
            if not faces:
                out.append(None)
                continue
            best = faces[0]  # detections come sorted by score
            pose_box = None
            if self.pose_bbox == "face":
                pose_box = expand_box(best, self.face_box_expand, frame.shape)
            landmarks = np.asarray(self.landmarker.face_landmarks(frame, pose_box), np.float32)
            out.append(FaceObservation(landmarks, _clip_box(best[:4], frame.shape)))
        return out


def dlib_predictor_path() -> Path:
    """Location of face-recognition-models' 68-point predictor, found without importing the
    package (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "models" / "shape_predictor_68_face_landmarks.dat"
        if path.is_file():
            return path
    raise MissingWeightsError("face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
                              "pip install dlib-bin face-recognition-models (test/demo backend only)")


class DlibAnalyzer:
    """dlib HOG face detector + 68-point shape predictor (tests and demos).

    HOG finds faces from about 80 px; frames under 1000 px on their long side are upsampled once
    so faces from about 40–60 px are found, larger frames are not (cost grows 4× per upsample).
    """

    def __init__(self, predictor_path: str | Path | None = None, upsample: int | None = None):
        import dlib

        path = Path(predictor_path) if predictor_path else dlib_predictor_path()
        if not path.is_file():
            raise MissingWeightsError(str(path), "pip install face-recognition-models")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        self.upsample = upsample

    def analyze(self, frames: list[np.ndarray]) -> list[FaceObservation | None]:
        return [self._one(np.ascontiguousarray(f, dtype=np.uint8)) for f in frames]

    def _one(self, frame: np.ndarray) -> FaceObservation | None:
        up = self.upsample if self.upsample is not None else int(max(frame.shape[:2]) < 1000)
        rects, scores, _ = self._detector.run(frame, up, 0.0)
        if not rects:
            return None
        rect = rects[int(np.argmax(scores))]
        shape = self._predictor(frame, rect)
        pts = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
        box = _clip_box((rect.left(), rect.top(), rect.right(), rect.bottom()), frame.shape)
        return FaceObservation(pts, box)


# --- tiny model and factory ---------------------------------------------------------------------

def write_tiny_dwpose_onnx(path: str | Path, seed: int = 0) -> Path:
    """Write a random ONNX model with the export's I/O: ``input`` float32 [1,3,384,288] →
    ``simcc_x`` [1,133,576], ``simcc_y`` [1,133,768].

    Weights are non-negative and the SimCC bins are non-zero only in the middle fifth of each
    axis, so every keypoint decodes to a positive score near the centre of the pose box.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h, w = INPUT_HW
    wx, wy = int(w * SIMCC_SPLIT_RATIO), int(h * SIMCC_SPLIT_RATIO)
    feat, emb = 8, 4

    def bins(n: int) -> np.ndarray:
        m = np.zeros((emb, n), np.float32)
        m[:, int(n * 0.4):int(n * 0.6)] = rng.uniform(0.1, 1.0, (emb, int(n * 0.6) - int(n * 0.4)))
        return m

    inits = {
        "conv_w": rng.normal(0, 0.1, (feat, 3, 8, 8)).astype(np.float32),
        "conv_b": np.ones(feat, np.float32),
        "embed": rng.uniform(0.1, 1.0, (feat, NUM_KEYPOINTS * emb)).astype(np.float32),
        "kp_shape": np.array([1, NUM_KEYPOINTS, emb], np.int64),
        "bins_x": bins(wx),
        "bins_y": bins(wy),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "embed"], ["e"]),
        helper.make_node("Reshape", ["e", "kp_shape"], ["k"]),
        helper.make_node("MatMul", ["k", "bins_x"], ["simcc_x"]),
        helper.make_node("MatMul", ["k", "bins_y"], ["simcc_y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_dwpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, NUM_KEYPOINTS, wx]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, NUM_KEYPOINTS, wy])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime of the last years
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _mmpose_usable(pth: Path) -> bool:
    if not pth.is_file() or importlib.util.find_spec("mmpose") is None:
        return False
    try:
        importlib.import_module("mmpose.apis")
        _mmpose_config(pth, None)
    except Exception:  # half-installed mmpose (no mmcv._ext) or no config: fall back to ONNX
        return False
    return True


def build_analyzer(models_dir: Path, backend: str = "auto", device: str = "cpu") -> FaceAnalyzer:
    """Face analyzer for ``backend`` in {"auto", "dwpose-onnx", "mmpose", "dlib"}.

    ``auto`` uses mmpose when it imports and ``dwpose/dw-ll_ucoco_384.pth`` exists, else the ONNX
    export. DWPose backends need ``s3fd/s3fd-619a316812.pth`` too. Missing files raise
    :class:`MissingWeightsError` naming the file.
    """
    if backend == "dlib":
        return DlibAnalyzer()
    if backend not in ("auto", "dwpose-onnx", "mmpose"):
        raise ValueError(f"unknown face backend {backend!r}; use auto, dwpose-onnx, mmpose or dlib")
    models_dir = Path(models_dir)
    pth, onnx_path = models_dir / "dwpose" / DWPOSE_PTH, models_dir / "dwpose" / DWPOSE_ONNX
    if backend == "auto":
        backend = "mmpose" if _mmpose_usable(pth) else "dwpose-onnx"
    landmarker: FaceLandmarker
    if backend == "mmpose":
        if importlib.util.find_spec("mmpose") is None:
            raise ProcessingError("face backend 'mmpose' needs the mmpose package (and mmcv) installed",
                                  stage="preprocessing", retryable=False)
        landmarker = DWPoseMMPose(pth, device=device)
    else:
        landmarker = DWPoseOnnx(onnx_path, device=device)
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    net = load_s3fd(models_dir / "s3fd" / S3FD_FILE, device=device, dtype=dtype)
    return DWPoseS3FDAnalyzer(landmarker, S3FDDetector(net, device=device, dtype=dtype))
