"""Results: the rendered MP4 and its JSON sidecar, on Backblaze B2 or in a local directory (DESIGN §6).

Layout (both backends): ``{prefix}/{job_id}.mp4`` then ``{prefix}/{job_id}.json``. The video goes
first and the sidecar second, so a sidecar's presence means the whole result is there. Keys are a pure
function of the job id, so a re-run (a requeued job) overwrites instead of duplicating.

Job ids become object keys and file names, hence :func:`safe_job_id`: 1–128 characters from
``[A-Za-z0-9._-]``, not starting with a dot and never containing ``..`` — nothing that could leave the
prefix, hide a file, or smuggle a control character into a key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, TypeVar, runtime_checkable

from b2sdk.v2 import B2Api, InMemoryAccountInfo
from b2sdk.v2.exception import (AccessDenied, FileNotPresent, InvalidAuthToken,
                                NonExistentBucket, RestrictedBucket, Unauthorized)
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import SecretStr

from musetalk_engine import MODEL_VERSION
from musetalk_engine.errors import MediaError, ProcessingError
from musetalk_engine.files import atomic_write
from tasks.settings import Settings, get_settings, redact, secret_values

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "avatar/outputs"
LOCAL_BUCKET = "local"
MAX_JOB_ID_LEN = 128
_JOB_ID = re.compile(r"[A-Za-z0-9._-]+")

SIDECAR_FIELDS = ("musetalk_job_id", "queue_job_id", "gpu_class", "aspect_ratio", "resolution",
                  "generation_time_sec", "script_wall_time_sec", "peak_vram_mib", "peak_ram_kb",
                  "b2_bucket", "b2_file_name", "create_time_utc")


@dataclass(frozen=True)
class StoredResult:
    """Where a result landed: bucket, video key, its download URL, and the sidecar key."""

    bucket: str
    file_name: str
    output_url: str
    sidecar_name: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@runtime_checkable
class Storage(Protocol):
    """A place for results; both operations are idempotent per job id."""

    def put(self, job_id: str, video_path: Path, sidecar: dict[str, Any]) -> StoredResult: ...

    def exists(self, job_id: str) -> StoredResult | None: ...


# ------------------------------------------------------------------------------------------ helpers


def safe_job_id(job_id: str) -> str:
    """``job_id`` if it is safe as a key/file name (see module doc); else MediaError (stage validation)."""
    if not isinstance(job_id, str) or not job_id:
        raise MediaError("musetalk_job_id is empty", stage="validation")
    if len(job_id) > MAX_JOB_ID_LEN:
        raise MediaError(f"musetalk_job_id is longer than {MAX_JOB_ID_LEN} characters", stage="validation")
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id or job_id.startswith("."):
        raise MediaError("musetalk_job_id may only contain letters, digits, '.', '_' and '-' "
                         "(no leading dot, no '..')", stage="validation", details={"job_id": job_id[:128]})
    return job_id


def _clean_prefix(prefix: str) -> str:
    parts = [p for p in prefix.strip().split("/") if p]
    if any(p in (".", "..") or "\\" in p for p in parts):
        raise ValueError(f"storage prefix {prefix!r} must not contain '.', '..' or backslashes")
    return "/".join(parts)


def result_keys(prefix: str, job_id: str) -> tuple[str, str]:
    """``(video_key, sidecar_key)`` for a job: ``{prefix}/{job_id}.mp4`` and ``….json``."""
    base = f"{prefix}/{safe_job_id(job_id)}" if prefix else safe_job_id(job_id)
    return f"{base}.mp4", f"{base}.json"


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_sidecar(musetalk_job_id: str, *, queue_job_id: str | None = None, gpu_class: str | None = None,
                  aspect_ratio: str | None = None, resolution: str | None = None,
                  metrics: Mapping[str, Any] | None = None, b2_bucket: str | None = None,
                  b2_file_name: str | None = None, create_time_utc: str | None = None) -> dict[str, Any]:
    """The sidecar with exactly DESIGN §6's fields.

    ``metrics`` is the HTTP contract's metrics object (``GENERATION_TIME_SEC``, ``SCRIPT_WALL_TIME_SEC``,
    ``PEAK_VRAM_MIB``, ``PEAK_RAM_KB``; lower-case keys work too). ``b2_bucket``/``b2_file_name`` are
    filled in by :meth:`Storage.put`, which knows where the file went.
    """
    metrics = {str(k).lower(): v for k, v in (metrics or {}).items()}
    return {
        "musetalk_job_id": musetalk_job_id,
        "queue_job_id": queue_job_id,
        "gpu_class": gpu_class,
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "generation_time_sec": metrics.get("generation_time_sec"),
        "script_wall_time_sec": metrics.get("script_wall_time_sec"),
        "peak_vram_mib": metrics.get("peak_vram_mib"),
        "peak_ram_kb": metrics.get("peak_ram_kb"),
        "b2_bucket": b2_bucket,
        "b2_file_name": b2_file_name,
        "create_time_utc": create_time_utc or utc_now_iso(),
    }


def _sidecar_bytes(sidecar: Mapping[str, Any], bucket: str, file_name: str) -> bytes:
    body = dict(sidecar)
    body["b2_bucket"], body["b2_file_name"] = bucket, file_name
    body.setdefault("create_time_utc", utc_now_iso())
    return json.dumps(body, indent=2, default=str).encode("utf-8")


def _require_file(video_path: Path) -> Path:
    path = Path(video_path)
    if not path.is_file():
        raise ProcessingError(f"rendered video {str(path)!r} is missing", stage="upload", retryable=False)
    return path


def _run_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout`` s (b2sdk calls have no overall deadline).

    A timed-out call keeps running in the background; that is harmless because keys are deterministic and
    a later attempt writes the same bytes.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"storage-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise ProcessingError(f"{what} did not finish within {timeout:g} s", stage="upload", retryable=True)
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------------------------------------ B2

# Failures that another attempt cannot fix: wrong credentials, missing bucket, key without access.
_CONFIG_ERRORS = (Unauthorized, AccessDenied, NonExistentBucket, RestrictedBucket)


class B2Storage:
    """Results on Backblaze B2 through b2sdk (its own per-request retries apply inside our deadline)."""

    def __init__(self, api: B2Api, bucket_name: str, prefix: str = DEFAULT_PREFIX, *,
                 upload_timeout: float = 300.0, model_version: str = MODEL_VERSION,
                 authorize: Callable[[], None] | None = None, secrets: tuple[str, ...] = ()):
        self.api = api
        self.bucket_name = bucket_name
        self.prefix = _clean_prefix(prefix)
        self.upload_timeout = upload_timeout
        self.model_version = model_version
        self._authorize = authorize
        self._secrets = secrets
        self._bucket_obj: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"B2Storage(bucket={self.bucket_name!r}, prefix={self.prefix!r})"

    @classmethod
    def from_credentials(cls, key_id: str, app_key: SecretStr | str, bucket: str,
                         prefix: str = DEFAULT_PREFIX, *, api: B2Api | None = None,
                         upload_timeout: float = 300.0) -> "B2Storage":
        """A storage that authorizes on first use (so building one never touches the network).

        ``api`` defaults to a fresh ``B2Api(InMemoryAccountInfo())``; tests pass one on b2sdk's simulator.
        """
        key = app_key if isinstance(app_key, SecretStr) else SecretStr(app_key)
        api = api or B2Api(InMemoryAccountInfo())

        def authorize() -> None:
            api.authorize_account("production", key_id, key.get_secret_value())

        return cls(api, bucket, prefix, upload_timeout=upload_timeout, authorize=authorize,
                   secrets=(key.get_secret_value(),))

    def keys(self, job_id: str) -> tuple[str, str]:
        return result_keys(self.prefix, job_id)

    def _bucket(self) -> Any:
        with self._lock:
            if self._bucket_obj is None:
                if self._authorize is not None:
                    try:
                        self._authorize()
                    except (Unauthorized, AccessDenied) as exc:
                        # At sign-in even "invalid token" means wrong credentials: no retry will help.
                        error = self._error(exc, "authorization")
                        error.retryable = False
                        raise error from None  # see _call: the raw error may quote the key
                    self._authorize = None
                self._bucket_obj = self.api.get_bucket_by_name(self.bucket_name)
            return self._bucket_obj

    def _result(self, video_key: str, sidecar_key: str) -> StoredResult:
        url = self.api.get_download_url_for_file_name(self.bucket_name, video_key)
        return StoredResult(self.bucket_name, video_key, url, sidecar_key)

    def _error(self, exc: BaseException, what: str) -> ProcessingError:
        retryable = isinstance(exc, InvalidAuthToken) or not isinstance(exc, _CONFIG_ERRORS)
        text = redact(f"{type(exc).__name__}: {exc}", [*self._secrets, *secret_values()])
        text = " ".join(text.split())[:300]  # b2sdk lists retried errors one per line: keep one line
        return ProcessingError(f"B2 {what} failed: {text}", stage="upload", retryable=retryable,
                               details={"bucket": self.bucket_name})

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return _run_with_deadline(fn, self.upload_timeout, f"B2 {what}")
        except ProcessingError:
            raise
        except FileNotPresent:
            raise
        except Exception as exc:  # b2sdk errors, and requests/OS errors it did not translate
            # "from None": a chained cause is printed in full by every traceback (Prefect's task-run
            # logs, stored on its server), unredacted; _error already carries its type and scrubbed text.
            raise self._error(exc, what) from None

    def put(self, job_id: str, video_path: Path, sidecar: dict[str, Any]) -> StoredResult:
        """Upload the video, then the sidecar; ProcessingError(stage upload) on failure or timeout."""
        video_key, sidecar_key = self.keys(job_id)
        path = _require_file(video_path)
        body = _sidecar_bytes(sidecar, self.bucket_name, video_key)

        def upload() -> None:
            bucket = self._bucket()
            bucket.upload_local_file(local_file=str(path), file_name=video_key, content_type="video/mp4",
                                     file_info={"musetalk_job_id": job_id,
                                                "model_version": self.model_version})
            bucket.upload_bytes(body, sidecar_key, content_type="application/json",
                                file_info={"musetalk_job_id": job_id})

        self._call(upload, f"upload of {video_key}")
        log.info("uploaded %s and %s to B2 bucket %s", video_key, sidecar_key, self.bucket_name)
        return self._result(video_key, sidecar_key)

    def exists(self, job_id: str) -> StoredResult | None:
        """The stored result when both the sidecar and the video are present, else None."""
        video_key, sidecar_key = self.keys(job_id)

        def look() -> None:
            bucket = self._bucket()
            bucket.get_file_info_by_name(sidecar_key)
            bucket.get_file_info_by_name(video_key)

        try:
            self._call(look, f"lookup of {video_key}")
        except FileNotPresent:
            return None
        return self._result(video_key, sidecar_key)


# --------------------------------------------------------------------------------------------- local


class LocalStorage:
    """Results in a directory, same layout as B2; files appear atomically (temp name + ``os.replace``)."""

    bucket = LOCAL_BUCKET

    def __init__(self, root: Path, prefix: str = DEFAULT_PREFIX):
        self.root = Path(root)
        self.prefix = _clean_prefix(prefix)

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r}, prefix={self.prefix!r})"

    def keys(self, job_id: str) -> tuple[str, str]:
        return result_keys(self.prefix, job_id)

    def _result(self, video_key: str, sidecar_key: str) -> StoredResult:
        url = (self.root / video_key).resolve().as_uri()
        return StoredResult(self.bucket, video_key, url, sidecar_key)

    def put(self, job_id: str, video_path: Path, sidecar: dict[str, Any]) -> StoredResult:
        """Copy the video, then write the sidecar; ProcessingError(stage upload) on disk errors."""
        video_key, sidecar_key = self.keys(job_id)
        path = _require_file(video_path)
        body = _sidecar_bytes(sidecar, self.bucket, video_key)
        video_dest, sidecar_dest = self.root / video_key, self.root / sidecar_key
        try:
            video_dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(video_dest, lambda tmp: shutil.copyfile(path, tmp))
            atomic_write(sidecar_dest, lambda tmp: tmp.write_bytes(body))
        except OSError as exc:
            raise ProcessingError(f"could not store the result locally: {exc.strerror or exc}",
                                  stage="upload", retryable=True) from exc
        log.info("stored %s and %s under %s", video_key, sidecar_key, self.root)
        return self._result(video_key, sidecar_key)

    def exists(self, job_id: str) -> StoredResult | None:
        video_key, sidecar_key = self.keys(job_id)
        if (self.root / sidecar_key).is_file() and (self.root / video_key).is_file():
            return self._result(video_key, sidecar_key)
        return None


# ----------------------------------------------------------------------------------- factory + task


# One B2Storage per configuration for the whole process: a fresh B2Api per job would sign in to B2 again
# (a round trip, a billed call) and start its own pool of 10 upload threads, which lingers until the
# garbage collector breaks the api's reference cycles (the soak saw +10 threads per job, 22 → 52).
_b2_storages: dict[tuple, "B2Storage"] = {}
_b2_lock = threading.Lock()


def clear_storage_cache() -> None:
    """Forget the process's B2 storages (tests that swap the B2 backend call this)."""
    with _b2_lock:
        _b2_storages.clear()


