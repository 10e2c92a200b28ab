"""ffprobe, run one way for every caller, and the media facts read from its answer.

One wrapper because a probe is where a hostile file first meets the worker: ``-protocol_whitelist file``
keeps playlist formats off the network, ``-format_whitelist`` (:data:`ALLOWED_DEMUXERS`) keeps them from
reading *other local files*, the ``file:`` prefix keeps a name starting with ``-`` from being read as an
option, and a hung probe is killed after its timeout. Later decodes of a file need no whitelist of their
own: they only ever see files a probe accepted.

Answers are remembered per version of a regular file (path, device, inode, size, mtime and ctime; the 32
most recent), because a job's validation and its render's decode ask about the same input; a failure is
never remembered."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ProcessingError

PROBE_TIMEOUT_SEC = 30.0

# ffprobe format/codec names of single still images (a still avatar). A codec alone is not enough for an
# input (an animated GIF or an MJPEG clip is video): the caller also checks the format or frame count.
IMAGE_FORMATS = frozenset({"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe"})
IMAGE_CODECS = frozenset({"png", "mjpeg", "webp", "bmp", "tiff", "gif", "jpegls"})

# Demuxers ffprobe may use on a customer's file (names as ffmpeg spells them; a demuxer with several
# names, like "mov,mp4,m4a,3gp,3g2,mj2", matches on any one). Everything that can open *other*
# resources is left out on purpose: hls, dash, concat, imf, ffmetadata, sdp/rtp/rtsp, … — a playlist
# that names local files (``/app/results/other-job.mp4``) would otherwise be read, and
# ``-protocol_whitelist file`` allows exactly that. A download's text sniff does not stop them alone:
# one control byte makes a playlist look binary.
ALLOWED_DEMUXERS = (
    "mov", "matroska", "avi", "flv", "mpegts", "mpeg", "asf", "ogg", "mxf", "nut", "dv", "ivf",
    "h264", "hevc", "m4v", "mjpeg", "yuv4mpegpipe", "gif",
    "wav", "w64", "aiff", "mp3", "aac", "flac", "amr", "caf", "ac3", "eac3", "dts", "wv", "ape", "tta",
    "au", "voc",
    "image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe",
)


class ProbeFailed(Exception):
    """ffprobe could not read the file: ``reason`` (its last error line), the demuxer the whitelist
    ``refused`` (a playlist, say), or ``timed_out``. Callers turn it into their own MediaError."""

    def __init__(self, reason: str, *, refused: str | None = None, timed_out: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.refused = refused
        self.timed_out = timed_out


def _identity(path: Path) -> tuple | None:
    """What identifies this version of a regular file; None for anything else (never remembered)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@lru_cache(maxsize=32)  # a job's two inputs, a few jobs back
def _remembered_answer(identity: tuple, timeout: float) -> bytes:
    """ffprobe's answer for one version of a file. A failure raises and so is never remembered; a file
    changed while it was read gets a new identity, so its entry can never answer again."""
    return _run_ffprobe(Path(identity[0]), timeout)


def forget_probes() -> None:
    """Drop every remembered answer (tests)."""
    _remembered_answer.cache_clear()


def ffprobe(path: str | Path, *, timeout: float = PROBE_TIMEOUT_SEC) -> dict[str, Any]:
    """ffprobe's JSON (``-show_format -show_streams``) for ``path``; :class:`ProbeFailed` when it cannot
    read it, a non-retryable ProcessingError when ffprobe is not installed. An unchanged regular file
    probed before is answered from memory (a fresh copy of the same JSON): the render's decode and the
    job's validation ask about the same input."""
    resolved = Path(path).resolve()
    identity = _identity(resolved)
    answer = _run_ffprobe(resolved, timeout) if identity is None else _remembered_answer(identity, timeout)
    return _parse(answer)


def _parse(answer: bytes) -> dict[str, Any]:
    try:
        return json.loads(answer or b"{}")
    except ValueError:
        raise ProbeFailed("ffprobe's answer is not JSON") from None


def _run_ffprobe(resolved: Path, timeout: float) -> bytes:
    """ffprobe's stdout for ``resolved``, or the failure it reported."""
    args = ["ffprobe", "-v", "error", "-protocol_whitelist", "file",
            "-format_whitelist", ",".join(ALLOWED_DEMUXERS), "-show_format", "-show_streams",
            "-of", "json", f"file:{resolved}"]
    try:
        proc = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"not readable within {timeout:g} s", timed_out=True) from None
    except FileNotFoundError as exc:
        raise ProcessingError("ffprobe is not installed on this worker", stage="validation",
                              retryable=False) from exc
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        refused = [line for line in lines if "not on whitelist" in line]
        if refused:  # "[hls @ 0x…] Format not on whitelist '…'"
            fmt = refused[0].partition("[")[2].partition(" @")[0] or "unknown"
            raise ProbeFailed(refused[0][:300], refused=fmt)
        raise ProbeFailed(lines[-1][:300] if lines else f"exit {proc.returncode}")
    return proc.stdout


def display_rotation(stream: dict) -> int:
    """Display rotation in degrees (0/90/180/270) of an ffprobe stream: the display matrix's side data,
    else the legacy ``rotate`` tag; 0 when neither holds a number."""
    value = (stream.get("tags") or {}).get("rotate")
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            value = side["rotation"]
    try:
        return int(round(float(value))) % 360
    except (TypeError, ValueError):
        return 0
