"""Input download (real HTTP server on 127.0.0.1 and httpx.MockTransport) and ffprobe validation."""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prefect.states import Failed

from musetalk_engine.errors import MediaError, ProcessingError
from tasks.fetch import (MediaInfo, check_media, display_url, download, fetch_input, is_transient,
                         parse_probe, probe_media, retry_if_transient, sniff_non_media, validate_input)
from tasks.fetch import check_peer
from tasks.settings import Settings

PUBLIC = "http://93.184.216.34"  # a public address literal: passes the SSRF guard without DNS


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    out = {"video": d / "talk.mp4", "silent": d / "silent.mp4", "audio": d / "speech.wav",
           "image": d / "face.png"}
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1", "-f", "lavfi",
            "-i", "sine=frequency=440:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
            "-shortest", str(out["video"]))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", str(out["silent"]))
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-ac", "1", "-ar", "16000", str(out["audio"]))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=1:duration=1", "-frames:v", "1", str(out["image"]))
    return out


def settings(tmp_path: Path, **overrides) -> Settings:
    values = {"musetalk_workdir": tmp_path, "musetalk_download_retry_base_sec": 0.0,
              "musetalk_allow_private_urls": False, "musetalk_allow_local_files": False}
    values.update(overrides)
    return Settings(**values)


# ------------------------------------------------------------------------------------ real server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Connection")))
        body = srv.media["video"].read_bytes()
        if self.path.startswith("/video.mp4"):
            self._send(200, body)
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/video.mp4?sig=secret"})
        elif self.path == "/broken-chunked":
            # The whole file in one chunk, then the connection closes without the 0-length terminator.
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_server(media):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.media, srv.seen = media, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_download_from_local_server_follows_redirect(http_server, media, tmp_path):
    _, base = http_server
    s = settings(tmp_path, musetalk_allow_private_urls=True)
    dest = download(f"{base}/redirect", tmp_path / "in" / "video.mp4", "video", s)
    assert dest.read_bytes() == media["video"].read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["video.mp4"]  # no temp file left
    info = probe_media(dest, "video", s)
    assert info.has_video and info.has_audio and (info.width, info.height) == (64, 48)


def test_loopback_refused_by_default(http_server, tmp_path):
    srv, base = http_server
    before = len(srv.seen)
    with pytest.raises(MediaError, match="private") as info:
        download(f"{base}/video.mp4", tmp_path / "v.mp4", "video", settings(tmp_path))
    assert info.value.stage == "download"
    assert len(srv.seen) == before  # refused before connecting


def test_peer_address_is_rechecked(http_server, tmp_path):
    _, base = http_server
    with httpx.Client() as client, client.stream("GET", f"{base}/video.mp4") as response:
        with pytest.raises(MediaError, match="private network"):
            check_peer(response, settings(tmp_path), "video")
        check_peer(response, settings(tmp_path, musetalk_allow_private_urls=True), "video")


def test_broken_chunked_body_falls_back_to_connection_close(http_server, media, tmp_path):
    srv, base = http_server
    srv.seen.clear()
    s = settings(tmp_path, musetalk_allow_private_urls=True)
    dest = download(f"{base}/broken-chunked", tmp_path / "v.mp4", "video", s)
    assert dest.read_bytes() == media["video"].read_bytes()
    assert srv.seen == [("/broken-chunked", "keep-alive"), ("/broken-chunked", "close")]
    probe_media(dest, "video", s)


def test_short_body_with_content_length_never_accepted(http_server, tmp_path):
    srv, base = http_server
    srv.seen.clear()
    with pytest.raises(MediaError, match="after 3 attempts") as info:
        download(f"{base}/short", tmp_path / "v.mp4", "video",
                 settings(tmp_path, musetalk_allow_private_urls=True))
    assert info.value.details["transient"] and len(srv.seen) == 3
    assert list(tmp_path.iterdir()) == []


def test_http_404_from_real_server(http_server, tmp_path):
    _, base = http_server
    with pytest.raises(MediaError, match="HTTP 404"):
        download(f"{base}/missing.mp4", tmp_path / "v.mp4", "audio",
                 settings(tmp_path, musetalk_allow_private_urls=True))


# ---------------------------------------------------------------------------------- mock transport


