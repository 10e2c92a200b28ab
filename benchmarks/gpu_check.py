"""The GPU self-check: what an operator runs on a new GPU machine to prove the fast path, one JSON verdict.

    python -m benchmarks.gpu_check [--device cuda] [--out verdict.json]      (= musetalk-flow doctor)

Correctness first, on tiny random-weight models (a minute): CUDA-graph faces vs eager ones; the CUDA
render's encoder input vs the CPU render's, frame by frame, on the same avatar and audio windows; the same
CUDA render with the GPU slowed and with a slow encoder (a missing event wait or a pinned buffer reused too
early shows as stale or torn frames: the input must not change by one level); a real out-of-memory error
(the caching allocator's own, asked for more than the GPU has) that the render survives at half the batch;
``cuda:1`` when
a second GPU is there. Then throughput per batch size (model only: UNet + VAE decode) on full-size random
weights (``--throughput-models`` to use others), and, when the budget allows, ``compiled`` mode warmed on
one thread and rendering on another, as the worker does. Each check has a deadline share of ``--budget-s``
(470 s: the whole run fits 8 minutes on an H100); what the budget cannot fit is reported as skipped.

On a machine without CUDA the same command runs a reduced form: the device render path on CPU tensors vs
the numpy path, and the slow-encoder check; the checks that need CUDA say so and are skipped. The exit
status is 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import wave
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# Tolerances in 8-bit levels. Graphs replay the eager kernels: ≤ 1 at fp32 with TF32 off, ≤ 3 at fp16.
# The CUDA render's I420 vs the CPU render's: float rounding in resize/blend/colour conversion, ≤ 2.
GRAPHS_FP32_LEVELS, GRAPHS_FP16_LEVELS, RENDER_LEVELS = 1, 3, 2
DEFAULT_BUDGET_S = 470.0


def levels(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Per-pixel level differences of two equally shaped uint8 stacks."""
    d = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).reshape(len(a), -1)
    return {"frames": len(a), "max": int(d.max()), "mean": round(float(d.mean()), 4),
            "identical_frames": int((d.max(1) == 0).sum())}


def synthetic_speech(path: Path, seconds: float) -> Path:
    """A 16 kHz voiced tone with a syllable-like envelope: random weights need no real speech, and the check
    must not depend on espeak-ng."""
    sr = 16000
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype(np.int16).tobytes())
    return path


class Checks:
    """Runs named checks under a shared deadline and keeps their results for the verdict."""

    def __init__(self, budget_s: float, say: Callable[[str], None]):
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, dict[str, Any]] = {}
        self.say = say

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, name: str, reason: str) -> None:
        self.results[name] = {"status": "skipped", "reason": reason}
        self.say(f"{name}: skipped ({reason})")

    def run(self, name: str, fn: Callable[[], dict[str, Any]], *, needs_s: float = 5.0) -> dict[str, Any] | None:
        """``fn()`` → numbers with ``ok`` (pass/fail); an exception is a failure with its message."""
        if self.left() < needs_s:
            self.skip(name, f"budget: {max(0.0, self.left()):.0f} s left, needs ~{needs_s:.0f} s")
            return None
        started = time.perf_counter()
        try:
            out = fn()
            status = "pass" if out.pop("ok") else "fail"
        except Exception as exc:  # noqa: BLE001 — a failed check is reported, the next one still runs
            traceback.print_exc(file=sys.stderr)
            out, status = {"error": f"{type(exc).__name__}: {exc}"[:600]}, "fail"
        self.results[name] = {"status": status, **out, "seconds": round(time.perf_counter() - started, 2)}
        self.say(f"{name}: {status} {json.dumps(out, default=str)[:300]}")
        return self.results[name]


@contextmanager
def recorded_encoder_input(slow_s: float = 0.0):
    """What the render hands its encoder, frame by frame (after the device path's event wait); with
    ``slow_s`` each pipe write is that much slower, so the model side runs ahead of the encoder."""
    import musetalk_engine.engine as engine_mod

    original = engine_mod.VideoWriter
    fed: list[np.ndarray] = []

    class Recording(original):
        def write_frames(self, frames: np.ndarray) -> None:
            fed.append(np.array(frames))
            if slow_s:
                time.sleep(slow_s)
            super().write_frames(frames)

    engine_mod.VideoWriter = Recording
    try:
        yield fed
    finally:
        engine_mod.VideoWriter = original


