"""`musetalk-flow`: the project's command line (render, models, demo, and the long-lived services)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import tempfile
from pathlib import Path


log = logging.getLogger(__name__)


def _engine(args):
    from musetalk_engine.engine import Engine, EngineConfig

    cfg = EngineConfig(models_dir=args.models, device=args.device, landmarks=args.landmarks,
                       batch_size=args.batch_size, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    return Engine(cfg)


def _render(engine, video: Path, audio: Path, out: Path) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=None, unit="frame", desc="render", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = engine.render(video, audio, out, on_progress=progress)
    finally:
        bar.close()
    m = result.metrics
    print(f"{out}: {result.frames} frames, {result.duration_s:.2f}s, {m.fps:.1f} fps, wall {m.wall_s:.2f}s, "
          f"avatar {'cached' if m.avatar_cached else 'prepared'}, {m.device}/{m.dtype}, batch {m.batch_size}, "
          f"{m.encoder}, peak RSS {m.peak_rss_kb // 1024} MiB, stages {json.dumps(m.stage_times)}")
    return m.as_dict()


def cmd_generate(args) -> int:
    _render(_engine(args), Path(args.video), Path(args.audio), Path(args.out))
    return 0


def cmd_demo(args) -> int:
    """Everything made here: tiny random models, an astronaut clip, espeak speech; then one render."""
    from musetalk_engine.sample_media import make_avatar_video, make_speech
    from musetalk_engine.tiny import make_models
    from musetalk_engine.weights import ModelPaths, missing_files

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.models == Path("models") and missing_files(ModelPaths(args.models)):
        args.models = work / "tiny-models"
        if missing_files(ModelPaths(args.models)):
            print(f"writing tiny random-weight models to {args.models}")
            make_models(args.models, "tiny")
    video = make_avatar_video(work / "avatar.mp4", seconds=2.0, width=360, height=360)
    audio = make_speech(work / "speech.wav", seconds=4.0)
    _render(_engine(args), video, audio, Path(args.out))
    return 0


def cmd_models(args) -> int:
    from musetalk_engine.weights import ModelPaths, missing_files

    if args.action == "make-tiny":
        from musetalk_engine.tiny import make_models

        make_models(args.dir, "full" if args.full else "tiny")
        print(f"wrote {'full-size' if args.full else 'tiny'} random-weight models to {args.dir}")
        return 0
    if args.action == "download":
        from musetalk_engine.download import download_models

        for p in download_models(args.dir):
            print(f"downloaded {p}")
    missing = missing_files(ModelPaths(Path(args.dir)))
    for p in missing:
        print(f"missing: {p}", file=sys.stderr)
    if not missing:
        print(f"{args.dir}: all required model files present")
    return 1 if missing else 0


def _catch_stop_signals() -> threading.Event:
    """SIGTERM/SIGINT from now on only set the returned event: a service signalled while torch and Prefect
    still import (seconds) then ends cleanly before it starts anything, instead of dying half-started.
    The server installs its own handlers once it runs."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_serve(args) -> int:
    """The long-lived worker: HTTP /hc + /generate, and the buffer loop when BUFFER_WORKER_ID is set."""
    from deployments.serve import serve

    return serve(args.host, args.port, log_level=args.log_level, stop_requested=args.stop_requested)


