"""`musetalk-flow`: the installed console script, run as a user runs it (a subprocess), plus the
``models`` subcommands in-process.

Mistakes on the command line must fail before any model loads: one line on stderr, exit code 2, within
a few CPU seconds (before this was checked they took 17-64 s and two ended in tracebacks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from deployments.cli import main
from tests.media import ffprobe

pytest_plugins = ["tests.fixtures_engine"]

SCRIPT = Path(sys.executable).with_name("musetalk-flow")
# "Fast" is judged by the CPU time the command used (its own and its children's), not by wall-clock time:
# wall-clock measured 0.1 s for a missing file or output directory, ~2.5 s when ffprobe runs (importing
# Prefect), ~4.5 s for the models check (importing torch) on an idle 2-core machine, but 13-21 s at a load
# average of 11 (five sessions' test suites at once), close to any bound that still means something. CPU
# time stays near the idle figures however loaded the machine is. Loading models and preparing an avatar
# took 17-64 s on an idle machine, nearly all of it CPU, so this still tells "failed fast" apart.
FAST_CPU_S = 30.0
# Wall-clock only bounds a hang (a wait that costs no CPU), with room for a machine 5x slower than idle.
FAST_WALL_S = 120.0


def run_cli(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> tuple[subprocess.CompletedProcess, tuple[float, float]]:
    """Run the console script; ``env`` entries set to None are removed from its environment. Returns the
    process and (CPU seconds it and the children it waited for used, wall-clock seconds); killed after
    ``timeout`` s."""
    merged = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen([str(SCRIPT), *args], stdout=out, stderr=err, text=True, env=full_env, cwd=cwd)
        killer = threading.Timer(timeout, child.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)  # wait4: this child's own resource usage
        finally:
            killer.cancel()
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out.read(), err.read())
    return proc, (usage.ru_utime + usage.ru_stime, wall)


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """An isolated user: data directory, no .env, and the CWD-free default locations under it."""
    data = tmp_path / "xdg"
    return {"XDG_DATA_HOME": str(data), "MUSETALK_ENV_FILE": str(tmp_path / "absent.env")}


def assert_one_line_error(proc: subprocess.CompletedProcess, seconds: tuple[float, float], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("musetalk-flow: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    cpu, wall = seconds
    assert cpu < FAST_CPU_S and wall < FAST_WALL_S, f"took {cpu:.1f} CPU s ({wall:.1f} s) to report {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- fail fast, speak plainly

def test_missing_input_file_fails_at_once(media, tmp_path, home):
    proc, seconds = run_cli("generate", "--video", str(tmp_path / "nope.mp4"), "--audio", str(media.speech),
                            "--out", str(tmp_path / "o.mp4"), env=home)
    assert_one_line_error(proc, seconds, "--video", "nope.mp4", "no such file")


@pytest.mark.parametrize("command, bad, needle", [
    (("generate", "--video", "v.mp4", "--audio", "a.wav", "--out", "o.mp4"), {"MUSETALK_DEVICES": "gpu0"},
     "MUSETALK_DEVICES: 'gpu0' is not cpu"),
    (("serve", "--port", "1"), {"BUFFER_WORKER_ID": "gpu box #1", "MUSETALK_BATCH_SIZE": "-3"},
     "BUFFER_WORKER_ID 'gpu box #1'"),
    (("orchestrator", "--port", "1"), {"MUSETALK_ROUTE_POLICY": "fastest"}, "MUSETALK_ROUTE_POLICY"),
    (("serve", "--port", "1"), {"MUSETALK_MAX_QUEUED": "-1"}, "MUSETALK_MAX_QUEUED"),  # the service's own options
])
def test_a_bad_setting_is_one_line_naming_the_variable(command, bad, needle, home):
    """Every entry point reads the same settings; a value they refuse is a usage error (exit 2) in one line
    that names each bad variable, never pydantic's traceback."""
    proc, seconds = run_cli(*command, env={**home, **bad, "PREFECT_API_URL": None})
    line = assert_one_line_error(proc, seconds, "configuration (environment or .env)", needle)
    assert all(name in line for name in bad), line


