"""Which device the engine runs on, and making it the current one.

A worker configured for a GPU must never render on the CPU instead: that would be a hundred times slower
while ``/hc`` says healthy. So ``cuda``/``cuda:N`` without that GPU is an error, and only ``auto`` may
pick the CPU. CUDA keeps a *current device* per host thread; ``torch.cuda.graph`` captures on the current
device's stream and the caching allocator, cuDNN handles and events default to it too, so every thread
that does GPU work for device N (the loader, the render thread) runs inside :func:`device_scope`."""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Any

import torch

from .device_names import DEVICE_PATTERN
from .errors import ProcessingError


class DeviceUnavailableError(ProcessingError):
    """The configured GPU is not there (no driver, a driver too old for this torch, no ``--gpus``)."""

    def __init__(self, message: str):
        super().__init__(message, stage="preprocessing", retryable=True)


def resolve_device(name: str, *, cuda_available: bool | None = None, cuda_count: int | None = None) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` → a device with an explicit index on CUDA (``cuda`` is ``cuda:0``), so
    locks, NVML and metrics all name the same GPU. ``cuda_available``/``cuda_count`` default to torch's."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "cpu" or (name == "auto" and not available):
        return torch.device("cpu")
    index = 0 if name in ("auto", "cuda") else int(name.split(":")[1])
    if not available:
        raise DeviceUnavailableError(
            f"device {name!r} was asked for but CUDA is not available to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}): check `nvidia-smi`, that the "
            f"driver supports that CUDA version, and that the container was started with GPUs; this worker "
            f"will not fall back to the CPU")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if index >= count:
        raise DeviceUnavailableError(f"device {name!r} was asked for but only {count} GPU(s) are visible "
                                     f"(CUDA ordinals 0..{count - 1}; see CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", index)


def device_scope(device: torch.device):
    """A context that makes ``device`` current for this thread (nothing to do on the CPU)."""
    if device.type != "cuda":
        return nullcontext()
    return torch.cuda.device(device.index if device.index is not None else 0)


def torch_uuid(device: torch.device) -> str:
    """The GPU's UUID as NVML spells it (``GPU-…``)."""
    uuid = str(torch.cuda.get_device_properties(device.index or 0).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def nvml_handle(nvml: Any, device: torch.device):
    """NVML's handle of the very GPU torch calls ``device``, found by UUID: NVML numbers GPUs by PCI bus
    while CUDA orders them fastest first and honours CUDA_VISIBLE_DEVICES, so the ordinals differ. None
    when NVML does not know that UUID (then nothing is measured rather than another GPU)."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(torch_uuid(device))
    except Exception:  # noqa: BLE001 — NVMLError_NotFound and friends: measure nothing
        return None


def empty_caches(device: torch.device) -> None:
    """Return cached device memory and pinned host memory to the system (both of torch's caches keep
    freed blocks for reuse, which a benchmark child or another process then cannot have)."""
    if device.type == "cuda":
        with device_scope(device):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    empty_host = getattr(torch.accelerator, "empty_host_cache", None)
    if empty_host is not None and torch.cuda.is_available():
        empty_host()


def visible_gpus() -> list[str]:
    """``cuda:0 … cuda:N-1`` for every GPU this process sees (none without CUDA): what ``MUSETALK_DEVICES=all``
    means."""
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def make_current(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device for good (a render thread that only ever
    works for that GPU; nothing to do on the CPU). :func:`device_scope` is the scoped form."""
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else 0)
