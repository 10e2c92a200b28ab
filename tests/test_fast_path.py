"""The fast paths give the eager path's faces: ``compiled`` (torch.compile) on this CPU, ``graphs`` and
``compiled`` on a GPU when there is one; a fast path that breaks falls back to eager for good; the
GPU-side colour conversion and stage timing agree with their CPU counterparts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import musetalk_engine.accel as accel
from musetalk_engine.face_generator import FaceGenerator
from musetalk_engine.metrics import StageTimer
from musetalk_engine.weights import ModelPaths, load_unet, load_vae
from musetalk_engine.yuv import rgb_to_i420

pytest_plugins = ["tests.fixtures_engine"]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _generator(models, device: torch.device, dtype: torch.dtype, mode: str) -> FaceGenerator:
    paths = ModelPaths(models)
    return FaceGenerator(load_unet(paths, device, dtype), load_vae(paths, device, dtype), device, dtype, mode)


def _inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, 32, 32, generator=g), torch.randn(batch, 50, 384, generator=g)


def _assert_same_faces(fast: torch.Tensor, eager: torch.Tensor, max_level: int) -> None:
    diff = (fast.int() - eager.int()).abs()
    assert fast.shape == eager.shape and fast.dtype == torch.uint8
    assert diff.max() <= max_level and diff.float().mean() < 0.5, (diff.max(), diff.float().mean())


def test_compiled_mode_gives_the_eager_faces_on_cpu(tiny_models, tmp_path, monkeypatch):
    """Inductor's CPU code for the tiny UNet + VAE decoder (≈ 2 min to compile on 2 cores)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cpu = torch.device("cpu")
    latents, audio = _inputs(4)
    eager = _generator(tiny_models, cpu, torch.float32, "eager").generate(latents, audio)
    compiled = _generator(tiny_models, cpu, torch.float32, "compiled")
    faces = compiled.generate(latents, audio, StageTimer())
    assert compiled.mode == "compiled"  # it really ran compiled, no fallback
    _assert_same_faces(faces, eager, max_level=1)


def test_a_broken_fast_path_falls_back_to_eager_for_good(tiny_models, monkeypatch, caplog):
    def broken(module, mode):
        def call(*args, **kwargs):
            raise RuntimeError("inductor exploded")
        return call

    monkeypatch.setattr(accel, "compile_module", broken)
    cpu = torch.device("cpu")
    latents, audio = _inputs(2)
    eager = _generator(tiny_models, cpu, torch.float32, "eager").generate(latents, audio)
    gen = _generator(tiny_models, cpu, torch.float32, "compiled")
    assert torch.equal(gen.generate(latents, audio), eager)
    assert gen.mode == "eager" and gen._unet_fast is None and gen._decoder_fast is None
    assert "compiled UNet failed (RuntimeError: inductor exploded); falling back to eager" in caplog.text


def test_graphs_mode_is_eager_on_cpu(tiny_models):
    assert _generator(tiny_models, torch.device("cpu"), torch.float32, "graphs").mode == "eager"


@cuda
@pytest.mark.parametrize("mode", ["graphs", "compiled"])
def test_gpu_fast_paths_give_the_eager_faces_within_fp16_tolerance(tiny_models, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    gpu = torch.device("cuda")
    eager = _generator(tiny_models, gpu, torch.float16, "eager")
    fast = _generator(tiny_models, gpu, torch.float16, mode)
    for batch in (8, 5):  # 5: a short last batch, run padded to 8
        latents, audio = _inputs(batch, seed=batch)
        faces = fast.generate(latents, audio, StageTimer(), batch_size=8)
        assert fast.mode == mode
        _assert_same_faces(faces, eager.generate(latents, audio), max_level=3)
    if mode == "graphs":
        assert list(fast._graphs) == [8]  # the short batch ran in the batch-8 graph


@cuda
def test_stage_times_on_the_gpu_come_from_events_without_stalling_the_host():
    timer = StageTimer()
    x = torch.randn(4096, 4096, device="cuda")
    with timer.stage("unet", x.device):
        for _ in range(20):
            x = x @ x.T / 4096
    assert timer._pending  # not read yet: nothing waited for the GPU
    seconds = timer.as_dict()["unet"]
    assert seconds > 0 and not timer._pending


@cuda
def test_i420_on_the_gpu_equals_the_cpu_conversion():
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8))
    diff = (rgb_to_i420(frames.cuda()).cpu().int() - rgb_to_i420(frames).int()).abs()
    assert diff.max() <= 1  # float rounding at .5 may differ between the devices, nothing more


