"""Inputs: download a customer's media URL safely, then probe it with ffprobe.

Download policy (:func:`download`):

* http(s) only; plain paths and ``file://`` only with ``MUSETALK_ALLOW_LOCAL_FILES`` (CLI, batch).
* SSRF guard: the host is resolved and every address must be globally routable unicast (no loopback,
  private, link-local incl. the 169.254.169.254 metadata service, shared, unspecified, multicast or
  reserved ranges) unless ``MUSETALK_ALLOW_PRIVATE_URLS``. Redirects are followed by hand (at most
  :data:`MAX_REDIRECTS`, loops refused) so every hop is checked, and the connected peer address is
  checked again once the response arrives, which defeats DNS rebinding between check and connect.
* Transient failures (connect errors, timeouts, 408/429/5xx) get :data:`ATTEMPTS` attempts (tenacity) with
  exponential backoff from ``MUSETALK_DOWNLOAD_RETRY_BASE_SEC`` (base, then 2×base); other 4xx fail at
  once. When all attempts fail, or the next wait would pass the download's time limit, the input is
  reported as unreachable: a :class:`MediaError` (422), per DESIGN §4.
* Broken HTTP framing (``RemoteProtocolError``: a chunked body cut short, a connection closed early):
  the next attempt is made at once with ``Connection: close``, and on that attempt, if the server sent
  no Content-Length, the bytes read until the connection closed are accepted (that is what an HTTP/1.0
  body is). :func:`probe_media` then decides whether they are a usable media file. With a
  Content-Length, a short body is never accepted.
* ``MUSETALK_MAX_DOWNLOAD_MB`` is enforced from Content-Length and again while streaming;
  ``MUSETALK_DOWNLOAD_TIMEOUT_SEC`` bounds the whole download, retries included.
* The first bytes are sniffed: a web page, JSON, XML or plain text is refused (a login page or an
  error document served with status 200 is the usual cause). Empty bodies are refused.
* Bytes go to a hidden temp name beside ``dest`` and are renamed on success, so ``dest`` is never partial.

Error messages name the input ("the video URL …") and never echo a URL's query string, which often
holds a signature.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel
from tenacity import (RetryCallState, RetryError, Retrying, retry_if_exception_type, stop_after_attempt,
                      stop_before_delay, wait_exponential)

from musetalk_engine.errors import MediaError, MuseTalkError, ProcessingError
from musetalk_engine.files import atomic_write
from musetalk_engine.probe import (IMAGE_CODECS, IMAGE_FORMATS, PROBE_TIMEOUT_SEC, ProbeFailed, display_rotation,
                                   ffprobe)
from tasks.settings import ALLOWLIST_ENV, Settings, get_settings

log = logging.getLogger(__name__)

Kind = Literal["video", "audio"]

ATTEMPTS = 3
MAX_REDIRECTS = 5
SNIFF_BYTES = 512
USER_AGENT = "musetalk-flow/0.1"

class _Transient(Exception):
    """A failure worth another attempt; ``framing`` marks broken HTTP framing (see module doc)."""

    def __init__(self, reason: str, *, framing: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.framing = framing


# ---------------------------------------------------------------------------------------------- URLs


def display_url(url: str) -> str:
    """``url`` without credentials, query or fragment: safe for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<invalid URL>"
    if not parts.scheme:
        return parts.path
    return f"{parts.scheme}://{host}{parts.path}"


def _label(kind: str) -> str:
    return f"the {kind} URL"


