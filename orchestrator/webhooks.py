"""Signed job webhooks (DESIGN §11): on a terminal state the job's GET body is POSTed to its `webhook_url`.

Signature: ``X-MuseTalk-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` over the
exact bytes sent. The timestamp is inside the MAC so a captured delivery cannot be replayed later with a
fresh ``t``; receivers check it with :func:`verify_signature` (a tolerance window, constant-time compare).
Each attempt is signed anew, so a delivery retried minutes later still passes a receiver's window.

Delivery (:func:`deliver_job_webhook`):

* The URL passes tasks/fetch.py's SSRF guard (http(s), public addresses only, unless the operator's
  ``MUSETALK_ALLOW_PRIVATE_URLS``) before every attempt, and the connected peer is checked again, as for
  media downloads: a webhook must not become a way to POST into the operator's private network.
* Redirects are not followed: a 307/308 would need the same per-hop check and a receiver has no reason to
  redirect a POST; any 3xx counts as a refusal.
* Up to :data:`ATTEMPTS` attempts (tenacity) with exponential backoff from
  ``MUSETALK_WEBHOOK_RETRY_BASE_SEC``, on connection errors, timeouts, 408, 425, 429 and 5xx. Any other
  status is the receiver's final answer (a 400 or 401 will not change on a retry) and ends the delivery.
* Best effort: failures are logged and returned as a :class:`WebhookDelivery`, never raised, so a dead
  receiver cannot fail or delay the job itself. The ``X-MuseTalk-Delivery`` id is the same on every attempt,
  so a receiver can drop duplicates (a retry after a response that was lost on the way back).

Logs name the URL without its query string (:func:`tasks.fetch.display_url`); the secret never appears.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, SecretStr
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from musetalk_engine.errors import MediaError
from tasks.fetch import check_peer, check_url_allowed, check_url_form, display_url
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MuseTalk-Signature"
DELIVERY_HEADER = "X-MuseTalk-Delivery"
EVENT_HEADER = "X-MuseTalk-Event"
ATTEMPTS = 5
MAX_BACKOFF_SEC = 60.0
TIMEOUT_SEC = 10.0
# Receivers should accept a signature this old (seconds) and no older: replay protection vs. clock skew.
DEFAULT_TOLERANCE_SEC = 300
USER_AGENT = "musetalk-flow-webhooks/0.1"
_RETRY_STATUSES = {408, 425, 429}
_KIND = "webhook"


class _RetryableAttempt(Exception):
    """One failed attempt that another attempt may fix (transport error, 408/425/429/5xx)."""

    def __init__(self, reason: str, status_code: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


class WebhookDelivery(BaseModel):
    """What became of one webhook: delivered or not, after how many attempts, and the last answer."""

    url: str  # display form: no credentials, no query string
    delivery_id: str
    delivered: bool
    attempts: int
    status_code: Optional[int] = None
    error: Optional[str] = None


# ------------------------------------------------------------------------------------------- signing


def _secret_bytes(secret: Union[str, SecretStr]) -> bytes:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if not value:
        raise ValueError("the webhook secret is empty; set MUSETALK_WEBHOOK_SECRET")
    return value.encode()


def _mac(secret: Union[str, SecretStr], timestamp: int, body: bytes) -> str:
    return hmac.new(_secret_bytes(secret), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: Union[str, SecretStr], body: bytes, timestamp: Optional[int] = None) -> str:
    """The ``X-MuseTalk-Signature`` value for ``body``: ``t=<unix seconds>,v1=<hex HMAC-SHA256>``."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_mac(secret, t, body)}"


def verify_signature(secret: Union[str, SecretStr], body: bytes, header: Optional[str], *,
                     tolerance_s: float = DEFAULT_TOLERANCE_SEC, now: Optional[float] = None) -> bool:
    """True when ``header`` signs exactly ``body`` with ``secret`` and its timestamp is within tolerance.

    For receivers: pass the raw request body (before any JSON parsing; re-serialising changes the bytes).
    Several ``v1=`` entries are accepted (one matching is enough), which lets an operator rotate secrets.
    """
    if not header:
        return False
    timestamp: Optional[int] = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)


def encode_body(job_body: Mapping[str, Any]) -> bytes:
    """The bytes sent and signed: compact JSON, UTF-8 (datetimes etc. as strings)."""
    return json.dumps(job_body, separators=(",", ":"), ensure_ascii=False, default=str).encode()


# ------------------------------------------------------------------------------------------ delivery


