"""`musetalk-flow`: the project's command line (render, models, demo, and the long-lived services)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PROG = "musetalk-flow"
# Exit codes: 1 = the work failed; 2 = the command line or its inputs are wrong (argparse's code too).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Long-lived processes: their log is the operator's record, so they keep INFO (no CLI quieting).
SERVICES = ("serve", "orchestrator", "up")

log = logging.getLogger(__name__)


class UsageError(Exception):
    """The command cannot run as given (a missing file, a wrong kind of file, an impossible output path).
    Caught in :func:`main`: one line on stderr, exit code 2, no traceback."""


# ------------------------------------------------------------------------------------------ checks
# Everything a render needs from the command line is checked here, before a model loads: a mistake
# costs a second, not the 20-60 s of loading models and preparing an avatar.

def _input_file(path: Path, option: str) -> Path:
    if not path.exists():
        raise UsageError(f"{option} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{option} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path}: not readable (permission denied)")
    return path


def _output_file(path: Path, option: str = "--out") -> Path:
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name such as {path / 'out.mp4'}")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: directory {parent} is not writable")
    return path


def _probe(path: Path, kind: str, option: str) -> None:
    """ffprobe the file: a video has a picture stream, an audio file a sound stream, within the limits."""
    from musetalk_engine.errors import MediaError
    from tasks.fetch import probe_media

    try:
        probe_media(path, kind, label=f"{option} {path}:")  # type: ignore[arg-type]
    except MediaError as exc:
        raise UsageError(exc.message) from None


def _models_complete(models: Path) -> list[Path]:
    from musetalk_engine.weights import ModelPaths, missing_files

    return missing_files(ModelPaths(models))


def _check_models(models: Path) -> None:
    missing = _models_complete(models)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UsageError(f"models directory {models}: missing {missing[0]}{more}; get them with "
                         f"`{PROG} models download {models}`, or point --models / MUSETALK_MODELS_DIR at them")


# ---------------------------------------------------------------------------------------- settings

def _settings(args) -> Any:
    """The project's settings (environment + .env), with this command line's overrides on top."""
    from tasks.settings import get_settings

    settings = get_settings()
    overrides: dict[str, Any] = {}
    if getattr(args, "models", None) is not None:
        overrides["musetalk_models_dir"] = args.models.expanduser().absolute()
    if getattr(args, "cache_dir", None) is not None:
        overrides["musetalk_cache_dir"] = args.cache_dir.expanduser().absolute()
    if getattr(args, "landmarks", None) is not None:
        overrides["musetalk_landmarks"] = args.landmarks
    if getattr(args, "batch_size", None) is not None:
        overrides["musetalk_batch_size"] = args.batch_size
    return settings.model_copy(update=overrides) if overrides else settings


def _models_dir(settings) -> Path:
    return settings.resolve(settings.musetalk_models_dir)


# ---------------------------------------------------------------------------------------- progress

class Progress:
    """One line on stderr naming the stage that runs now ("loading models", "preparing avatar", …) with
    its elapsed time, and a frame bar while rendering. Shown only on a terminal; silent in pipes and CI."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Any]:
        if not self.enabled:
            yield None
            return
        from tqdm import tqdm

        fmt = None if total else "{desc} {elapsed}"
        self._bar = tqdm(total=total, desc=name, unit="frame", leave=False, bar_format=fmt, file=sys.stderr)
        self._stop.clear()
        # tqdm redraws only on update: a stage with no counter needs a clock to show it is alive
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()
        try:
            yield self._bar
        finally:
            self._stop.set()
            self._ticker.join()
            self._bar.close()
            self._bar = None

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def frames(self, bar: Any):
        """An engine ``on_progress(done, total)`` callback moving ``bar``."""
        def update(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.n = done
        return update


# ------------------------------------------------------------------------------------------ render

def _render(settings, device: str, video: Path, audio: Path, out: Path, verbosity: int) -> None:
    """Load the engine, prepare (or reuse) the avatar, render; one summary line on stdout."""
    progress = Progress()
    started = time.perf_counter()
    with progress.stage("loading models"):
        from musetalk_engine.avatar import PrepareParams
        from tasks.engine import engine_config

        from musetalk_engine.engine import Engine

        engine = Engine(engine_config(settings).model_copy(update={"device": device}))
    params = PrepareParams(landmarks=engine.landmarks_backend)
    own: dict[str, float] = {"load": time.perf_counter() - started}
    with progress.stage("preparing avatar"):
        t = time.perf_counter()
        avatar, cached = engine.prepare(video, params)
        own["prepare"] = time.perf_counter() - t
    with progress.stage("audio features"):
        t = time.perf_counter()
        windows = engine.audio_windows(audio, params.fps)
        own["audio"] = time.perf_counter() - t
    with progress.stage("rendering", total=int(windows.shape[0])) as bar:
        result = engine.render(video, audio, out, params=params, avatar=avatar, windows=windows,
                               on_progress=progress.frames(bar))
    m = result.metrics
    wall = time.perf_counter() - started
    print(f"wrote {out}: {result.frames} frames ({result.duration_s:.1f} s of video) in {wall:.1f} s, "
          f"{m.fps:.1f} fps on {m.device}; avatar {'from cache' if cached else 'prepared'}")
    if verbosity > 0:
        # prepare and audio ran before the render (their own progress stages): the render's are ~0
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in {**m.stage_times, **own}.items())
        print(f"  {m.dtype}, batch {m.batch_size}, {m.encoder}, peak RSS {m.peak_rss_kb // 1024} MiB; {stages}")


