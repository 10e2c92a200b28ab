"""What a job run shows in Prefect's UI besides its state: live progress and a link to its output.

:class:`ProgressArtifact` is a Prefect progress artifact on the current run, fed by the job's own
progress updates (:data:`tasks.progress.progress_listener`). Updates arrive from render threads many
times a second; a background thread sends the latest value at most every :data:`PUSH_INTERVAL_S`, with
its own API client, so rendering never waits on the Prefect API and the API sees a few calls per job.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator
from uuid import UUID

from tasks.progress import progress_listener

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 2.0
_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"


def artifact_key(text: str, prefix: str) -> str:
    """A valid artifact key (lower-case letters, digits, dashes) made from ``text``."""
    body = "".join(c if c in _KEY_CHARS else "-" for c in text.lower()).strip("-")[:80]
    return f"{prefix}-{body}" if body else prefix


class ProgressArtifact:
    """A progress artifact (0-100 %) on the current flow run, described by the job's phase."""

    def __init__(self, job_id: str, interval_s: float = PUSH_INTERVAL_S):
        self.job_id = job_id
        self.interval_s = interval_s
        self._latest: tuple[str, float] | None = None
        self._sent: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.artifact_id: UUID | None = None

    def start(self) -> "ProgressArtifact":
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(
            progress=0.0, key=artifact_key(self.job_id, "progress"), description=f"job {self.job_id}: queued")
        self._thread = threading.Thread(target=self._run, name=f"progress-artifact-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def record(self, phase: str, progress: float) -> None:
        """The listener: remember the newest state (called from any thread; never blocks on the API)."""
        with self._lock:
            self._latest = (phase, max(0.0, min(1.0, float(progress))))

    def stop(self) -> None:
        """Send the last state and stop the sender."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s * 5)

    def _run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        with get_client(sync_client=True) as client:
            while True:
                stopping = self._stop.wait(self.interval_s)
                with self._lock:
                    latest = self._latest
                if latest is not None and latest != self._sent and self.artifact_id is not None:
                    phase, progress = latest
                    try:
                        client.update_artifact(self.artifact_id, ArtifactUpdate(
                            data=round(progress * 100.0, 1), description=f"job {self.job_id}: {phase}"))
                        self._sent = latest
                    except Exception:  # progress display is best effort
                        log.debug("progress artifact update failed", exc_info=True)
                if stopping:
                    return


@contextmanager
def progress_artifact(job_id: str) -> Iterator[ProgressArtifact | None]:
    """Within this block, the job's progress updates move a progress artifact on the current run."""
    try:
        artifact = ProgressArtifact(job_id).start()
    except Exception:  # no API: the job still runs, only the display is missing
        log.debug("no progress artifact for %s", job_id, exc_info=True)
        yield None
        return
    token = progress_listener.set(artifact.record)
    try:
        yield artifact
    finally:
        progress_listener.reset(token)
        artifact.stop()


def link_output(job_id: str, output_url: str) -> None:
    """A link artifact on the current run pointing at the job's video (the B2 URL, or the file's URI)."""
    from prefect.artifacts import create_link_artifact

    create_link_artifact(link=output_url, link_text=f"{job_id}.mp4", key=artifact_key(job_id, "output"),
                         description=f"job {job_id}: the rendered video")
