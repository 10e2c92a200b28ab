"""A throwaway PostgreSQL for tests: initdb into a temporary directory, listen on a free 127.0.0.1 port
(unix socket inside that directory), trust auth, durability off (a test database needs no fsync).

PostgreSQL refuses to run as root; under root (CI) the server runs as ``nobody`` and owns only its
temporary directory. :func:`start_postgres` returns ``(server, "")`` or ``(None, reason)`` so a test can
skip with a clear message where PostgreSQL cannot start."""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port

UNPRIVILEGED_USER = "nobody"


def find_bin_dir() -> Path | None:
    """Directory with initdb + pg_ctl: ``$MUSETALK_TEST_PG_BIN``, the newest Debian install, or PATH."""
    candidates = [os.environ.get("MUSETALK_TEST_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                         reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(str(Path(initdb).parent) if initdb else "")
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str | None  # OS user the server runs as (None: the current one)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "postgres.log"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        """SQLAlchemy URL for Prefect (``PREFECT_SERVER_DATABASE_CONNECTION_URL``)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user:
            entry = pwd.getpwnam(self.user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        # cwd inside our directory: the unprivileged user may not be allowed to read the caller's cwd
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root, **kwargs)

    def initdb(self) -> subprocess.CompletedProcess:
        return self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                         "--no-sync", "--no-instructions")

    def start(self) -> subprocess.CompletedProcess:
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=100")
        return self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", opts, "-w",
                         "-t", "60", "start")

    def stop(self) -> None:
        """Fast shutdown, then the directory goes."""
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_postgres() -> tuple[PostgresServer | None, str]:
    """A running throwaway server, or ``(None, why not)``."""
    if importlib.util.find_spec("asyncpg") is None:
        return None, "asyncpg is not installed (Prefect's PostgreSQL driver)"
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return None, "no PostgreSQL binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH"
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            return None, f"running as root and there is no {UNPRIVILEGED_USER!r} user to run PostgreSQL as"
        user = UNPRIVILEGED_USER
    # /tmp, not pytest's tmp_path: the server's user must be able to reach its directory
    root = Path(tempfile.mkdtemp(prefix="musetalk-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    reason = ""
    for _ in range(3):  # a free port can be taken between probing and binding: try another
        server = PostgresServer(bin_dir, root, free_port(), user)
        try:
            if not server.data_dir.exists():
                done = server.initdb()
                if done.returncode != 0:
                    reason = f"initdb failed: {(done.stderr or done.stdout).strip()[-500:]}"
                    break
            done = server.start()
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"could not run the PostgreSQL binaries: {exc}"
            break
        if done.returncode == 0:
            return server, ""
        reason = f"pg_ctl start failed: {(done.stderr or done.stdout).strip()[-300:]} {server.log_tail(500)}"
    shutil.rmtree(root, ignore_errors=True)
    return None, reason
