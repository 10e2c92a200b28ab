"""Video in and out through the system ffmpeg, frames only ever in memory.

Decoding resamples to the model's frame rate and honours rotation metadata; encoding takes raw frames
(RGB, or I420 made on the GPU) on a pipe, muxes the speech, and writes a faststart MP4 (NVENC when this
ffmpeg and GPU can, libx264 otherwise)."""

from __future__ import annotations

import functools
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from .errors import MediaError, ProcessingError
from .probe import IMAGE_CODECS, ProbeFailed, display_rotation, ffprobe

SAFE_PROTOCOLS = "file,pipe"  # playlists (HLS, concat) must not reach other files or the network


@dataclass(frozen=True)
class VideoInfo:
    width: int  # after rotation
    height: int
    fps: float
    duration: float
    rotation: int
    is_image: bool


def probe_video(path: str | Path) -> VideoInfo:
    """Size (as displayed), frame rate, duration and kind of the first video stream."""
    try:
        meta = ffprobe(path)
    except ProbeFailed as exc:
        raise MediaError(f"the video {Path(path).name!r} cannot be read: {exc.reason}",
                         stage="validation", details={"video": str(path)}) from None
    streams = [s for s in meta.get("streams", []) if s.get("codec_type") == "video"]
    if not streams:
        raise MediaError(f"the video {Path(path).name!r} has no video stream", stage="validation",
                         details={"video": str(path)})
    s = streams[0]
    rotation = display_rotation(s)
    w, h = int(s["width"]), int(s["height"])
    if rotation in (90, 270):
        w, h = h, w
    num, _, den = (s.get("avg_frame_rate") or "0/1").partition("/")
    fps = float(num) / float(den or 1) if float(den or 1) else 0.0
    duration = float(s.get("duration") or meta.get("format", {}).get("duration") or 0.0)
    is_image = s.get("codec_name") in IMAGE_CODECS and (int(s.get("nb_frames") or 1) <= 1 or duration == 0)
    return VideoInfo(w, h, fps, duration, rotation, is_image)


