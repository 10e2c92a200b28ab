"""The engine's device handling at the edges a fleet reaches: the configured GPU missing (no silent CPU
fallback), a GPU other than 0 made current, NVML found by UUID, OOM cleanup and retries, bounded pinned
buffers, warm-up on the render thread. The device path runs on CPU tensors here; the CUDA-only checks skip."""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import musetalk_engine.device_blend as device_blend_mod
import musetalk_engine.render as render_mod
from musetalk_engine.avatar import Avatar
from musetalk_engine.device import DeviceUnavailableError, device_scope, nvml_handle, resolve_device
from musetalk_engine.device_blend import DeviceBlendMaterial
from musetalk_engine.errors import ProcessingError
from musetalk_engine.metrics import StageTimer
from musetalk_engine.render import render_stream_device

pytest_plugins = ["tests.fixtures_engine"]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


# --- which device -----------------------------------------------------------------------------------------

def test_resolve_device_never_falls_back_to_the_cpu_when_a_gpu_was_asked_for():
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True, cuda_count=1) == torch.device("cuda", 0)
    assert resolve_device("cuda", cuda_available=True, cuda_count=1) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", cuda_available=True, cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available.*not fall back"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(DeviceUnavailableError, match="only 1 GPU"):
        resolve_device("cuda:1", cuda_available=True, cuda_count=1)
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_device_scope_makes_the_engines_gpu_current():
    """``torch.cuda.graph`` captures on the current device's stream: cuda:1's scope must select 1 (checked
    without entering it, which needs the GPU)."""
    scope = device_scope(torch.device("cuda", 1))
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
    assert device_scope(torch.device("cuda", 0)).idx == 0
    with device_scope(torch.device("cpu")):  # nothing to select on the CPU
        pass


def test_an_engine_asked_for_cuda_without_it_refuses_to_load(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from musetalk_engine.engine import Engine, EngineConfig

    with pytest.raises(DeviceUnavailableError, match="not fall back to the CPU"):
        Engine(EngineConfig(models_dir=tiny_models, device="cuda"))


def test_a_worker_configured_for_cuda_without_it_never_turns_ready(tiny_models, tmp_path):
    """MUSETALK_DEVICE=cuda (the image's setting) on a machine without CUDA: /hc stays 503 with the reason."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from deployments.serve import WorkerService
    from tasks.engine import get_engine
    from tasks.settings import Settings

    settings = Settings(musetalk_device="cuda", musetalk_models_dir=tiny_models, musetalk_workdir=tmp_path,
                        musetalk_cache_dir=tmp_path / "cache")
    service = WorkerService(settings, engine_loader=get_engine, prefect_warmup=lambda: "none")
    service.start()
    assert not service.wait_ready(60)
    status, body = service.health()
    assert status == 503 and body["status"] == "error" and "CUDA is not available" in body["detail"]
    service.stop()


def test_the_device_setting_is_validated():
    from tasks.settings import Settings

    assert Settings(musetalk_device="cuda:3").musetalk_device == "cuda:3"
    with pytest.raises(ValueError):
        Settings(musetalk_device="gpu0")


# --- NVML ----------------------------------------------------------------------------------------------------

def test_nvml_handle_is_looked_up_by_the_gpus_uuid_not_its_ordinal(monkeypatch):
    """CUDA orders GPUs fastest first and honours CUDA_VISIBLE_DEVICES; NVML numbers them by PCI bus."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(uuid=f"uuid-of-{i}"))
    asked = []
    fake = SimpleNamespace(nvmlDeviceGetHandleByUUID=lambda u: asked.append(u) or f"handle:{u}",
                           nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("looked up by ordinal"))
    assert nvml_handle(fake, torch.device("cuda", 1)) == "handle:GPU-uuid-of-1"

    def unknown(uuid):
        raise RuntimeError("NVML_ERROR_NOT_FOUND")

    assert nvml_handle(SimpleNamespace(nvmlDeviceGetHandleByUUID=unknown), torch.device("cuda", 0)) is None


# --- out of memory ----------------------------------------------------------------------------------------------

def _avatar(n=4, size=64):
    return Avatar(video_sha256="x", fps=25.0, width=size, height=size,
                  boxes=np.array([[8, 8, 56, 56]] * n, np.int32),
                  crop_boxes=np.array([[-4, -4, 68, 68]] * n, np.int32),
                  latents=np.random.default_rng(0).standard_normal((n, 8, 32, 32)).astype(np.float32),
                  masks=[np.full((72, 72), 200, np.uint8)] * n, face_found=np.ones(n, bool))


class _FacesByWindow:
    """Faces that depend on the audio window (so batch boundaries would show), with a scripted OOM."""

    device = torch.device("cpu")

    def __init__(self, oom_at_batch: int | None = None):
        self.oom_at_batch = oom_at_batch
        self.batches: list[int] = []
        self.failed_ref = None
        self.released = 0

    def generate(self, latents, windows, timer=None, batch_size=None):
        n = len(latents)
        if n == self.oom_at_batch:
            failed = torch.empty(n, 256, 256, 3)  # what the failed batch had allocated
            self.failed_ref = weakref.ref(failed)
            raise torch.OutOfMemoryError("CUDA out of memory (scripted)")
        self.batches.append(n)
        level = windows[:, 0, 0].round().clamp(0, 255).to(torch.uint8)
        return level.view(n, 1, 1, 1).expand(n, 256, 256, 3).contiguous()

    def release_fast_paths(self):
        self.released += 1


class _Recorder:
    pix_fmt, frame_shape = "rgb24", (64, 64, 3)

    def __init__(self):
        self.writes: list[np.ndarray] = []

    def write_frames(self, frames):
        self.writes.append(np.array(frames))


def _render(generator, batch_size=4, frames=12, writer=None):
    avatar = _avatar()
    windows = torch.arange(frames, dtype=torch.float32).mul(20).view(frames, 1, 1).expand(frames, 50, 384)
    writer = writer or _Recorder()
    src = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (avatar.n_frames, 64, 64, 3), dtype=np.uint8))
    used = render_stream_device(avatar=avatar, frames=src, material=DeviceBlendMaterial(avatar, torch.device("cpu")),
                                windows=windows.contiguous(), generator=generator, writer=writer,
                                batch_size=batch_size, timer=StageTimer())
    return used, writer


