"""The one place configuration is read: environment variables and ``.env`` → a typed :class:`Settings`.

Names follow DESIGN §7 exactly (they are fixed by existing deployments); project-only settings carry a
``MUSETALK_`` prefix. Field names are the lower-cased variable names, so ``Settings(b2_prefix="x")`` and
``B2_PREFIX=x`` mean the same thing. Empty variables count as unset (``env_ignore_empty``), so
``ORCHESTRATOR_BASE_URL=`` in a compose file disables progress reporting instead of breaking it.

Every entry point (CLI ``generate``/``demo``/``batch``/``serve``/``deploy``, the flows, the benchmarks)
reads this class, so one ``.env`` or one exported variable configures them all. Values come from the
environment first, then from ``.env`` in the current directory (``MUSETALK_ENV_FILE`` names another file).

Relative paths (result dir, models, cache, UNet files) are relative to ``MUSETALK_WORKDIR``; use
:meth:`Settings.resolve`. The workdir defaults to ``/app`` (the container layout) when that directory
exists, else to ``$XDG_DATA_HOME/musetalk-flow`` (``~/.local/share/musetalk-flow``): never the current
directory, so running a command from a checkout does not scatter ``cache/``, ``results/`` and ``tmp/``
into it.

Secrets (``INTERNAL_API_KEY``, ``B2_APP_KEY``, ``SALAD_API_KEY``, ``MUSETALK_WEBHOOK_SECRET``) are ``SecretStr``: their repr is
masked, and the process's logging (:mod:`tasks.logs`) scrubs their plain values from every log record as a
second line of defence (:func:`redact`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from musetalk_engine.device_names import DEVICE_PATTERN, canonical_slot_device
from musetalk_engine.gpu_lock import DEFAULT_LOCK_DIR
from tasks.logs import DEFAULT_MAX_CHARS

REDACTED = "***"
# Shorter "secrets" are not scrubbed: replacing every "ab" in every log line would make logs unreadable,
# and a key that short protects nothing anyway.
MIN_REDACT_LEN = 4


APP_DIR = Path("/app")
APP_NAME = "musetalk-flow"


def _default_workdir() -> Path:
    """``/app`` inside the worker image, the per-user data directory elsewhere (dev machines, CI)."""
    if APP_DIR.is_dir():
        return APP_DIR
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / APP_NAME


def env_file() -> str:
    """The dotenv file every settings class reads (``MUSETALK_ENV_FILE``, default ``.env``); a missing
    file is simply not read."""
    return os.environ.get("MUSETALK_ENV_FILE") or ".env"


def settings_config() -> SettingsConfigDict:
    """The one source configuration of every settings class of the project: environment, then the
    dotenv file; names case-insensitive; empty values unset; unknown names ignored (the same ``.env``
    holds Prefect's and other tools' variables)."""
    return SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore",
                              env_file=env_file(), env_file_encoding="utf-8")


class Settings(BaseSettings):
    """Worker configuration from the environment (DESIGN §7 names plus ``MUSETALK_*`` project settings)."""

    model_config = settings_config()

    # --- orchestrator (DESIGN §5)
    orchestrator_base_url: str | None = None
    buffer_orchestrator_base_url: str | None = None
    internal_api_key: SecretStr | None = None
    buffer_worker_id: str | None = None
    gpu_class_name: str | None = None
    # Claims held at once by this worker's buffer loop. Unset: one per render slot (MUSETALK_DEVICES), so 1 on
    # a one-GPU worker; never more than the slots (see buffer_claims).
    buffer_capacity: int = Field(1, ge=1)
    buffer_poll_interval_sec: float = Field(10.0, gt=0)

    # --- storage (DESIGN §6)
    b2_key_id: str | None = None
    b2_app_key: SecretStr | None = None
    b2_bucket_name: str | None = None
    b2_prefix: str = "avatar/outputs"

    # --- paths
    musetalk_workdir: Path = Field(default_factory=_default_workdir)
    musetalk_result_dir: Path = Path("results/job_queue")
    musetalk_unet_model_path: Path = Path("models/musetalkV15/unet.pth")
    musetalk_unet_config: Path = Path("models/musetalkV15/musetalk.json")
    musetalk_models_dir: Path = Path("models")
    # Avatar/feature cache; may point at a shared volume so machines reuse each other's avatars.
    musetalk_cache_dir: Path = Path("cache")

    # --- SaladCloud
    salad_queue_job_id: str | None = None
    salad_api_key: SecretStr | None = None
    salad_org_name: str | None = None
    salad_project_name: str | None = None
    salad_api_base_url: str | None = None  # the fake Salad API in tests; unset: Salad's public API

    # --- input limits and network policy
    musetalk_max_download_mb: float = Field(500.0, gt=0)
    musetalk_max_audio_sec: float = Field(600.0, gt=0)
    musetalk_max_video_sec: float = Field(600.0, gt=0)
    # Input picture size, either orientation (4K UHD by default: 3840x2160 and 2160x3840 pass, DCI 4K
    # 4096x2160 does not); larger inputs are a 422 before any preparation (one 4K frame already takes
    # over a minute to prepare on a CPU).
    musetalk_max_input_long_side: int = Field(3840, ge=16)
    musetalk_max_input_short_side: int = Field(2160, ge=16)
    # The HTTP front door (deployments/serve.py): a body over this is 413; a field over its limit is 422.
    musetalk_max_request_bytes: int = Field(64 * 1024, ge=1024)
    musetalk_max_url_chars: int = Field(8192, ge=64)
    # Wall-clock budget for one input download, all attempts included.
    musetalk_download_timeout_sec: float = Field(300.0, gt=0)
    # First retry delay of a download (doubles per attempt); tests set it near zero.
    musetalk_download_retry_base_sec: float = Field(1.0, ge=0)
    musetalk_job_timeout_sec: float = Field(1800.0, gt=0)
    musetalk_b2_upload_timeout_sec: float = Field(300.0, gt=0)
    # SSRF guard off entirely (loopback/private addresses allowed). Tests only: production uses the
    # allowlist below.
    musetalk_allow_private_urls: bool = False
    # Operator allowlist for media on private networks: comma-separated host names (exact, or
    # ``.example.internal`` for a domain and its subdomains) and IPs/CIDRs (``10.20.0.0/16``). Everything
    # else non-public stays refused.
    musetalk_private_url_allowlist: str = ""
    # Plain paths and file:// inputs, for the CLI and batch runs; never for the public HTTP endpoint.
    musetalk_allow_local_files: bool = False

    # --- control plane: webhooks (DESIGN §11); the secret signs every delivery, never sent itself
    musetalk_webhook_secret: SecretStr | None = None
    # First delay between webhook attempts (doubles per attempt, 5 attempts); tests set it near zero.
    musetalk_webhook_retry_base_sec: float = Field(1.0, ge=0)

    # --- logging (tasks/logs.py): text or one JSON object per line; longer messages are cut
    musetalk_log_format: Literal["text", "json"] = "text"
    musetalk_log_max_chars: int = Field(DEFAULT_MAX_CHARS, ge=200)

    # --- engine knobs
    musetalk_landmarks: str = "auto"
    # auto | cpu | cuda | cuda:N. The image sets cuda: a worker whose GPU is missing then fails to load
    # (``/hc`` stays 503 with the reason) instead of rendering on the CPU
    musetalk_device: str = "auto"
    # `musetalk-flow serve` only: the GPUs one serve process renders on, with one warm engine and one render
    # thread ("slot") each. A comma list of cpu | cuda | cuda:N (a GPU at most once; cpu may repeat, for
    # development and tests), or ``all`` for every GPU the process sees (CUDA_VISIBLE_DEVICES applies).
    # Unset: one slot on MUSETALK_DEVICE. Prefect process workers and the CLI use MUSETALK_DEVICE alone.
    musetalk_devices: str = ""
    # Where the per-GPU locks live (one file per GPU UUID): every process rendering on this machine's GPUs
    # must see the same directory (mount it into each container), so two never render on one GPU at once.
    musetalk_gpu_lock_dir: Path = DEFAULT_LOCK_DIR
    musetalk_batch_size: int | None = Field(None, ge=1)

    # --- Prefect
    # Start timeout of the temporary Prefect server (no PREFECT_API_URL). Prefect's own default (20 s) is
    # shorter than a cold start on a loaded machine: `musetalk-flow batch` failed 2 of 4 times on it.
    musetalk_prefect_start_timeout_sec: float = Field(120.0, gt=0)
    # Fan-out: how long a child share may stay unclaimed before the parent batch renders it itself (a
    # worker polls every ~10-15 s; longer means no worker is free to take it).
    musetalk_fanout_pickup_sec: float = Field(60.0, ge=0)

    @field_validator("musetalk_device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError(f"MUSETALK_DEVICE {value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("buffer_worker_id")
    @classmethod
    def _valid_worker_id(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(WORKER_ID_PATTERN, value):
            raise ValueError(f"BUFFER_WORKER_ID {value[:40]!r}: use at most 128 letters, digits and . _ : @ - "
                             "(the orchestrator refuses any other id)")
        return value

    @field_validator("musetalk_devices")
    @classmethod
    def _valid_devices(cls, value: str) -> str:
        parse_devices(value)  # a typo fails at start, not at the first job
        return value

    @field_validator("musetalk_private_url_allowlist")
    @classmethod
    def _valid_allowlist(cls, value: str) -> str:
        parse_allowlist(value)  # a typo in a CIDR fails at start, not as a refused job later
        return value

    # --- computed helpers
    @property
    def private_url_allowlist(self) -> "PrivateAllowlist":
        """The parsed ``MUSETALK_PRIVATE_URL_ALLOWLIST``."""
        return parse_allowlist(self.musetalk_private_url_allowlist)

    @property
    def device_list(self) -> list[str] | Literal["all"] | None:
        """The parsed ``MUSETALK_DEVICES``: device names, ``"all"``, or None when unset."""
        return parse_devices(self.musetalk_devices)

    def buffer_claims(self, slots: int) -> int:
        """Claims the buffer loop may hold at once on a serve process with ``slots`` render slots:
        ``BUFFER_CAPACITY`` when it is set, else one per slot; never more than the slots."""
        asked = self.buffer_capacity if "buffer_capacity" in self.model_fields_set else slots
        return max(1, min(asked, slots))

    @property
    def orchestrator_url(self) -> str | None:
        """Progress endpoint base (no trailing slash), or None when progress reporting is off."""
        return self.orchestrator_base_url.rstrip("/") if self.orchestrator_base_url else None

    @property
    def buffer_orchestrator_url(self) -> str | None:
        """Buffer endpoints base: ``BUFFER_ORCHESTRATOR_BASE_URL``, falling back to the orchestrator's."""
        url = self.buffer_orchestrator_base_url or self.orchestrator_base_url
        return url.rstrip("/") if url else None

    @property
    def buffer_enabled(self) -> bool:
        """Buffer mode (heartbeat + claim loop) is on when a buffer worker id is configured."""
        return bool(self.buffer_worker_id)

    @property
    def b2_enabled(self) -> bool:
        """True when key id, app key and bucket are all set; otherwise results go to local storage."""
        return bool(self.b2_key_id and self.b2_app_key and self.b2_app_key.get_secret_value()
                    and self.b2_bucket_name)

    @property
    def worker_id(self) -> str:
        """Identity sent to the orchestrator: the buffer worker id, else the host name."""
        return self.buffer_worker_id or socket.gethostname()

    @property
    def result_root(self) -> Path:
        """Directory of local result storage: ``{MUSETALK_WORKDIR}/{MUSETALK_RESULT_DIR}``."""
        return self.resolve(self.musetalk_result_dir)

    @property
    def job_work_root(self) -> Path:
        """Where each job's temporary workspace lives (``job-*`` folders, swept at a worker's start)."""
        return self.resolve(self.musetalk_workdir) / "tmp"

    def resolve(self, path: Path | str) -> Path:
        """An absolute path: relative paths are taken relative to ``MUSETALK_WORKDIR``."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.musetalk_workdir / path


# A buffer worker's id (BUFFER_WORKER_ID, else the host name) names a Prefect worker, is part of a Prefect
# variable (at most 5000 characters), a label and log lines: characters safe in all of them, bounded. The
# orchestrator refuses any other id (422 on every heartbeat), so a worker checks its own at start.
WORKER_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"

DEVICES_ENV = "MUSETALK_DEVICES"


def parse_devices(text: str) -> list[str] | Literal["all"] | None:
    """``"cuda:0, cuda:1"`` → ``["cuda:0", "cuda:1"]``; ``"all"`` → ``"all"``; empty → None.

    ``cuda`` is written ``cuda:0`` (the same GPU, so a list naming both is refused like any repeated GPU);
    ``cpu`` may repeat (each slot then renders on the shared cores). No torch here: ``all`` is counted by
    the serve process."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "all":
        return "all"
    names = []
    for raw in text.split(","):
        try:
            name = canonical_slot_device(raw)
        except ValueError as exc:
            raise ValueError(f"{DEVICES_ENV}: {exc} (or use 'all' alone)") from None
        if name != "cpu" and name in names:
            raise ValueError(f"{DEVICES_ENV}: {name} is listed twice; one GPU takes one render slot")
        names.append(name)
    return names


