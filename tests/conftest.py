"""Test-session setup: Prefect runs against a throwaway home, never the user's ~/.prefect."""

import os
import tempfile

# before anything imports torch (see musetalk_engine/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_home = tempfile.mkdtemp(prefix="musetalk-flow-prefect-")
os.environ.setdefault("PREFECT_HOME", _home)
# Prefect's telemetry off, as every entry point does (tasks/logs.py); set before anything imports prefect
from tasks.logs import disable_telemetry  # noqa: E402

disable_telemetry()
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# Prefect reads its settings at import, so this must be set here: the temporary server needs more than
# the default 20 s to start on a loaded 2-core CI machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Settings read .env from the current directory: a developer's own .env must not change test outcomes.
os.environ.setdefault("MUSETALK_ENV_FILE", os.path.join(_home, "no.env"))


def pytest_unconfigure(config):
    """Prefect stops its temporary server at interpreter exit and logs that to the stderr pytest captured
    and has closed by then; with this, that last log line is dropped instead of printing a traceback."""
    import logging

    logging.raiseExceptions = False


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it: the CLI's in-process ``main()`` sets Prefect's console
    level and Hugging Face's quiet switches for its children (tasks/logs.configure_cli), and without this
    they leak into every later test's subprocesses (workers whose INFO lines a test reads went silent)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
