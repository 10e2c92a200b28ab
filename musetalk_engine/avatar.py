"""The avatar: everything derived from the video alone, computed once and cached by content hash.

Per source frame: the face box, the 1.5× crop box and its feathered blend mask, and the 8×32×32 UNet
input latents ([masked lower half, reference] VAE latents). Source frames themselves are not stored:
they are decoded again from the video when a render needs them."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.numpy import load_file, save_file

from .blend import BLUR_FACTOR
from .errors import MediaError, NoFaceError
from .facebox import EXTRA_MARGIN, Box, face_box, fill_missing
from .files import atomic_write
from .video import VideoInfo, decode_frames, probe_video
from .weights import VAE_SCALING_FACTOR

FACE_SIZE = 256
MODEL_FPS = 25.0
AVATAR_FORMAT = 3  # 3: float32 latents (2 held float16: fp32 renders differed by up to 4 levels); 2: C order


class PrepareParams(BaseModel):
    """Everything that changes an avatar; part of its cache key."""

    fps: float = Field(MODEL_FPS, gt=0, le=60)
    extra_margin: int = Field(EXTRA_MARGIN, ge=0, le=100)
    parsing_mode: str = Field("jaw", pattern="^(jaw|raw)$")
    left_cheek_width: int = Field(90, ge=0, le=256)
    right_cheek_width: int = Field(90, ge=0, le=256)
    expand: float = Field(1.5, ge=1.0, le=3.0)
    blur_factor: float = Field(BLUR_FACTOR, ge=0.0, le=0.5)  # mask feathering, × crop width
    landmarks: str = "auto"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def avatar_key(video_sha256: str, params: PrepareParams, weights_fp: str) -> str:
    """Cache key: video content + preparation parameters + weights identity."""
    blob = json.dumps({"video": video_sha256, "params": params.model_dump(), "weights": weights_fp,
                       "format": AVATAR_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Avatar:
    video_sha256: str
    fps: float
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] int32 face boxes (x1, y1, x2, y2)
    crop_boxes: np.ndarray  # [N, 4] int32 blend crop boxes, may reach outside the frame
    latents: np.ndarray  # [N, 8, 32, 32] float32
    masks: list[np.ndarray]  # N uint8 masks, each the size of its crop box
    face_found: np.ndarray  # [N] bool: False where the box was borrowed from a neighbour
    params: dict = field(default_factory=dict)
    weights_fingerprint: str = ""

    @property
    def n_frames(self) -> int:
        return len(self.boxes)

    def save(self, directory: Path) -> None:
        """Write ``avatar.safetensors`` + ``avatar.json`` atomically (a reader never sees half an avatar)."""
        directory.mkdir(parents=True, exist_ok=True)
        shapes = np.array([m.shape for m in self.masks], dtype=np.int32)
        tensors = {
            "boxes": self.boxes.astype(np.int32), "crop_boxes": self.crop_boxes.astype(np.int32),
            "latents": self.latents.astype(np.float32), "face_found": self.face_found.astype(np.uint8),
            "mask_shapes": shapes, "mask_data": np.concatenate([m.ravel() for m in self.masks]),
        }
        # safetensors writes an array's memory as it lies: a strided view (the VAE's output is one) would
        # be stored scrambled, so every array goes in C order
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        meta = {"format": AVATAR_FORMAT, "video_sha256": self.video_sha256, "fps": self.fps,
                "width": self.width, "height": self.height, "params": self.params,
                "weights_fingerprint": self.weights_fingerprint}
        atomic_write(directory / "avatar.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        # json last: its presence marks completeness
        atomic_write(directory / "avatar.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    @classmethod
    def load(cls, directory: Path) -> "Avatar":
        meta = json.loads((directory / "avatar.json").read_text())
        t = load_file(str(directory / "avatar.safetensors"))
        offsets = np.cumsum([0, *[h * w for h, w in t["mask_shapes"]]])
        masks = [t["mask_data"][offsets[i]:offsets[i + 1]].reshape(h, w)
                 for i, (h, w) in enumerate(t["mask_shapes"])]
        return cls(video_sha256=meta["video_sha256"], fps=meta["fps"], width=meta["width"],
                   height=meta["height"], boxes=t["boxes"], crop_boxes=t["crop_boxes"], latents=t["latents"],
                   masks=masks, face_found=t["face_found"].astype(bool), params=meta["params"],
                   weights_fingerprint=meta["weights_fingerprint"])


class AvatarCache:
    """Avatars on disk under ``root/<key>/`` (shareable between processes and machines), with the most
    recent few also kept in memory: a job asks for its avatar twice (prepare, then render) and consecutive
    jobs often share one, so neither should re-read it from disk."""

    def __init__(self, root: Path, keep_in_memory: int = 2):
        self.root = Path(root)
        self.keep_in_memory = keep_in_memory
        self._recent: OrderedDict[str, Avatar] = OrderedDict()

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Avatar | None:
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        d = self.path(key)
        if not (d / "avatar.json").is_file():
            return None
        try:
            avatar = Avatar.load(d)
        except Exception:  # a corrupt entry is recomputed, never fatal
            return None
        self._remember(key, avatar)
        return avatar

    def put(self, key: str, avatar: Avatar) -> None:
        avatar.save(self.path(key))
        self._remember(key, avatar)

    def _remember(self, key: str, avatar: Avatar) -> None:
        self._recent[key] = avatar
        self._recent.move_to_end(key)
        while len(self._recent) > self.keep_in_memory:
            self._recent.popitem(last=False)


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    """The face box resized to 256×256 with Lanczos, as MuseTalk feeds the VAE."""
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


@torch.inference_mode()
def encode_latents(faces: np.ndarray, vae, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[B,256,256,3] uint8 RGB faces → [B, 8, 32, 32]: masked-lower-half latents, then reference latents."""
    x = torch.from_numpy(faces).to(device).permute(0, 3, 1, 2).float() / 255.0
    masked = x.clone()
    masked[:, :, FACE_SIZE // 2:, :] = 0  # zeroed before normalisation: the mouth area reads as -1
    both = torch.cat([masked, x], dim=0).mul(2).sub(1).to(dtype)
    latents = vae.encode(both).latent_dist.mode() * VAE_SCALING_FACTOR  # mode: deterministic
    n = faces.shape[0]
    return torch.cat([latents[:n], latents[n:]], dim=1)


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prepare_avatar(video: Path, *, analyzer, parser, vae, device: torch.device, dtype: torch.dtype,
                   params: PrepareParams, video_sha256: str, weights_fp: str, batch_size: int = 16,
                   info: VideoInfo | None = None,
                   on_progress: Callable[[int], None] | None = None) -> Avatar:
    """Two streamed passes over the video: faces and boxes first (so frames without a face can borrow a
    neighbour's box), then latents and blend masks. No frame is kept beyond its batch."""
    from .blend import prepare_blend_material

    info = info or probe_video(video)
    size = (info.width, info.height)
    raw_boxes: list[Box | None] = []
    for chunk in _chunks(decode_frames(video, params.fps, info), batch_size):
        for obs in analyzer.analyze(chunk):
            raw_boxes.append(None if obs is None else
                             face_box(obs.landmarks, obs.detector_box, size, params.extra_margin))
    if not raw_boxes:
        raise MediaError(f"no frames could be decoded from the video {video.name!r}", stage="preprocessing")
    try:
        boxes = fill_missing(raw_boxes)
    except ValueError:
        raise NoFaceError(video.name, frame=0,
                          message=f"no face detected in any of the {len(raw_boxes)} frames of the avatar "
                                  f"video {video.name!r} (first frame checked: 0)") from None

    latents, masks, crop_boxes = [], [], []
    start = 0
    for chunk in _chunks(decode_frames(video, params.fps, info), batch_size):
        chunk_boxes = boxes[start:start + len(chunk)]
        faces = np.stack([crop_face(f, b) for f, b in zip(chunk, chunk_boxes)])
        # kept at full precision: the UNet reads them at the render's dtype, which may be float32
        latents.append(encode_latents(faces, vae, device, dtype).to("cpu", torch.float32).numpy())
        for mask, crop in prepare_blend_material(chunk, chunk_boxes, parser, expand=params.expand,
                                                 blur_factor=params.blur_factor):
            masks.append(mask)
            crop_boxes.append(crop)
        start += len(chunk)
        if on_progress:
            on_progress(start)
    n = min(start, len(boxes))  # a stream may end a frame early on its second read
    return Avatar(video_sha256=video_sha256, fps=params.fps, width=info.width, height=info.height,
                  boxes=np.asarray(boxes[:n], np.int32), crop_boxes=np.asarray(crop_boxes[:n], np.int32),
                  latents=np.concatenate(latents)[:n], masks=masks[:n],
                  face_found=np.array([b is not None for b in raw_boxes[:n]]),
                  params=params.model_dump(), weights_fingerprint=weights_fp)
