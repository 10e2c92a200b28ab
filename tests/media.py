"""Media made on the spot for the engine's tests, and ways to look inside the results.

The main avatar clip carries a flat grey marker square in its top-left corner whose level encodes the
source frame index, so the frame order of a rendered video can be read back from the output (the face
blend never touches that corner)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from musetalk_engine.sample_media import astronaut_frame, swaying_frames
from musetalk_engine.video import decode_frames

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MARKER = 32  # side of the marker square (two 16-px macroblocks: flat after H.264)
MARKER_BASE, MARKER_STEP = 16, 6


# --- media helpers ---------------------------------------------------------------------------------

def encode_frames(frames: list[np.ndarray], out: Path, *, fps: float = 25.0, crf: int = 16,
                  args: tuple[str, ...] = (), pix_fmt: str = "yuv420p", container: tuple[str, ...] = ()) -> Path:
    """Raw RGB frames → an H.264 file (``args`` go before the codec, e.g. a timestamp filter)."""
    h, w = frames[0].shape[:2]
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", *args, "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf),
           "-pix_fmt", pix_fmt, *container, str(out)]
    subprocess.run(cmd, input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True)
    return Path(out)


def encode_rotated(upright: list[np.ndarray], out: Path, **encode: Any) -> Path:
    """Frames shown upright but stored sideways with a 90° display rotation in the container (the way
    phones record portrait video)."""
    sideways = [np.ascontiguousarray(np.rot90(f, 3)) for f in upright]  # what a rotate=90 display turns upright
    plain = encode_frames(sideways, Path(out).with_suffix(".plain.mp4"), **encode)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(plain), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(out)], check=True)
    plain.unlink()
    return Path(out)


def marker_level(index: int) -> int:
    return MARKER_BASE + MARKER_STEP * index


def marked_avatar_video(out: Path, *, seconds: float = 1.5, fps: float = 25.0, width: int = 360,
                        height: int = 360) -> Path:
    """The astronaut, swaying a few pixels, with frame i's index written as the marker square's grey level."""
    n = max(1, round(seconds * fps))
    assert marker_level(n - 1) <= 250, "too many frames for the marker's grey levels"
    frames = list(swaying_frames(n, width, height))
    for i, f in enumerate(frames):
        f[:MARKER, :MARKER] = marker_level(i)
    return encode_frames(frames, Path(out), fps=fps)


def read_markers(video: Path, fps: float = 25.0) -> list[int]:
    """Source frame index shown by each frame of ``video`` (nearest marker level)."""
    inner = slice(6, MARKER - 6)
    return [int(round((float(f[inner, inner].mean()) - MARKER_BASE) / MARKER_STEP))
            for f in decode_frames(video, fps)]


def rotated_video(out: Path, *, width: int, height: int, seconds: float, fps: float = 25.0) -> Path:
    """A marker-coded clip *displayed* as ``width``×``height`` (upright astronaut) but stored sideways with
    a 90° display rotation in the container (the way phones record portrait video)."""
    upright = astronaut_frame(width, height)
    frames = []
    for i in range(max(1, round(seconds * fps))):
        f = upright.copy()
        f[:MARKER, :MARKER] = marker_level(i)
        frames.append(f)
    return encode_rotated(frames, out, fps=fps)


def lavfi_video(out: Path, source: str, seconds: float = 1.0) -> Path:
    """A clip from one of ffmpeg's test sources (e.g. ``testsrc=size=160x120:rate=25``)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-t", str(seconds),
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(out)], check=True)
    return Path(out)


def ffprobe(path: Path) -> dict:
    proc = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def media_duration(path: Path) -> float:
    return float(ffprobe(path)["format"]["duration"])


def image_files(*roots: Path) -> set[Path]:
    """Every image file (by suffix) under ``roots``."""
    found: set[Path] = set()
    for root in roots:
        if Path(root).is_dir():
            found.update(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return found