def test_oom_retries_at_half_after_the_failed_batch_is_unreachable(monkeypatch):
    reference = np.concatenate(_render(_FacesByWindow())[1].writes)
    gen = _FacesByWindow(oom_at_batch=4)
    alive_at_cleanup = []
    monkeypatch.setattr(render_mod, "_free_after_oom",
                        lambda device: alive_at_cleanup.append(gen.failed_ref() is not None))
    used, writer = _render(gen)
    assert used == 2 and gen.batches == [2] * 6 and gen.released == 1
    assert alive_at_cleanup == [False]  # the exception (and its frames' tensors) was gone before empty_cache
    np.testing.assert_array_equal(np.concatenate(writer.writes), reference)


def test_a_second_oom_after_halving_is_a_clear_retryable_error():
    class AlwaysOOM(_FacesByWindow):
        def generate(self, latents, windows, timer=None, batch_size=None):
            raise torch.OutOfMemoryError("CUDA out of memory (scripted)")

    with pytest.raises(ProcessingError, match="already halved once") as exc:
        _render(AlwaysOOM())
    assert exc.value.retryable and exc.value.details == {"batch_size": 2}


def test_an_oom_in_the_blend_is_retried_in_halves(monkeypatch):
    reference = np.concatenate(_render(_FacesByWindow())[1].writes)
    real = device_blend_mod.paste_faces
    sizes = []

    def paste(frames, faces, *a, **kw):
        sizes.append(len(frames))
        if len(frames) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (scripted, blend)")
        return real(frames, faces, *a, **kw)

    monkeypatch.setattr(device_blend_mod, "paste_faces", paste)
    used, writer = _render(_FacesByWindow())
    assert used == 4  # the model kept its batch; only the blend went to halves
    assert sizes == [4, 2, 2, 2, 2, 2, 2]  # halved once, and stays halved for the next batches
    np.testing.assert_array_equal(np.concatenate(writer.writes), reference)


