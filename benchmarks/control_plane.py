"""`python -m benchmarks.control_plane`: the orchestrator's buffer claims under load (fake renders, no models).

For each database (SQLite, PostgreSQL) it starts a Prefect server, the orchestrator (`musetalk-flow
orchestrator`) and no GPU worker at all, then:

1. submits ``--jobs`` jobs (default 500) on route ``buffer`` through the public API;
2. starts ``--claimers`` buffer workers (default 20) at once, each a thread that heartbeats, claims over
   HTTP (``POST /internal/buffer/jobs/claim``), "renders" for ``--render-s`` seconds and reports success
   with an output URL, until the queue is empty;
3. checks that no job was claimed twice and none was lost (every submitted job claimed exactly once and
   ``succeeded`` in ``GET /v1/avatar/jobs/{id}``);
4. reports claim latency p50/p99 (successful claims; empty answers are counted apart) and jobs/s (jobs
   finished per second of the claim phase, first claim to last report).

    python -m benchmarks.control_plane                          # both databases, 500 jobs, 20 claimers
    python -m benchmarks.control_plane --db sqlite --jobs 50 --claimers 5 --json out.json

The orchestrator runs as `musetalk-flow up` and a fleet run it: at most one Prefect write at a time on
SQLite (``MUSETALK_PREFECT_MAX_WRITES=1``), no limit on PostgreSQL (``--max-writes`` overrides); the result
counts the Prefect server's "database is locked" log lines.

PostgreSQL needs its binaries (initdb/pg_ctl, as tests/pg.py finds them). The servers listen on 127.0.0.1
and everything is removed afterwards. The same run at a small size is a test (tests/test_control_plane_load.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx

from tasks.http_client import poll_http

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY = "bench-api-key-" + uuid.uuid4().hex[:8]
INTERNAL_KEY = "bench-internal-" + uuid.uuid4().hex[:8]
ORCHESTRATOR_CMD = "{python} -m deployments.cli orchestrator --host 127.0.0.1 --port {port}"
HEARTBEAT_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 300.0
log = logging.getLogger("benchmarks.control_plane")


# ------------------------------------------------------------------------------------------- processes


class Process:
    """A server subprocess in its own session, output in a log file; stopped with its whole group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} (rc={self.proc.poll()}) ---\n" + \
            self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: Process) -> None:
    outcome = poll_http(url, timeout, exited=lambda: proc.proc.poll() is not None, request_timeout=5)
    if outcome == "exited":
        raise RuntimeError(f"{proc.name} exited while starting\n{proc.tail()}")
    if outcome == "timeout":
        raise RuntimeError(f"{proc.name} did not answer {url} within {timeout:g} s\n{proc.tail()}")


