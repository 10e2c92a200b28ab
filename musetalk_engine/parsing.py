"""Face parsing with BiSeNet (19 CelebAMask-HQ classes) and the MuseTalk v1.5 blend-mask modes.

The network reproduces the key layout of the released ``face-parse-bisent/79999_iter.pth``
(zllrunning/face-parsing.PyTorch): a ResNet-18 context path under ``cp.resnet.*``, attention
refinement (``cp.arm16``/``cp.arm32``), heads (``cp.conv_head32``/``cp.conv_head16``/``cp.conv_avg``),
the fusion module ``ffm.*`` and three output heads ``conv_out`` (main), ``conv_out16`` and
``conv_out32`` (training-only auxiliaries, kept so the release loads with ``strict=True``).

``79999_iter.pth`` holds every weight, the backbone included, so the separate ImageNet file
``resnet18-5c106cde.pth`` that MuseTalk's loader also opens is not needed for inference.

Label ids used below: 1 skin, 10 nose, 11 mouth, 12 upper lip, 13 lower lip, 14 neck.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .errors import MissingWeightsError

N_CLASSES = 19
PARSE_SIZE = 512
RELEASE_BASE = 64
MODES = ("raw", "jaw", "neck")

SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14
_MOUTH_AND_LIPS = (MOUTH, UPPER_LIP, LOWER_LIP)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DOWNLOAD_HINT = "run `musetalk-flow models download DIR` to fetch face-parse-bisent/79999_iter.pth"


# --------------------------------------------------------------------------- network


class ConvBNReLU(nn.Module):
    """conv (no bias) → BN → ReLU; keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the projection shortcut is ``downsample.0`` (conv) + ``downsample.1`` (BN)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    """ResNet-18 trunk (no classifier); returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self, base: int = RELEASE_BASE):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _stage(base, base, 1)
        self.layer2 = _stage(base, 2 * base, 2)
        self.layer3 = _stage(2 * base, 4 * base, 2)
        self.layer4 = _stage(4 * base, 8 * base, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        return f8, f16, f32


class AttentionRefinement(nn.Module):
    """Channel attention from global pooling; keys ``conv.*``, ``conv_atten``, ``bn_atten``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        att = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * att


class ContextPath(nn.Module):
    """Backbone + global context + two refinement stages (outputs at 1/8 and 1/16)."""

    def __init__(self, base: int = RELEASE_BASE):
        super().__init__()
        mid = 2 * base  # 128 in the release
        self.resnet = ResNet18(base)
        self.arm16 = AttentionRefinement(4 * base, mid)
        self.arm32 = AttentionRefinement(8 * base, mid)
        self.conv_head32 = ConvBNReLU(mid, mid)
        self.conv_head16 = ConvBNReLU(mid, mid)
        self.conv_avg = ConvBNReLU(8 * base, mid, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f8, f16, f32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))
        up32 = F.interpolate(self.arm32(f32) + avg, size=f16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(f16) + up32, size=f8.shape[2:], mode="nearest")
        up16 = self.conv_head16(up16)
        return f8, up16, up32


class FeatureFusion(nn.Module):
    """Fuses backbone 1/8 features with the context path; keys ``convblk.*``, ``conv1``, ``conv2``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([a, b], dim=1))
        att = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * att + feat


class OutputHead(nn.Module):
    """3×3 ConvBNReLU then a 1×1 classifier without bias (``conv.*``, ``conv_out.weight``)."""

    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser in the key layout of ``79999_iter.pth`` (``base=64``).

    ``base`` scales every width (ResNet stages base..8·base, context 2·base, fusion 4·base) so tiny
    test models keep the same keys. ``forward`` returns only the main logits at input resolution.
    """

    def __init__(self, n_classes: int = N_CLASSES, base: int = RELEASE_BASE):
        super().__init__()
        self.base = base
        self.n_classes = n_classes
        self.cp = ContextPath(base)
        self.ffm = FeatureFusion(4 * base, 4 * base)
        self.conv_out = OutputHead(4 * base, 4 * base, n_classes)
        self.conv_out16 = OutputHead(2 * base, base, n_classes)
        self.conv_out32 = OutputHead(2 * base, base, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x, aux=False)[0]

    def forward_all(self, x: torch.Tensor, aux: bool = True) -> tuple[torch.Tensor, ...]:
        """Main logits (and with ``aux`` the two auxiliary heads), upsampled like the release."""
        size = x.shape[2:]
        f8, cp8, cp16 = self.cp(x)
        outs = [self.conv_out(self.ffm(f8, cp8))]
        if aux:
            outs += [self.conv_out16(cp8), self.conv_out32(cp16)]
        return tuple(F.interpolate(o, size=size, mode="bilinear", align_corners=True) for o in outs)