def _blocked(address: str) -> bool:
    """True for any address that is not globally routable unicast."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever the IPv6 rules say
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified


def _invalid_url(kind: str) -> MediaError:
    return MediaError(f"{_label(kind)} is not a valid URL", stage="download")


def check_url_form(url: str, kind: str, settings: Settings) -> None:
    """The URL's form alone, with no network: length (``MUSETALK_MAX_URL_CHARS``), scheme (http/https;
    local files only with ``MUSETALK_ALLOW_LOCAL_FILES``), and a host and request that can be built.

    Anything that fails to build here would fail to build a request later: it is the customer's error (a
    :class:`MediaError`, final), never a worker fault. The HTTP front door runs this before a job is queued."""
    label = _label(kind)
    limit = settings.musetalk_max_url_chars
    if len(url) > limit:
        raise MediaError(f"{label} is longer than {limit} characters", stage="download")
    if url.startswith("file://") or "://" not in url:
        if not settings.musetalk_allow_local_files:
            raise MediaError(f"{label} must be an http(s) URL; local files are not accepted here",
                             stage="download")
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError for a port that is not a number in range
    except ValueError:
        raise _invalid_url(kind) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"{label} must use http or https (got {parts.scheme or 'no'} scheme)",
                         stage="download", details={"url": display_url(url)})
    host = parts.hostname
    if not host:
        raise MediaError(f"{label} has no host name", stage="download")
    try:
        httpx.Request("GET", url)  # what the download will build: IDNA host, printable characters
        host.encode("idna")  # what the resolver will need: labels of 1-63 characters
    except Exception:  # noqa: BLE001 — InvalidURL, IDNAError, UnicodeError, ValueError: all the URL's fault
        raise _invalid_url(kind) from None


def check_url_allowed(url: str, settings: Settings, kind: str = "input") -> None:
    """SSRF guard for one URL (one redirect hop): scheme http(s) and only public addresses.

    Raises :class:`MediaError` (stage download) when refused; a temporary DNS failure is transient.
    """
    label = _label(kind)
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise MediaError(f"{label} is not a valid URL", stage="download") from None
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"{label} must use http or https (got {parts.scheme or 'no'} scheme)",
                         stage="download", details={"url": display_url(url)})
    host = parts.hostname
    if not host:
        raise MediaError(f"{label} has no host name", stage="download")
    if settings.musetalk_allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise _Transient(f"DNS lookup of {host} failed temporarily") from None
        raise MediaError(f"{label} host {host!r} could not be resolved", stage="download",
                         details={"url": display_url(url)}) from None
    except (UnicodeError, ValueError):  # a label too long or empty, a NUL: a name no resolver takes
        raise _invalid_url(kind) from None
    allow = settings.private_url_allowlist
    if allow.allows_host(host):
        return
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if _blocked(address) and not allow.allows_address(address):
            raise MediaError(
                f"{label} points to a private or reserved network address ({host}); only public "
                f"URLs are accepted unless the operator lists the host or network in {ALLOWLIST_ENV}",
                stage="download", details={"url": display_url(url)})


def check_peer(response: httpx.Response, settings: Settings, kind: str) -> None:
    """Re-check the address actually connected to (DNS may have changed since the guard resolved it)."""
    if settings.musetalk_allow_private_urls:
        return
    allow = settings.private_url_allowlist
    if allow.allows_host(response.url.host):
        return
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer and _blocked(str(peer[0])) and not allow.allows_address(str(peer[0])):
        raise MediaError(f"{_label(kind)} connected to a private network address; only public URLs "
                         f"are accepted unless the operator lists the host or network in {ALLOWLIST_ENV}",
                         stage="download", details={"url": display_url(str(response.url))})


# ------------------------------------------------------------------------------------------ sniffing


def sniff_non_media(head: bytes) -> str | None:
    """What the first bytes are when they are clearly not media ("a web page", "JSON", …), else None."""
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not body:
        return None
    lower = body[:64].lower()
    if lower.startswith(b"<?xml"):
        return "an XML document"
    if lower.startswith(b"<"):
        return "a web page"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a bad byte early on: binary; at the very end: a cut character
            return None
        text = head[: exc.start].decode("utf-8")
    if all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "JSON" if body[:1] in (b"{", b"[") else "text"
    return None


def _refuse_non_media(head: bytes, kind: str, url: str) -> None:
    what = sniff_non_media(head)
    if what:
        raise MediaError(f"{_label(kind)} returned {what}, not a media file", stage="download",
                         details={"url": display_url(url)})


# ------------------------------------------------------------------------------------------ download


def _limit_bytes(settings: Settings) -> int:
    return int(settings.musetalk_max_download_mb * 1024 * 1024)


def _too_large(kind: str, settings: Settings, url: str) -> MediaError:
    return MediaError(f"{_label(kind)} is larger than {settings.musetalk_max_download_mb:g} MB",
                      stage="download", details={"url": display_url(url)})


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")


def _local_source(url: str, settings: Settings, kind: str) -> Path | None:
    """The local file ``url`` names (plain path or file://), or None for a network URL."""
    if url.startswith("file://"):
        path = Path(unquote(urlsplit(url).path))
    elif "://" not in url:
        path = Path(url).expanduser()
    else:
        return None
    if not settings.musetalk_allow_local_files:
        raise MediaError(f"{_label(kind)} must be an http(s) URL; local files are not accepted here",
                         stage="download")
    if not path.is_file():
        raise MediaError(f"the {kind} file {str(path)!r} does not exist", stage="download")
    return path


def _copy_local(src: Path, dest: Path, kind: str, settings: Settings) -> Path:
    """Copy a local input into the job's workspace under the same size and content rules."""
    if src.resolve() == dest.resolve():
        return dest
    size = src.stat().st_size
    if size == 0:
        raise MediaError(f"the {kind} file {str(src)!r} is empty", stage="download")
    if size > _limit_bytes(settings):
        raise _too_large(kind, settings, str(src))
    with src.open("rb") as fh:
        _refuse_non_media(fh.read(SNIFF_BYTES), kind, str(src))
    try:
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    except OSError as exc:
        raise ProcessingError(f"could not copy the {kind} file: {exc.strerror}", stage="download") from exc
    return dest


def _check_status(response: httpx.Response, kind: str) -> None:
    status = response.status_code
    if 200 <= status < 300 and status != 204:
        return
    if status in (408, 429) or status >= 500:
        raise _Transient(f"HTTP {status}")
    raise MediaError(f"{_label(kind)} returned HTTP {status}", stage="download",
                     details={"url": display_url(str(response.url)), "status": status})


def _stream_body(response: httpx.Response, tmp: Path, kind: str, settings: Settings, deadline: float,
                 close_fallback: bool) -> int:
    """Write the body to ``tmp`` under the size, time and content rules; returns the byte count."""
    url = str(response.url)
    limit = _limit_bytes(settings)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(kind, settings, url)
    total, head, sniffed = 0, b"", False
    try:
        with tmp.open("wb") as fh:
            try:
                # No chunk_size: httpx would hold bytes back until a chunk fills and lose them
                # when a broken connection raises (the framing fallback needs them).
                for chunk in response.iter_bytes():
                    if time.monotonic() > deadline:
                        raise MediaError(
                            f"{_label(kind)} took longer than {settings.musetalk_download_timeout_sec:g} s "
                            "to download", stage="download", details={"url": display_url(url)})
                    total += len(chunk)
                    if total > limit:
                        raise _too_large(kind, settings, url)
                    if not sniffed:
                        head += chunk
                        if len(head) >= SNIFF_BYTES:
                            _refuse_non_media(head, kind, url)
                            sniffed = True
                    fh.write(chunk)
            except httpx.RemoteProtocolError:
                if not (close_fallback and declared is None and total > 0):
                    raise _Transient("the connection closed before the whole file arrived",
                                     framing=True) from None
                log.warning("download of %s: connection closed without a complete body and no "
                            "Content-Length; accepting the %d bytes read", display_url(url), total)
            except httpx.TimeoutException:
                raise _Transient("timed out while reading") from None
            except httpx.TransportError as exc:
                raise _Transient(f"connection failed while reading ({type(exc).__name__})") from None
    except OSError as exc:
        raise ProcessingError(f"could not write the downloaded {kind}: {exc.strerror}",
                              stage="download") from exc
    if total == 0:
        raise MediaError(f"{_label(kind)} returned an empty file", stage="download",
                         details={"url": display_url(url)})
    if not sniffed:
        _refuse_non_media(head, kind, url)
    return total


def _fetch_once(client: httpx.Client, url: str, tmp: Path, kind: str, settings: Settings,
                deadline: float, close_fallback: bool) -> int:
    """One attempt: follow redirects (each hop re-checked) and stream the body into ``tmp``."""
    headers = {"Connection": "close"} if close_fallback else {}
    current, seen = url, {url}
    for _ in range(MAX_REDIRECTS + 1):
        check_url_allowed(current, settings, kind)
        try:
            request = client.build_request("GET", current, headers=headers)
        except Exception:  # noqa: BLE001 — a URL (or redirect target) no request can be built from
            raise _invalid_url(kind) from None
        try:
            response = client.send(request, stream=True)
        except httpx.UnsupportedProtocol:
            raise _invalid_url(kind) from None
        except httpx.TimeoutException:
            raise _Transient("timed out") from None
        except httpx.RemoteProtocolError:
            raise _Transient("the server broke the HTTP protocol", framing=True) from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from None
        try:
            check_peer(response, settings, kind)
            if response.is_redirect:
                try:
                    current = str(response.url.join(response.headers["location"]))
                except Exception:  # noqa: BLE001 — the customer's server sent a Location no URL parses from
                    raise MediaError(f"{_label(kind)} redirects to an invalid URL", stage="download",
                                     details={"url": display_url(url)}) from None
                if current in seen:
                    raise MediaError(f"{_label(kind)} redirects in a loop", stage="download",
                                     details={"url": display_url(url)})
                seen.add(current)
                continue
            _check_status(response, kind)
            return _stream_body(response, tmp, kind, settings, deadline, close_fallback)
        finally:
            response.close()
    raise MediaError(f"{_label(kind)} redirects more than {MAX_REDIRECTS} times", stage="download",
                     details={"url": display_url(url)})


def _client(settings: Settings, transport: httpx.BaseTransport | None) -> httpx.Client:
    per_op = min(30.0, settings.musetalk_download_timeout_sec)
    # trust_env=False: a proxy from the environment would hide the real peer from the SSRF guard.
    return httpx.Client(transport=transport, follow_redirects=False, trust_env=False,
                        timeout=httpx.Timeout(per_op, connect=min(10.0, per_op)),
                        headers={"User-Agent": USER_AGENT})


def download(url: str, dest: Path, kind: Kind, settings: Settings | None = None, *,
             transport: httpx.BaseTransport | None = None) -> Path:
    """Download ``url`` to ``dest`` under the module's policy; returns ``dest``.

    Raises :class:`MediaError` (stage download) for bad or unreachable input and
    :class:`ProcessingError` for local faults (disk). ``transport`` is for tests (``httpx.MockTransport``).
    """
    settings = settings or get_settings()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_url_form(url, kind, settings)
    local = _local_source(url, settings, kind)
    if local is not None:
        return _copy_local(local, dest, kind, settings)

    started = time.monotonic()
    deadline = started + settings.musetalk_download_timeout_sec
    base = settings.musetalk_download_retry_base_sec
    tmp = _temp_name(dest)
    close_fallback = False

    backoff = wait_exponential(multiplier=base)  # base, 2×base, 4×base … by attempt number

    def wait(state: RetryCallState) -> float:
        if state.outcome.exception().framing and not close_fallback:
            return 0.0  # the next attempt reads the body as HTTP/1.0 would: no reason to wait for it
        return backoff(state)

    def before_retry(state: RetryCallState) -> None:
        nonlocal close_fallback
        exc = state.outcome.exception()
        if exc.framing and not close_fallback:
            close_fallback = True
            log.warning("download of %s: %s; retrying with Connection: close", display_url(url), exc.reason)
        else:
            log.warning("download of %s failed (%s), attempt %d/%d; retrying in %.1f s", display_url(url),
                        exc.reason, state.attempt_number, ATTEMPTS, state.upcoming_sleep)

    try:
        with _client(settings, transport) as client:
            try:
                size = Retrying(
                    retry=retry_if_exception_type(_Transient),
                    # the whole download, retries included, stays within MUSETALK_DOWNLOAD_TIMEOUT_SEC
                    stop=stop_after_attempt(ATTEMPTS) | stop_before_delay(deadline - time.monotonic()),
                    wait=wait, before_sleep=before_retry,
                )(lambda: _fetch_once(client, url, tmp, kind, settings, deadline, close_fallback))
            except RetryError as exc:  # out of attempts or time: the input is unreachable (DESIGN §4)
                attempts = exc.last_attempt.attempt_number
                raise MediaError(
                    f"could not download {_label(kind)}: {exc.last_attempt.exception().reason} "
                    f"(after {attempts} attempts)", stage="download",
                    details={"url": display_url(url), "attempts": attempts, "transient": True}) from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s input %s: %d bytes in %.2f s", kind, display_url(url), size,
             time.monotonic() - started)
    return dest


