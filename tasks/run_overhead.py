"""Two fixed costs Prefect adds to every in-process job run, and how this project avoids them.

Measured on a warm serve worker (tiny models, 2 busy vCPUs, one-frame jobs; py-spy of the render thread):

* **Tag concurrency slots**: before each task run, Prefect asks the API for concurrency slots on every
  tag the task run carries (``tag:<name>``), even when no limit exists. Task runs inherit the tags of the
  caller's :func:`prefect.tags` block, and the serve process (``attempt-of:<job>``) and the batch flow
  (``batch:<run>``) tag every job they run, so each of a job's ~9 task runs paid one round trip:
  ≈ 1 s per job there. Those tags mark the *flow run* (the orchestrator and the batch flow find runs by
  them); the flow run has them once it exists, and :func:`untagged_task_runs` keeps its task runs out of
  them.
* **Heartbeat join**: Prefect's flow-run heartbeat thread sleeps in one-second steps and the sync flow
  engine joins it when the run ends, so every flow run ended 0–1 s (≈ 0.5 s on average) after its final
  state was already reported. :func:`heartbeats_end_without_join` makes sync runs end the thread the way
  Prefect's own async engine does (``join_on_exit=False``): it is told to stop and exits by itself within
  a second, sending nothing more (it checks the stop flag before every beat).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def untagged_task_runs() -> Iterator[None]:
    """Task runs started inside the block carry only their own tags, none of the caller's."""
    from prefect.context import TagsContext

    with TagsContext(current_tags=set()):
        yield


def heartbeats_end_without_join() -> bool:
    """Make Prefect's flow engine stop a run's heartbeat thread without waiting for it (idempotent).
    False, with a log line, when this Prefect has no such switch (then nothing changes)."""
    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None:
        log.info("prefect.flow_engine has no _send_heartbeats; flow runs keep joining their heartbeat thread")
        return False
    if getattr(original, "_musetalk_unjoined", False):
        return True
    try:
        takes_switch = "join_on_exit" in inspect.signature(original).parameters
    except (TypeError, ValueError):
        takes_switch = False
    if not takes_switch:
        log.info("prefect's _send_heartbeats has no join_on_exit; flow runs keep joining their heartbeat thread")
        return False

    @contextmanager
    def unjoined(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
        with original(engine, join_on_exit=False):
            yield

    unjoined._musetalk_unjoined = True  # type: ignore[attr-defined]
    unjoined.__wrapped__ = original  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = unjoined
    return True