ALLOWLIST_ENV = "MUSETALK_PRIVATE_URL_ALLOWLIST"


@dataclass(frozen=True)
class PrivateAllowlist:
    """Private hosts and networks an operator lets the SSRF guard reach (``MUSETALK_PRIVATE_URL_ALLOWLIST``)."""

    hosts: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()  # ".media.internal": that domain and every subdomain
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.hosts or any(host == d[1:] or host.endswith(d) for d in self.domains)

    def allows_address(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.domains or self.networks)


def parse_allowlist(text: str) -> PrivateAllowlist:
    """``"media.internal, .corp.example, 10.20.0.0/16, 192.168.1.7"`` → a :class:`PrivateAllowlist`."""
    hosts, domains, networks = set(), [], []
    for raw in (text or "").split(","):
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if "/" in entry or not all(part.replace("-", "").isalnum() for part in entry.lstrip(".").split(".")):
            raise ValueError(f"{ALLOWLIST_ENV}: {raw.strip()!r} is neither a host name nor an IP network")
        (domains.append(entry) if entry.startswith(".") else hosts.add(entry))
    return PrivateAllowlist(frozenset(hosts), tuple(domains), tuple(networks))


class ConfigurationError(ValueError):
    """A setting from the environment or ``.env`` that is not valid; the message names each variable."""

    @classmethod
    def of(cls, exc: ValidationError) -> "ConfigurationError":
        """One line for pydantic's report: ``configuration (environment or .env): NAME: why; …``."""
        parts = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper() or "settings"
            why = str(error["msg"]).removeprefix("Value error, ")
            parts.append(why if why.startswith(name) else f"{name}: {why}")
        return cls("configuration (environment or .env): " + "; ".join(parts))


SettingsClass = TypeVar("SettingsClass", bound=BaseSettings)


def read_settings(cls: type[SettingsClass]) -> SettingsClass:
    """``cls()`` read from the environment and ``.env`` now; ConfigurationError (one readable line) when a
    variable is not valid. Every settings class of the project is read through here."""
    try:
        return cls()
    except ValidationError as exc:
        raise ConfigurationError.of(exc) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process; ``get_settings.cache_clear()`` re-reads the environment."""
    return read_settings(Settings)


def secret_values(settings: Settings | None = None) -> list[str]:
    """Plain values of the configured secrets (for redaction only — never log or return them)."""
    settings = settings or get_settings()
    values = []
    for secret in (settings.internal_api_key, settings.b2_app_key, settings.salad_api_key,
                   settings.musetalk_webhook_secret):
        if secret is not None and len(secret.get_secret_value()) >= MIN_REDACT_LEN:
            values.append(secret.get_secret_value())
    return values


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in secret_values() if secrets is None else secrets:
        if value and len(value) >= MIN_REDACT_LEN and value in text:
            text = text.replace(value, REDACTED)
    return text