# --------------------------------------------------------------------------------------------- probe


class MediaInfo(BaseModel):
    """What ffprobe says about one input file."""

    duration: float | None = None
    has_video: bool = False
    has_audio: bool = False
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    rotation: int = 0
    codec: str | None = None
    is_image: bool = False
    format_name: str | None = None


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # drop NaN


def _rate(value: Any) -> float | None:
    """``"30000/1001"`` → 29.97; ``"0/0"`` and junk → None."""
    try:
        num, _, den = str(value).partition("/")
        rate = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return rate if rate > 0 else None


def parse_probe(data: dict[str, Any], kind: Kind) -> MediaInfo:
    """Build :class:`MediaInfo` from ffprobe's JSON (``-show_format -show_streams``)."""
    streams = data.get("streams") or []
    fmt = data.get("format") or {}
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not (s.get("disposition") or {}).get("attached_pic")]  # cover art is not video
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    video = videos[0] if videos else None
    audio = audios[0] if audios else None
    format_name = fmt.get("format_name")
    is_image = bool(video and format_name in IMAGE_FORMATS and video.get("codec_name") in IMAGE_CODECS)
    main = audio if kind == "audio" else video
    # For audio, the audio stream's own length counts (a video file's format may run longer).
    duration = _float((main or {}).get("duration")) if kind == "audio" else None
    if duration is None:
        duration = _float(fmt.get("duration"))
    if duration is None:
        durations = [d for d in (_float(s.get("duration")) for s in streams) if d is not None]
        duration = max(durations) if durations else None
    return MediaInfo(
        duration=duration,
        has_video=video is not None,
        has_audio=audio is not None,
        width=video.get("width") if video else None,
        height=video.get("height") if video else None,
        fps=(_rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))) if video else None,
        rotation=display_rotation(video) if video else 0,
        codec=(main or {}).get("codec_name"),
        is_image=is_image,
        format_name=format_name,
    )