def cmd_batch(args) -> int:
    """Run a manifest here (in-process, warm engine) or hand it to a `batch/<name>` deployment."""
    from flows.batch import load_manifest

    jobs = load_manifest(args.manifest)  # parsed here: the manifest file need not exist on the workers
    if args.submit:
        from prefect.deployments import run_deployment

        name = args.submit if "/" in args.submit else f"batch/{args.submit}"
        run = run_deployment(name, parameters={"jobs": jobs, "fan_out": args.fan_out}, timeout=0)
        print(f"submitted {len(jobs)} job(s) to {name}: flow run {run.name} ({run.id})")
        return 0
    from flows.batch import batch

    state = batch(jobs=jobs, fan_out=args.fan_out, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        print(f"batch {state.name}: {state.message}", file=sys.stderr)
        return 2
    for job in summary["jobs"]:
        print(f"{job['musetalk_job_id']}: {job['status']} {job['output_url'] or job['error_message']} "
              f"({job['time_s']}s)")
    print(f"{summary['succeeded']}/{summary['total']} ok; results {summary['csv_path']}")
    return 0 if state.is_completed() and summary["failed"] == 0 else 1


def cmd_orchestrator(args) -> int:
    """The control plane's HTTP API (DESIGN §11) against the Prefect server of PREFECT_API_URL."""
    import uvicorn
    from prefect.settings import PREFECT_API_URL

    from orchestrator.api import create_app

    if not PREFECT_API_URL.value():
        log.warning("PREFECT_API_URL is not set: the orchestrator uses a temporary Prefect server, and every "
                    "job is lost when it stops (set PREFECT_API_URL, or use musetalk-flow up)")
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_up(args) -> int:
    """Prefect, the orchestrator and a local worker on this machine (see deployments/up.py)."""
    from deployments.up import up

    return up(host=args.host, port=args.port, worker_port=args.worker_port, prefect_port=args.prefect_port,
              log_dir=Path(args.log_dir), tiny=args.tiny, gpu_worker=args.gpu_worker)


def cmd_deploy(args) -> int:
    """Work pool, prioritised queues and the generate/batch deployments on the Prefect server."""
    from deployments.workpool import deploy

    for name, deployment_id in deploy(args.pool, pool_limit=args.pool_limit).items():
        print(f"deployed {name} ({deployment_id}) to work pool {args.pool!r}")
    from deployments.scale_schedule import CONTROL_POOL, INTERVAL_S, deploy_scale

    scale_id = deploy_scale(CONTROL_POOL, targets_path=args.targets)
    print(f"deployed scale/salad-autoscale ({scale_id}) every {INTERVAL_S:g} s to work pool {CONTROL_POOL!r}")
    print(f"start one worker per GPU: prefect worker start --pool {args.pool} --limit 1")
    print(f"start the control-plane worker where SALAD_* are set: prefect worker start --pool {CONTROL_POOL}")
    return 0


def cmd_salad(args) -> int:
    """Create or update each GPU class's Salad queue and container group (idempotent)."""
    import os

    from tasks.salad import ENV_API_KEY, salad_client_from_env
    from tasks.salad_provision import ProvisionConfig, provision, worker_environment
    from tasks.scaling import read_targets

    config = ProvisionConfig(image=args.image, cpu=args.cpu, memory_mb=args.memory_mb,
                             environment=worker_environment())
    targets = read_targets(args.targets)
    # A dry run without credentials still prints the plan (everything to create).
    client = salad_client_from_env() if (os.environ.get(ENV_API_KEY) or not args.dry_run) else None
    try:
        actions = provision(client, targets, config, dry_run=args.dry_run, class_ids=args.class_ids or None)
    finally:
        if client is not None:
            client.close()
    for a in actions:
        extra = f" ({', '.join(a.changes)})" if a.changes else ""
        print(f"{'would ' if args.dry_run and a.action in ('create', 'update') else ''}{a.action} "
              f"{a.kind} {a.name} [{a.class_name}]{extra}{': ' + a.detail if a.detail else ''}")
    if args.dry_run and actions:
        from tasks.salad_provision import container_group_spec, redacted, salad_classes

        first = next(e for e in salad_classes(targets) if str(e["id"]) == actions[0].class_id)
        print(f"container group spec for {first['name']} (secrets shown as ***):")
        print(json.dumps(redacted(container_group_spec(first, config)), indent=2))
    return 1 if any(a.action == "error" for a in actions) else 0


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=Path("models"), help="models directory (released layout)")
    p.add_argument("--device", default="auto")
    p.add_argument("--landmarks", default="auto", choices=["auto", "dwpose-onnx", "mmpose", "dlib"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="avatar cache directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk-flow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render one lip-synced video")
    g.add_argument("--video", required=True)
    g.add_argument("--audio", required=True)
    g.add_argument("--out", required=True)
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="render a demo on tiny models with media made on the spot")
    d.add_argument("--out", default="demo.mp4")
    d.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "musetalk-flow-demo"))
    _engine_args(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="check, download or fake a models directory")
    m.add_argument("action", choices=["check", "download", "make-tiny"])
    m.add_argument("dir", type=Path)
    m.add_argument("--full", action="store_true", help="make-tiny: write released-size random weights")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("serve", help="run the worker service (HTTP /hc + /generate; buffer loop with BUFFER_WORKER_ID)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="render a manifest of jobs (list/CSV/JSONL) as one Prefect batch run")
    b.add_argument("manifest", help="a .csv, .jsonl or .json manifest, or inline JSON")
    b.add_argument("--fan-out", type=int, default=0, help="child runs to spread the batch over (needs --submit)")
    b.add_argument("--submit", metavar="DEPLOYMENT", default=None,
                   help="send to a batch deployment (e.g. batch/gpu) instead of running here")
    b.set_defaults(func=cmd_batch)

    dp = sub.add_parser("deploy", help="create the GPU work pool, its queues and the generate/batch deployments")
    dp.add_argument("--pool", default="gpu")
    dp.add_argument("--pool-limit", type=int, default=None, help="fleet-wide cap on concurrent runs")
    dp.add_argument("--targets", default="gpu_targets.json",
                    help="GPU classes the scheduled scale flow sizes (path as the control worker sees it)")
    dp.set_defaults(func=cmd_deploy)

    sa = sub.add_parser("salad", help="SaladCloud: provision each GPU class's job queue and container group")
    sa.add_argument("action", choices=["provision"])
    sa.add_argument("--image", required=True, help="worker image the container groups run")
    sa.add_argument("--targets", default="gpu_targets.json", help="GPU classes (gpu_targets.json)")
    sa.add_argument("--class", dest="class_ids", action="append", metavar="CLASS_ID",
                    help="only this Salad GPU class id (repeatable)")
    sa.add_argument("--cpu", type=int, default=4)
    sa.add_argument("--memory-mb", type=int, default=24576)
    sa.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    sa.set_defaults(func=cmd_salad)

    o = sub.add_parser("orchestrator", help="run the control plane: public job API, /internal worker protocol, /docs")
    o.add_argument("--host", default="0.0.0.0")
    o.add_argument("--port", type=int, default=8080)
    o.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    o.set_defaults(func=cmd_orchestrator)

    u = sub.add_parser("up", help="the whole system on this machine: Prefect (SQLite), orchestrator, a local worker")
    u.add_argument("--host", default="127.0.0.1", help="the orchestrator's address")
    u.add_argument("--port", type=int, default=8080, help="the orchestrator's port")
    u.add_argument("--worker-port", type=int, default=8001)
    u.add_argument("--prefect-port", type=int, default=4200)
    u.add_argument("--log-dir", default="up-logs")
    u.add_argument("--tiny", action="store_true", help="render with random-weight tiny models (no downloads)")
    u.add_argument("--gpu-worker", action="store_true", help="also run a Prefect process worker on pool gpu")
    u.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_serve:
        args.stop_requested = _catch_stop_signals()
    from tasks.logs import configure_logging

    configure_logging(logging.INFO)  # before anything imports Prefect (telemetry off, one log format)
    from musetalk_engine.errors import MuseTalkError

    try:
        return args.func(args)
    except MuseTalkError as exc:
        print(f"error ({exc.error_type}, stage {exc.stage}): {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
