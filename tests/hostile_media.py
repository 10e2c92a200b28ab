"""Hostile and odd inputs, and the 127.0.0.1 servers that hand them to the worker, for the hostile-input,
fault, secret and soak tests.

* Media builders write tiny files (0.24 s, ≤ 320 px) so a render stays cheap on a CPU: the astronaut
  clip in its variants (rotated, odd-sized, variable frame rate, face in only some frames, still image)
  and the broken ones (no ``moov``, garbage header, an audio track claiming ten hours, a header-only WAV,
  playlists that name local files).
* :class:`MediaServer` serves bytes, status sequences, redirects and endless streams, and records every
  request and whether a stream was cut off by the client.
* :class:`FakeOrchestrator` answers the progress endpoint of DESIGN §5 (ok, 500s, or too slowly).
* :func:`run_jobs` is a flow that runs many jobs through ``flows.generate.run_job`` in ONE flow run, with
  per-job environment overrides (a lower size limit, the SSRF guard on, …).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote, urlsplit

import cv2
import numpy as np
from prefect import flow

from musetalk_engine.sample_media import astronaut_frame, make_speech, swaying_frames
from tests.media import encode_frames, encode_rotated, ffprobe, lavfi_video

FPS = 25.0

# Variables that would point a test's jobs at real services, or change their layout.
UNSET_ENV = ("PREFECT_API_URL", "ORCHESTRATOR_BASE_URL", "BUFFER_ORCHESTRATOR_BASE_URL", "BUFFER_WORKER_ID",
             "INTERNAL_API_KEY", "B2_KEY_ID", "B2_APP_KEY", "B2_BUCKET_NAME", "B2_PREFIX",
             "MUSETALK_RESULT_DIR", "MUSETALK_BATCH_SIZE", "MUSETALK_LANDMARKS", "SALAD_API_KEY",
             "MUSETALK_ALLOW_LOCAL_FILES", "MUSETALK_MAX_DOWNLOAD_MB", "MUSETALK_MAX_AUDIO_SEC",
             "MUSETALK_MAX_VIDEO_SEC", "MUSETALK_JOB_TIMEOUT_SEC", "MUSETALK_DEVICES", "BUFFER_CAPACITY")


def worker_inputs(tmp_path_factory, name: str) -> tuple[Path, Path, Path]:
    """A test module's work dir, and its avatar clip and speech track (made once per module)."""
    work = tmp_path_factory.mktemp(f"{name}-work")
    media = tmp_path_factory.mktemp(f"{name}-media")
    return work, avatar_clip(media / "avatar.mp4"), speech(media / "speech.wav")


def worker_env(mp, work: Path, models: Path, **extra: str) -> None:
    """Point the worker's settings at ``work`` and the tiny ``models`` (on a pytest MonkeyPatch)."""
    from tasks.settings import get_settings

    for name in UNSET_ENV:
        mp.delenv(name, raising=False)
    values = {"MUSETALK_WORKDIR": str(work), "MUSETALK_MODELS_DIR": str(models),
              "MUSETALK_CACHE_DIR": str(work / "cache"), "MUSETALK_ALLOW_PRIVATE_URLS": "true",
              "MUSETALK_DOWNLOAD_RETRY_BASE_SEC": "0.05", "MUSETALK_DOWNLOAD_TIMEOUT_SEC": "60", **extra}
    for name, value in values.items():
        mp.setenv(name, value)
    get_settings.cache_clear()


# ------------------------------------------------------------------------------------------- media


def _encode(frames: list[np.ndarray], out: Path, **options: Any) -> Path:
    return encode_frames(frames, out, fps=FPS, crf=18, **options)


def face_frames(n: int, width: int, height: int) -> list[np.ndarray]:
    return list(swaying_frames(n, width, height))


CLIP_SEC = 0.24  # 6 frames at 25 fps: every render and avatar preparation stays a few seconds on a CPU


def avatar_clip(out: Path, *, seconds: float = CLIP_SEC, width: int = 200, height: int = 200,
                faststart: bool = True) -> Path:
    """A plain talking-head clip; ``faststart=False`` leaves the ``moov`` box at the end of the file."""
    container = ("-movflags", "+faststart") if faststart else ()
    return _encode(face_frames(round(seconds * FPS), width, height), out, container=container)