class Script:
    """A MockTransport handler answering from a list of responses (the last one repeats)."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(item, Exception):
            raise item
        return item(request) if callable(item) else item


def _fetch(tmp_path, script: Script, url: str = f"{PUBLIC}/media/clip.mp4?token=abc", kind="video",
           **overrides) -> Path:
    return download(url, tmp_path / "dl" / f"{kind}.bin", kind, settings(tmp_path, **overrides),
                    transport=httpx.MockTransport(script))


MEDIA = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8


def test_transient_errors_are_retried_then_succeed(tmp_path):
    script = Script(httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200, content=MEDIA))
    assert _fetch(tmp_path, script).read_bytes() == MEDIA
    assert len(script.requests) == 3


def test_backoff_doubles_and_broken_framing_retries_at_once(tmp_path, monkeypatch):
    """Waits of base then 2×base between transient failures; a broken connection is retried at once, with
    Connection: close; a wait that would pass the download's time limit is not taken."""
    import time

    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    script = Script(httpx.Response(503), httpx.Response(503), httpx.Response(200, content=MEDIA))
    assert _fetch(tmp_path, script, musetalk_download_retry_base_sec=0.25).read_bytes() == MEDIA
    assert sleeps == [0.25, 0.5]

    sleeps.clear()
    script = Script(httpx.RemoteProtocolError("peer closed"), httpx.Response(503),
                    httpx.Response(200, content=MEDIA))
    assert _fetch(tmp_path, script, musetalk_download_retry_base_sec=0.25).read_bytes() == MEDIA
    assert [s for s in sleeps if s] == [0.5]
    assert [r.headers.get("connection") for r in script.requests][1:] == ["close", "close"]

    sleeps.clear()
    script = Script(httpx.Response(503))
    with pytest.raises(MediaError, match=r"HTTP 503 \(after 1 attempts\)") as info:
        _fetch(tmp_path, script, musetalk_download_retry_base_sec=60.0, musetalk_download_timeout_sec=30.0)
    assert sleeps == [] and len(script.requests) == 1 and info.value.details["transient"]


def test_persistent_5xx_and_timeouts_become_media_error(tmp_path):
    for failure in (httpx.Response(502), httpx.Response(429), httpx.ReadTimeout("slow")):
        script = Script(failure)
        with pytest.raises(MediaError, match="could not download the video URL") as info:
            _fetch(tmp_path, script)
        assert len(script.requests) == 3 and info.value.details["attempts"] == 3
        assert "token=abc" not in str(info.value) and "token" not in str(info.value.details)


def test_4xx_fails_at_once_with_status(tmp_path):
    script = Script(httpx.Response(403, content=b"denied"))
    with pytest.raises(MediaError, match="HTTP 403") as info:
        _fetch(tmp_path, script, kind="audio")
    assert len(script.requests) == 1 and info.value.details["status"] == 403
    assert "the audio URL" in info.value.message


@pytest.mark.parametrize("body, what", [
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "a web page"),
    (b"  <html>\n<head>", "a web page"),
    (b'{"error": "expired"}', "JSON"),
    (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "an XML document"),
    (b"Forbidden\n", "text"),
    (b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n", "text"),
])
def test_non_media_bodies_refused(tmp_path, body, what):
    with pytest.raises(MediaError, match=f"returned {what}, not a media file"):
        _fetch(tmp_path, Script(httpx.Response(200, content=body)))
    assert not list((tmp_path / "dl").iterdir())


def test_sniffer_lets_binary_media_through(media):
    for path in media.values():
        assert sniff_non_media(path.read_bytes()[:512]) is None


def test_empty_body_refused(tmp_path):
    with pytest.raises(MediaError, match="empty"):
        _fetch(tmp_path, Script(httpx.Response(200, content=b"")))


def test_size_limit_from_header_and_while_streaming(tmp_path):
    limit = dict(musetalk_max_download_mb=0.001)  # 1048 bytes
    with pytest.raises(MediaError, match="larger than 0.001 MB"):
        _fetch(tmp_path, Script(httpx.Response(200, content=MEDIA)), **limit)

    def endless(request):
        def chunks():
            yield MEDIA
            while True:
                yield b"\x01" * 4096
        return httpx.Response(200, content=chunks())  # no Content-Length

    with pytest.raises(MediaError, match="larger than"):
        _fetch(tmp_path, Script(endless), **limit)
    assert not list((tmp_path / "dl").iterdir())


def test_redirect_hops_are_rechecked(tmp_path):
    script = Script(httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}))
    with pytest.raises(MediaError, match="private"):
        _fetch(tmp_path, script)
    assert len(script.requests) == 1  # the metadata service was never asked

    script = Script(httpx.Response(301, headers={"Location": "file:///etc/passwd"}))
    with pytest.raises(MediaError, match="http or https"):
        _fetch(tmp_path, script)