def test_fast_mode_runs_a_short_last_batch_padded_instead_of_building_again(tiny_models, monkeypatch):
    seen: dict[str, list[int]] = {"unet": [], "decoder": []}

    def recording(module, mode):  # stands in for torch.compile: records the batch sizes it is given
        name = "unet" if module.__class__.__name__.startswith("UNet") else "decoder"

        def call(x, *args, **kwargs):
            seen[name].append(x.shape[0])
            return module(x, *args, **kwargs)
        return call

    monkeypatch.setattr(accel, "compile_module", recording)
    cpu = torch.device("cpu")
    eager = _generator(tiny_models, cpu, torch.float32, "eager")
    gen = _generator(tiny_models, cpu, torch.float32, "compiled")
    for batch in (8, 8, 3):  # a job of 19 frames at batch 8
        latents, audio = _inputs(batch, seed=batch)
        faces = gen.generate(latents, audio, batch_size=8)
        assert faces.shape[0] == batch
        _assert_same_faces(faces, eager.generate(latents, audio), max_level=1)  # padding changes no real frame
    assert seen == {"unet": [8, 8, 8], "decoder": [8, 8, 8]} and gen.mode == "compiled"


class _FakeGraph:
    """Stands in for a captured CUDA graph (no GPU here): records captures, runs the eager UNet."""

    captured: list[int] = []

    def __init__(self, unet, batch_size, device, dtype):
        self.unet, self.batch_size = unet, batch_size
        _FakeGraph.captured.append(batch_size)

    def __call__(self, latents, audio):
        assert latents.shape[0] == self.batch_size
        return self.unet(latents, torch.zeros(1, dtype=torch.long), encoder_hidden_states=audio).sample


def test_graphs_are_kept_for_the_few_most_recent_batch_sizes_and_dropped_for_an_oom_retry(tiny_models, monkeypatch):
    from musetalk_engine import face_generator

    monkeypatch.setattr(accel, "GraphedUNet", _FakeGraph)
    monkeypatch.setattr(_FakeGraph, "captured", [])
    gen = _generator(tiny_models, torch.device("cpu"), torch.float32, "eager")
    gen.mode = "graphs"  # what a CUDA generator runs; the capture itself is faked
    for size in (8, 4, 2, 8, 1, 4):
        latents, audio = _inputs(size)
        gen.generate(latents, audio, batch_size=size)
    assert _FakeGraph.captured == [8, 4, 2, 1, 4] and face_generator.MAX_GRAPHS == 3
    assert list(gen._graphs) == [8, 1, 4]  # least recently used first: 4 made way for 1, then 2 for 4
    gen.release_fast_paths()
    assert not gen._graphs and gen.mode == "graphs"


@cuda
def test_device_path_on_the_gpu_renders_the_cpu_paths_video(tiny_models, media, tmp_path):
    """The whole CUDA render (pinned buffers, events, I420 on the GPU, graphs) against the CPU engine."""
    from musetalk_engine.engine import Engine, EngineConfig
    from musetalk_engine.video import decode_frames
    from tests.media import read_markers

    videos = {}
    for device in ("cpu", "cuda"):
        engine = Engine(EngineConfig(models_dir=tiny_models, device=device, cache_dir=tmp_path / device,
                                     batch_size=4))
        engine.warmup()
        videos[device] = engine.render(media.video, media.short_speech, tmp_path / f"{device}.mp4").output
    a, b = (np.stack(list(decode_frames(videos[d], 25.0))).astype(np.int16) for d in ("cpu", "cuda"))
    assert read_markers(videos["cuda"]) == read_markers(videos["cpu"]) == list(range(10))  # order, no tearing
    # random tiny weights at fp16 vs fp32 give different faces; torn or misplaced frames differ far more
    assert a.shape == b.shape and np.abs(a - b).mean() < 8
