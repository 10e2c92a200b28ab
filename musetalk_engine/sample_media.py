"""Reproducible sample media for the demo, the tests and the benchmark workload: a real frontal face
(``skimage.data.astronaut()``, public domain) animated into a clip, and real speech from espeak-ng."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

SPEECH_TEXT = ("The quick brown fox jumps over the lazy dog. MuseTalk moves the lips of the avatar in time "
               "with this sentence, frame by frame, and the rest of the face stays exactly as it was.")


def astronaut_frame(width: int, height: int) -> np.ndarray:
    """The astronaut photo scaled to the frame's height and centred (the face near the middle)."""
    from skimage import data

    img = data.astronaut()  # 512×512 RGB, face around x≈200, y≈130
    face = img[0:400, 40:400]
    scale = height / face.shape[0]
    face = cv2.resize(face, (max(1, round(face.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
    canvas = np.full((height, width, 3), 90, np.uint8)
    fw = min(width, face.shape[1])
    x0 = (width - fw) // 2
    src_x0 = (face.shape[1] - fw) // 2
    canvas[:, x0:x0 + fw] = face[:, src_x0:src_x0 + fw]
    return canvas


def swaying_frames(n: int, width: int, height: int) -> Iterator[np.ndarray]:
    """``n`` frames of the astronaut swaying a few pixels sideways (so that frames differ)."""
    base = astronaut_frame(width, height)
    for i in range(n):
        m = np.float32([[1, 0, 3.0 * np.sin(2 * np.pi * i / max(n, 2))], [0, 1, 0]])
        yield cv2.warpAffine(base, m, (width, height), borderMode=cv2.BORDER_REPLICATE)


def make_avatar_video(out: str | Path, *, seconds: float = 2.0, fps: float = 25.0, width: int = 360,
                      height: int = 360, codec: str = "libx264", extra_args: tuple[str, ...] = ()) -> Path:
    """A short clip of the astronaut gently swaying (a few pixels), encoded by ffmpeg from memory."""
    out = Path(out)
    n = max(1, round(seconds * fps))
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", *extra_args, "-c:v", codec,
           "-pix_fmt", "yuv420p", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    try:
        for frame in swaying_frames(n, width, height):
            proc.stdin.write(frame.tobytes())
    finally:
        proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg could not write {out}")
    return out


def make_speech(out: str | Path, *, seconds: float | None = None, text: str = SPEECH_TEXT,
                sample_rate: int = 16000, extra_args: tuple[str, ...] = ()) -> Path:
    """Real speech from espeak-ng, looped or trimmed to ``seconds`` when given, written by ffmpeg."""
    out = Path(out)
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    spoken = subprocess.run(["espeak-ng", "--stdout", "-s", "160", text], capture_output=True, check=True).stdout
    cmd = ["ffmpeg", "-v", "error", "-y", "-i", "pipe:0"]
    if seconds is not None:  # a pipe cannot be re-read: loop inside the filter graph instead
        cmd += ["-af", "aloop=loop=-1:size=2000000000", "-t", f"{seconds:.3f}"]
    cmd += ["-ar", str(sample_rate), *extra_args, str(out)]
    subprocess.run(cmd, input=spoken, check=True)
    return out