def odd_size_clip(out: Path, *, width: int = 239, height: int = 181, seconds: float = CLIP_SEC) -> Path:
    """Odd width and height (4:4:4 chroma: 4:2:0 H.264 cannot have odd sides)."""
    return _encode(face_frames(round(seconds * FPS), width, height), out, pix_fmt="yuv444p")


def vfr_clip(out: Path, *, width: int = 200, height: int = 200, frames: int = 8) -> Path:
    """Variable frame rate: 4 frames 20 ms apart, then 70 ms apart (avg_frame_rate ≠ r_frame_rate)."""
    ts = "setpts='if(lt(N,4),N*0.02,0.08+(N-4)*0.07)/TB'"
    return _encode(face_frames(frames, width, height), out, args=("-vf", ts, "-fps_mode", "vfr"))


def partial_face_clip(out: Path, *, with_face: int = 3, without: int = 3, width: int = 200,
                      height: int = 200, grey: int = 90) -> Path:
    """``with_face`` astronaut frames, then ``without`` flat grey frames (no face to find)."""
    blank = np.full((height, width, 3), grey, np.uint8)
    return _encode(face_frames(with_face, width, height) + [blank] * without, out)


def no_face_clip(out: Path, *, seconds: float = CLIP_SEC) -> Path:
    """ffmpeg's test pattern: moving, colourful, no face anywhere."""
    return lavfi_video(out, "testsrc=size=160x120:rate=25", seconds)


def rotated_clip(out: Path, *, width: int = 180, height: int = 320, seconds: float = CLIP_SEC) -> Path:
    """Displayed ``width``×``height`` (portrait), stored sideways with a 90° rotation tag, like phones."""
    return encode_rotated(face_frames(round(seconds * FPS), width, height), out, fps=FPS, crf=18)


def still_png(out: Path, *, width: int = 200, height: int = 200) -> Path:
    cv2.imwrite(str(out), cv2.cvtColor(astronaut_frame(width, height), cv2.COLOR_RGB2BGR))
    return Path(out)


def speech(out: Path, seconds: float = CLIP_SEC, **kwargs: Any) -> Path:
    return make_speech(out, seconds=seconds, **kwargs)


def mp3_48k_stereo(out: Path, seconds: float = CLIP_SEC) -> Path:
    return make_speech(out, seconds=seconds, sample_rate=48000, extra_args=("-ac", "2", "-c:a", "libmp3lame"))


def silent_wav(out: Path, seconds: float = CLIP_SEC) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "anullsrc=r=16000:cl=mono", "-t", str(seconds), str(out)], check=True)
    return Path(out)


def audio_only_m4a(out: Path, seconds: float = CLIP_SEC) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=f=300:r=16000:d={seconds}", "-c:a", "aac", str(out)], check=True)
    return Path(out)


def ten_hour_audio(out: Path) -> Path:
    """A 7 KB AAC file whose container says it lasts 10 hours: one second of tone (0.96 s of AAC frames)
    with every timestamp scaled by 37 500 (``-itsscale``). Cheap to make, and what ffprobe reports is what
    the limit sees."""
    short = Path(out).with_suffix(".1s.m4a")
    audio_only_m4a(short, seconds=1.0)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-itsscale", "37500", "-i", str(short),
                    "-c", "copy", str(out)], check=True)
    short.unlink()
    return Path(out)


