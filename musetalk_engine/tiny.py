"""Random-weight models written in the released layout (same file names, config keys and state-dict keys),
so tests, the demo and GPU benchmarks go through the real loading code without the real weights.

``tiny``: small widths, fast on a CPU. ``full``: the released sizes (UNet ≈ 850 M parameters), the same
compute as the real model — what the ``full-random`` benchmark profile renders with."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .weights import ModelPaths

RELEASED_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

RELEASED_VAE_CONFIG = {  # stabilityai/sd-vae-ft-mse
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 256,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "scaling_factor": 0.18215,
}

RELEASED_WHISPER_CONFIG = {  # openai/whisper-tiny
    "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
    "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865,
}

TINY_OVERRIDES = {
    # narrow widths need smaller GroupNorm groups; the key layout is unchanged
    "unet": {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "attention_head_dim": 1},  # one head: 8 heads of 1024² scores would dominate on a CPU
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
    # d_model and the 4 encoder layers stay: they fix the [50, 384] audio prompt shape
    "whisper": {"encoder_ffn_dim": 64, "decoder_layers": 1, "decoder_ffn_dim": 64, "vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
                "max_target_positions": 8, "encoder_attention_heads": 2, "decoder_attention_heads": 2},
}


def _config(base: dict, size: str, key: str) -> dict:
    return {**base, **(TINY_OVERRIDES[key] if size == "tiny" else {})}


# The landmark backend random-weight models run with (written to tiny.json, read by the engine). Tiny
# models serve the tests, which check boxes against the real face: dlib's real landmarks. Full-size random
# models serve GPU benchmarks, where only the box's size matters: the random ONNX DWPose lands a face box
# of plausible size near the frame's centre, and needs no 100 MB dlib model on the GPU machine.
RANDOM_MODEL_LANDMARKS = {"tiny": "dlib", "full": "dwpose-onnx"}


def make_models(root: str | Path, size: str = "tiny", seed: int = 0) -> ModelPaths:
    """Write every model file the engine loads under ``root`` with random weights; returns its paths."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from .detector import write_tiny_s3fd
    from .landmarks import write_tiny_dwpose_onnx
    from .parsing import write_tiny_bisenet

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    paths = ModelPaths(Path(root))
    torch.manual_seed(seed)

    unet_cfg = _config(RELEASED_UNET_CONFIG, size, "unet")
    paths.unet_config.parent.mkdir(parents=True, exist_ok=True)
    paths.unet_config.write_text(json.dumps(unet_cfg, indent=2))
    unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    torch.save(unet.state_dict(), paths.unet_weights)  # a plain fp32 state dict, like the release
    del unet

    AutoencoderKL(**_config(RELEASED_VAE_CONFIG, size, "vae")).save_pretrained(paths.vae_dir)

    whisper = WhisperModel(WhisperConfig(**_config(RELEASED_WHISPER_CONFIG, size, "whisper")))
    whisper.save_pretrained(paths.whisper_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(paths.whisper_dir)

    paths.bisenet.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_bisenet(paths.bisenet, base=8 if size == "tiny" else 64, seed=seed)
    paths.s3fd.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_s3fd(paths.s3fd, seed=seed)
    paths.dwpose_onnx.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_dwpose_onnx(paths.dwpose_onnx, seed=seed)
    (paths.root / "tiny.json").write_text(json.dumps({"size": size, "seed": seed,
                                                      "landmarks": RANDOM_MODEL_LANDMARKS[size]}))
    return paths