def _attempt(client: httpx.Client, url: str, body: bytes, secret: Union[str, SecretStr],
             headers: Mapping[str, str], settings: Settings) -> int:
    """One POST; returns the final (non-retryable) status, raises _RetryableAttempt for another try."""
    try:
        check_url_allowed(url, settings, _KIND)
    except MediaError:
        raise
    except Exception as exc:  # the guard's temporary DNS failure: worth another attempt
        raise _RetryableAttempt(str(exc)) from None
    request_headers = {**headers, SIGNATURE_HEADER: sign(secret, body)}
    try:
        with client.stream("POST", url, content=body, headers=request_headers) as response:
            check_peer(response, settings, _KIND)
            status = response.status_code
    except httpx.TransportError as exc:
        raise _RetryableAttempt(f"connection failed ({type(exc).__name__})") from None
    if status in _RETRY_STATUSES or status >= 500:
        raise _RetryableAttempt(f"HTTP {status}", status)
    return status


def deliver_job_webhook(job_body: Mapping[str, Any], url: str, secret: Union[str, SecretStr], *,
                        settings: Optional[Settings] = None, attempts: int = ATTEMPTS,
                        transport: Optional[httpx.BaseTransport] = None) -> WebhookDelivery:
    """POST ``job_body`` (the job's GET body) to ``url``, signed, retried; see the module doc.

    Blocks for the whole retry schedule (about 15 s with the default 1 s base): call it off the request path.
    """
    settings = settings or get_settings()
    body = encode_body(job_body)
    delivery_id = uuid.uuid4().hex
    shown = display_url(url)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: f"job.{job_body.get('status', 'unknown')}",
    }
    tries = 0
    last_status: Optional[int] = None

    def result(delivered: bool, error: Optional[str]) -> WebhookDelivery:
        outcome = WebhookDelivery(url=shown, delivery_id=delivery_id, delivered=delivered, attempts=tries,
                                  status_code=last_status, error=error)
        if delivered:
            log.info("webhook %s for job %s delivered to %s (HTTP %s, attempt %d)", delivery_id,
                     job_body.get("id"), shown, last_status, tries)
        else:
            log.warning("webhook %s for job %s to %s not delivered after %d attempt(s): %s", delivery_id,
                        job_body.get("id"), shown, tries, error)
        return outcome

    retrying = Retrying(
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_exponential(multiplier=settings.musetalk_webhook_retry_base_sec, max=MAX_BACKOFF_SEC),
        retry=retry_if_exception_type(_RetryableAttempt),
        before_sleep=lambda rs: log.info("webhook %s to %s: %s; attempt %d of %d failed, retrying",
                                         delivery_id, shown, rs.outcome.exception(), rs.attempt_number,
                                         attempts),
    )
    # trust_env=False: an environment proxy would hide the real peer from the SSRF check.
    with httpx.Client(transport=transport, timeout=TIMEOUT_SEC, follow_redirects=False,
                      trust_env=False) as client:
        try:
            for attempt in retrying:
                with attempt:
                    tries = attempt.retry_state.attempt_number
                    try:
                        last_status = _attempt(client, url, body, secret, headers, settings)
                    except _RetryableAttempt as exc:
                        last_status = exc.status_code
                        raise
        except RetryError as exc:
            return result(False, str(exc.last_attempt.exception()))
        except MediaError as exc:  # refused by the SSRF guard: no attempt can succeed
            return result(False, exc.message)
    if 200 <= last_status < 300:
        return result(True, None)
    return result(False, f"the receiver answered HTTP {last_status}")


def check_webhook_url(url: str, settings: Settings) -> None:
    """At submit, looking up no ordinary name: a webhook URL that can never be delivered is the client's
    error (:class:`MediaError`). Its form (http(s), a host, a request that can be built) and, when the host
    is an address — in any spelling the resolver takes: ``127.1``, ``2130706433``, ``[::1]`` — or
    ``localhost``/``*.localhost`` (which the resolver answers itself, so the front door calls this off the
    event loop), the SSRF guard itself. Other names are judged at delivery, after their lookup."""
    check_url_form(url, _KIND, settings.model_copy(update={"musetalk_allow_local_files": False}))
    host = (urlsplit(url).hostname or "").rstrip(".")
    try:
        socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
        numeric = True
    except (socket.gaierror, UnicodeError, ValueError):
        numeric = False
    if numeric or host == "localhost" or host.endswith(".localhost"):
        try:
            check_url_allowed(url, settings, _KIND)
        except MediaError:
            raise
        except Exception:  # noqa: BLE001 — a lookup that failed for now: delivery judges the URL again
            pass
