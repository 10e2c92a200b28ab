"""The released models directory: loaders, missing/corrupt files, the weights fingerprint, latent order."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_engine.avatar import FACE_SIZE, encode_latents
from musetalk_engine.engine import Engine, EngineConfig
from musetalk_engine.errors import MissingWeightsError
from musetalk_engine.tiny import RELEASED_UNET_CONFIG, TINY_OVERRIDES
from musetalk_engine.weights import (VAE_SCALING_FACTOR, ModelPaths, check_models, load_unet, load_vae,
                                     load_whisper, missing_files, weights_fingerprint)

pytest_plugins = ["tests.fixtures_engine"]

CPU = torch.device("cpu")

# every file a render needs from the released layout (landmark weights depend on the backend)
REQUIRED = [
    "musetalkV15/unet.pth",
    "musetalkV15/musetalk.json",
    "sd-vae/config.json",
    "sd-vae/diffusion_pytorch_model.safetensors",
    "whisper/config.json",
    "whisper/model.safetensors",
    "whisper/preprocessor_config.json",
    "face-parse-bisent/79999_iter.pth",
]


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a models dir made of symlinks (cheap; delete or replace single files freely)."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _own_file(path: Path) -> None:
    """Turn one symlink of a linked copy into a real file that may be modified."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def vae(tiny_models):
    return load_vae(ModelPaths(tiny_models), CPU, torch.float32)


# --- loaders ------------------------------------------------------------------------------------------

def test_tiny_models_have_the_released_layout(tiny_models):
    paths = ModelPaths(tiny_models)
    assert missing_files(paths) == []
    for rel in REQUIRED:
        assert (tiny_models / rel).is_file(), rel
    cfg = json.loads(paths.unet_config.read_text())
    assert cfg["in_channels"] == 8 and cfg["out_channels"] == 4 and cfg["cross_attention_dim"] == 384
    assert cfg["down_block_types"] == RELEASED_UNET_CONFIG["down_block_types"]
    assert cfg["block_out_channels"] == TINY_OVERRIDES["unet"]["block_out_channels"]


def test_unet_round_trips(tiny_models):
    paths = ModelPaths(tiny_models)
    unet = load_unet(paths, CPU, torch.float32)
    saved = torch.load(paths.unet_weights, map_location="cpu", weights_only=True)
    loaded = unet.state_dict()
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]), k
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    out = unet(torch.zeros(1, 8, 32, 32), torch.zeros(1, dtype=torch.long),
               encoder_hidden_states=torch.zeros(1, 50, 384)).sample
    assert out.shape == (1, 4, 32, 32)


def test_vae_and_whisper_load(tiny_models, vae):
    assert vae.config.scaling_factor == pytest.approx(VAE_SCALING_FACTOR)
    assert vae.config.latent_channels == 4
    extractor, encoder = load_whisper(ModelPaths(tiny_models), CPU, torch.float32)
    assert extractor.feature_size == 80 and extractor.sampling_rate == 16000
    assert encoder.config.d_model == 384 and encoder.config.encoder_layers == 4  # 5 hidden states


# --- missing and corrupt files --------------------------------------------------------------------------

@pytest.mark.parametrize("rel", REQUIRED)
def test_missing_file_is_named_with_the_download_hint(tiny_models, tmp_path, rel):
    models = _linked_copy(tiny_models, tmp_path / "models")
    (models / rel).unlink()
    with pytest.raises(MissingWeightsError) as exc:
        Engine(EngineConfig(models_dir=models, cache_dir=tmp_path / "cache"))
    err = exc.value
    assert err.path == str(models / rel)
    assert rel in str(err) and "musetalk-flow models download" in str(err)
    assert err.retryable is False and err.error_type == "processing_error"


def test_check_models_names_the_first_missing_file_of_an_empty_dir(tmp_path):
    with pytest.raises(MissingWeightsError) as exc:
        check_models(ModelPaths(tmp_path))
    assert "musetalkV15/unet.pth" in str(exc.value)
    assert len(missing_files(ModelPaths(tmp_path))) == len(REQUIRED)


def test_corrupt_unet_names_the_file(tiny_models, tmp_path):
    models = _linked_copy(tiny_models, tmp_path / "models")
    unet = models / "musetalkV15" / "unet.pth"
    unet.unlink()
    unet.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(MissingWeightsError) as exc:
        load_unet(ModelPaths(models), CPU, torch.float32)
    assert exc.value.path == str(unet) and "unet.pth" in str(exc.value)
    assert "musetalk-flow models download" in str(exc.value)


def test_unet_not_matching_its_config_names_the_file(tiny_models, tmp_path):
    models = _linked_copy(tiny_models, tmp_path / "models")
    cfg_path = models / "musetalkV15" / "musetalk.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.unlink()
    cfg_path.write_text(json.dumps({**cfg, "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}))
    with pytest.raises(MissingWeightsError) as exc:
        load_unet(ModelPaths(models), CPU, torch.float32)
    assert "unet.pth" in str(exc.value) and "musetalk.json" in str(exc.value)


# --- fingerprint ----------------------------------------------------------------------------------------

def test_weights_fingerprint_follows_the_weights(tiny_models, tmp_path):
    base = weights_fingerprint(ModelPaths(tiny_models))
    models = _linked_copy(tiny_models, tmp_path / "models")
    paths = ModelPaths(models)
    assert weights_fingerprint(paths) == base  # same files, another directory: same identity

    unet = paths.unet_weights
    _own_file(unet)
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.write_bytes(bytes(data))
    changed_tail = weights_fingerprint(paths)
    assert changed_tail != base

    data[-1] ^= 0xFF
    data[0] ^= 0xFF
    unet.write_bytes(bytes(data))
    assert weights_fingerprint(paths) not in (base, changed_tail)

    data[0] ^= 0xFF
    unet.write_bytes(bytes(data))
    assert weights_fingerprint(paths) == base

    # a re-saved checkpoint with other values
    state = torch.load(unet, map_location="cpu", weights_only=True)
    state = {k: v + 1 for k, v in state.items()}
    torch.save(state, unet)
    assert weights_fingerprint(paths) != base


@pytest.mark.parametrize("size_mib", [0.5, 1.5, 5])
def test_fingerprint_sees_the_last_byte_of_any_size(tiny_models, tmp_path, size_mib):
    """Head and tail are hashed: the last byte counts whatever the file size (1–2 MiB included)."""
    models = _linked_copy(tiny_models, tmp_path / "models")
    paths = ModelPaths(models)
    parse = paths.bisenet
    parse.unlink()
    data = bytearray(np.random.default_rng(0).integers(0, 256, int(size_mib * (1 << 20)), np.uint8).tobytes())
    parse.write_bytes(bytes(data))
    before = weights_fingerprint(paths)
    data[-1] ^= 0xFF
    parse.write_bytes(bytes(data))
    assert weights_fingerprint(paths) != before


# --- latent channel order ----------------------------------------------------------------------------

def test_latents_are_masked_then_reference(vae):
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (2, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    latents = encode_latents(faces, vae, CPU, torch.float32)
    assert latents.shape == (2, 8, 32, 32)

    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # normalised to [-1, 1]
    masked = x.clone()
    masked[:, :, 128:256, :] = -1  # lower half blacked out (0 before normalisation)
    with torch.inference_mode():
        ref = vae.encode(x).latent_dist.mode() * VAE_SCALING_FACTOR
        msk = vae.encode(masked).latent_dist.mode() * VAE_SCALING_FACTOR
    torch.testing.assert_close(latents[:, 4:8], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents[:, 0:4], msk, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents[:, 0:4], latents[:, 4:8])  # the two halves really differ