def decode_frames(path: str | Path, fps: float, info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Yield H×W×3 RGB uint8 frames resampled to ``fps`` (a still image yields one frame)."""
    info = info or probe_video(path)
    stream = ffmpeg.input(str(path), protocol_whitelist=SAFE_PROTOCOLS)
    if not info.is_image:
        stream = stream.filter("fps", fps=fps)
    out_args = {"format": "rawvideo", "pix_fmt": "rgb24"}
    if info.is_image:
        out_args["frames:v"] = 1
    proc = stream.output("pipe:", **out_args).global_args("-nostdin", "-v", "error").run_async(pipe_stdout=True, pipe_stderr=True)
    frame_bytes = info.width * info.height * 3
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    drain.start()
    n = 0
    try:
        while True:
            buf = proc.stdout.read(frame_bytes)
            if len(buf) < frame_bytes:
                break
            n += 1
            yield np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
    finally:
        proc.stdout.close()
        proc.wait()
        drain.join(timeout=5)
    if n == 0:
        msg = b"".join(stderr).decode(errors="replace").strip().splitlines()
        raise MediaError(f"no frames could be decoded from the video {Path(path).name!r}"
                         + (f": {msg[-1]}" if msg else ""), stage="validation", details={"video": str(path)})


@functools.lru_cache(maxsize=1)
def nvenc_available() -> bool:
    """True when this ffmpeg can actually open h264_nvenc (listed is not enough: it needs a GPU)."""
    try:
        proc = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=black:s=256x256:d=0.1",
             "-frames:v", "1", "-c:v", "h264_nvenc", "-f", "null", "-"],
            capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def video_codec_options(encoder: str, crf: int = 18) -> dict[str, str | int]:
    """The H.264 settings of every render (ffmpeg output options; the benchmark's floor uses them too)."""
    quality = {"preset": "p4", "cq": crf} if encoder == "h264_nvenc" else {"preset": "veryfast", "crf": crf}
    return {"vcodec": encoder, "pix_fmt": "yuv420p", **quality}


def i420_shape(height: int, width: int) -> tuple[int, int]:
    """One I420 (yuv420p) frame as a 2-D uint8 array: the Y plane, then U and V (a quarter each) below it."""
    if height % 2 or width % 2:
        raise ValueError(f"4:2:0 needs even sides, not {width}x{height}")
    return height * 3 // 2, width


@dataclass(frozen=True)
class OutputShape:
    """An optional crop (in source pixels) followed by a scale, applied by ffmpeg's own filters."""

    crop: tuple[int, int, int, int] | None = None  # x, y, w, h
    size: tuple[int, int] | None = None  # W, H


class VideoWriter:
    """Raw frames in, H.264 + AAC MP4 out, through one ffmpeg process fed on a pipe.

    ``pix_fmt`` is the frames' layout: ``rgb24`` (H×W×3) or ``yuv420p`` (I420 as one (H·3/2)×W array,
    even sides only; see :mod:`musetalk_engine.yuv`). ``frame_shape`` is what ``write`` expects."""

    def __init__(self, out_path: str | Path, width: int, height: int, fps: float, audio_path: str | Path,
                 shape: OutputShape | None = None, encoder: str | None = None, crf: int = 18,
                 pix_fmt: str = "rgb24"):
        self.out_path = Path(out_path)
        self.width, self.height = width, height
        if pix_fmt not in ("rgb24", "yuv420p"):
            raise ValueError(f"pix_fmt must be rgb24 or yuv420p, not {pix_fmt!r}")
        self.pix_fmt = pix_fmt
        self.frame_shape = (height, width, 3) if pix_fmt == "rgb24" else i420_shape(height, width)
        self.encoder = encoder or ("h264_nvenc" if nvenc_available() else "libx264")
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt=pix_fmt, s=f"{width}x{height}",
                             framerate=fps)
        shape = shape or OutputShape()
        if shape.crop:
            x, y, w, h = shape.crop
            video = video.filter("crop", w, h, x, y)
        if shape.size:
            video = video.filter("scale", shape.size[0], shape.size[1], flags="lanczos")
        # yuv420p needs even sides; pad odd sources by one pixel rather than resample them
        video = video.filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")
        audio = ffmpeg.input(str(audio_path), protocol_whitelist=SAFE_PROTOCOLS).audio
        out = ffmpeg.output(video, audio, str(self.out_path), acodec="aac", audio_bitrate="128k",
                            movflags="+faststart", **video_codec_options(self.encoder, crf))
        self._proc = out.global_args("-nostdin", "-v", "error", "-y").run_async(pipe_stdin=True,
                                                                                  pipe_stderr=True)
        self._stderr: list[bytes] = []
        self._drain = threading.Thread(target=lambda: self._stderr.append(self._proc.stderr.read()),
                                       daemon=True)
        self._drain.start()
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """One frame of ``frame_shape``."""
        self.write_frames(frame[None])

    def write_frames(self, frames: np.ndarray) -> None:
        """A stack of frames [N, *frame_shape] in one pipe write."""
        if frames.shape[1:] != self.frame_shape:
            raise ValueError(f"frame shape {frames.shape[1:]} != {self.frame_shape} ({self.pix_fmt})")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).data)
        except BrokenPipeError:
            self.close()  # raises with ffmpeg's own message
            raise
        self.frames += len(frames)

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = self._proc.wait()
        self._drain.join(timeout=10)
        if rc != 0:
            msg = b"".join(self._stderr).decode(errors="replace").strip()
            raise ProcessingError(f"video encoding failed ({self.encoder}): {msg[-500:]}", stage="postprocessing",
                                  retryable=False)

    def abort(self) -> None:
        """Stop the encoder and remove its partial output."""
        self._proc.kill()
        self._proc.wait()
        self.out_path.unlink(missing_ok=True)
