"""The engine facade: load the models once, then prepare avatars and render jobs one after another.

    engine = Engine(EngineConfig(models_dir="models"))
    result = engine.render("avatar.mp4", "speech.wav", "out.mp4")
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from . import audio as audio_mod
from .avatar import Avatar, AvatarCache, PrepareParams, avatar_key, file_sha256, prepare_avatar
from .device import device_scope, empty_caches, resolve_device
from .device_names import DEVICE_PATTERN
from .errors import MediaError
from .face_generator import FaceGenerator
from .gpu_lock import DEFAULT_LOCK_DIR, GpuLock, gpu_lock_key
from .metrics import PeakVram, RenderMetrics, StageTimer, gpu_info, peak_rss_kb
from .render import render_stream, render_stream_device, source_frames
from .video import OutputShape, VideoWriter, decode_frames
from .weights import ModelPaths, check_models, load_unet, load_vae, load_whisper, weights_fingerprint

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "musetalk-flow" / "avatars"


class EngineConfig(BaseModel):
    """How to load the engine (process-level; one engine per GPU)."""

    models_dir: Path = Path("models")
    # auto | cpu | cuda | cuda:N; cuda without a usable GPU is an error, never a silent CPU fallback
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float16 | bfloat16 | float32
    landmarks: str = "auto"  # auto | dwpose-onnx | mmpose | dlib
    cache_dir: Path = DEFAULT_CACHE
    batch_size: int | None = Field(None, ge=1, le=512)  # None: chosen from free VRAM
    # CPU torch threads; None: all cores but one, which the render's decode/blend/encode stages and
    # ffmpeg need (with every core, torch's threads stall whenever those run: measured 1.2–1.7× slower)
    cpu_threads: int | None = Field(None, ge=1)
    accel: str = "auto"  # auto (graphs on CUDA, eager on CPU) | eager | graphs | compiled
    blend: str = "auto"  # auto (device on CUDA, cpu on CPU) | cpu | device
    # the machine-wide per-GPU lock (see gpu_lock.py): "auto" locks the GPU by its UUID and nothing on the
    # CPU, "off" never locks, any other value is the lock's name (two CPU engines may share one that way)
    gpu_lock: str = "auto"
    gpu_lock_dir: Path = DEFAULT_LOCK_DIR
    unet_weights: Path | None = None  # defaults to models_dir/musetalkV15/unet.pth
    unet_config: Path | None = None  # defaults to models_dir/musetalkV15/musetalk.json


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[name]


def auto_batch_size(device: torch.device) -> int:
    """Largest batch the free VRAM allows (≈6 GiB fixed + ≈0.15 GiB per frame at fp16), 8..64; 8 on CPU."""
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_frame, fixed = 0.15 * (1 << 30), 6 * (1 << 30)
    return int(max(8, min(64, (free - fixed) // per_frame // 8 * 8)))


@dataclass
class RenderResult:
    output: Path
    frames: int
    duration_s: float
    metrics: RenderMetrics


def _tiny_landmarks(models_dir: Path) -> str | None:
    marker = models_dir / "tiny.json"
    if marker.is_file():
        return json.loads(marker.read_text()).get("landmarks")
    return None


# One engine is built at a time in a process: diffusers and transformers build their models inside context
# managers that patch torch for every thread (empty "meta" parameters, skipped init) and do not always undo
# it, so a module another thread built meanwhile came out empty (a serve process builds its slots' engines
# before any warm-up for the same reason: deployments/serve.py).
_BUILDING = threading.Lock()


class Engine:
    """Models loaded once per process and kept warm; thread-safe for one render at a time."""

    loads = 0  # how many engines this process has built (tests prove reuse with it)

    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.paths = ModelPaths(Path(self.config.models_dir), self.config.unet_weights, self.config.unet_config)
        check_models(self.paths)
        self.device = resolve_device(self.config.device)
        with _BUILDING, device_scope(self.device):
            self._load()

    def _load(self) -> None:
        from .landmarks import build_analyzer
        from .parsing import load_bisenet

        self.dtype = resolve_dtype(self.config.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(self.config.cpu_threads or max(1, len(os.sched_getaffinity(0)) - 1))
        else:
            # shapes are fixed per batch size, so cuDNN's per-shape search for the fastest convolution
            # (the VAE decoder is convolutions) pays once, at warm-up
            torch.backends.cudnn.benchmark = True
        started = time.perf_counter()
        self.unet = load_unet(self.paths, self.device, self.dtype)
        self.vae = load_vae(self.paths, self.device, self.dtype)
        self.extractor, self.whisper = load_whisper(self.paths, self.device, self.dtype)
        self.parsing_net = load_bisenet(self.paths.bisenet, self.device, self.dtype)
        backend = self.config.landmarks
        if backend == "auto":
            backend = _tiny_landmarks(self.paths.root) or "auto"
        self.landmarks_backend = backend
        self.analyzer = build_analyzer(self.paths.root, backend, str(self.device))
        accel = self.config.accel
        if accel == "auto":
            accel = "graphs" if self.device.type == "cuda" else "eager"
        if accel == "compiled":  # kernels kept beside the avatars, so later process starts reuse them
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(self.config.cache_dir).parent / "inductor"))
        self.generator = FaceGenerator(self.unet, self.vae, self.device, self.dtype, mode=accel)
        blend = self.config.blend
        self.blend_on = ("device" if self.device.type == "cuda" else "cpu") if blend == "auto" else blend
        self._device_frames: OrderedDict[str, tuple] = OrderedDict()
        self._auto_batch: int | None = None
        self.fingerprint = weights_fingerprint(self.paths)
        self.avatars = AvatarCache(self.config.cache_dir)
        self.gpu = gpu_info(self.device)
        self.load_seconds = time.perf_counter() - started
        self._lock = threading.Lock()
        lock = self.config.gpu_lock
        key = gpu_lock_key(self.device) if lock == "auto" else None if lock == "off" else lock
        # held around every use of the GPU, so that another process's engine on it waits its turn
        self.gpu_lock: GpuLock | None = None if key is None else GpuLock(key, self.config.gpu_lock_dir)
        self.warm = False
        # threads the fast path was warmed on: torch.compile's CUDA-graph trees are per thread, so a
        # compiled engine warmed on a loader thread warms again on the thread that renders
        self._warm_threads: set[int] = set()
        Engine.loads += 1
        log.info("engine loaded in %.1fs on %s (%s), landmarks=%s", self.load_seconds, self.device,
                 self.dtype, backend)

    # -- per video -------------------------------------------------------------------------------------
    def prepare(self, video: str | Path, params: PrepareParams | None = None, *, batch_size: int | None = None,
                timer: StageTimer | None = None, video_sha256: str | None = None) -> tuple[Avatar, bool]:
        """The avatar for ``video``: from the cache when this video was prepared before, else computed and
        stored. Returns (avatar, cached). ``video_sha256`` spares re-hashing a file the caller hashed."""
        from .parsing import FaceParser

        video = Path(video)
        params = params or PrepareParams(landmarks=self.landmarks_backend)
        timer = timer or StageTimer()
        with timer.stage("prepare"), self._gpu(), device_scope(self.device):
            sha = video_sha256 or file_sha256(video)
            key = avatar_key(sha, params, self.fingerprint)
            cached = self.avatars.get(key)
            if cached is not None:
                return cached, True
            parser = FaceParser(self.parsing_net, self.device, self.dtype, mode=params.parsing_mode,
                                left_cheek_width=params.left_cheek_width,
                                right_cheek_width=params.right_cheek_width)
            avatar = prepare_avatar(video, analyzer=self.analyzer, parser=parser, vae=self.vae,
                                    device=self.device, dtype=self.dtype, params=params,
                                    video_sha256=sha, weights_fp=self.fingerprint,
                                    batch_size=batch_size or self.batch_size())
            self.avatars.put(key, avatar)
            return avatar, False

    # -- per audio -------------------------------------------------------------------------------------
    def encode_audio(self, audio: str | Path, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
        """Whisper encoder states [steps, 5, 384] of the whole speech track, and its sample count."""
        samples = audio_mod.load_audio(audio, max_seconds)
        with self._gpu(), device_scope(self.device):
            states = audio_mod.encoder_states(samples, self.extractor, self.whisper, self.device, self.dtype)
        return states, len(samples)

    def windows_from_states(self, states: torch.Tensor, n_samples: int, fps: float, name: str = "audio"):
        """Per-frame windows [T, 50, 384] from encoder states (cheap indexing, no model)."""
        n_frames = audio_mod.frame_count(n_samples, fps)
        if n_frames == 0:
            raise MediaError(f"the {name} is shorter than one video frame", stage="validation")
        return audio_mod.frame_windows(states.to(self.device, self.dtype), n_frames, fps)

    def audio_windows(self, audio: str | Path, fps: float = 25.0) -> torch.Tensor:
        """Per-frame Whisper windows [T, 50, 384] for the whole speech track (on the model's device)."""
        states, n_samples = self.encode_audio(audio)
        return self.windows_from_states(states, n_samples, fps, f"audio {Path(audio).name!r}")

    def batch_size(self) -> int:
        """The configured batch size, else the one free VRAM allows, read once: the warm engine's own
        memory (graphs, cached frames) would otherwise shrink it job by job, and each new size costs
        a graph capture or a compile."""
        if self.config.batch_size:
            return self.config.batch_size
        if self._auto_batch is None:
            self._auto_batch = auto_batch_size(self.device)
        return self._auto_batch

    # -- per job ---------------------------------------------------------------------------------------
    def render(self, video: str | Path, audio: str | Path, out: str | Path, *,
               params: PrepareParams | None = None, batch_size: int | None = None,
               shape: OutputShape | None = None, windows: torch.Tensor | None = None,
               avatar: Avatar | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> RenderResult:
        """Render one job: avatar (cached) + audio windows → MP4 at ``out``. One render at a time."""
        video, audio, out = Path(video), Path(audio), Path(out)
        params = params or PrepareParams(landmarks=self.landmarks_backend)
        batch = batch_size or self.batch_size()
        with self._lock, self._gpu(), device_scope(self.device):
            if self.generator.mode == "compiled" and threading.get_ident() not in self._warm_threads:
                self._warmup_locked()
            timer = StageTimer()
            wall_start = time.perf_counter()
            with PeakVram(self.device) as vram:
                if avatar is None:
                    avatar, cached = self.prepare(video, params, batch_size=batch, timer=timer)
                else:
                    cached = True
                if windows is None:
                    with timer.stage("audio"):
                        windows = self.audio_windows(audio, params.fps)
                device_frames = self._frames_on_device(video, avatar, timer) if self.blend_on == "device" else None
                gen_start = time.perf_counter()
                # the device path hands the encoder I420 made on the GPU (4:2:0 needs even sides)
                yuv = device_frames is not None and avatar.width % 2 == 0 and avatar.height % 2 == 0
                writer = VideoWriter(out, avatar.width, avatar.height, avatar.fps, audio, shape=shape,
                                     pix_fmt="yuv420p" if yuv else "rgb24")
                try:
                    if device_frames is not None:
                        frames, material = device_frames
                        batch = render_stream_device(avatar=avatar, frames=frames, material=material,
                                                     windows=windows, generator=self.generator, writer=writer,
                                                     batch_size=batch, timer=timer, on_progress=on_progress)
                    else:
                        batch = render_stream(avatar=avatar, frames=decode_frames(video, avatar.fps),
                                              windows=windows, generator=self.generator, writer=writer,
                                              batch_size=batch, timer=timer, on_progress=on_progress)
                    with timer.stage("encode"):
                        writer.close()
                except BaseException:
                    writer.abort()
                    raise
                generation = time.perf_counter() - gen_start
            metrics = RenderMetrics(
                frames=int(windows.shape[0]), fps_out=avatar.fps, wall_s=time.perf_counter() - wall_start,
                generation_s=generation, stage_times=timer.as_dict(), peak_vram_mib=round(vram.torch_mib, 1),
                peak_vram_nvml_mib=None if vram.nvml_mib is None else round(vram.nvml_mib, 1),
                peak_rss_kb=peak_rss_kb(), gpu_class=self.gpu["name"], batch_size=batch,
                encoder=writer.encoder, avatar_cached=cached, device=str(self.device),
                dtype=str(self.dtype).replace("torch.", ""))
            return RenderResult(out, metrics.frames, metrics.frames / avatar.fps, metrics)

    def _frames_on_device(self, video: Path, avatar: Avatar, timer: StageTimer):
        """Source frames (decoded once per avatar) and blend material on the model's device, or None when
        they would take more than a quarter of the free memory (then the streamed CPU path runs)."""
        from .device_blend import DeviceBlendMaterial

        key = avatar.video_sha256 + json.dumps(avatar.params, sort_keys=True)
        if key in self._device_frames:
            self._device_frames.move_to_end(key)
            return self._device_frames[key]
        need = avatar.n_frames * avatar.width * avatar.height * 3
        if self.device.type == "cuda" and need > torch.cuda.mem_get_info(self.device)[0] // 4:
            return None
        n = avatar.n_frames
        host = np.empty((n, avatar.height, avatar.width, 3), np.uint8)  # one copy of the decoded frames
        # the first n frames in order, by the streamed path's own rules (a stream one short repeats its last)
        for k, frame in enumerate(source_frames(decode_frames(video, avatar.fps), np.arange(n), n, timer)):
            host[k] = frame
        with timer.stage("decode"):
            entry = (torch.from_numpy(host).to(self.device), DeviceBlendMaterial(avatar, self.device))
        self._device_frames[key] = entry
        while len(self._device_frames) > 2:  # the current avatar and the one before are enough
            self._device_frames.popitem(last=False)
        return entry

    def warmup(self) -> None:
        """One forward pass through every per-frame model so the first job pays no lazy init. On a GPU,
        and in the fast modes, at the render's batch size: the graph capture, compile or cuDNN's search
        for that shape happens here, not in a job."""
        with self._lock, self._gpu(), device_scope(self.device):
            self._warmup_locked()

    def _gpu(self):
        """This GPU for this process alone (other processes' engines on it wait), or nothing to hold."""
        return self.gpu_lock if self.gpu_lock is not None else nullcontext()

    def _warmup_locked(self) -> None:
        n = 1 if self.device.type == "cpu" and self.generator.mode == "eager" else self.batch_size()
        with torch.inference_mode():
            self.generator.generate(torch.zeros(n, 8, 32, 32), torch.zeros(n, 50, 384))
        self._warm_threads.add(threading.get_ident())
        self.warm = True

    def release_gpu_memory(self) -> None:
        """Give back what the warm engine holds beyond its weights: captured graphs, the source frames kept
        on the device, and torch's caches of freed device memory and pinned host buffers. Before another
        process needs the GPU (the benchmark's child); the next job recaptures and re-uploads."""
        with self._lock:
            self.generator.release_fast_paths()
            self._device_frames.clear()
            self._warm_threads.clear()
            empty_caches(self.device)