def check_media(info: MediaInfo, kind: Kind, settings: Settings, label: str | None = None) -> None:
    """Apply the input rules; raises :class:`MediaError` (stage validation) naming the input (``label``,
    default "the video URL"; the CLI names its option and file instead)."""
    label = label or _label(kind)

    def fail(message: str) -> MediaError:
        return MediaError(f"{label} {message}", stage="validation", details=info.model_dump())

    if kind == "video":
        if not info.has_video:
            raise fail("has no video track" + (" (it is an audio file)" if info.has_audio else ""))
        if not info.width or not info.height:
            raise fail("has no readable picture size")
        long_side, short_side = settings.musetalk_max_input_long_side, settings.musetalk_max_input_short_side
        if max(info.width, info.height) > long_side or min(info.width, info.height) > short_side:
            raise fail(f"is {info.width}x{info.height}; the largest accepted picture is "
                       f"{long_side}x{short_side} (either orientation)")
        if info.is_image:
            return  # a still avatar: no duration to check
        limit = settings.musetalk_max_video_sec
    else:
        if not info.has_audio:
            raise fail("has no audio track")
        limit = settings.musetalk_max_audio_sec
    if info.duration is None or info.duration <= 0:
        raise fail("has no duration (empty or unreadable stream)")
    if info.duration > limit:
        raise fail(f"is {info.duration:.1f} s long; the limit is {limit:g} s")


