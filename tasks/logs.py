"""The process's one logging configuration, used by every entry point (`musetalk-flow …`, `python -m
benchmarks`, the serve process and the processes they start).

Every log record — ours, httpx/httpcore's own request lines, Prefect's, uvicorn's — is cleaned the moment it
is made (a log-record factory, so no handler, formatter or Prefect API shipper ever sees the raw text):

* URLs lose their credentials and query: ``https://user:pw@host/p?X-Amz-Signature=…`` becomes
  ``https://***@host/p?***``. Presigned URLs carry their signature in the query; that is where secrets are.
* configured secrets (:func:`tasks.settings.secret_values`) become ``***``;
* control characters (newlines included), Unicode line separators and bidi overrides are escaped
  (``\\n``, ``\\x1b``, ``\\u2028``), so text a customer chose (ids, URLs, exception messages) cannot forge a
  log line or rewrite a terminal;
* the message is cut at ``MUSETALK_LOG_MAX_CHARS``; a traceback keeps its last lines, each cut the same way.

Formats (``MUSETALK_LOG_FORMAT``): ``text`` (``time level logger: message``; traceback lines follow,
prefixed with ``  | `` so they never look like a record of their own) or ``json`` (one object per line:
``ts, level, logger, message`` and ``exc`` / ``flow_run_id`` / ``task_run_id`` when present).

:func:`configure_logging` also turns Prefect's telemetry off (:data:`TELEMETRY_OFF`) in this process and
— through the environment — in every process it starts (Prefect's temporary server, flow-run workers,
benchmark children). It must run before ``prefect`` is imported: Prefect starts its analytics on import.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any, Callable

# Prefect 3.9 reads these: DO_NOT_TRACK stops the SDK's analytics (started on `import prefect`),
# PREFECT_SERVER_ANALYTICS_ENABLED the server's (the temporary server included), the other two its
# resource-metrics and orchestration telemetry. Set only when unset, so an operator can opt back in.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}

DEFAULT_MAX_CHARS = 4000
# A traceback may span this many times the message bound (its last part is kept: that is where the cause is).
TRACEBACK_FACTOR = 4
CONTINUATION = "  | "

# scheme://authority[path][?query][#fragment]; the authority ends at the first / ? # or whitespace/quote.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]{0,31})://(?P<authority>[^\s/?#\"'<>`]*)"
                  r"(?P<path>[^\s?#\"'<>`]*)(?P<query>\?[^\s#\"'<>`]*)?(?P<fragment>#[^\s\"'<>`]*)?")
# C0/C1 controls, DEL, Unicode line/paragraph separators, bidi embeddings/overrides/isolates, BOM.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def scrub_urls(text: str) -> str:
    """Every URL in ``text`` without its userinfo and query (fragment dropped too)."""

    def clean(m: re.Match[str]) -> str:
        authority = m["authority"]
        if "@" in authority:
            authority = "***@" + authority.rpartition("@")[2]
        return f"{m['scheme']}://{authority}{m['path']}{'?***' if m['query'] else ''}"

    return _URL.sub(clean, text) if "://" in text else text


def escape_controls(text: str) -> str:
    """``text`` on one line: control and line-breaking characters as visible escapes."""

    def esc(m: re.Match[str]) -> str:
        ch = m.group()
        if ch in _NAMED:
            return _NAMED[ch]
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"

    return _UNSAFE.sub(esc, text)


def bound(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was dropped."""
    if limit <= 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more chars]"


def clean_text(text: str, limit: int = DEFAULT_MAX_CHARS) -> str:
    """One log-safe line: secrets, URL credentials/queries and control characters gone, length bounded."""
    return bound(escape_controls(scrub_urls(_redact(text))), limit)


def _redact(text: str) -> str:
    from tasks.settings import redact

    try:
        return redact(text)
    except Exception:  # unreadable settings must not break logging itself
        return text


def clean_traceback(text: str, limit: int = DEFAULT_MAX_CHARS) -> str:
    """A traceback kept multi-line, but each line cleaned like a message and the whole bounded (tail kept)."""
    lines = [bound(escape_controls(line), limit) for line in scrub_urls(_redact(text)).split("\n")]
    budget, kept = limit * TRACEBACK_FACTOR, []
    for line in reversed(lines):
        budget -= len(line) + 1
        if budget < 0:
            kept.append(f"… [{len(lines) - len(kept)} earlier lines dropped]")
            break
        kept.append(line)
    return "\n".join(reversed(kept))


# ------------------------------------------------------------------------------------------ records


def _uvicorn_access_args(args: Any) -> Any:
    """uvicorn's access line carries the request path with its query (``/generate?token=…``): drop it."""
    if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
        return (*args[:2], args[2].partition("?")[0] + "?***", *args[3:])
    return args


class CleanRecordFactory:
    """A ``logging.setLogRecordFactory`` wrapper: each record's message and traceback are cleaned once,
    when it is made, so every handler (console, Prefect's API shipper, test captures) sees the same
    safe text. The message is formatted here (``msg % args``): a secret or a newline may hide in an arg."""

    def __init__(self, previous: Callable[..., logging.LogRecord], max_chars: int):
        self.previous = previous
        self.max_chars = max_chars

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        try:
            if record.name == "uvicorn.access":
                record.args = _uvicorn_access_args(record.args)
            message = record.getMessage()
        except Exception:  # a broken format string: keep the template, drop the args
            message = f"{record.msg!s} (unformattable args)"
        record.msg, record.args = clean_text(message, self.max_chars), ()
        if record.exc_info:
            # formatted now and the live exception dropped: handlers that render exc_info themselves
            # (rich) would otherwise print the uncleaned text
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = clean_traceback(record.exc_text, self.max_chars)
        if record.stack_info:
            record.stack_info = clean_traceback(record.stack_info, self.max_chars)
        return record


