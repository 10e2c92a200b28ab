"""Result storage on b2sdk's in-memory B2 simulator and in a local directory."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator
from b2sdk.v2.exception import ServiceError
from prefect.states import Failed
from pydantic import SecretStr

from musetalk_engine import MODEL_VERSION
from musetalk_engine.errors import MediaError, ProcessingError
from tasks.settings import Settings
from tasks.storage import (SIDECAR_FIELDS, B2Storage, LocalStorage, Storage, build_sidecar,
                           _run_with_deadline, retry_if_retryable, safe_job_id, storage_from_settings, upload_result)

BUCKET = "musetalk-results"
PREFIX = "avatar/outputs"


@pytest.fixture
def b2():
    """(api, raw simulator, key id, key) with one bucket; one simulator per test."""
    api = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
    raw = api.session.raw_api
    key_id, key = raw.create_account()
    api.authorize_account("production", key_id, key)
    api.create_bucket(BUCKET, "allPrivate")
    return api, raw, key_id, key


@pytest.fixture
def video(tmp_path) -> Path:
    path = tmp_path / "render.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return path


def _sidecar(job_id: str) -> dict:
    return build_sidecar(job_id, queue_job_id="q-1", gpu_class="RTX 4090 (24 GB)", aspect_ratio="9:16",
                         resolution="720p",
                         metrics={"GENERATION_TIME_SEC": 4.5, "SCRIPT_WALL_TIME_SEC": 6.0,
                                  "PEAK_VRAM_MIB": 5120, "PEAK_RAM_KB": 900000, "stage_times": {"x": 1}})


def _download(api: B2Api, name: str) -> bytes:
    buf = io.BytesIO()
    api.get_bucket_by_name(BUCKET).download_file_by_name(name).save(buf)
    return buf.getvalue()


def test_build_sidecar_has_exactly_design_fields():
    sidecar = _sidecar("job-1")
    assert tuple(sidecar) == SIDECAR_FIELDS
    assert sidecar["generation_time_sec"] == 4.5 and sidecar["peak_ram_kb"] == 900000
    assert sidecar["create_time_utc"].endswith("Z")


def test_b2_put_writes_video_then_sidecar_with_metadata(b2, video):
    api, _, _, _ = b2
    storage = B2Storage(api, BUCKET, PREFIX)
    assert isinstance(storage, Storage)
    assert storage.exists("job-1") is None

    result = storage.put("job-1", video, _sidecar("job-1"))

    assert (result.bucket, result.file_name, result.sidecar_name) == (
        BUCKET, f"{PREFIX}/job-1.mp4", f"{PREFIX}/job-1.json")
    assert result.output_url == api.get_download_url_for_file_name(BUCKET, f"{PREFIX}/job-1.mp4")
    bucket = api.get_bucket_by_name(BUCKET)
    info = bucket.get_file_info_by_name(f"{PREFIX}/job-1.mp4")
    assert info.content_type == "video/mp4"
    # (b2sdk adds large_file_sha1 when it splits the upload into parts)
    assert info.file_info.items() >= {"musetalk_job_id": "job-1", "model_version": MODEL_VERSION}.items()
    assert bucket.get_file_info_by_name(f"{PREFIX}/job-1.json").content_type == "application/json"
    assert _download(api, f"{PREFIX}/job-1.mp4") == video.read_bytes()

    sidecar = json.loads(_download(api, f"{PREFIX}/job-1.json"))
    assert tuple(sidecar) == SIDECAR_FIELDS
    assert (sidecar["b2_bucket"], sidecar["b2_file_name"]) == (BUCKET, f"{PREFIX}/job-1.mp4")
    assert sidecar["musetalk_job_id"] == "job-1" and sidecar["queue_job_id"] == "q-1"

    listed = {fv.file_name: fv.upload_timestamp for fv, _ in bucket.ls(PREFIX, recursive=True)}
    assert sorted(listed) == [f"{PREFIX}/job-1.json", f"{PREFIX}/job-1.mp4"]
    assert listed[f"{PREFIX}/job-1.mp4"] < listed[f"{PREFIX}/job-1.json"]  # video first, sidecar second
    assert storage.exists("job-1") == result


def test_b2_reupload_overwrites_same_names(b2, video, tmp_path):
    api, _, _, _ = b2
    storage = B2Storage(api, BUCKET, PREFIX)
    first = storage.put("job-2", video, _sidecar("job-2"))
    newer = tmp_path / "newer.mp4"
    newer.write_bytes(b"\x00\x00\x00\x18ftypmp42 second render" * 20)
    second = storage.put("job-2", newer, _sidecar("job-2"))

    assert second == first  # deterministic keys
    assert _download(api, f"{PREFIX}/job-2.mp4") == newer.read_bytes()  # latest version is the new one
    bucket = api.get_bucket_by_name(BUCKET)
    latest = [fv.file_name for fv, _ in bucket.ls(PREFIX, recursive=True)]
    assert latest == [f"{PREFIX}/job-2.json", f"{PREFIX}/job-2.mp4"]  # no duplicate names
    versions = list(bucket.list_file_versions(f"{PREFIX}/job-2.mp4"))
    assert len(versions) == 2 and versions[0].size == newer.stat().st_size  # newest first


def test_b2_from_credentials_authorizes_lazily(b2, video):
    api, _, key_id, key = b2
    fresh = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
    fresh.session.raw_api = api.session.raw_api  # same simulated account
    storage = B2Storage.from_credentials(key_id, SecretStr(key), BUCKET, "/custom/prefix/", api=fresh)
    assert key not in repr(storage)
    result = storage.put("job-3", video, _sidecar("job-3"))
    assert result.file_name == "custom/prefix/job-3.mp4"


def test_b2_failure_is_retryable_processing_error(b2, video):
    api, raw, _, _ = b2
    storage = B2Storage(api, BUCKET, PREFIX)
    # b2sdk retries an upload 5 times itself; fail them all.
    raw.set_upload_errors([ServiceError("503 service_unavailable") for _ in range(5)])
    with pytest.raises(ProcessingError) as info:
        storage.put("job-4", video, _sidecar("job-4"))
    assert info.value.stage == "upload" and info.value.retryable
    assert storage.exists("job-4") is None


def test_b2_missing_bucket_is_not_retryable(b2, video):
    api, _, _, _ = b2
    with pytest.raises(ProcessingError) as info:
        B2Storage(api, "no-such-bucket", PREFIX).put("job-5", video, _sidecar("job-5"))
    assert info.value.stage == "upload" and not info.value.retryable


def test_upload_deadline_bounds_a_hung_call():
    release = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(ProcessingError, match="within 0.2 s") as info:
            _run_with_deadline(lambda: release.wait(10), 0.2, "B2 upload of x")
        assert time.monotonic() - started < 5  # cut off at 0.2 s (slack for a loaded machine), not after 10
        assert info.value.retryable and info.value.stage == "upload"
    finally:
        release.set()
    assert _run_with_deadline(lambda: 42, 1, "quick") == 42
    with pytest.raises(KeyError):  # the worker's own exception reaches the caller
        _run_with_deadline(lambda: {}["x"], 1, "broken")


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a\\b", "..", ".hidden", "x" * 129, "a\nb",
                                 "job id", "a..b", "ü"])
def test_unsafe_job_ids_rejected(bad, b2, video, tmp_path):
    with pytest.raises(MediaError) as info:
        safe_job_id(bad)
    assert info.value.stage == "validation"
    with pytest.raises(MediaError):
        B2Storage(b2[0], BUCKET, PREFIX).put(bad, video, {})
    with pytest.raises(MediaError):
        LocalStorage(tmp_path / "out", PREFIX).put(bad, video, {})
    assert not (tmp_path / "out").exists()


def test_safe_job_ids_accepted():
    for ok in ("job-1", "3f2a9c1e-aaaa-bbbb-cccc-1234567890ab", "A.b_c-9", "x" * 128):
        assert safe_job_id(ok) == ok


def test_local_storage_same_layout_atomic(tmp_path, video):
    root = tmp_path / "results"
    storage = LocalStorage(root, PREFIX)
    assert storage.exists("job-7") is None
    result = storage.put("job-7", video, _sidecar("job-7"))

    assert (result.file_name, result.sidecar_name) == (f"{PREFIX}/job-7.mp4", f"{PREFIX}/job-7.json")
    assert result.output_url == (root / PREFIX / "job-7.mp4").resolve().as_uri()
    assert (root / PREFIX / "job-7.mp4").read_bytes() == video.read_bytes()
    sidecar = json.loads((root / PREFIX / "job-7.json").read_text())
    assert tuple(sidecar) == SIDECAR_FIELDS and sidecar["b2_file_name"] == f"{PREFIX}/job-7.mp4"
    assert sorted(p.name for p in (root / PREFIX).iterdir()) == ["job-7.json", "job-7.mp4"]  # no temp left
    assert storage.exists("job-7") == result

    video.write_bytes(b"second render")
    storage.put("job-7", video, _sidecar("job-7"))
    assert (root / PREFIX / "job-7.mp4").read_bytes() == b"second render"


def test_local_storage_failure_leaves_no_partial_file(tmp_path, video):
    root = tmp_path / "results"
    (root / PREFIX).mkdir(parents=True)
    (root / PREFIX / "job-8.json").mkdir()  # the sidecar cannot replace a directory
    with pytest.raises(ProcessingError) as info:
        LocalStorage(root, PREFIX).put("job-8", video, _sidecar("job-8"))
    assert info.value.stage == "upload"
    assert not [p for p in (root / PREFIX).iterdir() if p.name.endswith(".part")]
    with pytest.raises(ProcessingError) as missing:
        LocalStorage(root, PREFIX).put("job-9", tmp_path / "nope.mp4", {})
    assert not missing.value.retryable


def test_storage_from_settings(tmp_path):
    local = storage_from_settings(Settings(musetalk_workdir=tmp_path, b2_key_id=None, b2_app_key=None))
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "results/job_queue"
    remote = storage_from_settings(Settings(b2_key_id="kid", b2_app_key="app-key-secret",
                                            b2_bucket_name="bkt", b2_prefix="p/q"))
    assert isinstance(remote, B2Storage) and (remote.bucket_name, remote.prefix) == ("bkt", "p/q")
    assert "app-key-secret" not in repr(remote)


def test_upload_result_task_and_retry_condition(tmp_path, video):
    result = upload_result.fn("job-10", video, _sidecar("job-10"), LocalStorage(tmp_path, PREFIX))
    assert result.file_name == f"{PREFIX}/job-10.mp4"
    assert upload_result.retries == 2 and upload_result.retry_condition_fn is retry_if_retryable
    assert retry_if_retryable(None, None, Failed(data=ProcessingError("x", stage="upload", retryable=True)))
    assert not retry_if_retryable(None, None, Failed(data=ProcessingError("x", stage="upload",
                                                                         retryable=False)))
    assert not retry_if_retryable(None, None, Failed(data=MediaError("bad id", stage="validation")))


def test_b2_bad_credentials_not_retryable_and_key_not_leaked(b2, video):
    api, _, key_id, _ = b2
    fresh = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
    fresh.session.raw_api = api.session.raw_api
    wrong = "wrong-application-key-123"
    storage = B2Storage.from_credentials(key_id, SecretStr(wrong), BUCKET, PREFIX, api=fresh)
    with pytest.raises(ProcessingError) as info:
        storage.put("job-11", video, _sidecar("job-11"))
    assert info.value.stage == "upload" and not info.value.retryable
    assert wrong not in str(info.value) and wrong not in str(info.value.details)