# --------------------------------------------------------------------------- weights


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise MissingWeightsError(path, _DOWNLOAD_HINT)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated download, wrong file, pickle garbage …
        raise MissingWeightsError(path, f"cannot read it ({type(exc).__name__}: {exc}); {_DOWNLOAD_HINT}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MissingWeightsError(path, f"not a BiSeNet state dict; {_DOWNLOAD_HINT}")
    return sd


def load_bisenet(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> BiSeNet:
    """Load a BiSeNet checkpoint (release or tiny) strictly, width inferred from the tensors; eval mode."""
    path = os.fspath(path)
    sd = _read_state_dict(path)
    try:
        base = int(sd["cp.resnet.conv1.weight"].shape[0])
        n_classes = int(sd["conv_out.conv_out.weight"].shape[0])
    except KeyError as exc:
        raise MissingWeightsError(path, f"missing tensor {exc}; {_DOWNLOAD_HINT}") from None
    if n_classes != N_CLASSES:  # the mask modes rely on the CelebAMask-HQ label ids
        raise MissingWeightsError(path, f"expected {N_CLASSES} classes, found {n_classes}; {_DOWNLOAD_HINT}")
    net = BiSeNet(n_classes=n_classes, base=base)
    # BN step counters carry no inference information; tolerate checkpoints written without them.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = value
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        detail = str(exc)[:300]  # the full list of mismatched keys can run to pages
        raise MissingWeightsError(path, f"state dict does not match BiSeNet ({detail}); {_DOWNLOAD_HINT}") from None
    return net.to(device=device, dtype=dtype).eval()


def write_tiny_bisenet(path: str | os.PathLike, base: int = 8, seed: int = 0) -> str:
    """Write a random-weight BiSeNet of width ``base`` as a plain state dict (like the release)."""
    gen = torch.Generator().manual_seed(seed)
    net = BiSeNet(base=base)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                # positive scales/variances keep activations in range; offsets make classes differ
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    sd = net.state_dict()
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    torch.save(sd, path)
    return os.fspath(path)


# --------------------------------------------------------------------------- masks


def jaw_kernel() -> np.ndarray:
    """MuseTalk's 33×33 cone-and-tail dilation kernel (uint8 0/1).

    Rows 0–9 empty; rows 10–20 a centred cone of widths 1, 3, …, 21; rows 21–32 a band as wide
    as the cone's last row (21 px). Used with cv2's default (centre) anchor.
    """
    cone, tail = 21, 12
    size = cone + tail
    centre = size // 2
    rows = np.arange(size)[:, None]
    cols = np.arange(size)[None, :]
    half = np.where(rows < cone, rows - cone // 2, cone - 1 - cone // 2)  # half-width per row
    kernel = (rows >= cone // 2) & (np.abs(cols - centre) <= half)
    return kernel.astype(np.uint8)


def cheek_zone_mask(left_cheek_width: int = 90, right_cheek_width: int = 90) -> np.ndarray:
    """512×512 uint8 mask, 255 in the cheek zones x ≤ 256−left and x ≥ 256+right (inclusive, as MuseTalk)."""
    mask = np.zeros((PARSE_SIZE, PARSE_SIZE), np.uint8)
    centre = PARSE_SIZE // 2
    mask[:, : centre - left_cheek_width + 1] = 255
    mask[:, centre + right_cheek_width:] = 255
    return mask


_CHEEK_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
_JAW_KERNEL = jaw_kernel()


def _validate(mode: str, left_cheek_width: int, right_cheek_width: int) -> None:
    if mode not in MODES:
        raise ValueError(f"parsing mode must be one of {', '.join(MODES)}; got {mode!r}")
    for name, w in (("left_cheek_width", left_cheek_width), ("right_cheek_width", right_cheek_width)):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w <= PARSE_SIZE // 2:
            raise ValueError(f"{name} must be an integer in 0..{PARSE_SIZE // 2}; got {w!r}")


def mask_from_labels(labels: np.ndarray, mode: str = "jaw", left_cheek_width: int = 90,
                     right_cheek_width: int = 90, *, _cheek: np.ndarray | None = None) -> np.ndarray:
    """Blend mask (uint8 0/255) from one 512×512 label map.

    raw: skin, mouth, lips. neck: raw + neck. jaw: skin dilated with :func:`jaw_kernel`, eroded
    twice with a 35×3 ellipse inside the cheek zones only, minus nose, plus mouth and lips.
    """
    _validate(mode, left_cheek_width, right_cheek_width)
    if labels.shape != (PARSE_SIZE, PARSE_SIZE):
        raise ValueError(f"label map must be {PARSE_SIZE}×{PARSE_SIZE}; got {labels.shape}")
    if mode == "raw":
        keep = np.isin(labels, (SKIN, *_MOUTH_AND_LIPS))
    elif mode == "neck":
        keep = np.isin(labels, (SKIN, *_MOUTH_AND_LIPS, NECK))
    else:
        cheek = _cheek if _cheek is not None else cheek_zone_mask(left_cheek_width, right_cheek_width)
        skin = np.where(labels == SKIN, np.uint8(255), np.uint8(0))
        dilated = cv2.dilate(skin, _JAW_KERNEL, iterations=1)
        eroded = cv2.erode(dilated, _CHEEK_KERNEL, iterations=2)
        # Cheeks get the eroded skin (slimmer sides), the chin band keeps the dilated one.
        face = np.where(cheek > 0, eroded, dilated)
        keep = ((face == 255) & (labels != NOSE)) | np.isin(labels, _MOUTH_AND_LIPS)
    return np.where(keep, np.uint8(255), np.uint8(0))


# --------------------------------------------------------------------------- parser


class FaceParser:
    """Batched BiSeNet parsing of RGB crops into per-image blend masks."""

    def __init__(self, net: nn.Module, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 mode: str = "jaw", left_cheek_width: int = 90, right_cheek_width: int = 90,
                 batch_size: int = 8):
        _validate(mode, left_cheek_width, right_cheek_width)
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1; got {batch_size}")
        self.net = net
        self.device = torch.device(device)
        self.dtype = dtype
        self.mode = mode
        self.left_cheek_width = int(left_cheek_width)
        self.right_cheek_width = int(right_cheek_width)
        self.batch_size = batch_size
        self._cheek = cheek_zone_mask(self.left_cheek_width, self.right_cheek_width)
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @staticmethod
    def _to_512(image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 H×W×3 image; got {image.dtype} {image.shape}")
        if image.shape[:2] == (PARSE_SIZE, PARSE_SIZE):
            return image
        # PIL's bilinear (antialiased when shrinking) is what the released pipeline feeds the net.
        return np.asarray(Image.fromarray(image).resize((PARSE_SIZE, PARSE_SIZE), Image.BILINEAR))

    @torch.inference_mode()
    def labels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Class ids [N, 512, 512] uint8 (argmax of the main head) for RGB uint8 images of any size."""
        out = np.empty((len(images), PARSE_SIZE, PARSE_SIZE), np.uint8)
        for start in range(0, len(images), self.batch_size):
            chunk = np.stack([self._to_512(im) for im in images[start:start + self.batch_size]])
            x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            x = ((x - self._mean) / self._std).to(self.dtype)
            logits = self.net(x)
            out[start:start + len(chunk)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        return out

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image a uint8 mask at the image's own size, built by ``self.mode`` ({0,255} at 512², with
        bicubic edges at any other size)."""
        result = []
        for image, lab in zip(images, self.labels(images)):
            m = mask_from_labels(lab, self.mode, self.left_cheek_width, self.right_cheek_width, _cheek=self._cheek)
            h, w = image.shape[:2]
            if (h, w) != m.shape:
                # MuseTalk resizes its 512² 'L' mask with PIL's default filter, bicubic: the soft edge it
                # leaves is part of the feathered mask (nearest-neighbour changed ~9 % of its pixels)
                m = np.asarray(Image.fromarray(m, "L").resize((w, h), Image.BICUBIC))
            result.append(m)
        return result