def test_a_wrong_path_costs_no_heavy_import(tmp_path):
    """Path mistakes are found before torch or Prefect is even imported (each costs seconds)."""
    code = ("import sys; from deployments.cli import main; "
            "rc = main(['generate', '--video', 'missing.mp4', '--audio', 'a.wav', '--out', 'o.mp4']); "
            "print(rc, sorted(m for m in ('torch', 'prefect') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    # nor does reading settings that name GPUs (their spelling is checked without torch)
    code = ("import sys; from tasks.settings import Settings; s = Settings(); "
            "print(s.musetalk_device, s.device_list, 'torch' in sys.modules)")
    env = {**os.environ, "MUSETALK_DEVICE": "cuda:1", "MUSETALK_DEVICES": "cuda,cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=env)
    assert proc.stdout.strip() == "cuda:1 ['cuda:0', 'cpu'] False", proc.stdout + proc.stderr


def test_audio_passed_as_video_is_named(media, tmp_path, home):
    proc, seconds = run_cli("generate", "--video", str(media.speech), "--audio", str(media.speech),
                            "--out", str(tmp_path / "o.mp4"), env=home)
    assert_one_line_error(proc, seconds, "--video", "speech.wav", "no video track", "audio file")


def test_video_without_sound_passed_as_audio_is_named(media, tmp_path, home):
    proc, seconds = run_cli("generate", "--video", str(media.video), "--audio", str(media.video),
                            "--out", str(tmp_path / "o.mp4"), env=home)
    assert_one_line_error(proc, seconds, "--audio", "no audio track")


def test_output_in_a_missing_directory_fails_at_once(media, tmp_path, home):
    out = tmp_path / "no-such-dir" / "o.mp4"
    proc, seconds = run_cli("generate", "--video", str(media.video), "--audio", str(media.speech),
                            "--out", str(out), env=home)
    assert_one_line_error(proc, seconds, "--out", f"directory {out.parent} does not exist")


def test_missing_models_are_named_with_the_fix(media, tmp_path, home):
    proc, seconds = run_cli("generate", "--video", str(media.still), "--audio", str(media.short_speech),
                            "--out", str(tmp_path / "x.mp4"), "--models", str(tmp_path / "none"), env=home)
    assert_one_line_error(proc, seconds, "unet.pth", "musetalk-flow models download")
    assert not (tmp_path / "x.mp4").exists()


def test_models_dir_comes_from_the_environment_and_dotenv(media, tmp_path, home):
    """`generate` honours MUSETALK_MODELS_DIR, from the environment or from .env in the current
    directory (the environment wins)."""
    from_env = tmp_path / "models-from-env"
    proc, seconds = run_cli("generate", "--video", str(media.still), "--audio", str(media.short_speech),
                            "--out", str(tmp_path / "x.mp4"), env={**home, "MUSETALK_MODELS_DIR": str(from_env)})
    assert_one_line_error(proc, seconds, f"models directory {from_env}:")

    project = tmp_path / "project"
    project.mkdir()
    (project / ".env").write_text("MUSETALK_MODELS_DIR=/srv/from-dotenv\n")
    dotenv = {**home, "MUSETALK_ENV_FILE": None}  # the default: .env in the current directory
    proc, seconds = run_cli("generate", "--video", str(media.still), "--audio", str(media.short_speech),
                            "--out", str(tmp_path / "x.mp4"), env=dotenv, cwd=project)
    assert_one_line_error(proc, seconds, "models directory /srv/from-dotenv:")


@pytest.mark.parametrize("argv", [["models"], ["generate", "--video", "v.mp4"], []])
def test_bad_arguments_exit_with_usage(argv):
    proc, _ = run_cli(*argv)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_version_and_help_on_every_option():
    proc, _ = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("musetalk-flow ") and "musetalk-v1.5" in proc.stdout
    from deployments.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_generate_writes_the_output_quietly(tiny_models, media, tmp_path, home):
    """One summary line on stdout, nothing on stderr: no diffusers float32 notices, no weight-loading
    bars, no JSON dump; -v brings the stage times back."""
    out = tmp_path / "out" / "talk.mp4"
    out.parent.mkdir()
    args = ["generate", "--video", str(media.still), "--audio", str(media.short_speech), "--out", str(out),
            "--models", str(tiny_models), "--batch-size", "4"]
    proc, _ = run_cli(*args, env=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out}: 10 frames") and "avatar prepared" in lines[0]
    assert sorted(s["codec_name"] for s in ffprobe(out)["streams"]) == ["aac", "h264"]
    # the avatar went to the configured cache, not the current directory or ~/.cache
    assert list((Path(home["XDG_DATA_HOME"]) / "musetalk-flow" / "cache" / "avatars").iterdir())

    proc, _ = run_cli(*args, "-v", env=home)
    assert proc.returncode == 0, proc.stderr
    assert "avatar from cache" in proc.stdout and "prepare" in proc.stdout.splitlines()[1]
    assert "engine loaded" in proc.stderr  # INFO logs are back with -v



def test_progress_names_each_stage_on_a_terminal(capsys):
    """On a terminal the progress line names the stage that runs (not "render: 0frame"), and moves a frame
    bar while rendering; off a terminal it prints nothing."""
    from deployments.cli import Progress

    shown = Progress(enabled=True)
    with shown.stage("preparing avatar"):
        time.sleep(0.6)  # one tick of the clock that keeps an uncounted stage alive
    with shown.stage("rendering", total=10) as bar:
        shown.frames(bar)(4, 10)
        bar.refresh()
    err = capsys.readouterr().err
    assert "preparing avatar" in err and "rendering" in err and "4/10" in err, err

    quiet = Progress(enabled=False)
    with quiet.stage("preparing avatar") as bar:
        quiet.frames(bar)(1, 2)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------- models, in-process

def test_make_tiny_then_check(tmp_path, capsys):
    models = tmp_path / "models"
    assert main(["models", "make-tiny", str(models)]) == 0
    assert (models / "musetalkV15" / "unet.pth").is_file()
    assert json.loads((models / "tiny.json").read_text())["landmarks"] == "dlib"
    capsys.readouterr()
    assert main(["models", "check", str(models)]) == 0
    assert "all required model files present" in capsys.readouterr().out


def test_check_on_an_empty_dir_names_the_missing_files(tmp_path, capsys):
    assert main(["models", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "missing:" in err and "musetalkV15/unet.pth" in err
    assert "face-parse-bisent/79999_iter.pth" in err


def test_check_names_a_single_missing_file(tiny_models, tmp_path, capsys):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models, copy_function=os.symlink)
    (models / "whisper" / "preprocessor_config.json").unlink()
    assert main(["models", "check", str(models)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"missing: {models / 'whisper' / 'preprocessor_config.json'}"]