def test_a_blend_oom_at_half_is_a_clear_error(monkeypatch):
    def paste(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (scripted, blend)")

    monkeypatch.setattr(device_blend_mod, "paste_faces", paste)
    with pytest.raises(ProcessingError, match="blending"):
        _render(_FacesByWindow())


# --- pinned host buffers ------------------------------------------------------------------------------------

def test_host_buffers_are_bounded_whatever_the_batch(monkeypatch):
    reference = np.concatenate(_render(_FacesByWindow(), batch_size=6)[1].writes)
    frame = 64 * 64 * 3
    monkeypatch.setattr(render_mod, "HOST_BUFFER_BYTES", 2 * frame + 1)  # two frames per buffer
    used, writer = _render(_FacesByWindow(), batch_size=6)
    assert used == 6 and max(len(w) for w in writer.writes) == 2 and len(writer.writes) == 6
    np.testing.assert_array_equal(np.concatenate(writer.writes), reference)


def test_release_gpu_memory_drops_graphs_and_device_frames(engine_cpu, monkeypatch):
    engine_cpu._device_frames["k"] = ("frames", "material")
    engine_cpu._warm_threads.add(threading.get_ident())
    released = []
    monkeypatch.setattr(engine_cpu.generator, "release_fast_paths", lambda: released.append(True))
    engine_cpu.release_gpu_memory()
    assert released == [True] and not engine_cpu._device_frames and not engine_cpu._warm_threads


@pytest.fixture(scope="module")
def engine_cpu(tiny_models, tmp_path_factory):
    from musetalk_engine.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(models_dir=tiny_models, device="cpu",
                                 cache_dir=tmp_path_factory.mktemp("device-cache")))
    return engine


def test_the_benchmark_child_starts_after_the_engine_released_its_memory(monkeypatch, tmp_path):
    import deployments.benchmark_job as bj
    from tasks.settings import Settings

    order = []
    monkeypatch.setattr(bj, "run_in_child", lambda config, timeout_s: order.append("child") or {"ok": 1})
    outcome = bj.run_benchmark_job({"benchmark": {"profile": "tiny"}}, Settings(musetalk_workdir=tmp_path), 60,
                                   cuda=False, release=lambda: order.append("release"))
    assert outcome.http_status == 200 and order == ["release", "child"]


# --- warm-up on the render thread --------------------------------------------------------------------------

def test_the_worker_warms_its_engine_on_the_render_thread(tmp_path):
    """CUDA-graph trees (``compiled``) and the current device are per thread: warm where jobs render."""
    from deployments.serve import WorkerService
    from tasks.settings import Settings

    threads = []
    engine = SimpleNamespace(warm=False, warmup=lambda: threads.append(threading.current_thread().name))
    service = WorkerService(Settings(musetalk_workdir=tmp_path), engine_loader=lambda s: engine,
                            prefect_warmup=lambda: "none")
    service.start()
    assert service.wait_ready(30), service.load_error
    assert threads == ["render"]
    service.stop()


def test_a_compiled_engine_warms_again_on_a_new_rendering_thread(engine_cpu, monkeypatch):
    calls = []
    monkeypatch.setattr(engine_cpu.generator, "mode", "compiled")
    monkeypatch.setattr(engine_cpu, "_warmup_locked",
                        lambda: calls.append(threading.get_ident()) or engine_cpu._warm_threads.add(threading.get_ident()))
    monkeypatch.setattr(engine_cpu, "_warm_threads", set())
    engine_cpu.warmup()
    assert calls == [threading.get_ident()]

    def render_elsewhere():
        with pytest.raises(Exception):  # noqa: B017 — the render itself fails on a missing file after warming
            engine_cpu.render("/nonexistent.mp4", "/nonexistent.wav", "/tmp/never.mp4")

    th = threading.Thread(target=render_elsewhere)
    th.start()
    th.join()
    assert len(calls) == 2 and calls[1] != calls[0]


# --- CUDA only ------------------------------------------------------------------------------------------------

@needs_cuda
def test_nvml_finds_the_gpu_torch_uses():
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    handle = nvml_handle(pynvml, torch.device("cuda", 0))
    assert handle is not None and pynvml.nvmlDeviceGetName(handle)


@needs_two_gpus
def test_graphs_on_cuda1_replay_the_current_inputs(tiny_models):
    """The bug this guards: a capture on device 0's stream while the UNet runs on device 1 is empty, so
    every replay returned the face computed at capture."""
    from musetalk_engine.face_generator import FaceGenerator
    from musetalk_engine.weights import ModelPaths, load_unet, load_vae

    d1 = torch.device("cuda", 1)
    paths = ModelPaths(tiny_models)
    unet, vae = load_unet(paths, d1, torch.float32), load_vae(paths, d1, torch.float32)
    eager, graphs = FaceGenerator(unet, vae, d1, torch.float32, "eager"), FaceGenerator(unet, vae, d1, torch.float32, "graphs")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        lat, aud = torch.randn(4, 8, 32, 32, generator=g), torch.randn(4, 50, 384, generator=g)
        diff = (graphs.generate(lat, aud, batch_size=4).int() - eager.generate(lat, aud).int()).abs().max()
        assert graphs.mode == "graphs" and int(diff) <= 1