def cmd_generate(args) -> int:
    video = _input_file(args.video, "--video")
    audio = _input_file(args.audio, "--audio")
    out = _output_file(args.out)
    _probe(video, "video", "--video")
    _probe(audio, "audio", "--audio")
    settings = _settings(args)
    _check_models(_models_dir(settings))
    _render(settings, args.device, video, audio, out, args.verbose)
    return 0


def cmd_demo(args) -> int:
    """Everything made here: tiny random models, an astronaut clip, espeak speech; then one render."""
    out = _output_file(args.out)
    settings = _settings(args)
    cache = settings.resolve(settings.musetalk_cache_dir)
    work = (args.workdir or cache / "demo").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.models is None and _models_complete(_models_dir(settings)):
        # no real weights configured: the demo's point is the pipeline, so tiny random ones will do
        tiny = cache / "tiny-models"
        if _models_complete(tiny):
            from musetalk_engine.tiny import make_models

            print(f"writing tiny random-weight models to {tiny}")
            make_models(tiny, "tiny")
        settings = settings.model_copy(update={"musetalk_models_dir": tiny})
    else:
        _check_models(_models_dir(settings))
    from musetalk_engine.sample_media import make_avatar_video, make_speech

    video = make_avatar_video(work / "avatar.mp4", seconds=2.0, width=360, height=360)
    audio = make_speech(work / "speech.wav", seconds=4.0)
    _render(settings, args.device, video, audio, out, args.verbose)
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
    if args.fan_out < 0:
        raise UsageError(f"--fan-out {args.fan_out}: must be 0 or more")
    if args.fan_out and not args.submit:
        raise UsageError("--fan-out needs --submit DEPLOYMENT: child runs are taken by the pool's workers")
    from flows.batch import load_manifest

    try:
        jobs = load_manifest(args.manifest)  # parsed here: the manifest file need not exist on the workers
    except (ValueError, OSError) as exc:
        raise UsageError(f"manifest: {exc}") from None
    if not jobs:
        raise UsageError(f"manifest {args.manifest}: no jobs in it")
    from musetalk_engine.errors import MediaError
    from tasks.contract import JobRequest

    for n, job in enumerate(jobs, start=1):  # the flow's typed parameter would refuse the whole batch later
        try:
            JobRequest.parse(job)
        except MediaError as exc:
            raise UsageError(f"manifest job {n} ({job.get('musetalk_job_id') or 'no id'}): {exc.message}") from None
    if args.submit:
        from prefect.deployments import run_deployment

        name = args.submit if "/" in args.submit else f"batch/{args.submit}"
        run = run_deployment(name, parameters={"jobs": jobs, "fan_out": args.fan_out}, timeout=0)
        print(f"submitted {len(jobs)} job(s) to {name}: flow run {run.name} ({run.id})")
        return 0
    from deployments.prefect_api import start_prefect_api
    from flows.batch import batch

    start_prefect_api()  # the temporary server, with the project's start timeout, before any model loads
    state = batch(jobs=jobs, fan_out=0, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        print(f"error: batch {state.name}: {state.message}", file=sys.stderr)
        return EXIT_FAILED
    for job in summary["jobs"]:
        print(f"{job['musetalk_job_id']}: {job['status']} {job['output_url'] or job['error_message']} "
              f"({job['time_s']}s)")
    print(f"{summary['succeeded']}/{summary['total']} ok (batch run {state.name})")
    return 0 if state.is_completed() and summary["failed"] == 0 else EXIT_FAILED


def cmd_orchestrator(args) -> int:
    """The control plane's HTTP API (DESIGN §11) against the Prefect server of PREFECT_API_URL."""
    import uvicorn
    from prefect.settings import PREFECT_API_URL

    from orchestrator.api import create_app
    from orchestrator.settings import get_orchestrator_settings

    settings = get_orchestrator_settings()  # a bad variable fails here, before anything is said or started
    if not PREFECT_API_URL.value():
        log.warning("PREFECT_API_URL is not set: the orchestrator uses a temporary Prefect server, and every "
                    "job is lost when it stops (set PREFECT_API_URL, or use musetalk-flow up)")
    # log_config=None: uvicorn's records go to the process's one configuration (tasks/logs.py), as in
    # `serve`; uvicorn's own access formatter would unpack the record's args, which tasks/logs has already
    # folded into the cleaned message (every request then logged a "Logging error" traceback instead)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, log_config=None)
    return 0


def cmd_up(args) -> int:
    """Prefect, the orchestrator and a local worker on this machine (see deployments/up.py)."""
    from deployments.up import StartError, up

    try:
        return up(host=args.host, port=args.port, worker_port=args.worker_port, prefect_port=args.prefect_port,
                  log_dir=Path(args.log_dir), tiny=args.tiny, gpu_worker=args.gpu_worker)
    except StartError as exc:  # already one plain line that names the log to read
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def cmd_deploy(args) -> int:
    """Work pools, prioritised queues and every deployment of deployments/prefect.yaml."""
    from deployments.workpool import CONTROL_POOL, deploy

    ids = deploy(args.pool, pool_limit=args.pool_limit,
                 parameters={"salad-autoscale": {"targets_path": args.targets}})
    for name, deployment_id in sorted(ids.items()):
        print(f"deployed {name} ({deployment_id})")
    print(f"start one worker per GPU: prefect worker start --pool {args.pool} --limit 1")
    print(f"start the control-plane worker where SALAD_* are set: prefect worker start --pool {CONTROL_POOL}")
    return 0


def cmd_salad(args) -> int:
    """Create or update each GPU class's Salad queue and container group (idempotent)."""
    import json

    from tasks.salad import salad_client_from_env, salad_configured
    from tasks.salad_provision import ProvisionConfig, provision, worker_environment
    from tasks.scaling import read_targets

    config = ProvisionConfig(image=args.image, cpu=args.cpu, memory_mb=args.memory_mb,
                             environment=worker_environment())
    targets = read_targets(args.targets)
    # A dry run without credentials still prints the plan (everything to create).
    client = salad_client_from_env() if (salad_configured() or not args.dry_run) else None
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
        from tasks.salad_provision import container_group_spec, redacted
        from tasks.scaling import salad_classes

        first = next(e for e in salad_classes(targets) if str(e["id"]) == actions[0].class_id)
        print(f"container group spec for {first['name']} (secrets shown as ***):")
        print(json.dumps(redacted(container_group_spec(first, config)), indent=2))
    return 1 if any(a.action == "error" for a in actions) else 0


# ------------------------------------------------------------------------------------------ parser

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from musetalk_engine import MODEL_VERSION

    try:
        mine = version(PROG)
    except PackageNotFoundError:  # run from a checkout that was never installed
        mine = "unknown"
    return f"{PROG} {mine} ({MODEL_VERSION})"


def _common() -> argparse.ArgumentParser:
    """Options every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="show library logs, warnings and stage times (-vv: debug logs)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return p


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=None,
                   help="models directory in MuseTalk's released layout (default: $MUSETALK_MODELS_DIR)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--landmarks", default=None, choices=["auto", "dwpose-onnx", "mmpose", "dlib"],
                   help="face landmark backend (default: $MUSETALK_LANDMARKS, else auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="frames per UNet batch (default: $MUSETALK_BATCH_SIZE, else chosen from free memory)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="avatar cache directory (default: $MUSETALK_CACHE_DIR)")


def _service_args(p: argparse.ArgumentParser, port: int) -> None:
    """The listening address and log level shared by the two HTTP services (worker, orchestrator)."""
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the service (default info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__,
        epilog="Configuration: environment variables or a .env file in the current directory "
               "(see .env.example); options override them.")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    g = sub.add_parser("generate", parents=[common], help="render one lip-synced video",
                       description="Render one lip-synced video from an avatar video and a speech track.")
    g.add_argument("--video", type=Path, required=True, help="avatar video (or still image) with one face")
    g.add_argument("--audio", type=Path, required=True, help="speech track (WAV, MP3, … or a video with sound)")
    g.add_argument("--out", type=Path, required=True, help="MP4 to write (its directory must exist)")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", parents=[common], help="render a demo on tiny models with media made on the spot",
                       description="Render a demo: an astronaut clip and espeak speech made on the spot, on "
                                   "tiny random-weight models unless real ones are configured.")
    d.add_argument("--out", type=Path, default=Path("demo.mp4"), help="MP4 to write (default: demo.mp4)")
    d.add_argument("--workdir", type=Path, default=None,
                   help="where the sample media are made (default: demo/ in the cache directory)")
    _engine_args(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", parents=[common], help="check, download or fake a models directory")
    m.add_argument("action", choices=["check", "download", "make-tiny"],
                   help="check: list missing files; download: fetch the released weights; "
                        "make-tiny: write random weights for tests")
    m.add_argument("dir", type=Path, help="models directory")
    m.add_argument("--full", action="store_true", help="make-tiny: write released-size random weights")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("serve", parents=[common],
                       help="run the worker service (HTTP /hc + /generate; buffer loop with BUFFER_WORKER_ID; "
                            "a render slot per GPU in MUSETALK_DEVICES)")
    _service_args(s, 8000)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", parents=[common],
                       help="render a manifest of jobs (list/CSV/JSONL) as one Prefect batch run")
    b.add_argument("manifest", help="a .csv, .jsonl or .json manifest, or inline JSON")
    b.add_argument("--fan-out", type=int, default=0, help="child runs to spread the batch over (needs --submit)")
    b.add_argument("--submit", metavar="DEPLOYMENT", default=None,
                   help="send to a batch deployment (e.g. batch/gpu) instead of running here")
    b.set_defaults(func=cmd_batch)

    dp = sub.add_parser("deploy", parents=[common],
                        help="create the work pools, their queues and the deployments of deployments/prefect.yaml")
    dp.add_argument("--pool", default="gpu", help="work pool of the GPU deployments (default gpu)")
    dp.add_argument("--pool-limit", type=int, default=None, help="fleet-wide cap on concurrent runs")
    dp.add_argument("--targets", default="gpu_targets.json",
                    help="GPU classes the scheduled scale flow sizes (path as the control worker sees it)")
    dp.set_defaults(func=cmd_deploy)

    sa = sub.add_parser("salad", parents=[common],
                        help="SaladCloud: provision each GPU class's job queue and container group")
    sa.add_argument("action", choices=["provision"], help="provision: create or update, idempotently")
    sa.add_argument("--image", required=True, help="worker image the container groups run")
    sa.add_argument("--targets", default="gpu_targets.json", help="GPU classes (gpu_targets.json)")
    sa.add_argument("--class", dest="class_ids", action="append", metavar="CLASS_ID",
                    help="only this Salad GPU class id (repeatable)")
    sa.add_argument("--cpu", type=int, default=4, help="vCPUs per container (default 4)")
    sa.add_argument("--memory-mb", type=int, default=24576, help="memory per container in MB (default 24576)")
    sa.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    sa.set_defaults(func=cmd_salad)

    o = sub.add_parser("orchestrator", parents=[common],
                       help="run the control plane: public job API, /internal worker protocol, /docs")
    _service_args(o, 8080)
    o.set_defaults(func=cmd_orchestrator)

    u = sub.add_parser("up", parents=[common],
                       help="the whole system on this machine: Prefect (SQLite), orchestrator, a local worker")
    u.add_argument("--host", default="127.0.0.1", help="the orchestrator's address")
    u.add_argument("--port", type=int, default=8080, help="the orchestrator's port")
    u.add_argument("--worker-port", type=int, default=8001, help="the local worker's port (default 8001)")
    u.add_argument("--prefect-port", type=int, default=4200, help="the Prefect server's port (default 4200)")
    u.add_argument("--log-dir", default="up-logs", help="where each process's log is written (default up-logs)")
    u.add_argument("--tiny", action="store_true", help="render with random-weight tiny models (no downloads)")
    u.add_argument("--gpu-worker", action="store_true", help="also run a Prefect process worker on pool gpu")
    u.set_defaults(func=cmd_up)

    from benchmarks.gpu_check import build_parser as gpu_check_parser

    doc = gpu_check_parser(sub.add_parser("doctor", parents=[common],
                                          help="the GPU self-check (python -m benchmarks.gpu_check): one JSON verdict"))
    doc.set_defaults(func=cmd_doctor)
    return parser


def cmd_doctor(args) -> int:
    from benchmarks.gpu_check import main as gpu_check

    return gpu_check(args=args)


def _configure_logging(args) -> None:
    """Before anything imports Prefect (telemetry off, one log format; see tasks/logs.py)."""
    from tasks.logs import configure_cli, configure_logging

    if args.command in SERVICES:  # a service: its log is the operator's record, INFO (serve re-applies it)
        configure_logging(logging.INFO)
    else:
        configure_cli(args.verbose)


def main(argv: list[str] | None = None) -> int:
    from tasks.settings import ConfigurationError

    args = build_parser().parse_args(argv)
    if args.func is cmd_serve:
        args.stop_requested = _catch_stop_signals()
    try:
        _configure_logging(args)  # reads the settings: a bad variable is a usage error, said in one line
        return args.func(args)
    except (UsageError, ConfigurationError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        from musetalk_engine.errors import MediaError, MissingWeightsError, MuseTalkError

        if isinstance(exc, MuseTalkError):
            print(f"{PROG}: error: {exc.message}", file=sys.stderr)
            return EXIT_USAGE if isinstance(exc, (MediaError, MissingWeightsError)) else EXIT_FAILED
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