class TextFormatter(logging.Formatter):
    """``2026-01-01T10:00:00.123Z INFO tasks.fetch: message``; traceback lines prefixed :data:`CONTINUATION`."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        exc_text, stack = record.exc_text, record.stack_info
        record.exc_text = record.stack_info = None
        try:
            line = super().format(record)
        finally:
            record.exc_text, record.stack_info = exc_text, stack
        for extra in (exc_text, stack):
            if extra:
                line += "".join(f"\n{CONTINUATION}{part}" for part in extra.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (ASCII, so no raw newline can appear inside it)."""

    EXTRA = ("flow_run_id", "task_run_id", "flow_run_name", "task_run_name")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in self.EXTRA:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, ensure_ascii=True, default=str)


class _OurHandler(logging.StreamHandler):
    """The root handler :func:`configure_logging` installs (recognised on a second call)."""


# Loggers that libraries give a console handler of their own and stop from propagating (Prefect's
# logging.yml does this for uvicorn/fastapi/prefect._internal): they are sent to our root handler instead,
# so every line on the console has one format.
ADOPTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi", "prefect._internal")


def _adopt_library_loggers() -> None:
    for name in ADOPTED_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def _unwrapped_factory() -> Callable[..., logging.LogRecord]:
    """The record factory in place before any :func:`configure_logging` call."""
    factory = logging.getLogRecordFactory()
    while isinstance(factory, CleanRecordFactory):
        factory = factory.previous
    return factory


def disable_telemetry(environ: dict[str, str] | None = None) -> None:
    """Prefect's telemetry off here and in every child process (the environment is inherited)."""
    env = os.environ if environ is None else environ
    for key, value in TELEMETRY_OFF.items():
        env.setdefault(key, value)


def configure_logging(level: int | str = logging.INFO, *, fmt: str | None = None,
                      max_chars: int | None = None, stream: Any = None) -> logging.Handler:
    """Install the process's logging (idempotent: a second call replaces the first's handler and factory).

    ``fmt``/``max_chars`` default to ``MUSETALK_LOG_FORMAT``/``MUSETALK_LOG_MAX_CHARS``. Call it first thing
    in an entry point (before ``prefect`` is imported: Prefect keeps a root handler that is already there),
    and again after uvicorn/Prefect set up their loggers, to bring those back to this handler.
    """
    disable_telemetry()
    if fmt is None or max_chars is None:
        from tasks.settings import get_settings

        settings = get_settings()
        fmt = fmt or settings.musetalk_log_format
        max_chars = max_chars if max_chars is not None else settings.musetalk_log_max_chars
    logging.setLogRecordFactory(CleanRecordFactory(_unwrapped_factory(), max_chars))

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    handler = _OurHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    _adopt_library_loggers()
    # httpx logs every request URL at INFO; the URL is scrubbed, but one line per request (progress
    # updates, downloads) drowns the operator's log
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    return handler


def reset_logging() -> None:
    """Undo :func:`configure_logging` (tests)."""
    logging.setLogRecordFactory(_unwrapped_factory())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)


# ------------------------------------------------------------------------------------- command line

# Libraries whose INFO and own WARNING notices are noise on a terminal at the CLI's default verbosity
# (diffusers' "should be kept in float32" notices, transformers' advisories, httpx's request lines).
NOISY_LOGGERS = ("httpx", "httpcore", "diffusers", "transformers", "huggingface_hub", "urllib3", "PIL",
                 "matplotlib", "asyncio")
# Read by the Hugging Face libraries at import, so set before anything imports them.
HF_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Loading weights" / "Writing model shards" bars
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# Prefect's console handler echoes every flow/task-run log line; logging.yml keys can be overridden from
# the environment, which Prefect reads when it configures logging (its import).
PREFECT_CONSOLE_LEVEL_ENV = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"
# ... and its root level, which Prefect's logging.yml otherwise resets to WARNING on import (-v lost).
PREFECT_ROOT_LEVEL_ENV = "PREFECT_LOGGING_ROOT_LEVEL"


def configure_cli(verbosity: int = 0) -> logging.Handler:
    """:func:`configure_logging` for a person at a terminal; call before importing torch, diffusers or Prefect.

    ``0``: the console shows WARNING and above from this project only — third-party loggers at ERROR,
    Python warnings and Hugging Face progress bars off, Prefect's run-log echo off. ``1`` (``-v``): INFO
    from everything, library warnings and bars back. ``2`` (``-vv``): DEBUG. Only the console is quieted:
    run logs still reach the Prefect server (its API handler sits on Prefect's own loggers). Variables the
    user set explicitly win.
    """
    quiet = verbosity <= 0
    level = logging.WARNING if quiet else (logging.INFO if verbosity == 1 else logging.DEBUG)
    if quiet:
        for name, value in HF_QUIET_ENV.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault(PREFECT_CONSOLE_LEVEL_ENV, "WARNING")
        warnings.simplefilter("ignore")  # this project raises none; every one is a library's notice
    os.environ.setdefault(PREFECT_ROOT_LEVEL_ENV, logging.getLevelName(level))
    handler = configure_logging(level)
    # Prefect's run loggers log INFO whatever the root level (PREFECT_LOGGING_LEVEL): the console
    # handler, not the loggers, is where the CLI turns them down
    handler.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
    return handler
