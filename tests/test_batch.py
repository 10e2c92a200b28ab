"""The `batch` flow, in-process on a temporary Prefect server: grouping, failure isolation, results CSV and
table artifact, one engine load, idempotent re-runs, Prefect's avatar cache across flow runs; plus fast
unit tests of manifest parsing and share splitting."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest

from flows.batch import (ARTIFACT_KEY, COLUMNS, gather_share, group_by_avatar, load_manifest,
                         split_shares)
from musetalk_engine.sample_media import make_avatar_video, make_speech
from tests.hostile_media import worker_env

pytest_plugins = ["tests.fixtures_engine"]

# --------------------------------------------------------------------------------- manifest (fast)

JOB = {"musetalk_job_id": "a", "video_url": "v.mp4", "audio_url": "a.wav"}


def test_manifest_from_list_and_inline_json():
    assert load_manifest([JOB]) == [JOB]
    assert load_manifest(json.dumps([JOB])) == [JOB]
    assert load_manifest(json.dumps({"jobs": [JOB]})) == [JOB]
    with pytest.raises(ValueError, match="item 1"):
        load_manifest([JOB, "not a job"])


def test_manifest_from_csv(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text("musetalk_job_id,video_url,audio_url,aspect_ratio,resolution,params\n"
                    'j1,https://x/v.mp4,https://x/a.wav,9:16,720p,"{""batch_size"": 4}"\n'
                    "j2, v2.mp4 ,a2.wav,,,\n"
                    "j3,v3.mp4,a3.wav,,,{not json\n")
    jobs = load_manifest(str(path))
    assert jobs[0] == {"musetalk_job_id": "j1", "video_url": "https://x/v.mp4", "audio_url": "https://x/a.wav",
                       "aspect_ratio": "9:16", "resolution": "720p", "params": {"batch_size": 4}}
    # empty cells are absent (defaults apply) and cells are stripped
    assert jobs[1] == {"musetalk_job_id": "j2", "video_url": "v2.mp4", "audio_url": "a2.wav"}
    # an unreadable params cell stays text: that one job fails validation, not the whole batch
    assert jobs[2]["params"] == "{not json"
    assert all(isinstance(j["musetalk_job_id"], str) for j in jobs)


def test_manifest_from_jsonl(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(JOB) + "\n\n# a comment\n" + json.dumps({**JOB, "musetalk_job_id": "b"}) + "\n")
    assert [j["musetalk_job_id"] for j in load_manifest(path)] == ["a", "b"]
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(JOB) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2"):
        load_manifest(bad)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        load_manifest(bad)


def test_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(str(tmp_path / "missing.csv"))
    (tmp_path / "jobs.txt").write_text("x")
    with pytest.raises(ValueError, match="use .csv"):
        load_manifest(tmp_path / "jobs.txt")
    (tmp_path / "jobs.json").write_text('{"no": "jobs"}')
    with pytest.raises(ValueError, match="list of jobs"):
        load_manifest(tmp_path / "jobs.json")


def test_grouping_keeps_first_appearance_order():
    jobs = [{"musetalk_job_id": str(i), "video_url": v} for i, v in enumerate("abacba")]
    ordered = group_by_avatar(jobs)
    assert [(i, j["video_url"]) for i, j in ordered] == [(0, "a"), (2, "a"), (5, "a"), (1, "b"), (4, "b"),
                                                          (3, "c")]


def test_split_shares_is_contiguous_and_balanced():
    assert split_shares(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_shares(list(range(2)), 5) == [[0], [1]]  # never an empty share
    assert split_shares(list(range(4)), 1) == [[0, 1, 2, 3]]
    assert split_shares([], 3) == [[]]


def test_lost_share_becomes_failed_rows():
    share = [(4, {"musetalk_job_id": "x", "video_url": "https://h/v.mp4?sig=SECRET"})]
    rows, finished = gather_share(share, None, 30)
    assert not finished
    assert rows[0]["index"] == 4 and rows[0]["status"] == "failed" and rows[0]["retryable"] is True
    assert "did not finish within 30s" in rows[0]["error_message"]
    assert rows[0]["video"] == "https://h/v.mp4"  # the query string (a credential) never reaches the table
    assert set(rows[0]) == set(COLUMNS)


def test_child_rows_map_back_to_the_parent_manifest(monkeypatch):
    from types import SimpleNamespace

    from prefect.states import Completed, Failed

    import flows.batch as batch_mod

    share = [(7, {"musetalk_job_id": "p"}), (2, {"musetalk_job_id": "q"})]
    child_rows = [{**dict.fromkeys(COLUMNS), "index": 1, "musetalk_job_id": "q", "status": "failed"},
                  {**dict.fromkeys(COLUMNS), "index": 0, "musetalk_job_id": "p", "status": "ok"}]
    monkeypatch.setattr(batch_mod, "artifact_rows", lambda run_id: child_rows)
    run = SimpleNamespace(id="r", name="child-1", state=Completed())
    rows, finished = gather_share(share, run, 60)
    assert finished and [(r["index"], r["musetalk_job_id"], r["share"]) for r in rows] == \
        [(7, "p", "child-1"), (2, "q", "child-1")]
    # a child that ended Incomplete (its machinery broke): its rows count, but the batch is incomplete
    rows, finished = gather_share(share, SimpleNamespace(id="r", name="child-1",
                                                         state=Failed(name="Incomplete")), 60)
    assert not finished and len(rows) == 2
    # one that ended Failed because every one of its jobs failed did its work
    rows, finished = gather_share(share, SimpleNamespace(id="r", name="child-1", state=Failed()), 60)
    assert finished and len(rows) == 2
    # ... and without a table every job of the share is a failed row naming the child
    monkeypatch.setattr(batch_mod, "artifact_rows", lambda run_id: None)
    rows, finished = gather_share(share, SimpleNamespace(id="r", name="child-1", state=Failed(message="boom")), 60)
    assert not finished and [r["status"] for r in rows] == ["failed", "failed"]
    assert "child-1 ended Failed" in rows[0]["error_message"] and "boom" in rows[0]["error_message"]


# ---------------------------------------------------------------------------------- flow (slow)

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict[str, Path]:
    """The shortest media that exercises everything (0.4 s 256×256 avatar, 0.5 s speech): seconds a job."""
    d = tmp_path_factory.mktemp("batch-media")
    return {"video": make_avatar_video(d / "avatar.mp4", seconds=0.4, width=256, height=256),
            "speech": make_speech(d / "speech.wav", seconds=0.5)}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    from tasks.settings import get_settings

    work = tmp_path_factory.mktemp("batch-work")
    mp = pytest.MonkeyPatch()
    worker_env(mp, work, tiny_models, MUSETALK_ALLOW_LOCAL_FILES="true")
    yield work
    mp.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def deployed(env):
    """Every deployment of prefect.yaml, the GPU ones in a pool no worker serves: (pool, ids). Made once:
    each deploy runs Prefect's CLI in a fresh interpreter, which imports the flows (seconds)."""
    from deployments.workpool import deploy

    return "gpu-nobody", deploy(pool="gpu-nobody")


