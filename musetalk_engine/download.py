"""Fetch the released weights into a models directory (machines with internet; not exercised in CI)."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

# (repository, file in repository, path under the models dir)
HUB_FILES = [
    ("TMElyralab/MuseTalk", "musetalkV15/unet.pth", "musetalkV15/unet.pth"),
    ("TMElyralab/MuseTalk", "musetalkV15/musetalk.json", "musetalkV15/musetalk.json"),
    ("stabilityai/sd-vae-ft-mse", "config.json", "sd-vae/config.json"),
    ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors", "sd-vae/diffusion_pytorch_model.safetensors"),
    ("openai/whisper-tiny", "config.json", "whisper/config.json"),
    ("openai/whisper-tiny", "model.safetensors", "whisper/model.safetensors"),
    ("openai/whisper-tiny", "preprocessor_config.json", "whisper/preprocessor_config.json"),
    ("yzd-v/DWPose", "dw-ll_ucoco_384.onnx", "dwpose/dw-ll_ucoco_384.onnx"),
    ("ManyOtherFunctions/face-parse-bisent", "79999_iter.pth", "face-parse-bisent/79999_iter.pth"),
    ("ManyOtherFunctions/face-parse-bisent", "resnet18-5c106cde.pth", "face-parse-bisent/resnet18-5c106cde.pth"),
]
# face_alignment's S3FD checkpoint is published outside the hub
URL_FILES = [("https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
              "s3fd/s3fd-619a316812.pth")]


def download_models(root: str | Path) -> list[Path]:
    """Download every released file that is not already present; returns the paths written."""
    from huggingface_hub import hf_hub_download

    root = Path(root)
    written = []
    for repo, name, dest in HUB_FILES:
        target = root / dest
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hf_hub_download(repo, name), target)
        written.append(target)
    for url, dest in URL_FILES:
        target = root / dest
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as resp, open(target, "wb") as fh:  # noqa: S310
            shutil.copyfileobj(resp, fh)
        written.append(target)
    return written
