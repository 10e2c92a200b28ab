"""The benchmark runner: one engine, one fixed workload, a batch-size sweep → a `BenchmarkResult`.

Per batch size, on the same prepared avatar and the same precomputed audio windows:

- `end_to_end_s`: `Engine.render` (source decode → UNet + VAE decode → blend → encode, audio muxed);
- `model_only_s`: `FaceGenerator.generate` over the same batches of the same frames, inputs already on
  the device, synchronised once at the end (CUDA) — the model's share and nothing else;
- `floor_s`: ffmpeg alone decodes the source once (ping-pong cycled like the render), encodes the same
  number of frames with the render's encoder and settings, and muxes the speech — the media floor.

`overhead_ratio = end_to_end_s / (floor_s + model_only_s)`: 1.0 means the streamed render costs no more
than its two unavoidable parts run back to back; below 1 they overlap; above 1 something serialises.

`job_overhead_s`: a warm job's fixed cost, everything but the model — a one-frame job on the cached avatar
and fresh copies of the inputs (probe the video, hash both inputs, avatar cache lookup, decode the speech
track and its Whisper log-mel features, encoder start, muxing the speech track, finish) minus the model
work inside it: that frame's UNet + VAE decode and the Whisper encoder's forward over the track, each
timed on its own. At the GPU target a 10 s clip renders in ~0.6 s, so this is what decides whether short
jobs pay double; the target is ≤ 150 ms. The engine path only: the Prefect flow around a real job adds
its own run and task set-up (measured in benchmarks/RESULTS.md).

No Prefect here: the CLI (`python -m benchmarks`) and the benchmark flow both call `run_benchmark`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import BaseModel, Field, field_validator

from benchmarks.schema import (
    BenchmarkResult,
    GpuInfo,
    Mode,
    Profile,
    SoftwareVersions,
    SweepEntry,
    Workload,
)
from benchmarks.workload import WorkloadMedia, default_work_dir, make_workload, profile_models
from musetalk_engine.files import atomic_write

log = logging.getLogger(__name__)

# Sweeps a profile runs when none is given: CPU-sized for tiny, VRAM-sized for the released model.
DEFAULT_BATCH_SIZES: dict[str, list[int]] = {
    "tiny": [4, 8],
    "full-random": [8, 16, 32, 64],
    "real": [8, 16, 32, 64],
}


class BenchmarkConfig(BaseModel):
    """What to measure; each field has a CLI flag (`--models` for models_dir) and a flow parameter."""

    profile: Profile = "tiny"
    modes: list[Mode] = Field(default_factory=list)  # empty: eager on CPU; eager + graphs on CUDA
    models_dir: Optional[Path] = None
    work_dir: Optional[Path] = None
    batch_sizes: list[int] = Field(default_factory=list, max_length=16)  # empty: the profile's default sweep
    audio_seconds: float = Field(10.0, gt=0, le=600)
    video_seconds: float = Field(2.0, gt=0, le=60)
    width: int = Field(1280, ge=64, le=3840)
    height: int = Field(720, ge=64, le=3840)
    fps: float = Field(25.0, gt=0, le=60)
    device: str = "auto"
    torch_threads: Optional[int] = Field(None, ge=1, le=256)  # CPU intra-op threads; None: the engine's default
    repeats: int = Field(1, ge=1, le=10)  # each measurement's median over this many runs
    gpu_class: Optional[str] = None  # Salad class name; defaults to $GPU_CLASS_NAME

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 or b > 512 for b in value):
            raise ValueError("batch sizes must be between 1 and 512")
        return sorted(set(value))

    def sweep(self) -> list[int]:
        return self.batch_sizes or DEFAULT_BATCH_SIZES[self.profile]

    def mode_sweep(self, device: torch.device) -> list[str]:
        """The execution modes to measure; CUDA graphs only where there is CUDA."""
        modes = list(dict.fromkeys(self.modes)) or ["eager", "graphs"]
        if device.type != "cuda":
            modes = [m for m in modes if m != "graphs"] or ["eager"]
        return modes

    def workload(self) -> Workload:
        return Workload(video_seconds=self.video_seconds, audio_seconds=self.audio_seconds,
                        width=self.width, height=self.height, fps=self.fps)


# ------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_batches(engine, avatar, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The render's batches (same frame cycle, same slicing), staged on the model's device."""
    from musetalk_engine.cycle import cycle_indices

    total = int(windows.shape[0])
    order = cycle_indices(avatar.n_frames, total)
    latents = torch.from_numpy(avatar.latents)
    gen = engine.generator
    batches = []
    for start in range(0, total, batch_size):
        idx = torch.as_tensor(order[start:start + batch_size])
        batches.append((latents[idx].to(gen.device, gen.dtype),
                        windows[start:start + batch_size].to(gen.device, gen.dtype)))
    return batches