@pytest.fixture(scope="module")
def first_run(env, clip):
    """Three jobs in manifest order A, BAD, B; A and B share the avatar video; BAD's video is missing."""
    from flows.batch import batch
    from musetalk_engine.engine import Engine

    video, speech = str(clip["video"]), str(clip["speech"])
    jobs = [{"musetalk_job_id": "job-a", "video_url": video, "audio_url": speech},
            {"musetalk_job_id": "job-bad", "video_url": str(env / "missing.mp4"), "audio_url": speech},
            {"musetalk_job_id": "job-b", "video_url": video, "audio_url": speech,
             "params": {"keep_source_size": True}}]
    loads = Engine.loads
    # fan_out without a deployment behind the run: the flow warns and renders everything here
    state = batch(jobs=jobs, fan_out=2, return_state=True)
    return state, Engine.loads - loads


def test_batch_isolates_failures_and_groups_avatars(first_run, env):
    state, loads = first_run
    assert state.is_completed() and state.name == "Partial", (state.name, state.message)
    summary = state.result()
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (3, 2, 1)
    assert summary["children"] == []
    # jobs sharing a video ran back to back: A, B, then the bad one
    assert [j["musetalk_job_id"] for j in summary["jobs"]] == ["job-a", "job-b", "job-bad"]
    bad = summary["jobs"][2]
    assert bad["status"] == "failed" and bad["http_status"] == 422 and bad["error_type"] == "media_error"
    assert "does not exist" in bad["error_message"]
    for job in summary["jobs"][:2]:
        assert job["status"] == "ok" and job["output_url"].startswith("file://") and job["time_s"] > 0
        out = env / "results" / "job_queue" / "avatar" / "outputs" / f"{job['musetalk_job_id']}.mp4"
        assert out.stat().st_size > 1000
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert sidecar["musetalk_job_id"] == job["musetalk_job_id"]
    # the engine was built at most once for the whole batch
    assert loads <= 1