@contextmanager
def slowed_gpu(cycles: int):
    """Each colour conversion starts after the GPU spun ``cycles``: the host queues far ahead of the GPU,
    so only the events keep buffers and frames in order."""
    import torch

    import musetalk_engine.yuv as yuv_mod

    original = yuv_mod.rgb_to_i420

    def delayed(frames, *args, **kwargs):
        torch.cuda._sleep(cycles)
        return original(frames, *args, **kwargs)

    yuv_mod.rgb_to_i420 = delayed
    try:
        yield
    finally:
        yuv_mod.rgb_to_i420 = original


def run_gpu_check(*, device: str = "auto", work_dir: Path, budget_s: float = DEFAULT_BUDGET_S,
                  throughput_models: Path | None = None, throughput_batches: list[int] | None = None,
                  tiny_models: Path | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """All checks; returns the verdict (``verdict`` pass/fail, ``checks``, ``problems``, environment).
    ``tiny_models``: tiny random-weight models already made (else made under ``work_dir``)."""
    import torch

    from benchmarks.workload import profile_models
    from musetalk_engine.device import resolve_device
    from musetalk_engine.engine import Engine, EngineConfig
    from musetalk_engine.face_generator import FaceGenerator
    from musetalk_engine.sample_media import make_avatar_video
    from musetalk_engine.weights import ModelPaths, load_unet, load_vae
    from musetalk_engine.yuv import rgb_to_i420

    started = time.monotonic()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    checks = Checks(budget_s, say)
    # exact comparisons: TF32 would round the graphs' and the CPU's matmuls differently
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev),
                           "gpus": torch.cuda.device_count() if cuda else 0}
    if cuda:
        from musetalk_engine.device import nvml_handle, torch_uuid
        from musetalk_engine.metrics import _nvml, gpu_info

        env.update(gpu=gpu_info(dev), uuid=torch_uuid(dev))
        nvml = _nvml()
        env["nvml_finds_uuid"] = None if nvml is None else nvml_handle(nvml, dev) is not None

    tiny = Path(tiny_models) if tiny_models else profile_models("tiny", work_dir)
    paths = ModelPaths(tiny)
    video = work_dir / "gpu-check-avatar.mp4"
    if not video.is_file():
        make_avatar_video(video, seconds=1.2, width=256, height=256)
    speech = synthetic_speech(work_dir / "gpu-check-speech.wav", 2.0)

    def inputs(batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 8, 32, 32, generator=g), torch.randn(batch, 50, 384, generator=g)

    # -- graphs vs eager ------------------------------------------------------------------------------
    def graphs_vs_eager(dtype, tol: int, on=dev) -> Callable[[], dict[str, Any]]:
        def check() -> dict[str, Any]:
            unet, vae = load_unet(paths, on, dtype), load_vae(paths, on, dtype)
            eager = FaceGenerator(unet, vae, on, dtype, "eager")
            fast = FaceGenerator(unet, vae, on, dtype, "graphs")
            (la, aa), (lb, ab), (lc, ac) = inputs(8, 1), inputs(8, 2), inputs(5, 3)
            fa, fb = fast.generate(la, aa, batch_size=8).cpu(), fast.generate(lb, ab, batch_size=8).cpu()
            fc = fast.generate(lc, ac, batch_size=8).cpu()  # a short batch, padded to the graph's size
            again = fast.generate(la, aa, batch_size=8).cpu()
            r = {"mode_after": fast.mode, "A": levels(fa, eager.generate(la, aa).cpu()),
                 "B": levels(fb, eager.generate(lb, ab).cpu()), "short5": levels(fc, eager.generate(lc, ac).cpu()),
                 "replay_repeats_A": levels(again, fa), "A_vs_B_differ": levels(fa, fb)}
            # a stale replay (an empty graph) returns the capture's faces: A and B would be the same
            r["ok"] = (fast.mode == "graphs" and max(r[k]["max"] for k in ("A", "B", "short5")) <= tol
                       and r["replay_repeats_A"]["max"] == 0 and r["A_vs_B_differ"]["max"] > 10)
            return r
        return check

    if cuda:
        checks.run("graphs_vs_eager_fp32", graphs_vs_eager(torch.float32, GRAPHS_FP32_LEVELS), needs_s=20)
        checks.run("graphs_vs_eager_fp16", graphs_vs_eager(torch.float16, GRAPHS_FP16_LEVELS), needs_s=20)
    else:
        checks.skip("graphs_vs_eager_fp32", "needs CUDA (graphs are a CUDA feature)")
        checks.skip("graphs_vs_eager_fp16", "needs CUDA")

    # -- the render: device path vs the CPU reference ------------------------------------------------
    ctx: dict[str, Any] = {}

    def cpu_reference() -> dict[str, Any]:
        engine = Engine(EngineConfig(models_dir=tiny, device="cpu", dtype="float32", blend="cpu", batch_size=8,
                                     landmarks="dwpose-onnx", cache_dir=work_dir / "cache-cpu"))
        avatar, _ = engine.prepare(video)
        windows = engine.audio_windows(speech)
        with recorded_encoder_input() as fed:
            result = engine.render(video, speech, work_dir / "ref.mp4", avatar=avatar, windows=windows)
        rgb = np.concatenate(fed)
        ctx.update(avatar=avatar, windows=windows, ref=rgb_to_i420(torch.from_numpy(rgb)).numpy())
        return {"ok": result.frames == len(rgb), "frames": result.frames, "faces_found": int(avatar.face_found.sum())}

    def device_engine() -> Engine:
        if "engine" not in ctx:
            ctx["engine"] = Engine(EngineConfig(models_dir=tiny, device=str(dev), dtype="float32", blend="device",
                                                batch_size=8, landmarks="dwpose-onnx",
                                                cache_dir=work_dir / "cache-device"))
            ctx["engine"].warmup()
        return ctx["engine"]

    def device_render(tag: str, *, slow_encoder_s: float = 0.0, slow_gpu_cycles: int = 0,
                      batch_size: int | None = None) -> tuple[np.ndarray, Any]:
        engine = device_engine()
        slow = slowed_gpu(slow_gpu_cycles) if slow_gpu_cycles else _nothing()
        with recorded_encoder_input(slow_encoder_s) as fed, slow:
            result = engine.render(video, speech, work_dir / f"{tag}.mp4", avatar=ctx["avatar"],
                                   windows=ctx["windows"].to(engine.device), batch_size=batch_size)
        return np.concatenate(fed), result

    def render_vs_reference() -> dict[str, Any]:
        fed, result = device_render("device")
        ctx["device_fed"] = fed
        r = {"mode": device_engine().generator.mode, "encoder": result.metrics.encoder,
             "pix_fmt_shape": list(fed.shape[1:])}
        if fed.shape != ctx["ref"].shape:
            return {**r, "ok": False, "error": f"encoder input {fed.shape} vs reference {ctx['ref'].shape}"}
        r["vs_cpu_render"] = levels(fed, ctx["ref"])
        r["ok"] = r["vs_cpu_render"]["max"] <= RENDER_LEVELS
        return r

    def unchanged_when(tag: str, **slow) -> Callable[[], dict[str, Any]]:
        def check() -> dict[str, Any]:
            fed, _ = device_render(tag, **slow)
            d = levels(fed, ctx["device_fed"]) if fed.shape == ctx["device_fed"].shape else None
            return {"ok": d is not None and d["max"] == 0, "vs_plain_device_render": d or "shape differs"}
        return check

    if checks.run("cpu_reference_render", cpu_reference, needs_s=30) and "ref" in ctx:
        label = "cuda_render_vs_cpu_render" if cuda else "device_path_vs_cpu_path_on_cpu"
        if checks.run(label, render_vs_reference, needs_s=20) and "device_fed" in ctx:
            checks.run("slow_encoder_same_frames", unchanged_when("slowenc", slow_encoder_s=0.1), needs_s=20)
            if cuda:
                checks.run("slow_gpu_same_frames", unchanged_when("slowgpu", slow_gpu_cycles=int(5e7)), needs_s=20)
            else:
                checks.skip("slow_gpu_same_frames", "needs CUDA (torch.cuda._sleep)")

    # -- a real out-of-memory error -------------------------------------------------------------------
    def real_oom() -> dict[str, Any]:
        """A render asked for batch 16 whose batches of 16 run out of memory for real: each first asks the
        caching allocator for more than the GPU has, and the allocator's OutOfMemoryError is what the render
        sees. It must finish at 8, with the failed batch's memory given back (a memory cap between two batch
        sizes' peaks would do the same but depends on the models' sizes)."""
        engine = device_engine()
        engine.release_gpu_memory()
        big = 16
        generate = engine.generator.generate
        failed = {"n": 0}

        def greedy(latents, audio, *args, **kwargs):
            if latents.shape[0] >= big:
                failed["n"] += 1
                torch.empty(torch.cuda.get_device_properties(dev).total_memory, dtype=torch.uint8, device=dev)
            return generate(latents, audio, *args, **kwargs)

        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        engine.generator.generate = greedy
        try:
            fed, result = device_render("oom", batch_size=big)
        finally:
            del engine.generator.generate  # the instance attribute: back to the class's method
        torch.cuda.synchronize(dev)
        leaked = torch.cuda.memory_allocated(dev) - before
        same = fed.shape == ctx["device_fed"].shape and levels(fed, ctx["device_fed"])["max"] <= GRAPHS_FP32_LEVELS
        usable = engine.generator.generate(*inputs(2, 0)).shape[0] == 2
        return {"ok": result.metrics.batch_size == big // 2 and failed["n"] == 1 and usable and same,
                "asked_batch": big, "batch_used": result.metrics.batch_size, "ooms": failed["n"],
                "same_frames_as_plain_render": same, "allocated_change_mib": round(leaked / 2**20, 1),
                "cuda_usable_after": usable}

    if cuda and "engine" in ctx:
        checks.run("real_oom_halves_the_batch", real_oom, needs_s=30)
    else:
        checks.skip("real_oom_halves_the_batch", "needs CUDA" if not cuda else "no device engine")

    # -- a second GPU ------------------------------------------------------------------------------------
    if cuda and torch.cuda.device_count() > 1:
        checks.run("graphs_on_cuda1", graphs_vs_eager(torch.float32, GRAPHS_FP32_LEVELS, torch.device("cuda", 1)),
                   needs_s=20)
    else:
        checks.skip("graphs_on_cuda1", "needs a second CUDA GPU")

    ctx.pop("engine", None)  # its memory goes before the full-size models load
    if cuda:
        torch.cuda.empty_cache()

    # -- throughput per batch size ------------------------------------------------------------------------
    def throughput() -> dict[str, Any]:
        models = throughput_models or (profile_models("full-random", work_dir) if cuda else tiny)
        p = ModelPaths(Path(models))
        dtype = torch.float16 if cuda else torch.float32
        unet, vae = load_unet(p, dev, dtype), load_vae(p, dev, dtype)
        sizes = throughput_batches or ([8, 16, 32, 64] if cuda else [1, 2, 4])
        out: dict[str, Any] = {"models": str(models)}
        for mode in (["eager", "graphs"] if cuda else ["eager"]):
            gen = FaceGenerator(unet, vae, dev, dtype, mode)
            for b in sizes:
                if checks.left() < 15:
                    out[f"{mode}_b{b}"] = "skipped: budget"
                    continue
                lat, aud = inputs(b, 0)
                lat, aud = lat.to(dev, dtype), aud.to(dev, dtype)
                for _ in range(2):
                    gen.generate(lat, aud, batch_size=b)
                repeats = 5 if cuda else 2
                unet_s = decode_s = 0.0
                for _ in range(repeats):
                    u, d = _timed(dev, lambda: gen.unet_latents(lat, aud), lambda pred: gen.decode(pred))
                    unet_s, decode_s = unet_s + u / repeats, decode_s + d / repeats
                out[f"{mode}_b{b}"] = {"unet_ms": round(unet_s * 1000, 2), "decode_ms": round(decode_s * 1000, 2),
                                       "fps": round(b / (unet_s + decode_s), 1), "mode_after": gen.mode}
            gen.release_fast_paths()
            del gen
        best = max((v["fps"] for v in out.values() if isinstance(v, dict)), default=0.0)
        return {**out, "ok": best > 0, "best_fps": best}

    checks.run("throughput_per_batch_size", throughput, needs_s=60 if cuda else 10)

    # -- compiled mode, warmed on one thread and rendering on another (as the worker does) --------------
    def compiled_on_the_render_thread() -> dict[str, Any]:
        import threading

        engine = Engine(EngineConfig(models_dir=tiny, device=str(dev), dtype="float16", accel="compiled",
                                     batch_size=8, landmarks="dwpose-onnx", cache_dir=work_dir / "cache-compiled"))
        t = time.perf_counter()
        engine.warmup()  # this thread: compiles
        compile_s = time.perf_counter() - t
        lat, aud = inputs(8, 7)
        reference = FaceGenerator(engine.unet, engine.vae, dev, torch.float16, "eager").generate(lat, aud).cpu()
        box: dict[str, Any] = {}

        def render_thread() -> None:
            try:
                engine.render(video, speech, work_dir / "compiled.mp4")  # warms again on this thread first
                faces = engine.generator.generate(lat, aud, batch_size=8).cpu()
                box["vs_eager"] = levels(faces, reference)
            except Exception as exc:  # noqa: BLE001 — reported as the check's failure
                box["error"] = f"{type(exc).__name__}: {exc}"[:400]

        th = threading.Thread(target=render_thread, name="render")
        th.start()
        th.join()
        ok = "error" not in box and engine.generator.mode == "compiled" and box["vs_eager"]["max"] <= GRAPHS_FP16_LEVELS
        return {"ok": ok, "compile_s": round(compile_s, 1), "mode_after": engine.generator.mode, **box}

    if cuda:
        checks.run("compiled_warm_up_and_render_threads", compiled_on_the_render_thread, needs_s=150)
    else:
        checks.skip("compiled_warm_up_and_render_threads", "needs CUDA (CUDA-graph trees are what is per thread)")

    problems = [name for name, r in checks.results.items() if r["status"] == "fail"]
    return {"verdict": "fail" if problems else "pass", "problems": problems,
            "skipped": [name for name, r in checks.results.items() if r["status"] == "skipped"],
            "environment": env, "checks": checks.results, "seconds": round(time.monotonic() - started, 1)}


