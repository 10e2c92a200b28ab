"""What keeps a buffer claim cheap (orchestrator/leases.py, prefect_writes.py), without a Prefect server:
concurrent claims of one process start at different candidates and skip runs another claim of the
process is proposing or has won; the write gate lets N writes through at once and never holds reads."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx

from orchestrator.leases import _Claims, _in_turn
from orchestrator.prefect_writes import WriteGate, is_read, limit_writes


def _run(state_id=None):
    return SimpleNamespace(id=uuid.uuid4(), state=SimpleNamespace(id=state_id or uuid.uuid4()))


def test_a_lone_claim_starts_at_the_oldest_and_concurrent_ones_spread():
    claims = _Claims()
    runs = [_run() for _ in range(5)]
    first = claims.take_slot()
    assert first == 0 and _in_turn(runs, first) == runs  # alone: urgent/oldest first, as before
    second, third = claims.take_slot(), claims.take_slot()
    assert (second, third) == (1, 2)
    assert _in_turn(runs, second)[0] is runs[1] and _in_turn(runs, third)[0] is runs[2]
    assert _in_turn(runs, 7) == runs[2:] + runs[:2]  # more claims than candidates: wrap around
    claims.slots.discard(second)
    assert claims.take_slot() == 1  # a finished claim's slot is the next one's
    assert _in_turn([], 3) == []


def test_runs_being_proposed_or_just_won_are_skipped_but_a_requeued_run_is_not():
    claims = _Claims()
    proposing, won = _run(), _run()
    claims.proposing.add(proposing.id)
    claims.mark_won(won)
    assert claims.taken(proposing) and claims.taken(won)
    # a stale candidate list still shows the won run in the Scheduled state it was won from: skipped;
    # requeued, the run is Scheduled again under a new state: a candidate again
    requeued = SimpleNamespace(id=won.id, state=SimpleNamespace(id=uuid.uuid4()))
    assert not claims.taken(requeued)
    assert not claims.taken(_run())


class _Recorder(httpx.AsyncBaseTransport):
    """Answers after a short wait and records how many requests of each kind were in flight at once."""

    def __init__(self):
        self.in_flight = {"read": 0, "write": 0}
        self.peak = {"read": 0, "write": 0}

    async def handle_async_request(self, request):
        kind = "read" if is_read(request) else "write"
        self.in_flight[kind] += 1
        self.peak[kind] = max(self.peak[kind], self.in_flight[kind])
        await asyncio.sleep(0.02)
        self.in_flight[kind] -= 1
        return httpx.Response(200, json={"ok": True})


def test_write_gate_serializes_writes_and_lets_reads_through():
    assert is_read(httpx.Request("POST", "http://p/api/flow_runs/filter"))
    assert is_read(httpx.Request("GET", "http://p/api/variables/name/x"))
    assert not is_read(httpx.Request("POST", "http://p/api/flow_runs/1/set_state"))
    assert not is_read(httpx.Request("PATCH", "http://p/api/flow_runs/1/labels"))

    async def go():
        inner = _Recorder()
        async with httpx.AsyncClient(transport=WriteGate(inner, asyncio.Semaphore(1)), base_url="http://p") as http:
            calls = [http.post("/api/flow_runs/filter") for _ in range(5)]
            calls += [http.post(f"/api/flow_runs/{i}/set_state") for i in range(5)]
            calls += [http.patch(f"/api/flow_runs/{i}/labels") for i in range(5)]
            answers = await asyncio.gather(*calls)
        assert all(a.status_code == 200 and a.json() == {"ok": True} for a in answers)
        return inner.peak

    peak = asyncio.run(go())
    assert peak["write"] == 1 and peak["read"] == 5


def test_limit_writes_wraps_the_prefect_clients_transport():
    from prefect.client.orchestration import PrefectClient

    async def go():
        client = PrefectClient("http://127.0.0.1:9/api")
        assert not limit_writes(client, 0)  # 0: unlimited, nothing wrapped
        assert limit_writes(client, 2)
        assert isinstance(client._client._transport, WriteGate)
        assert client._client._transport.semaphore._value == 2

    asyncio.run(go())


class _SlowRoster:
    """The few PrefectClient calls orchestrator/workers.py makes: a worker record whose heartbeat moves only
    when a Prefect worker heartbeat is sent, and a roster read that takes a while."""

    api_url = "http://prefect.test/api"

    def __init__(self):
        self.last_beat = datetime.now(timezone.utc) - timedelta(minutes=5)  # offline by now
        self.variable = None

    async def send_worker_heartbeat(self, pool, name, heartbeat_interval_seconds):
        self.last_beat = datetime.now(timezone.utc)

    async def read_variable_by_name(self, name):
        return self.variable

    async def update_variable(self, update):
        self.variable = SimpleNamespace(name=update.name, value=update.value)

    async def create_variable(self, create):
        self.variable = SimpleNamespace(name=create.name, value=create.value)

    async def read_workers_for_work_pool(self, pool):
        seen = self.last_beat  # what the read saw when it started
        await asyncio.sleep(1.0)
        return [SimpleNamespace(name="w1", last_heartbeat_time=seen)]

    async def read_variables(self):
        return [self.variable] if self.variable else []


def test_a_read_begun_before_a_heartbeat_is_not_the_answer_after_it():
    """A worker back online with an unchanged body: its beat writes no variable, but a fresh read (max_age 0)
    must not share a read that began while it was still offline (the claim would be refused with 409)."""
    from orchestrator.workers import buffer_workers, record_heartbeat, utcnow
    OFFLINE = 3.0  # a beat reaches Prefect at most every 0.5 s; a roster read takes 1 s

    async def scenario():
        client = _SlowRoster()
        body = {"status": "idle", "gpu_class": "g", "capacity": 1, "error": None}
        await record_heartbeat(client, "w1", body, offline_sec=OFFLINE)
        client.last_beat = client.last_beat.replace(year=client.last_beat.year - 1)  # then it went silent
        stale = asyncio.ensure_future(buffer_workers(client))
        await asyncio.sleep(0.05)  # the read is in flight
        await asyncio.sleep(OFFLINE / 6)  # due again: this beat reaches Prefect, with the same body as before
        await record_heartbeat(client, "w1", body, offline_sec=OFFLINE)
        fresh = await buffer_workers(client, max_age=0)
        assert not (await stale)["w1"].online(utcnow(), OFFLINE)
        assert fresh["w1"].online(utcnow(), OFFLINE)

    asyncio.run(scenario())