def test_batch_writes_csv_and_table_artifact(first_run, env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, _ = first_run
    summary = state.result()
    csv = Path(summary["csv_path"])
    assert csv == env / "results" / "job_queue" / "batches" / f"{summary['flow_run_id']}.csv"
    frame = pd.read_csv(csv)
    assert len(frame) == 3 and list(frame.columns) == list(COLUMNS)
    assert sorted(frame["status"]) == ["failed", "ok", "ok"]
    # the second job of the avatar group found the avatar already prepared
    assert bool(frame.set_index("musetalk_job_id").loc["job-b", "avatar_cached"]) is True

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(summary["flow_run_id"])])))
    tables = [a for a in arts if a.key == ARTIFACT_KEY and a.type == "table"]
    assert len(tables) == 1
    rows = json.loads(tables[0].data)
    assert [r["musetalk_job_id"] for r in rows] == ["job-a", "job-b", "job-bad"]
    assert "2/3" in tables[0].description


def test_rerun_overwrites_and_avatar_task_is_cached(first_run, env, clip):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags

    from flows.batch import batch
    from musetalk_engine.engine import Engine

    out = env / "results" / "job_queue" / "avatar" / "outputs" / "job-a.mp4"
    before_sha, before_mtime = _sha(out), out.stat().st_mtime_ns
    speech = make_speech(env / "speech-short.wav", seconds=0.4)  # new content for the same job id
    loads = Engine.loads
    state = batch(jobs=[{"musetalk_job_id": "job-a", "video_url": str(clip["video"]), "audio_url": str(speech)}],
                  return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["succeeded"] == 1
    assert Engine.loads == loads  # the warm engine of the first batch served the second
    first = state.result()["jobs"][0]
    assert first["output_url"] == out.resolve().as_uri()  # same key as the first run's job-a
    assert _sha(out) != before_sha and out.stat().st_mtime_ns > before_mtime
    assert not list(out.parent.glob("job-a*.mp4"))[1:]  # overwritten, not duplicated

    with get_client(sync_client=True) as client:
        job_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"batch:{summary['flow_run_id']}"])))
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[r.id for r in job_runs])))
    avatar_runs = [r for r in runs if r.name.startswith("cache-avatar")]
    assert avatar_runs and all(r.state.name == "Cached" for r in avatar_runs), \
        [(r.name, r.state.name) for r in runs]


def _read_back(run_id: str):
    """The batch run, its job runs and every artifact of both, as the Prefect server has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        jobs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"batch:{run_id}"])))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id, *[j.id for j in jobs]])))
    return run, {j.name: j for j in jobs}, arts


def test_prefect_shows_each_job_with_progress_and_a_link(first_run):
    """Read back from the server: the batch ended Partial (2 of 3 ok); each job is its own run named by its
    id, failed when the job failed; each has a progress artifact at 100 % (or where it stopped) and the
    successful ones a link artifact to their video."""
    state, _ = first_run
    summary = state.result()
    run, jobs, arts = _read_back(summary["flow_run_id"])
    assert (run.state.type.value, run.state.name) == ("COMPLETED", "Partial")
    assert "2 of 3" in run.state.message
    assert set(jobs) == {"job-a", "job-b", "job-bad"}
    assert {n: j.state.type.value for n, j in jobs.items()} == {"job-a": "COMPLETED", "job-b": "COMPLETED",
                                                               "job-bad": "FAILED"}
    by_run = {}
    for a in arts:
        by_run.setdefault(a.flow_run_id, []).append(a)
    urls = {j["musetalk_job_id"]: j["output_url"] for j in summary["jobs"]}
    for name in ("job-a", "job-b"):
        kinds = {a.type: a for a in by_run[jobs[name].id]}
        assert float(kinds["progress"].data) == 100.0 and "completed" in kinds["progress"].description
        assert urls[name] in kinds["markdown"].data  # a link artifact is stored as markdown: [text](url)
    bad = {a.type: a for a in by_run[jobs["job-bad"].id]}
    assert "markdown" not in bad and "failed" in bad["progress"].description
    outputs = [a for a in by_run[run.id] if a.type == "markdown"]
    assert outputs and urls["job-a"] in outputs[0].data  # the batch links its videos, not a worker's CSV path


def test_batch_where_every_job_failed_ends_failed(env):
    from flows.batch import batch

    state = batch(jobs=[{"musetalk_job_id": "gone-1", "video_url": str(env / "gone.mp4"),
                         "audio_url": str(env / "gone.wav")}], return_state=True)
    run, jobs, _ = _read_back(state.result(raise_on_failure=False)["flow_run_id"])
    assert (run.state.type.value, run.state.name) == ("FAILED", "Failed") and "all 1 job(s) failed" in run.state.message
    assert jobs["gone-1"].state.type.value == "FAILED"


def test_batch_list_parameter_is_the_job_model():
    """The UI's Run form and the server's validation come from the flow's parameter schema."""
    from flows.batch import batch

    schema = batch.parameters.model_dump()
    jobs = schema["properties"]["jobs"]
    assert any(opt.get("type") == "array" and "$ref" in json.dumps(opt.get("items", {}))
               for opt in jobs["anyOf"]), jobs
    assert "JobRequest" in schema["definitions"]
    assert set(schema["definitions"]["JobRequest"]["required"]) == {"musetalk_job_id", "video_url", "audio_url"}
    from flows.generate import generate

    one = generate.parameters.model_dump()
    assert "JobRequest" in json.dumps(one["properties"]["job"]) and "JobRequest" in one["definitions"]


