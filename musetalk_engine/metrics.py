"""What a render cost: stage times, peak memory (torch, NVML, RSS) and which GPU did it."""

from __future__ import annotations

import resource
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .device import nvml_handle

RENDER_STAGES = ("decode", "prepare", "audio", "unet", "vae_decode", "blend", "encode")


class StageTimer:
    """Accumulates seconds per stage; safe to use from the pipeline's threads.

    A stage timed on a CUDA device is measured with a pair of CUDA events on the current stream and read
    only when the times are asked for, so timing never makes the host wait for the GPU (a synchronize per
    stage would stop the host from queueing the next batch while this one runs)."""

    def __init__(self, listed: tuple[str, ...] = RENDER_STAGES) -> None:
        # ``listed`` stages are always reported, in this order (0 when never timed); others follow in the
        # order they were first timed (a job's contract stages, say)
        self.listed = tuple(listed)
        self.current: str | None = None  # the stage entered last (a failed job names it)
        self._times: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str, device: torch.device | None = None):
        """Time the block: wall-clock, or the GPU's own time for the work it queues on ``device``."""
        self.current = name
        if device is not None and device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            # blocking: reading the times waits in the driver instead of spinning a core that x264 needs
            start = torch.cuda.Event(enable_timing=True, blocking=True)
            end = torch.cuda.Event(enable_timing=True, blocking=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                with self._lock:
                    self._pending.append((name, start, end))
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start_s)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._times[name] += seconds

    def as_dict(self) -> dict[str, float]:
        """Seconds per stage (waits for GPU stages still running)."""
        with self._lock:
            for name, start, end in self._pending:
                end.synchronize()
                self._times[name] += start.elapsed_time(end) / 1000
            self._pending.clear()
            names = (*self.listed, *(k for k in self._times if k not in self.listed))
            return {k: round(self._times.get(k, 0.0), 4) for k in names}


def peak_rss_kb() -> int:
    """Peak resident set size of this process in KiB (Linux reports ru_maxrss in KiB): the lifetime peak,
    or the peak since a :class:`PeakRss` reset it."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _status_kb(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakRss:
    """Peak resident memory of this process during a block, in KiB — one job's peak, not the process's
    lifetime peak (a warm worker's lifetime peak is whichever job was largest, for every later job).

    Linux keeps the exact peak (``VmHWM``) and lets a process reset it (``5`` into /proc/self/clear_refs);
    where that is refused, a thread samples ``VmRSS`` every ``interval`` (short spikes may slip between
    samples). Blocks may overlap (a serve process with several render slots): each then reports the
    process's peak while it ran, other jobs' memory included (a later block's reset leaves the sampled
    floor); threads share one address space, so no finer split exists."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._sampled = 0
        self._reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRss":
        return self.start()

    def start(self) -> "PeakRss":
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._reset = True
        except OSError:
            self._reset = False
        self._sample()
        self._thread = threading.Thread(target=self._poll, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        rss = _status_kb("VmRSS")
        if rss is not None:
            self._sampled = max(self._sampled, rss)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_kb(self) -> int | None:
        """The peak so far (None where /proc cannot tell)."""
        self._sample()
        hwm = _status_kb("VmHWM") if self._reset else None
        peak = max(self._sampled, hwm or 0)
        return peak or None

    def __exit__(self, *exc) -> None:
        self.stop()


def _nvml():
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # NVMLError_LibraryNotFound without a GPU driver; any import problem alike
        return None


def gpu_info(device: torch.device | None = None) -> dict:
    """Name, memory and driver of the GPU in use (``{"name": "cpu"}`` without one)."""
    if device is None or device.type != "cuda":
        return {"name": "cpu", "memory_mib": None, "driver": None}
    index = device.index or 0
    info = {"name": torch.cuda.get_device_name(index),
            "memory_mib": torch.cuda.get_device_properties(index).total_memory // (1 << 20), "driver": None}
    nvml = _nvml()
    if nvml is not None:
        try:
            info["driver"] = nvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    return info


class PeakVram:
    """Peak GPU memory during a block: torch's allocator peak, and NVML's device-wide reading sampled on a
    thread (it also sees cuDNN workspaces and other processes' memory)."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device = device
        self.interval = interval
        self.torch_mib = 0.0
        self.nvml_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakVram":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            nvml = _nvml()
            handle = None if nvml is None else nvml_handle(nvml, self.device)
            if handle is not None:
                self.nvml_mib = 0.0
                self._thread = threading.Thread(target=self._poll, args=(nvml, handle), daemon=True)
                self._thread.start()
        return self

    def _poll(self, nvml, handle) -> None:
        while not self._stop.is_set():
            used = nvml.nvmlDeviceGetMemoryInfo(handle).used / (1 << 20)
            self.nvml_mib = max(self.nvml_mib or 0.0, used)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.device.type == "cuda":
            self.torch_mib = torch.cuda.max_memory_allocated(self.device) / (1 << 20)


@dataclass
class RenderMetrics:
    """One render's measurements; ``as_dict`` gives the JSON the service reports."""

    frames: int = 0
    fps_out: float = 25.0
    wall_s: float = 0.0
    generation_s: float = 0.0  # model + blend + encode once inputs are ready
    stage_times: dict[str, float] = field(default_factory=dict)
    peak_vram_mib: float = 0.0
    peak_vram_nvml_mib: float | None = None
    peak_rss_kb: int = 0
    gpu_class: str = "cpu"
    batch_size: int = 0
    encoder: str = ""
    avatar_cached: bool = False
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["fps"] = round(self.fps, 3)
        d["wall_s"] = round(self.wall_s, 4)
        d["generation_s"] = round(self.generation_s, 4)
        return d