def storage_from_settings(settings: Settings | None = None) -> Storage:
    """B2 when key id, app key and bucket are set (one shared storage per configuration); else local
    under ``{WORKDIR}/{RESULT_DIR}``."""
    settings = settings or get_settings()
    if settings.b2_enabled:
        assert settings.b2_key_id and settings.b2_app_key and settings.b2_bucket_name
        secret = hashlib.sha256(settings.b2_app_key.get_secret_value().encode()).hexdigest()  # key rotation
        key = (settings.b2_key_id, secret, settings.b2_bucket_name, settings.b2_prefix,
               settings.musetalk_b2_upload_timeout_sec)
        with _b2_lock:
            storage = _b2_storages.get(key)
            if storage is None:
                storage = _b2_storages[key] = B2Storage.from_credentials(
                    settings.b2_key_id, settings.b2_app_key, settings.b2_bucket_name, settings.b2_prefix,
                    upload_timeout=settings.musetalk_b2_upload_timeout_sec)
        return storage
    return LocalStorage(settings.result_root, settings.b2_prefix)


def retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only a ``ProcessingError`` marked retryable."""
    try:
        state.result()
    except ProcessingError as exc:
        return exc.retryable
    except BaseException:  # noqa: BLE001 - anything else is not ours to retry
        return False
    return False


@task(name="upload-result", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_condition_fn=retry_if_retryable, cache_policy=NO_CACHE)
def upload_result(job_id: str, video_path: Path, sidecar: dict[str, Any],
                  storage: Storage | None = None) -> StoredResult:
    """Store one job's video and sidecar (storage from the environment unless given)."""
    return (storage or storage_from_settings()).put(job_id, video_path, sidecar)