def probe_media(path: Path, kind: Kind, settings: Settings | None = None, *,
                timeout: float = PROBE_TIMEOUT_SEC, label: str | None = None) -> MediaInfo:
    """Probe ``path`` (:func:`musetalk_engine.probe.ffprobe`: timeout, demuxer whitelist) and check it
    is a usable ``kind`` input."""
    settings = settings or get_settings()
    label = label or _label(kind)
    try:
        data = ffprobe(path, timeout=timeout)
    except ProbeFailed as exc:
        if exc.timed_out:
            raise MediaError(f"{label} could not be read within {timeout:g} s", stage="validation") from None
        if exc.refused:
            raise MediaError(f"{label} is a playlist or a container format that is not accepted ({exc.refused}); "
                             "send a single media file such as MP4, MOV, WebM, WAV or MP3",
                             stage="validation", details={"format": exc.refused}) from None
        raise MediaError(f"{label} is not a readable {kind} file", stage="validation",
                         details={"reason": exc.reason}) from None
    info = parse_probe(data, kind)
    check_media(info, kind, settings, label)
    return info


# --------------------------------------------------------------------------------------------- tasks


def is_transient(exc: BaseException) -> bool:
    """Whether another try may help: retryable worker faults and raw network errors, never MediaError."""
    if isinstance(exc, MuseTalkError):
        return isinstance(exc, ProcessingError) and exc.retryable
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure :func:`is_transient`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's exception is exactly what we inspect
        return is_transient(exc)
    return False


@task(name="fetch-input", task_run_name="fetch-{kind}", retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def fetch_input(url: str, dest: Path, kind: Kind, settings: Settings | None = None) -> Path:
    """Download one job input (never cached: inputs are per job; network retries happen inside)."""
    return download(url, dest, kind, settings)


@task(name="validate-input", task_run_name="validate-{kind}", cache_policy=NO_CACHE)
def validate_input(path: Path, kind: Kind, settings: Settings | None = None) -> MediaInfo:
    """Probe and check one downloaded input (deterministic: no retries)."""
    return probe_media(path, kind, settings)
