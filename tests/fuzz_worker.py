"""The worker the fuzz test (tests/test_fuzz_generate.py) talks to, in a process of its own: the real app,
render queue and ``generate`` flow, with a stand-in engine (no job that passes the front door gets past the
SSRF guard, so none ever needs a model). ``python -m tests.fuzz_worker PORT``; Prefect's API comes from
``PREFECT_API_URL`` (the test session's temporary server)."""

from __future__ import annotations

import sys
from types import SimpleNamespace


def main(port: int) -> int:
    from deployments.serve import bind_socket, create_app, make_server
    from tasks.logs import configure_logging

    configure_logging("WARNING")
    app = create_app(engine_loader=lambda settings: SimpleNamespace(warm=True, gpu={}, device=None))
    server = make_server(app, log_level="warning", owns_process=True)
    server.run(sockets=[bind_socket("127.0.0.1", port)])
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