def test_redirects_followed_with_bound_and_loop_detection(tmp_path):
    script = Script(httpx.Response(302, headers={"Location": "/b"}),
                    httpx.Response(307, headers={"Location": f"{PUBLIC}/c"}),
                    httpx.Response(200, content=MEDIA))
    assert _fetch(tmp_path, script).read_bytes() == MEDIA
    assert [r.url.path for r in script.requests] == ["/media/clip.mp4", "/b", "/c"]

    loop = Script(lambda r: httpx.Response(302, headers={"Location": "/loop"}))
    with pytest.raises(MediaError, match="loop"):
        _fetch(tmp_path, loop, url=f"{PUBLIC}/loop")

    counter = iter(range(100))
    chain = Script(lambda r: httpx.Response(302, headers={"Location": f"/hop{next(counter)}"}))
    with pytest.raises(MediaError, match="more than 5"):
        _fetch(tmp_path, chain)
    assert len(chain.requests) == 6


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.mp4", "http://169.254.169.254/latest/meta-data",
                                 "http://10.1.2.3/v.mp4", "http://192.168.0.5/v.mp4", "http://[::1]/v.mp4",
                                 "http://0.0.0.0/v.mp4", "http://224.0.0.1/v.mp4",
                                 "http://[::ffff:127.0.0.1]/v.mp4", "http://100.64.0.1/v.mp4"])
def test_ssrf_guard_refuses_non_public_addresses(tmp_path, url):
    script = Script(httpx.Response(200, content=MEDIA))
    with pytest.raises(MediaError, match="private or reserved"):
        _fetch(tmp_path, script, url=url)
    assert script.requests == []
    # the operator switch lets them through
    assert _fetch(tmp_path, script, url=url, musetalk_allow_private_urls=True).read_bytes() == MEDIA


def test_operator_allowlist_opens_only_the_listed_hosts_and_networks(tmp_path):
    """MUSETALK_PRIVATE_URL_ALLOWLIST lets an operator's private media hosts through, one CIDR or host at a
    time; everything else private stays refused, and the refusal names the setting."""
    allow = {"musetalk_private_url_allowlist": "10.20.0.0/16, 192.168.0.5, localhost, .media.internal"}
    for url in ("http://10.20.3.4/v.mp4", "http://192.168.0.5/v.mp4", "http://localhost/v.mp4"):
        script = Script(httpx.Response(200, content=MEDIA))
        assert _fetch(tmp_path, script, url=url, **allow).read_bytes() == MEDIA, url
    for url in ("http://10.21.0.1/v.mp4", "http://192.168.0.6/v.mp4", "http://127.0.0.1/v.mp4",
                "http://169.254.169.254/latest/meta-data"):
        script = Script(httpx.Response(200, content=MEDIA))
        with pytest.raises(MediaError, match="MUSETALK_PRIVATE_URL_ALLOWLIST"):
            _fetch(tmp_path, script, url=url, **allow)
        assert script.requests == [], url
    parsed = settings(tmp_path, **allow).private_url_allowlist
    assert parsed.allows_host("cdn.media.internal") and parsed.allows_host("media.internal")
    assert not parsed.allows_host("media.internal.evil.com") and not parsed.allows_host("xmedia.internal")
    assert parsed.allows_address("::ffff:10.20.0.9")  # IPv4-mapped IPv6 is the IPv4 address


def test_allowlist_rechecks_the_peer_and_rejects_typos(http_server, tmp_path):
    from pydantic import ValidationError

    _, base = http_server  # 127.0.0.1
    with httpx.Client() as client, client.stream("GET", f"{base}/video.mp4") as response:
        with pytest.raises(MediaError, match="MUSETALK_PRIVATE_URL_ALLOWLIST"):
            check_peer(response, settings(tmp_path, musetalk_private_url_allowlist="10.0.0.0/8"), "video")
        check_peer(response, settings(tmp_path, musetalk_private_url_allowlist="127.0.0.0/8"), "video")
    with pytest.raises(ValidationError, match="neither a host name nor an IP network"):
        settings(tmp_path, musetalk_private_url_allowlist="10.0.0.0/33")
    assert not settings(tmp_path).private_url_allowlist  # empty by default: nothing private allowed


@pytest.mark.parametrize("url", ["ftp://93.184.216.34/v.mp4", "gopher://x/", "http:///nohost"])
def test_unsupported_urls_refused(tmp_path, url):
    with pytest.raises(MediaError):
        _fetch(tmp_path, Script(httpx.Response(200, content=MEDIA)), url=url)