def header_only_wav(out: Path) -> Path:
    """A valid 16 kHz mono WAV header with no samples: zero duration."""
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    Path(out).write_bytes(b"RIFF" + struct.pack("<I", 36) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", 0))
    return Path(out)


def truncated_mp4(src: Path) -> bytes:
    """The first half of an MP4 whose ``moov`` box is at the end: the index never arrives."""
    data = Path(src).read_bytes()
    assert data.find(b"moov") > len(data) // 2, "needs an MP4 without faststart"
    return data[: len(data) // 2]


def corrupt_header(src: Path) -> bytes:
    """A real MP4 whose first 64 bytes (the ``ftyp`` box and the next box's header) are garbage."""
    data = bytearray(Path(src).read_bytes())
    data[:64] = bytes((37 * k + 11) % 256 for k in range(64))
    return bytes(data)


def hls_playlist(segment: str, *, disguised: bool) -> bytes:
    """An HLS playlist pointing at ``segment`` (a local path). ``disguised`` adds one control byte so the
    body no longer looks like text to a sniffer (ffmpeg ignores the odd comment line)."""
    odd = "#\x01\n" if disguised else ""
    return f"#EXTM3U\n{odd}#EXT-X-TARGETDURATION:2\n#EXTINF:1,\n{segment}\n#EXT-X-ENDLIST\n".encode()


def concat_playlist(path: str) -> bytes:
    """An ffconcat list naming a local file, with a control byte so it does not sniff as text."""
    return f"ffconcat version 1.0\n#\x01\nfile '{path}'\n".encode()


def dash_manifest(segment: str) -> bytes:
    return (f'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static">'
            f"<Period><AdaptationSet><Representation id=\"1\"><BaseURL>{segment}</BaseURL>"
            f"</Representation></AdaptationSet></Period></MPD>").encode()


def video_size(path: Path) -> tuple[int, int]:
    stream = next(s for s in ffprobe(path)["streams"] if s["codec_type"] == "video")
    return int(stream["width"]), int(stream["height"])


def decoded_frames(path: Path) -> Iterator[np.ndarray]:
    """Frames of a rendered MP4 exactly as stored (RGB)."""
    w, h = video_size(path)
    proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "rawvideo",
                           "-pix_fmt", "rgb24", "-"], capture_output=True, check=True)
    data = np.frombuffer(proc.stdout, np.uint8)
    yield from data.reshape(-1, h, w, 3)


# -------------------------------------------------------------------------------------- media server


