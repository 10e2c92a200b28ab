"""Test-session setup: Prefect runs against a throwaway home, never the user's ~/.prefect."""

import os
import tempfile

_home = tempfile.mkdtemp(prefix="musetalk-flow-prefect-")
os.environ.setdefault("PREFECT_HOME", _home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
