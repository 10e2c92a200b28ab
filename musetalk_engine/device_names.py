"""How a device is named in settings, without importing torch (3 s), so a configuration typo is found
the moment the settings are read: ``auto | cpu | cuda | cuda:N`` for the engine's device, and ``cpu |
cuda | cuda:N`` for one render slot of a several-GPU worker (``auto`` picks one device, not a slot's)."""

from __future__ import annotations

import re

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
SLOT_DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"


def canonical_slot_device(name: str) -> str:
    """``cuda`` → ``cuda:0``, ``CUDA:01`` → ``cuda:1``, ``cpu`` → ``cpu``: one spelling per device, so a
    list naming one GPU twice is seen as such. ValueError for anything else."""
    name = name.strip().lower()
    if not re.fullmatch(SLOT_DEVICE_PATTERN, name):
        raise ValueError(f"{name!r} is not cpu, cuda or cuda:N")
    if name == "cpu":
        return name
    return "cuda:0" if name == "cuda" else f"cuda:{int(name[5:])}"
