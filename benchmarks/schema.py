"""Benchmark result schema: one `BenchmarkResult` per benchmark run on one machine.

The JSON written by the benchmark flow validates against `BenchmarkResult.model_json_schema()`.
Derived numbers of a sweep entry (fps, overhead ratio, real-time factor, …) may be left out on input:
they are computed from the raw measurements; when given, they must agree with them (2 % tolerance),
so a hand-edited or mis-computed file is rejected rather than silently trusted.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

Profile = Literal["tiny", "full-random", "real"]
Mode = Literal["eager", "graphs", "compiled"]

_REL_TOL = 0.02


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuInfo(_Strict):
    """The measured device (NVML name, e.g. "NVIDIA GeForce RTX 4090"; "cpu" without a GPU)."""

    name: str
    memory_mib: Optional[int] = Field(default=None, ge=0)
    driver: Optional[str] = None
    gpu_class: Optional[str] = Field(default=None, description="Salad GPU class name, if known")


class SoftwareVersions(_Strict):
    """Versions of everything that moves the numbers; None when not installed."""

    python: str
    torch: Optional[str] = None
    cuda: Optional[str] = None
    diffusers: Optional[str] = None
    transformers: Optional[str] = None
    musetalk_flow: Optional[str] = None
    ffmpeg: Optional[str] = None


class Workload(_Strict):
    """The benchmark input: source video and speech."""

    video_seconds: float = Field(gt=0)
    audio_seconds: float = Field(gt=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    fps: float = Field(gt=0, description="output frames per second")


class StageTimes(BaseModel):
    """Seconds per pipeline stage; extra stages (float seconds) are kept."""

    model_config = ConfigDict(extra="allow")

    decode: float = Field(default=0.0, ge=0)
    prepare: float = Field(default=0.0, ge=0)
    audio: float = Field(default=0.0, ge=0)
    unet: float = Field(default=0.0, ge=0)
    vae_decode: float = Field(default=0.0, ge=0)
    blend: float = Field(default=0.0, ge=0)
    encode: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _extras_are_seconds(self) -> "StageTimes":
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"stage time {key!r} must be a non-negative number of seconds")
        return self


def _close(given: float, expected: float) -> bool:
    return math.isclose(given, expected, rel_tol=_REL_TOL, abs_tol=1e-6)


class SweepEntry(_Strict):
    """One batch size × execution mode of the sweep.

    Raw: frames, end_to_end_s (whole warm job), model_only_s (UNet + VAE decode), floor_s (the
    non-model floor: decode/blend/encode measured alone), output_seconds (duration of the video made).
    Derived: overhead_ratio = end_to_end_s / (floor_s + model_only_s); fps = frames / end_to_end_s;
    model_fps = frames / model_only_s; real_time_factor = end_to_end_s / output_seconds (wall seconds per
    output second; < 1 is faster than real time); warm_wall_over_generation = warm job wall time /
    output_seconds (the job wall including download/upload when measured, else end_to_end_s).
    """

    batch_size: int = Field(ge=1)
    mode: Mode
    frames: int = Field(ge=1)
    output_seconds: float = Field(gt=0)
    end_to_end_s: float = Field(gt=0)
    model_only_s: float = Field(gt=0)
    floor_s: float = Field(ge=0)
    overhead_ratio: float = Field(default=0.0, ge=0)
    fps: float = Field(default=0.0, ge=0)
    model_fps: float = Field(default=0.0, ge=0)
    real_time_factor: float = Field(default=0.0, ge=0)
    warm_wall_over_generation: float = Field(default=0.0, ge=0)
    job_overhead_s: Optional[float] = Field(
        default=None, ge=0, description="a warm one-frame job's wall time outside the model (benchmarks/run.py)")
    stage_times: StageTimes = Field(default_factory=StageTimes)
    peak_vram_mib: Optional[float] = Field(default=None, ge=0, description="torch max allocated")
    peak_vram_nvml_mib: Optional[float] = Field(default=None, ge=0, description="NVML device used")
    peak_rss_kb: Optional[int] = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            frames = float(data["frames"])
            e2e = float(data["end_to_end_s"])
            model = float(data["model_only_s"])
            floor = float(data["floor_s"])
            out_s = float(data["output_seconds"])
        except (KeyError, TypeError, ValueError):
            return data  # field validation reports what is missing
        if min(e2e, model, out_s) <= 0 or floor < 0:
            return data
        expected = {
            "overhead_ratio": e2e / (floor + model),
            "fps": frames / e2e,
            "model_fps": frames / model,
            "real_time_factor": e2e / out_s,
        }
        if data.get("warm_wall_over_generation") in (None, 0, 0.0):
            data["warm_wall_over_generation"] = e2e / out_s
        for key, value in expected.items():
            given = data.get(key)
            if given in (None, 0, 0.0):
                data[key] = value
            elif not _close(float(given), value):
                raise ValueError(f"{key}={given} disagrees with the measurements (expected {value:.4g})")
        return data

    @classmethod
    def from_measurements(
        cls,
        *,
        batch_size: int,
        mode: Mode,
        frames: int,
        output_fps: float,
        end_to_end_s: float,
        model_only_s: float,
        floor_s: float,
        stage_times: Optional[dict[str, float]] = None,
        warm_wall_s: Optional[float] = None,
        job_overhead_s: Optional[float] = None,
        peak_vram_mib: Optional[float] = None,
        peak_vram_nvml_mib: Optional[float] = None,
        peak_rss_kb: Optional[int] = None,
    ) -> "SweepEntry":
        """Build an entry from raw timings; derived numbers are computed."""
        output_seconds = frames / output_fps
        return cls(
            batch_size=batch_size,
            mode=mode,
            frames=frames,
            output_seconds=output_seconds,
            end_to_end_s=end_to_end_s,
            model_only_s=model_only_s,
            floor_s=floor_s,
            warm_wall_over_generation=(warm_wall_s or end_to_end_s) / output_seconds,
            job_overhead_s=None if job_overhead_s is None else round(job_overhead_s, 4),
            stage_times=StageTimes(**(stage_times or {})),
            peak_vram_mib=peak_vram_mib,
            peak_vram_nvml_mib=peak_vram_nvml_mib,
            peak_rss_kb=peak_rss_kb,
        )


class BenchmarkResult(_Strict):
    """Everything one benchmark run measured on one machine."""

    schema_version: Literal[1] = 1
    profile: Profile
    gpu: GpuInfo
    software: SoftwareVersions
    created_utc: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    workload: Workload
    cold_start_s: Optional[float] = Field(default=None, ge=0, description="process start → ready")
    sweep: list[SweepEntry] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: Any) -> Any:
        # `best` is written by model_dump (computed field); accept it back on re-validation.
        if isinstance(data, dict) and "best" in data:
            data = {k: v for k, v in data.items() if k != "best"}
        return data

    @field_validator("created_utc")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def best(self) -> SweepEntry:
        """The sweep entry with the highest end-to-end fps (ties: the smaller batch, less VRAM)."""
        return max(self.sweep, key=lambda e: (e.fps, -e.batch_size))

    @classmethod
    def load(cls, path: str) -> "BenchmarkResult":
        """Read and validate a result JSON file."""
        with open(path, encoding="utf-8") as fh:
            return cls.model_validate_json(fh.read())


def json_schema() -> dict[str, Any]:
    """The JSON schema of a result file as written (includes the computed `best`)."""
    return BenchmarkResult.model_json_schema(mode="serialization")
