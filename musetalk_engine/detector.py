"""S3FD face detector (the one MuseTalk uses through its copy of face_alignment).

The module layout and parameter names match the released ``s3fd-619a316812.pth`` so that file loads
strictly. Channel widths scale with ``base`` (64 in the release) so tests can write a tiny model with
the same keys. Decoding follows the published detector: softmax per level, candidates above 0.05,
prior boxes centred on each cell (strides 4…128, side 4·stride), variances 0.1/0.2, NMS at IoU 0.3,
faces kept above 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingWeightsError

DOWNLOAD_HINT = "run `musetalk-flow models download DIR` to fetch the model files"
S3FD_FILE = "s3fd-619a316812.pth"

#: Per-channel means the detector subtracts (Caffe-trained VGG, B,G,R order).
S3FD_MEAN = (104.0, 117.0, 123.0)
CANDIDATE_SCORE = 0.05
NMS_IOU = 0.3
VARIANCES = (0.1, 0.2)

Box = tuple[float, float, float, float, float]

# VGG16 trunk: (name, input channels, output channels) as multiples of `base` (0 = the 3 RGB inputs).
_VGG = [
    ("conv1_1", 0, 1), ("conv1_2", 1, 1),
    ("conv2_1", 1, 2), ("conv2_2", 2, 2),
    ("conv3_1", 2, 4), ("conv3_2", 4, 4), ("conv3_3", 4, 4),
    ("conv4_1", 4, 8), ("conv4_2", 8, 8), ("conv4_3", 8, 8),
    ("conv5_1", 8, 8), ("conv5_2", 8, 8), ("conv5_3", 8, 8),
]
# Detection sources: (feature name, channel multiple); conv3_3 has 4 confidence maps (max-out).
_SOURCES = [("conv3_3_norm", 4), ("conv4_3_norm", 8), ("conv5_3_norm", 8),
            ("fc7", 16), ("conv6_2", 8), ("conv7_2", 4)]


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (initialised to ``scale``)."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Sum of squares in fp32: VGG activations overflow fp16 when squared and summed.
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return (x32 / norm * self.weight.float().view(1, -1, 1, 1)).to(x.dtype)


class S3FD(nn.Module):
    """S3FD network; ``forward`` returns [conf, loc] × 6 levels (strides 4, 8, …, 128)."""

    def __init__(self, base: int = 64):
        super().__init__()
        self.base = base
        for name, cin, cout in _VGG:
            setattr(self, name, nn.Conv2d(cin * base if cin else 3, cout * base, 3, 1, 1))
        # fc6 is a plain 3×3 conv with padding 3 in the released port (grows the map by 4 cells).
        self.fc6 = nn.Conv2d(8 * base, 16 * base, 3, 1, 3)
        self.fc7 = nn.Conv2d(16 * base, 16 * base, 1, 1, 0)
        self.conv6_1 = nn.Conv2d(16 * base, 4 * base, 1, 1, 0)
        self.conv6_2 = nn.Conv2d(4 * base, 8 * base, 3, 2, 1)
        self.conv7_1 = nn.Conv2d(8 * base, 2 * base, 1, 1, 0)
        self.conv7_2 = nn.Conv2d(2 * base, 4 * base, 3, 2, 1)
        self.conv3_3_norm = L2Norm(4 * base, 10.0)
        self.conv4_3_norm = L2Norm(8 * base, 8.0)
        self.conv5_3_norm = L2Norm(8 * base, 5.0)
        for i, (src, mult) in enumerate(_SOURCES):
            setattr(self, f"{src}_mbox_conf", nn.Conv2d(mult * base, 4 if i == 0 else 2, 3, 1, 1))
            setattr(self, f"{src}_mbox_loc", nn.Conv2d(mult * base, 4, 3, 1, 1))

    def _block(self, h: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        for n in names:
            h = F.relu(getattr(self, n)(h))
        return h

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.max_pool2d(self._block(x, ["conv1_1", "conv1_2"]), 2, 2)
        h = F.max_pool2d(self._block(h, ["conv2_1", "conv2_2"]), 2, 2)
        f3 = self._block(h, ["conv3_1", "conv3_2", "conv3_3"])
        f4 = self._block(F.max_pool2d(f3, 2, 2), ["conv4_1", "conv4_2", "conv4_3"])
        f5 = self._block(F.max_pool2d(f4, 2, 2), ["conv5_1", "conv5_2", "conv5_3"])
        f7 = self._block(F.max_pool2d(f5, 2, 2), ["fc6", "fc7"])
        f62 = self._block(f7, ["conv6_1", "conv6_2"])
        f72 = self._block(f62, ["conv7_1", "conv7_2"])
        feats = [self.conv3_3_norm(f3), self.conv4_3_norm(f4), self.conv5_3_norm(f5), f7, f62, f72]
        out: list[torch.Tensor] = []
        for i, ((src, _), feat) in enumerate(zip(_SOURCES, feats)):
            conf = getattr(self, f"{src}_mbox_conf")(feat)
            if i == 0:
                # Max-out background: three background logits collapse to their maximum.
                conf = torch.cat([conf[:, :3].amax(dim=1, keepdim=True), conf[:, 3:4]], dim=1)
            out += [conf, getattr(self, f"{src}_mbox_loc")(feat)]
        return out


def load_s3fd(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> S3FD:
    """Load a state dict in the released key layout (any width), strictly; eval mode."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(str(path), DOWNLOAD_HINT)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        base = int(state["conv1_1.weight"].shape[0])
        net = S3FD(base)
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # corrupt file, wrong layout: same remedy
        raise MissingWeightsError(str(path), f"cannot load S3FD weights ({exc}); {DOWNLOAD_HINT}") from exc
    return net.to(device=device, dtype=dtype).eval()