def time_model_only(engine, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for UNet + VAE decode of every batch; one synchronisation at the end, as a stream would."""
    gen = engine.generator
    batch_size = batches[0][0].shape[0]
    _sync(gen.device)
    start = time.perf_counter()
    for lat, win in batches:
        gen.generate(lat, win, batch_size=batch_size)  # a short last batch runs as the render runs it
    _sync(gen.device)
    return time.perf_counter() - start


def encoder_args(encoder: str) -> list[str]:
    """The video codec settings of `musetalk_engine.video.VideoWriter`, as ffmpeg command-line options."""
    from musetalk_engine.video import video_codec_options

    options = video_codec_options(encoder)
    args = ["-c:v", str(options.pop("vcodec"))]
    for name, value in options.items():
        args += [f"-{name}", str(value)]
    return args


def floor_command(video: Path, audio: Path, out: Path, *, frames: int, n_source: int, fps: float,
                  encoder: str) -> list[str]:
    """ffmpeg: decode the source once, cycle it forward/backward like the render, encode `frames`
    frames, mux the speech. No scaling, no colour conversion beyond what the encoder needs."""
    graph = (f"[0:v]fps={fps:g},split[f][b];[b]reverse[r];[f][r]concat=n=2:v=1:a=0,"
             f"loop=loop=-1:size={2 * n_source}:start=0,pad=ceil(iw/2)*2:ceil(ih/2)*2[v]")
    return ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(video), "-i", str(audio),
            "-filter_complex", graph, "-map", "[v]", "-map", "1:a", "-frames:v", str(frames),
            *encoder_args(encoder), "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", str(out)]


def time_floor(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"floor ffmpeg failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return elapsed


# ------------------------------------------------------------------------------------ describing


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def ffmpeg_version() -> Optional[str]:
    try:
        first = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, timeout=20,
                               check=False).stdout.split("\n", 1)[0]
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = first.split()
    return parts[2] if len(parts) > 2 and parts[:2] == ["ffmpeg", "version"] else first or None


def software_versions() -> SoftwareVersions:
    return SoftwareVersions(python=platform.python_version(), torch=torch.__version__,
                            cuda=torch.version.cuda, diffusers=_version("diffusers"),
                            transformers=_version("transformers"),
                            musetalk_flow=_version("musetalk-flow"), ffmpeg=ffmpeg_version())


def process_start_time() -> float:
    """When this process was started (epoch seconds), the anchor of a true cold start."""
    import psutil

    return psutil.Process().create_time()


# ------------------------------------------------------------------------------------ the run


def run_benchmark(config: BenchmarkConfig, *, process_start: Optional[float] = None,
                  say: Callable[[str], None] = log.info) -> BenchmarkResult:
    """Measure `config` and return the result (nothing is written).

    `cold_start_s`: with `process_start` (epoch seconds; the CLI passes the process's create time),
    process start → engine loaded and warm, minus the time this run spent making its own models and
    media; without it (in-process calls in a long-lived process), engine construction + warm-up only.
    `torch_threads` applies for the run only (an in-process caller gets its own setting back).
    """
    threads = torch.get_num_threads()
    try:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        return _run(config, process_start, say)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchmarkConfig, process_start: Optional[float], say: Callable[[str], None]) -> BenchmarkResult:
    from musetalk_engine.engine import Engine, EngineConfig

    setup_start = time.perf_counter()
    work = Path(config.work_dir or default_work_dir())
    models = profile_models(config.profile, work, config.models_dir)
    media = make_workload(work, config.workload())
    setup_s = time.perf_counter() - setup_start
    sweep = config.sweep()
    say(f"profile {config.profile}: models {models}, video {media.video.name}, "
        f"audio {media.audio.name}, batch sizes {sweep} (setup {setup_s:.1f}s)")

    load_start = time.perf_counter()
    engine = Engine(EngineConfig(models_dir=models, cache_dir=work / "avatars", device=config.device,
                                 batch_size=max(sweep), accel="eager", cpu_threads=config.torch_threads))
    engine.warmup()
    if process_start is not None:
        cold_start = max(0.0, time.time() - process_start - setup_s)
    else:
        cold_start = time.perf_counter() - load_start
    say(f"engine ready on {engine.device} ({engine.dtype}, {torch.get_num_threads()} CPU threads); "
        f"cold start {cold_start:.1f}s")

    avatar, _ = engine.prepare(media.video)  # outside every timing: the avatar is cached per video
    windows = engine.audio_windows(media.audio, config.fps)
    entries = []
    for mode in config.mode_sweep(engine.device):
        use_mode(engine, mode)
        _warm_render(engine, media, avatar, windows, max(sweep))
        entries += [_measure(engine, media, avatar, windows, bs, config.repeats, say) for bs in sweep]

    gpu = engine.gpu
    return BenchmarkResult(
        profile=config.profile,
        gpu=GpuInfo(name=gpu["name"], memory_mib=gpu.get("memory_mib"), driver=gpu.get("driver"),
                    gpu_class=config.gpu_class or os.environ.get("GPU_CLASS_NAME") or None),
        software=software_versions(),
        workload=config.workload(),
        cold_start_s=round(cold_start, 3),
        sweep=entries,
    )


def use_mode(engine, mode: str) -> None:
    """Give the engine a generator in `mode` over the already loaded UNet and VAE (no reload)."""
    from musetalk_engine.face_generator import FaceGenerator

    if getattr(engine.generator, "mode", "eager") != mode:
        engine.generator = FaceGenerator(engine.unet, engine.vae, engine.device, engine.dtype, mode=mode)


def _warm_render(engine, media: WorkloadMedia, avatar, windows: torch.Tensor, batch_size: int) -> None:
    """One batch rendered through every stage (lazy inits, encoder start, page cache), not timed."""
    frames = min(int(windows.shape[0]), batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        engine.render(media.video, media.audio, Path(tmp) / "warm.mp4", avatar=avatar,
                      windows=windows[:frames], batch_size=batch_size)


@dataclass
class JobOverhead:
    """One warm one-frame job, timed: its wall and the model work inside it (see `time_job_overhead`)."""

    wall_s: float  # input copy excluded (it stands in for the download), everything else included
    probe_s: float
    hash_s: float
    lookup_s: float  # avatar cache
    audio_s: float  # decode + log-mel + Whisper encoder + per-frame windows
    render_s: float  # encoder start, source decode, one frame, blend, mux of the whole track
    whisper_model_s: float  # the Whisper encoder's forward over the track, timed on its own
    frame_model_s: float  # UNet + VAE decode of the frame, timed on its own

    @property
    def fixed_s(self) -> float:
        """The job's wall less its model work: what a job costs before its length matters."""
        return max(0.0, self.wall_s - self.whisper_model_s - self.frame_model_s)

    def summary(self) -> str:
        return (f"probe {self.probe_s * 1000:.0f} ms, hash {self.hash_s * 1000:.0f}, lookup {self.lookup_s * 1000:.0f}, "
                f"audio {self.audio_s * 1000:.0f} (Whisper model {self.whisper_model_s * 1000:.0f}), "
                f"render {self.render_s * 1000:.0f} (frame model {self.frame_model_s * 1000:.0f})")


def whisper_model_seconds(engine, audio: Path) -> float:
    """The Whisper encoder's forward over the whole track's log-mel windows, as `encode_audio` runs it."""
    from musetalk_engine import audio as audio_mod

    samples = audio_mod.load_audio(audio)
    piece = audio_mod.PIECE_SECONDS * audio_mod.SAMPLE_RATE
    feats = engine.extractor([samples[i:i + piece] for i in range(0, len(samples), piece)],
                             sampling_rate=audio_mod.SAMPLE_RATE, return_tensors="pt").input_features
    feats = feats.to(engine.device, engine.dtype)
    with torch.inference_mode():
        _sync(engine.device)
        start = time.perf_counter()
        engine.whisper(feats, output_hidden_states=True)
        _sync(engine.device)
    return time.perf_counter() - start


def time_job_overhead(engine, media: WorkloadMedia, avatar, batch_size: int, work: Path) -> JobOverhead:
    """A warm one-frame job on fresh copies of the inputs (a job's downloads are new files, so nothing
    remembered per file, such as a probe, may answer for them): probe the video, hash both inputs, find
    the avatar in the cache, the speech track's Whisper features, render one frame; then the model work
    inside it timed on its own — the frame's UNet + VAE decode and the Whisper encoder's forward over
    the track (on a GPU ≈ 3 ms per 30 s window; the tiny CPU model's ≈ 0.3 s would say nothing about
    the fixed cost). See the module's docstring."""
    import shutil

    from musetalk_engine.avatar import file_sha256
    from musetalk_engine.video import probe_video

    job = Path(tempfile.mkdtemp(prefix="job-", dir=work))
    video, audio = job / media.video.name, job / media.audio.name
    shutil.copyfile(media.video, video)
    shutil.copyfile(media.audio, audio)
    marks = [time.perf_counter()]
    probe_video(video)
    marks.append(time.perf_counter())
    sha = file_sha256(video)
    file_sha256(audio)
    marks.append(time.perf_counter())
    cached, hit = engine.prepare(video, video_sha256=sha)
    marks.append(time.perf_counter())
    if not hit or cached is not avatar:  # the cache must answer, as on a warm worker
        raise RuntimeError("the avatar was not served from the cache")
    # the whole track's features (one Whisper window per 30 s, as a job computes them), one frame rendered
    states, n_samples = engine.encode_audio(audio)
    windows = engine.windows_from_states(states, n_samples, avatar.fps)[:1]
    marks.append(time.perf_counter())
    result = engine.render(video, audio, job / "one-frame.mp4", avatar=avatar, windows=windows,
                           batch_size=batch_size)
    marks.append(time.perf_counter())
    if result.frames != 1:
        raise RuntimeError(f"the one-frame job made {result.frames} frames")
    steps = [b - a for a, b in zip(marks, marks[1:])]
    frame_model = time_model_only(engine, model_batches(engine, avatar, windows, batch_size))
    whisper_model = whisper_model_seconds(engine, audio)
    shutil.rmtree(job, ignore_errors=True)
    return JobOverhead(marks[-1] - marks[0], *steps, whisper_model_s=whisper_model, frame_model_s=frame_model)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (ffmpeg): load-independent,
    so comparing them tells serialisation (wall) from extra work (CPU) on a shared machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _measure(engine, media: WorkloadMedia, avatar, windows: torch.Tensor, batch_size: int,
             repeats: int, say: Callable[[str], None]) -> SweepEntry:
    frames = int(windows.shape[0])
    batches = model_batches(engine, avatar, windows, batch_size)
    engine.generator.generate(*batches[0])  # first call at this shape: kernel selection, not timed
    e2e, model, floor, renders, jobs = [], [], [], [], []
    cpu = {"render": [], "model": [], "floor": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "render.mp4"
        for _ in range(repeats):  # interleaved, so a load change on a shared machine hits all three
            c0, start = cpu_seconds(), time.perf_counter()
            result = engine.render(media.video, media.audio, out, avatar=avatar, windows=windows,
                                   batch_size=batch_size)
            e2e.append(time.perf_counter() - start)
            c1 = cpu_seconds()
            renders.append(result.metrics)
            if result.frames != frames:
                raise RuntimeError(f"render made {result.frames} frames, expected {frames}")
            model.append(time_model_only(engine, batches))
            c2 = cpu_seconds()
            cmd = floor_command(media.video, media.audio, Path(tmp) / "floor.mp4", frames=frames,
                                n_source=avatar.n_frames, fps=avatar.fps,
                                encoder=result.metrics.encoder)
            floor.append(time_floor(cmd))
            c3 = cpu_seconds()
            jobs.append(time_job_overhead(engine, media, avatar, batch_size, Path(tmp)))
            for key, value in zip(cpu, (c1 - c0, c2 - c1, c3 - c2)):
                cpu[key].append(value)
    # the render whose wall time is the median carries its own stage split and memory peaks
    mid = statistics.median_low(e2e)
    m = renders[e2e.index(mid)]
    fixed = [j.fixed_s for j in jobs]
    job = jobs[fixed.index(statistics.median_low(fixed))]  # the median job, with its own breakdown
    entry = SweepEntry.from_measurements(
        batch_size=m.batch_size, mode=getattr(engine.generator, "mode", "eager"), frames=frames,
        output_fps=avatar.fps,
        end_to_end_s=mid, model_only_s=statistics.median(model), floor_s=statistics.median(floor),
        stage_times=m.stage_times, warm_wall_s=m.wall_s, job_overhead_s=statistics.median(fixed),
        peak_vram_mib=m.peak_vram_mib if engine.device.type == "cuda" else None,
        peak_vram_nvml_mib=m.peak_vram_nvml_mib, peak_rss_kb=m.peak_rss_kb)
    say(f"{entry.mode} batch {batch_size}: {frames} frames, end-to-end {entry.end_to_end_s:.2f}s "
        f"({entry.fps:.1f} fps, rtf {entry.real_time_factor:.3f}), model {entry.model_only_s:.2f}s, "
        f"job overhead {entry.job_overhead_s:.3f}s, "
        f"floor {entry.floor_s:.2f}s, overhead ×{entry.overhead_ratio:.2f}; CPU seconds: render "
        f"{statistics.median(cpu['render']):.1f}, model {statistics.median(cpu['model']):.1f}, "
        f"floor {statistics.median(cpu['floor']):.1f}; stages {m.stage_times}; "
        f"one-frame job: {job.summary()}")
    return entry


def write_result(result: BenchmarkResult, path: Path) -> Path:
    """Write the result JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8"))


if __name__ == "__main__":  # pragma: no cover - use `python -m benchmarks`
    sys.exit("run `python -m benchmarks --help`")