def test_fan_out_is_capped_by_online_workers():
    from flows.batch import capped_fan_out

    assert capped_fan_out(3, None) == 3  # not from a pool: the caller named the deployment
    assert capped_fan_out(3, 1) == 0  # only this run's own worker is online: nothing can take a child
    assert capped_fan_out(3, 3) == 2 and capped_fan_out(1, 5) == 1


def test_unclaimed_child_share_is_rendered_by_the_parent(env, clip, deployed):
    """fan_out to a deployment no worker serves: the child stays Scheduled, so the parent cancels it and
    renders its share itself instead of waiting (the default wait was 45 minutes)."""
    from prefect.client.orchestration import get_client

    from flows.batch import batch

    jobs = [{"musetalk_job_id": f"fan-{n}", "video_url": str(clip["video"]), "audio_url": str(clip["speech"])}
            for n in range(2)]
    started = time.monotonic()
    state = batch(jobs=jobs, fan_out=1, deployment="batch/gpu", wait_timeout_s=600, pickup_timeout_s=1,
                  return_state=True)
    assert time.monotonic() - started < 300
    summary = state.result()
    assert state.is_completed() and state.name == "Completed", state.message
    assert summary["succeeded"] == 2 and len(summary["children"]) == 1
    child = summary["children"][0]
    assert child["rendered_by_parent"] is True
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(child["flow_run_id"])).state.type.value == "CANCELLED"


def test_cli_batch_reports_failures(env, tmp_path, capsys):
    """`musetalk-flow batch manifest.jsonl` runs the flow here and exits 1 when a job failed."""
    from deployments.cli import main

    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"musetalk_job_id": "cli-bad", "video_url": str(env / "nope.mp4"),
                                    "audio_url": str(env / "nope.wav")}) + "\n")
    assert main(["batch", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "cli-bad: failed" in out and "0/1 ok" in out


# --------------------------------------------------------------------- deployments (Python API)

def test_workpool_deploy_creates_pool_queues_and_deployments(env, deployed):
    """`deployments.workpool.deploy` against the temporary server: idempotent, prioritised queues, every
    deployment of prefect.yaml (the one definition) with the pull step that finds the project on any
    machine, entrypoints relative to it."""
    from prefect.client.orchestration import get_client

    from deployments.workpool import (CONTROL_POOL, PULL_STEP, deploy, enter_repo, load_definition,
                                      repo_root)

    definition = load_definition()
    pool, ids = deployed
    assert deploy(pool=pool) == ids  # a second deploy updates in place
    assert {"generate/gpu", "generate/urgent", "batch/gpu", "batch/urgent", "generate/buffer",
            "generate/salad", "scale/salad-autoscale"} <= set(ids)
    assert len(ids) == len(definition["deployments"])
    assert definition["pull"] == [{PULL_STEP: {}}]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
        queues = {q.name: q.priority for q in client.read_work_queues(work_pool_name=pool)}
        assert queues == {"urgent": 1, "default": 10}
        assert {q.name for q in client.read_work_queues(work_pool_name=CONTROL_POOL)} == {"default"}
        for full_name, deployment_id in ids.items():
            d = client.read_deployment(deployment_id)
            assert f"{client.read_flow(d.flow_id).name}/{d.name}" == full_name
            spec = next(e for e in definition["deployments"]
                        if e["entrypoint"] == d.entrypoint and e["name"] == d.name)
            named = spec["work_pool"]["name"]
            assert d.work_pool_name == (pool if named == "gpu" else named)
            assert d.work_queue_name == spec["work_pool"]["work_queue_name"]
            assert d.pull_steps == [{PULL_STEP: {}}]
            assert (repo_root() / d.entrypoint.split(":")[0]).is_file()
    cwd = os.getcwd()
    try:
        assert enter_repo() == {"directory": str(repo_root())} and Path.cwd() == repo_root()
    finally:
        os.chdir(cwd)