@contextmanager
def _nothing():
    yield


def _timed(device, first: Callable[[], Any], second: Callable[[Any], Any]) -> tuple[float, float]:
    """Seconds of ``first()`` and of ``second(first())``: GPU time from events on CUDA, wall time on CPU."""
    import torch

    if device.type == "cuda":
        ev = [torch.cuda.Event(enable_timing=True, blocking=True) for _ in range(3)]
        ev[0].record()
        out = first()
        ev[1].record()
        second(out)
        ev[2].record()
        ev[2].synchronize()
        return ev[0].elapsed_time(ev[1]) / 1000, ev[1].elapsed_time(ev[2]) / 1000
    t0 = time.perf_counter()
    out = first()
    t1 = time.perf_counter()
    second(out)
    return t1 - t0, time.perf_counter() - t1


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="models and media made for the check (default: the benchmark's work dir)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for all checks; what does not fit is skipped (default 470)")
    parser.add_argument("--throughput-models", type=Path, default=None,
                        help="models for the throughput check (default: full-size random weights on CUDA)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="batch sizes for the throughput check, e.g. 8,16,32,64")
    parser.add_argument("--out", type=Path, default=None, help="also write the verdict JSON here")
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    from benchmarks.workload import default_work_dir

    args = args or build_parser().parse_args(argv)
    verdict = run_gpu_check(device=args.device, work_dir=args.work_dir or default_work_dir() / "gpu-check",
                            budget_s=args.budget_s, throughput_models=args.throughput_models,
                            throughput_batches=args.batch_sizes, say=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(verdict, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0 if verdict["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