@dataclass
class StreamRecord:
    """What the server managed to send of an endless body, and whether the client hung up."""

    sent: int = 0
    aborted: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class _ThreadedHTTP:
    """A ThreadingHTTPServer on a free 127.0.0.1 port, served on a daemon thread inside ``with``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class MediaServer(_ThreadedHTTP):
    """A threaded HTTP server on 127.0.0.1 with scripted routes; paths are matched percent-decoded."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the server closes

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = unquote(urlsplit(self.path).path)
                with owner._lock:
                    owner.requests.append(path)
                route = owner.routes.get(path)
                if route is None:
                    self.send_error(404, "not here")
                    return
                route(self)

            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

        super().__init__(Handler, "media-server")

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{quote(path)}"

    def hits(self, path: str) -> int:
        with self._lock:
            return self.requests.count(path)

    # --- routes

    def file(self, path: str, data: bytes | Path, content_type: str = "application/octet-stream") -> str:
        body = Path(data).read_bytes() if isinstance(data, Path) else data

        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        self.routes[path] = send
        return self.url(path)

    def statuses(self, path: str, codes: list[int]) -> str:
        """Answer with ``codes`` in turn (the last one repeats)."""
        pending = list(codes)

        def send(h: BaseHTTPRequestHandler) -> None:
            code = pending.pop(0) if len(pending) > 1 else pending[0]
            h.send_error(code)

        self.routes[path] = send
        return self.url(path)

    def redirect(self, path: str, location: str) -> str:
        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = send
        return self.url(path)

    def stream(self, path: str, total: int, *, declare_length: bool, chunk: int = 64 * 1024) -> StreamRecord:
        """``total`` bytes of MP4-looking binary in ``chunk`` pieces; records how far it got."""
        record = StreamRecord()
        block = (b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * (chunk // 256 + 1))[:chunk]

        def send(h: BaseHTTPRequestHandler) -> None:
            try:
                h.send_response(200)
                h.send_header("Content-Type", "video/mp4")
                if declare_length:
                    h.send_header("Content-Length", str(total))
                h.end_headers()
                while record.sent < total:
                    h.wfile.write(block)
                    h.wfile.flush()
                    record.sent += len(block)
            except (BrokenPipeError, ConnectionResetError):
                record.aborted = True
            finally:
                record.finished.set()

        self.routes[path] = send
        return record


# ------------------------------------------------------------------------------------ orchestrator


class FakeOrchestrator(_ThreadedHTTP):
    """The orchestrator's progress endpoint on 127.0.0.1. ``mode``: ``ok`` (200), ``error`` (500) or
    ``slow`` (answers after ``delay`` s). Records (path, api key header, body) of every POST."""

    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        self.posts: list[tuple[str, str | None, dict]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                with owner._lock:
                    owner.posts.append((self.path, self.headers.get("X-Internal-API-Key"), body))
                if owner.mode == "slow":
                    time.sleep(owner.delay)
                code = 500 if owner.mode == "error" else 200
                payload = b'{"error": "internal"}' if code == 500 else b"{}"
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler, "fake-orchestrator")
        self.url = f"http://127.0.0.1:{self.port}"

    def bodies(self, job_id: str) -> list[dict]:
        with self._lock:
            return [b for p, _, b in self.posts if p == f"/internal/jobs/{job_id}/progress"]


# ------------------------------------------------------------------------------------------ B2


def b2_simulator(bucket: str, app_key: str) -> tuple[Any, str]:
    """b2sdk's in-memory B2 (RawSimulator) with one bucket and an account whose application key is
    ``app_key``; returns (raw simulator, key id)."""
    from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator

    api = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
    raw = api.session.raw_api
    key_id, master = raw.create_account()
    raw.key_id_to_key[key_id].key = app_key  # a distinctive key, so a leak of it is findable
    api.authorize_account("production", key_id, app_key)
    api.create_bucket(bucket, "allPrivate")
    return raw, key_id


def b2_api_factory(raw: Any) -> Callable[..., Any]:
    """A stand-in for ``tasks.storage.B2Api``: every api it builds talks to the shared simulator."""
    from b2sdk.v2 import B2Api, B2HttpApiConfig, RawSimulator

    def build(account_info: Any, *args: Any, **kwargs: Any) -> Any:
        api = B2Api(account_info, api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
        api.session.raw_api = raw
        return api

    return build


def simulated_b2(mp, bucket: str, app_key: str) -> tuple[Any, str]:
    """Point ``tasks.storage`` at a fresh in-memory B2 (on a pytest MonkeyPatch) with 0.1 s between upload
    attempts instead of production's seconds; returns (raw simulator, key id)."""
    import tasks.storage
    from flows import generate as generate_module

    raw, key_id = b2_simulator(bucket, app_key)
    mp.setattr(tasks.storage, "B2Api", b2_api_factory(raw))
    tasks.storage.clear_storage_cache()  # storages are shared per configuration: start from this simulator
    mp.setattr(generate_module, "upload_result", tasks.storage.upload_result.with_options(retry_delay_seconds=0.1))
    return raw, key_id


def b2_read(raw: Any, bucket: str, name: str) -> bytes:
    """The latest version of ``name`` in the simulator's bucket."""
    sim = raw.bucket_name_to_bucket[bucket]
    versions = [f for f in sim.file_id_to_file.values() if f.name == name]
    latest = max(versions, key=lambda f: f.upload_timestamp)
    return bytes(latest.data_bytes)


# ------------------------------------------------------------------------------------------ flow


# Per-job fault injection for :func:`run_jobs`, by name (flow parameters must stay plain data):
# a test module registers context-manager factories here; a case's "hook" names one.
HOOKS: dict[str, Callable[[], Any]] = {}


@flow(name="hostile-jobs", log_prints=True)
def run_jobs(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each ``{"name", "job", "env", "hook"}`` through ``run_job`` in this one flow run; ``env``
    overrides the environment and ``hook`` (a :data:`HOOKS` name) wraps that job only. Returns the
    outcomes with each job's wall time."""
    from contextlib import nullcontext

    from flows.generate import run_job
    from tasks.settings import get_settings

    results = []
    for case in cases:
        saved = {name: os.environ.get(name) for name in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        get_settings.cache_clear()
        started = time.perf_counter()
        try:
            with HOOKS[case["hook"]]() if case.get("hook") else nullcontext():
                outcome = run_job(case["job"], case.get("queue_job_id"))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            get_settings.cache_clear()
        results.append({"name": case["name"], "http_status": outcome.http_status, "body": outcome.body,
                        "wall_s": round(time.perf_counter() - started, 2)})
    return results
