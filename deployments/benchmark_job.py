"""Benchmark jobs on a worker: the container side of the benchmark flow's ``via="salad"`` fan-out.

The flow queues ``{"benchmark": {…its parameters}}`` on a class's benchmark queue; a container group of
that class whose queue connection points at ``POST /benchmark`` receives it from the Salad job-queue
worker. The measurement runs as ``python -m benchmarks --config …`` in a child process, on the render
thread: it never shares the GPU with a render, a crash or out-of-memory in it cannot take the worker down,
and its cold start is a real process start. The answer, ``{"status": "ok", "result": BenchmarkResult}``,
becomes the Salad job's output, which the flow merges into ``gpu_targets.json``.

What runs where is the worker's decision, not the job's: paths (``models_dir``, ``work_dir``) and the
device are never taken from the request. ``real`` measures the worker's own weights
(``MUSETALK_MODELS_DIR``); generated models and media go under ``$MUSETALK_CACHE_DIR/benchmark``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from benchmarks.run import BenchmarkConfig
from musetalk_engine.errors import MediaError
from tasks.contract import JobOutcome, describe_errors, failure_body, processing_failure
from tasks.settings import Settings, redact

log = logging.getLogger(__name__)

# Measurement fields the worker decides itself (the flow's own keys, such as class_id, are dropped too).
_WORKER_DECIDES = {"models_dir", "work_dir", "device"}
# The child is polled this often, so that an exception raised in the render thread (abandon at shutdown)
# lands promptly and the child is killed on the way out.
_POLL_SEC = 0.5


class BenchmarkJob(BaseModel):
    """``POST /benchmark`` body: the benchmark flow's job input."""

    benchmark: dict[str, Any]


def benchmark_config(request: dict[str, Any], settings: Settings, *, cuda: bool,
                     device: str | None = None) -> BenchmarkConfig:
    """The measurement a job asks for, on this worker's terms; a bad request is a MediaError (422).
    ``device``: the GPU to measure (the render slot's that runs the job); None: the child's default."""
    fields = {k: v for k, v in request.items()
              if k in BenchmarkConfig.model_fields and k not in _WORKER_DECIDES and v is not None}
    if device is not None:
        fields["device"] = device
    fields.setdefault("profile", "full-random" if cuda else "tiny")
    fields.setdefault("gpu_class", settings.gpu_class_name)
    fields["work_dir"] = settings.resolve(settings.musetalk_cache_dir) / "benchmark"
    if fields["profile"] == "real":
        fields["models_dir"] = settings.resolve(settings.musetalk_models_dir)
    try:
        return BenchmarkConfig.model_validate(fields)
    except ValidationError as exc:
        raise MediaError(f"invalid benchmark request: {describe_errors(exc.errors())}", stage="validation") from None


def run_in_child(config: BenchmarkConfig, timeout_s: float) -> dict[str, Any]:
    """``python -m benchmarks`` on ``config`` in a child process; returns the result JSON."""
    with tempfile.TemporaryDirectory(prefix="benchmark-job-") as tmp:
        cfg, out, err = Path(tmp) / "config.json", Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        cfg.write_text(config.model_dump_json(), encoding="utf-8")
        with err.open("wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--config", str(cfg), "--out", str(out)],
                                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
            try:
                rc = _wait(proc, timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if rc is None:
            raise TimeoutError(f"the benchmark did not finish within {timeout_s:g} s "
                               "(MUSETALK_BENCHMARK_TIMEOUT_SEC)")
        if rc != 0 or not out.is_file():
            tail = err.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"the benchmark exited with status {rc}" + (f": {tail[0][:400]}" if tail else ""))
        return json.loads(out.read_text(encoding="utf-8"))


def _wait(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The child's exit status, or None when it is still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return proc.wait(timeout=min(_POLL_SEC, max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def run_benchmark_job(job: dict[str, Any], settings: Settings, timeout_s: float, *, cuda: bool,
                      release: Callable[[], None] | None = None, device: str | None = None) -> JobOutcome:
    """One benchmark job, as the HTTP outcome: 200 with the result, 422 for a bad request, 500 (retryable)
    when the measurement failed or ran out of time. ``release`` (the warm engine's ``release_gpu_memory``)
    runs before the child starts; ``device`` is the GPU the child measures (see :func:`benchmark_config`)."""
    try:
        config = benchmark_config(job.get("benchmark") or {}, settings, cuda=cuda, device=device)
    except MediaError as exc:
        status, body = failure_body(exc, {}, "validation")
        return JobOutcome(http_status=status, body=body)
    log.info("benchmark job: profile %s, batch sizes %s, modes %s", config.profile, config.sweep(),
             config.modes or "default")
    # the child needs the memory this process's warm engine holds but is not using: its graphs, cached
    # device frames, and torch's caches of freed device memory and pinned host buffers
    if release is not None:
        release()
    elif cuda:
        import torch

        torch.cuda.empty_cache()
    try:
        result = run_in_child(config, timeout_s)
    except TimeoutError as exc:
        return JobOutcome(http_status=500, body=processing_failure(str(exc), stage="inference",
                                                                   details={"reason": "timeout"}))
    except Exception as exc:  # noqa: BLE001 — a failed measurement is a worker fault; another may succeed
        message = redact(str(exc))[:500]  # the child's stderr could carry anything
        log.error("benchmark job failed: %s", message)
        return JobOutcome(http_status=500, body=processing_failure(message, stage="inference"))
    return JobOutcome(http_status=200, body={"status": "ok", "result": result})
