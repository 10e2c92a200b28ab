"""The released MuseTalk v1.5 models directory: its layout, checks, and loaders for the UNet, VAE and
Whisper encoder. Face detection, landmarks and parsing weights are loaded by their own modules."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MissingWeightsError

DOWNLOAD_HINT = "fetch the released weights with `musetalk-flow models download {root}` " \
    "(or `musetalk-flow models make-tiny {root}` for random test weights)"

VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class ModelPaths:
    """Where each released file lives under a models directory (MuseTalk's own layout)."""

    root: Path
    unet_weights_path: Path | None = None  # MUSETALK_UNET_MODEL_PATH overrides
    unet_config_path: Path | None = None  # MUSETALK_UNET_CONFIG overrides

    @property
    def unet_weights(self) -> Path:
        return self.unet_weights_path or self.root / "musetalkV15" / "unet.pth"

    @property
    def unet_config(self) -> Path:
        return self.unet_config_path or self.root / "musetalkV15" / "musetalk.json"

    @property
    def vae_dir(self) -> Path:
        return self.root / "sd-vae"

    @property
    def whisper_dir(self) -> Path:
        return self.root / "whisper"

    @property
    def dwpose_onnx(self) -> Path:
        return self.root / "dwpose" / "dw-ll_ucoco_384.onnx"

    @property
    def dwpose_pth(self) -> Path:
        return self.root / "dwpose" / "dw-ll_ucoco_384.pth"

    @property
    def bisenet(self) -> Path:
        return self.root / "face-parse-bisent" / "79999_iter.pth"

    @property
    def s3fd(self) -> Path:
        return self.root / "s3fd" / "s3fd-619a316812.pth"

    def hint(self) -> str:
        return DOWNLOAD_HINT.format(root=self.root)

    def required(self) -> dict[str, Path]:
        """Files every render needs (landmark weights depend on the backend and are checked there)."""
        return {
            "unet weights": self.unet_weights,
            "unet config": self.unet_config,
            "vae config": self.vae_dir / "config.json",
            "whisper config": self.whisper_dir / "config.json",
            "whisper preprocessor": self.whisper_dir / "preprocessor_config.json",
            "face parsing": self.bisenet,
        }


def _weights_file(directory: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


def missing_files(paths: ModelPaths) -> list[Path]:
    """Every required file that is absent, in a stable order."""
    missing = [p for p in paths.required().values() if not p.is_file()]
    # named as released (and as `models download` writes them); any of _weights_file's names will do
    for d, released in ((paths.vae_dir, "diffusion_pytorch_model.safetensors"),
                        (paths.whisper_dir, "model.safetensors")):
        if _weights_file(d) is None:
            missing.append(d / released)
    return missing


def check_models(paths: ModelPaths) -> None:
    """Raise :class:`MissingWeightsError` naming the first missing file."""
    missing = missing_files(paths)
    if missing:
        raise MissingWeightsError(str(missing[0]), paths.hint())


def weights_fingerprint(paths: ModelPaths) -> str:
    """A cheap, stable identity of the weights: sizes plus the first and last MiB of each file.

    Hashing 3.4 GB on every start would cost seconds; the head and tail of a checkpoint change whenever
    its tensors do, which is what an avatar cache key needs."""
    h = hashlib.sha256()
    files = [paths.unet_weights, paths.unet_config, paths.bisenet]
    files += [f for d in (paths.vae_dir, paths.whisper_dir) if (f := _weights_file(d)) is not None]
    for f in files:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:  # the tail, without re-reading the head (files of 1–2 MiB included)
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _torch_load(path: Path, hint: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingWeightsError(str(path), hint) from None
    except Exception as exc:  # a truncated or foreign file
        raise MissingWeightsError(str(path), f"cannot be read ({type(exc).__name__}: {exc}); {hint}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_unet(paths: ModelPaths, device: torch.device, dtype: torch.dtype):
    """MuseTalk's UNet: a diffusers UNet2DConditionModel built from musetalk.json, weights from unet.pth."""
    from diffusers import UNet2DConditionModel

    hint = paths.hint()
    try:
        config = json.loads(paths.unet_config.read_text())
    except FileNotFoundError:
        raise MissingWeightsError(str(paths.unet_config), hint) from None
    except json.JSONDecodeError as exc:
        raise MissingWeightsError(str(paths.unet_config), f"is not valid JSON ({exc}); {hint}") from exc
    unet = UNet2DConditionModel(**config)
    state = _torch_load(paths.unet_weights, hint)
    try:
        unet.load_state_dict(state)
    except RuntimeError as exc:
        raise MissingWeightsError(str(paths.unet_weights),
                                  f"does not match {paths.unet_config.name} ({str(exc)[:200]}); {hint}") from exc
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae(paths: ModelPaths, device: torch.device, dtype: torch.dtype):
    """sd-vae-ft-mse as a diffusers AutoencoderKL."""
    from diffusers import AutoencoderKL

    _require_dir(paths.vae_dir, paths)
    try:
        vae = AutoencoderKL.from_pretrained(paths.vae_dir)
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(str(paths.vae_dir), f"cannot be loaded ({str(exc)[:200]}); {paths.hint()}") from exc
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_whisper(paths: ModelPaths, device: torch.device, dtype: torch.dtype):
    """whisper-tiny's encoder and its feature extractor (the decoder is never used)."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    _require_dir(paths.whisper_dir, paths)
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(paths.whisper_dir)
        encoder = WhisperModel.from_pretrained(paths.whisper_dir).get_encoder()
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(str(paths.whisper_dir),
                                  f"cannot be loaded ({str(exc)[:200]}); {paths.hint()}") from exc
    return extractor, encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _require_dir(directory: Path, paths: ModelPaths) -> None:
    if not (directory / "config.json").is_file():
        raise MissingWeightsError(str(directory / "config.json"), paths.hint())
    if _weights_file(directory) is None:
        raise MissingWeightsError(str(directory / "<weights file>"), paths.hint())