def write_tiny_s3fd(path: str | Path, seed: int = 0, base: int = 4) -> Path:
    """Write a random S3FD state dict with the released keys and ``base`` channels (tests, demos)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(S3FD(base).state_dict(), path)
    return path


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> list[int]:
    """Greedy NMS; returns kept indices by descending score.

    Areas and overlaps use the inclusive-pixel (+1) convention of the original detector's NMS.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep: list[int] = []
    while order.size:
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


def decode_level(conf: torch.Tensor, loc: torch.Tensor, stride: int) -> torch.Tensor:
    """Decode one level: conf [B,2,h,w] logits, loc [B,4,h,w] → [B, h·w, 5] (x1,y1,x2,y2,score)."""
    conf, loc = conf.float(), loc.float()
    score = F.softmax(conf, dim=1)[:, 1]
    b, h, w = score.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=loc.device), torch.arange(w, device=loc.device),
                            indexing="ij")
    prior_xy = torch.stack([xs, ys]).to(loc.dtype) * stride + stride / 2  # [2,h,w] cell centres
    prior_wh = float(stride * 4)
    centre = prior_xy + loc[:, :2] * VARIANCES[0] * prior_wh
    size = prior_wh * torch.exp(loc[:, 2:] * VARIANCES[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2, score[:, None]], dim=1)
    return boxes.flatten(2).transpose(1, 2)


class S3FDDetector:
    """Batched face detection on RGB uint8 frames of one size."""

    def __init__(self, net: S3FD, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, threshold: float = 0.5,
                 batch_size: int = 4, bgr: bool = False):
        """``bgr=False`` reproduces MuseTalk: its wrapper hands the net RGB channels minus the
        (104, 117, 123) means. ``bgr=True`` feeds B,G,R as the Caffe weights were trained
        (face_alignment's own convention); boxes differ slightly, presence rarely."""
        self.net = net.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.threshold = threshold
        self.batch_size = max(1, batch_size)
        self.bgr = bgr

    @torch.inference_mode()
    def detect(self, frames: list[np.ndarray]) -> list[list[Box]]:
        """Faces per frame as (x1, y1, x2, y2, score), highest score first, clipped to the frame."""
        results: list[list[Box]] = []
        for start in range(0, len(frames), self.batch_size):
            results += self._detect_batch(frames[start:start + self.batch_size])
        return results

    def _detect_batch(self, frames: list[np.ndarray]) -> list[list[Box]]:
        x = torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        x = (x - torch.tensor(S3FD_MEAN, device=self.device).view(1, 3, 1, 1)).to(self.dtype)
        outs = self.net(x)
        dets = torch.cat([decode_level(outs[2 * i], outs[2 * i + 1], 2 ** (i + 2))
                          for i in range(len(outs) // 2)], dim=1).cpu().numpy()
        height, width = frames[0].shape[:2]
        # Filtering at the final threshold before NMS is exact: a box below it can only suppress
        # boxes scored lower still, which the final filter drops anyway.
        floor = max(CANDIDATE_SCORE, self.threshold)
        results: list[list[Box]] = []
        for det in dets:
            det = det[det[:, 4] > floor]
            kept = det[nms(det[:, :4], det[:, 4])] if len(det) else det
            kept[:, [0, 2]] = kept[:, [0, 2]].clip(0, width)
            kept[:, [1, 3]] = kept[:, [1, 3]].clip(0, height)
            results.append([tuple(float(v) for v in row) for row in kept])  # type: ignore[misc]
        return results
