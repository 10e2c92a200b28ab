"""A job's result is its flow run's persisted result: the ``JobOutcome`` (HTTP status + §4 body) as JSON.

The ``generate`` flow persists its own (``persist_result=True``); for a job a buffer worker or Salad
rendered, the orchestrator persists the reported body the same way and puts it on the run's final state,
so every job's result reads back through one call. Storage is Prefect's result storage: the local
``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` on one machine; a fleet whose GPU-pool workers run on other machines
sets a shared default storage block (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``) so the orchestrator can
read what they wrote."""

from __future__ import annotations

import logging
from typing import Any

from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

from tasks.contract import JobOutcome

log = logging.getLogger(__name__)


async def persist_outcome(outcome: JobOutcome) -> Any:
    """A persisted result record of ``outcome``, ready to be a final state's ``data``."""
    store = ResultStore(serializer=JSONSerializer())
    record = store.create_result_record(outcome.model_dump(mode="json"))
    await store.apersist_result_record(record)
    return record


async def read_outcome(state: Any) -> JobOutcome | None:
    """The outcome a finished run carries, or None (no result: crashed, cancelled, unreadable storage)."""
    if state is None or state.data is None:
        return None
    try:
        value = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 — MissingResult, storage another machine holds, …
        log.warning("result of state %s unreadable: %s", state.id, exc)
        return None
    try:
        return JobOutcome.model_validate(value)
    except Exception:  # noqa: BLE001 — an exception object (crash) or a foreign value
        return None