@contextmanager
def control_plane(database_url: Optional[str], work: Path, orchestrator_cmd: str = ORCHESTRATOR_CMD,
                  max_writes: Optional[int] = None) -> Iterator[str]:
    """A Prefect server (SQLite in ``work`` unless ``database_url``) and the orchestrator; its base URL.
    ``max_writes``: the orchestrator's ``MUSETALK_PREFECT_MAX_WRITES``; None: 1 on SQLite (one writer),
    else no limit — what ``musetalk-flow up`` and a fleet on PostgreSQL run with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MUSETALK_"))}
    prefect_port, orch_port = _free_port(), _free_port()
    env.update({
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MUSETALK_API_KEYS": API_KEY,
        "INTERNAL_API_KEY": INTERNAL_KEY,
        "MUSETALK_WORKDIR": str(work),
        "MUSETALK_ALLOW_PRIVATE_URLS": "true",  # the fake media URLs are on 127.0.0.1 and never fetched
        "MUSETALK_WORKER_OFFLINE_SEC": "120",
        "ORCHESTRATOR_BASE_URL": "",
        "MUSETALK_PREFECT_MAX_WRITES": str(max_writes if max_writes is not None else 0 if database_url else 1),
    })
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    if database_url:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    procs: list[Process] = []
    try:
        server = Process("prefect-server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                            "--port", str(prefect_port)], server_env, work)
        procs.append(server)
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, server)
        cmd = orchestrator_cmd.format(python=PY, port=orch_port).split()
        orchestrator = Process("orchestrator", cmd, env, work)
        procs.append(orchestrator)
        base = f"http://127.0.0.1:{orch_port}"
        _wait_http(f"{base}/hc", 180, orchestrator)
        yield base
    except BaseException:
        for p in procs:
            log.error("%s", p.tail())
        raise
    finally:
        for p in reversed(procs):
            p.stop()


# ---------------------------------------------------------------------------------------------- the load


@dataclass
class Claimed:
    worker_id: str
    job_id: str
    lease: str


@dataclass
class LoadResult:
    database: str
    jobs: int
    claimers: int
    submit_s: float
    claim_phase_s: float
    jobs_per_s: float
    claim_p50_ms: float
    claim_p99_ms: float
    claim_max_ms: float
    empty_claims: int
    empty_p50_ms: float
    server_errors: int = 0  # 5xx/dropped answers to submits and reports, retried
    claim_errors: int = 0  # 5xx/dropped answers to claims (the worker polled again)
    leases_lost: int = 0  # reports answered 409: the orchestrator had requeued the job (it ran again)
    claims_refused: int = 0  # claims answered 409: the worker's heartbeats had not been recorded in time
    db_locked: int = 0  # "database is locked" lines in the Prefect server's log (SQLite's one writer)
    max_writes: Optional[int] = None  # the orchestrator's MUSETALK_PREFECT_MAX_WRITES (None: the default)
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    not_succeeded: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.not_succeeded)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ok"] = self.ok
        return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


RETRIES = 5


def _with_retries(send, counters: dict[str, int]) -> httpx.Response:
    """What a client does with a safe request (a submit under its Idempotency-Key, a lease's repeated
    final report): retry a 5xx or a dropped connection with backoff. Each retry is counted."""
    for attempt in range(1, RETRIES + 1):
        try:
            r = send()
        except httpx.TransportError:
            if attempt == RETRIES:
                raise
        else:
            if r.status_code < 500 or attempt == RETRIES:
                return r
        counters["server_errors"] = counters.get("server_errors", 0) + 1
        time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def submit_jobs(base: str, n: int, concurrency: int = 8,
                counters: Optional[dict[str, int]] = None) -> list[str]:
    """``n`` buffer jobs through the public API; their ids."""
    counters = {} if counters is None else counters
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def one(i: int) -> str:
        job_id = f"load-{i:05d}-{uuid.uuid4().hex[:6]}"
        body = {"musetalk_job_id": job_id, "video_url": "http://127.0.0.1:9/avatar.mp4",
                "audio_url": "http://127.0.0.1:9/speech.wav", "route": "buffer"}
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            r = _with_retries(lambda: http.post(f"{base}/v1/avatar/jobs", json=body,
                                                headers={**headers, "Idempotency-Key": job_id}), counters)
        if r.status_code not in (200, 202):
            raise RuntimeError(f"submit {job_id}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()["id"]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def run_claimers(base: str, n_jobs: int, claimers: int, render_s: float, timeout_s: float,
                 counters: Optional[dict[str, int]] = None) -> tuple[list[Claimed], list[float], list[float], float]:
    """``claimers`` workers claiming until ``n_jobs`` are done; (claims, claim ms, empty-claim ms, seconds)."""
    counters = {} if counters is None else counters
    headers = {"X-Internal-API-Key": INTERNAL_KEY}
    claimed: list[Claimed] = []
    succeeded: set[str] = set()
    latencies: list[float] = []
    empty: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    errors: list[str] = []
    start = threading.Barrier(claimers + 1)
    deadline = time.monotonic() + timeout_s

    def heartbeat(http: httpx.Client, worker_id: str, status: str) -> None:
        r = _with_retries(lambda: http.post(f"{base}/internal/buffer/workers/{worker_id}/heartbeat",
                                            headers=headers, json={"status": status, "gpu_class": "fake",
                                                                   "capacity": 1, "error": None}), counters)
        r.raise_for_status()

    def beat_forever(worker_id: str, holding: threading.Event) -> None:
        """As a buffer worker does (DESIGN §5): heartbeats on their own clock, also while it holds a job or
        waits on a slow claim, so a slow orchestrator never makes a live worker look offline."""
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            while not done.wait(HEARTBEAT_EVERY_S):
                try:
                    heartbeat(http, worker_id, "busy" if holding.is_set() else "idle")
                except httpx.HTTPError as exc:  # logged and reported in the next beat by a real worker
                    log.warning("heartbeat of %s failed: %s", worker_id, exc)

    def worker(index: int) -> None:
        worker_id = f"load-worker-{index:02d}"
        holding = threading.Event()
        try:
            # A slow claim is a measurement (it lands in p99), not a failure: only a hung server fails the run.
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
                heartbeat(http, worker_id, "idle")
                threading.Thread(target=beat_forever, args=(worker_id, holding), daemon=True).start()
                start.wait()
                while not done.is_set() and time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    try:
                        r = http.post(f"{base}/internal/buffer/jobs/claim", headers=headers,
                                      json={"worker_id": worker_id})
                    except httpx.TransportError:
                        r = None
                    ms = (time.perf_counter() - t0) * 1000
                    if r is None or r.status_code >= 500:  # a buffer worker logs it and polls again
                        with lock:
                            counters["claim_errors"] = counters.get("claim_errors", 0) + 1
                        time.sleep(0.5)
                        continue
                    if r.status_code == 409:  # refused: no heartbeat recorded within the window; beat, poll again
                        with lock:
                            counters["claims_refused"] = counters.get("claims_refused", 0) + 1
                        heartbeat(http, worker_id, "idle")
                        continue
                    r.raise_for_status()
                    job = r.json().get("job")
                    if job is None:
                        with lock:
                            empty.append(ms)
                            finished = len(succeeded) >= n_jobs
                        if finished:
                            break
                        time.sleep(0.05)  # others hold the rest, or a race emptied the candidates
                        continue
                    holding.set()
                    with lock:
                        latencies.append(ms)
                        claimed.append(Claimed(worker_id, job["musetalk_job_id"], job["buffer_job_id"]))
                    if render_s:
                        time.sleep(render_s)
                    url = f"https://cdn.example/avatar/outputs/{job['musetalk_job_id']}.mp4"
                    report = {"status": "succeeded", "output_url": url, "worker_id": worker_id,
                              "metrics": {"GENERATION_TIME_SEC": render_s}}
                    r = _with_retries(lambda: http.post(  # noqa: B023 - called at once, in this iteration
                        f"{base}/internal/buffer/jobs/{job['buffer_job_id']}/status", headers=headers,
                        json=report), counters)
                    holding.clear()
                    if r.status_code == 409:  # the lease was taken back (requeued): the job runs again
                        with lock:
                            counters["leases_lost"] = counters.get("leases_lost", 0) + 1
                        log.warning("%s: lease of %s lost: %s", worker_id, job["musetalk_job_id"], r.text[:200])
                        continue
                    if r.status_code != 200:
                        raise RuntimeError(f"status report for {job['musetalk_job_id']}: HTTP {r.status_code} "
                                           f"{r.text[:300]}")
                    with lock:
                        succeeded.add(job["musetalk_job_id"])
        except Exception as exc:  # noqa: BLE001 - reported with the result, and the others stop
            with lock:
                errors.append(f"{worker_id}: {exc}")
            done.set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(claimers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 5))
    elapsed = time.perf_counter() - t0
    done.set()
    if errors:
        raise RuntimeError("claimers failed: " + "; ".join(errors[:5]))
    return claimed, latencies, empty, elapsed


def job_statuses(base: str, ids: list[str]) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def one(job_id: str) -> tuple[str, str]:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            r = http.get(f"{base}/v1/avatar/jobs/{job_id}", headers=headers)
        return job_id, (r.json().get("status") if r.status_code == 200 else f"HTTP {r.status_code}")

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, ids))


def run_load(database: str, *, jobs: int = 500, claimers: int = 20, render_s: float = 0.0,
             timeout_s: float = 1800.0, orchestrator_cmd: str = ORCHESTRATOR_CMD,
             keep: Optional[Path] = None, max_writes: Optional[int] = None) -> LoadResult:
    """One full run on ``database`` (``sqlite`` or ``postgres``); ``keep``: a folder for the logs and the
    SQLite file, left in place (else a temporary one, removed)."""
    pg = None
    with tempfile.TemporaryDirectory(prefix="control-plane-load-") as tmp:
        work = Path(tmp) if keep is None else keep / database
        work.mkdir(parents=True, exist_ok=True)
        url = None
        if database == "postgres":
            from tests.pg import start_postgres  # the tests' throwaway PostgreSQL (initdb, 127.0.0.1)

            pg, why = start_postgres()
            if pg is None:
                raise RuntimeError(f"PostgreSQL could not be started: {why}")
            url = pg.url
        try:
            with control_plane(url, work, orchestrator_cmd, max_writes) as base:
                counters: dict[str, int] = {}
                t0 = time.perf_counter()
                ids = submit_jobs(base, jobs, counters=counters)
                submit_s = time.perf_counter() - t0
                log.info("%s: %d jobs submitted in %.1f s", database, jobs, submit_s)
                claimed, lat, empty, elapsed = run_claimers(base, jobs, claimers, render_s, timeout_s, counters)
                seen: dict[str, int] = {}
                for c in claimed:
                    seen[c.job_id] = seen.get(c.job_id, 0) + 1
                statuses = job_statuses(base, ids)
            server_log = work / "prefect-server.log"
            db_locked = server_log.read_text(errors="replace").count("database is locked") if server_log.is_file() else 0
        finally:
            if pg is not None:
                pg.stop()
    return LoadResult(
        database=database, jobs=jobs, claimers=claimers, submit_s=round(submit_s, 2),
        claim_phase_s=round(elapsed, 2), jobs_per_s=round(len(seen) / elapsed, 2) if elapsed else 0.0,
        claim_p50_ms=round(_pct(lat, 0.50), 1), claim_p99_ms=round(_pct(lat, 0.99), 1),
        claim_max_ms=round(max(lat, default=0.0), 1), empty_claims=len(empty),
        empty_p50_ms=round(statistics.median(empty), 1) if empty else 0.0,
        server_errors=counters.get("server_errors", 0), claim_errors=counters.get("claim_errors", 0),
        leases_lost=counters.get("leases_lost", 0), claims_refused=counters.get("claims_refused", 0),
        db_locked=db_locked, max_writes=max_writes,
        duplicates=sorted(j for j, n in seen.items() if n > 1),
        lost=sorted(set(ids) - set(seen)),
        not_succeeded={j: s for j, s in statuses.items() if s != "succeeded"},
    )


def markdown_rows(results: list[LoadResult]) -> str:
    lines = ["| database | jobs | claimers | claim p50 (ms) | claim p99 (ms) | jobs/s | empty claims | "
             "claimed twice | lost | submit (jobs/s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        submit_rate = r.jobs / r.submit_s if r.submit_s else 0.0
        lines.append(f"| {r.database} | {r.jobs} | {r.claimers} | {r.claim_p50_ms:.1f} | {r.claim_p99_ms:.1f} | "
                     f"{r.jobs_per_s:.1f} | {r.empty_claims} | {len(r.duplicates)} | "
                     f"{len(r.lost) + len(r.not_succeeded)} | {submit_rate:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.control_plane", description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--claimers", type=int, default=20)
    parser.add_argument("--render-s", type=float, default=0.0, help="fake render time per job")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--orchestrator-cmd", default=ORCHESTRATOR_CMD,
                        help="how to start the orchestrator ({python}, {port} are filled in)")
    parser.add_argument("--max-writes", type=int, default=None,
                        help="the orchestrator's MUSETALK_PREFECT_MAX_WRITES (default: 1 on SQLite, none on PostgreSQL)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs (and SQLite) under this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the results
    results = []
    for database in [d.strip() for d in args.db.split(",") if d.strip()]:
        result = run_load(database, jobs=args.jobs, claimers=args.claimers, render_s=args.render_s,
                          timeout_s=args.timeout_s, orchestrator_cmd=args.orchestrator_cmd, keep=args.keep,
                          max_writes=args.max_writes)
        print(json.dumps(result.as_dict()), flush=True)
        results.append(result)
    print(markdown_rows(results))
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