def test_local_files_only_when_allowed(tmp_path, media):
    for url in (str(media["audio"]), media["audio"].as_uri()):
        with pytest.raises(MediaError, match="local files are not accepted"):
            download(url, tmp_path / "a.wav", "audio", settings(tmp_path))
        out = download(url, tmp_path / "a.wav", "audio", settings(tmp_path, musetalk_allow_local_files=True))
        assert out.read_bytes() == media["audio"].read_bytes()
    with pytest.raises(MediaError, match="does not exist"):
        download(str(tmp_path / "nope.wav"), tmp_path / "b.wav", "audio",
                 settings(tmp_path, musetalk_allow_local_files=True))


def test_display_url_hides_credentials_and_query():
    assert display_url("https://user:pw@cdn.example.com:8443/a/b.mp4?X-Amz-Signature=s#f") == \
        "https://cdn.example.com:8443/a/b.mp4"


# ------------------------------------------------------------------------------------------- probe


def test_probe_accepts_video_audio_and_still_image(media, tmp_path):
    s = settings(tmp_path)
    video = probe_media(media["video"], "video", s)
    assert video.has_video and video.fps == pytest.approx(10) and video.codec == "h264"
    assert 0.9 <= video.duration <= 1.2 and not video.is_image and video.rotation == 0
    audio = probe_media(media["audio"], "audio", s)
    assert audio.has_audio and not audio.has_video and audio.codec == "pcm_s16le"
    assert audio.duration == pytest.approx(1.0, abs=0.05)
    assert probe_media(media["video"], "audio", s).codec == "aac"  # a video's soundtrack is fine as audio
    image = probe_media(media["image"], "video", s)
    assert image.is_image and (image.width, image.height) == (64, 48)


def test_probe_rejects_wrong_kind_long_and_garbage(media, tmp_path):
    s = settings(tmp_path)
    with pytest.raises(MediaError, match="the video URL has no video track") as info:
        probe_media(media["audio"], "video", s)
    assert info.value.stage == "validation"
    with pytest.raises(MediaError, match="the audio URL has no audio track"):
        probe_media(media["silent"], "audio", s)
    with pytest.raises(MediaError, match="limit is 0.5 s"):
        probe_media(media["audio"], "audio", settings(tmp_path, musetalk_max_audio_sec=0.5))
    with pytest.raises(MediaError, match="limit is 0.5 s"):
        probe_media(media["video"], "video", settings(tmp_path, musetalk_max_video_sec=0.5))
    garbage = tmp_path / "-garbage.mp4"  # a leading dash must not be read as an ffprobe option
    garbage.write_bytes(b"\x00\x01\x02 definitely not media " * 50)
    with pytest.raises(MediaError, match="the video URL is not a readable video file") as info:
        probe_media(garbage, "video", s)
    assert info.value.stage == "validation"


def test_parse_probe_rotation_cover_art_and_zero_duration(tmp_path):
    data = {"format": {"format_name": "mov,mp4,m4a,3gp,3g2,mj2", "duration": "2.5"},
            "streams": [{"codec_type": "video", "codec_name": "h264", "width": 1080, "height": 1920,
                         "avg_frame_rate": "30000/1001", "side_data_list": [{"rotation": -90}]},
                        {"codec_type": "audio", "codec_name": "aac", "duration": "2.4"}]}
    info = parse_probe(data, "video")
    assert info.rotation == 270 and info.fps == pytest.approx(29.97, abs=0.01) and info.duration == 2.5
    assert parse_probe(data, "audio").duration == 2.4
    mp3_with_art = {"format": {"format_name": "mp3", "duration": "3"},
                    "streams": [{"codec_type": "audio", "codec_name": "mp3"},
                                {"codec_type": "video", "codec_name": "mjpeg", "width": 300, "height": 300,
                                 "disposition": {"attached_pic": 1}}]}
    assert not parse_probe(mp3_with_art, "video").has_video
    with pytest.raises(MediaError, match="no duration"):
        check_media(MediaInfo(has_audio=True, duration=0.0), "audio", settings(tmp_path))


# ------------------------------------------------------------------------------------------- tasks


def test_tasks_are_thin_wrappers_with_transient_only_retries(tmp_path, media):
    s = settings(tmp_path, musetalk_allow_local_files=True)
    path = fetch_input.fn(str(media["video"]), tmp_path / "job" / "video.mp4", "video", s)
    assert validate_input.fn(path, "video", s).has_video
    assert fetch_input.retry_condition_fn is retry_if_transient and fetch_input.retries == 2
    assert not retry_if_transient(None, None, Failed(data=MediaError("bad", stage="download")))
    assert retry_if_transient(None, None, Failed(data=ProcessingError("disk", stage="download")))
    assert retry_if_transient(None, None, Failed(data=httpx.ConnectError("down")))
    assert not is_transient(ProcessingError("no ffprobe", stage="validation", retryable=False))
