"""Fault injection for durable channels against a real PostgreSQL (issue 4).

A publisher sends 20,000 durable messages (batches of durable inserts, one
transaction each) while the listener's backend is terminated 20 times and
the server is restarted twice. The listener must end with all 20,000, each
exactly once, in order; the same through a NotificationManager.

The faults are spread over the publishing: the publisher waits at evenly
spaced points until the next fault was injected, and each fault waits until
the listener is connected again, so every fault hits a live listener while
messages keep being committed. The publisher survives the faults the way an
application would: a batch whose fate is unknown (the connection broke while
it was on the wire) is looked up in the log before resuming, so the log
itself holds every message once. Every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import pgcast
from pgcast.durable import install_schema
from pgcast.durable._core import REPLAY_BATCH, DurableState
from pgcast.durable._schema import Steps
from pgcast.embedded import EmbeddedServer

pytestmark = pytest.mark.slow

TOTAL = 20_000
BATCH = 50
TERMINATIONS = 20
RESTARTS = 2
LISTENER_APP = "pgcast-fault-listener"
DEADLINE = 100.0  # seconds for one whole run; it takes far less on loopback


@dataclass
class Run:
    """What the threads of one run share."""

    dsn: str
    channel: str
    published: int = 0
    faults_done: int = 0
    markers: int = 0  # Reconnected markers the listener has seen
    terminated: int = 0
    restarted: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def check_time(self, what: str) -> None:
        if time.monotonic() - self.started > DEADLINE:
            raise TimeoutError(f"{what}: the run took over {DEADLINE} s")


def fault_plan() -> list[str]:
    plan = ["terminate"] * TERMINATIONS
    for k in range(RESTARTS):  # restarts among the terminations, evenly
        plan.insert((k + 1) * len(plan) // (RESTARTS + 1), "restart")
    return plan


PLAN = fault_plan()


def threshold(k: int) -> int:
    """The count of messages published before fault *k* is injected."""
    return (k + 1) * TOTAL // (len(PLAN) + 1) // BATCH * BATCH


def admin_query(run: Run, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run *sql* on a fresh connection, retrying while the server restarts."""
    while True:
        run.check_time(f"admin query {sql!r}")
        try:
            with psycopg.connect(run.dsn, autocommit=True, connect_timeout=5) as c:
                cur = c.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except psycopg.OperationalError:
            time.sleep(0.05)


def listener_pids(run: Run) -> list[int]:
    rows = admin_query(
        run, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (LISTENER_APP,)
    )
    return [r[0] for r in rows]


def publish(run: Run) -> None:
    """Send 0..TOTAL-1 in order, each once, through faults."""
    ps: pgcast.PubSub | None = None
    try:
        while run.published < TOTAL and not run.stop.is_set():
            k = run.faults_done
            while k < len(PLAN) and run.published >= threshold(k) and not run.stop.is_set():
                run.check_time("the publisher waiting for a fault")
                time.sleep(0.005)  # let the next fault happen first
                k = run.faults_done
            run.check_time("publishing")
            if ps is None:
                ps = pgcast.connect(run.dsn, notify_timeout=30)
            start = run.published
            batch = [(run.channel, str(i)) for i in range(start, min(start + BATCH, TOTAL))]
            try:
                ps.notify_many(batch, durable=True)
                run.published = start + len(batch)
            except (pgcast.ConnectionLostError, pgcast.ConnectError):
                # Sent or not? The log knows (a batch is one transaction).
                run.published = admin_query(
                    run, "SELECT count(*) FROM pgcast.log WHERE channel = %s", (run.channel,)
                )[0][0]
            time.sleep(0.002)
    except BaseException as exc:
        run.errors.append(exc)
        run.stop.set()
    finally:
        if ps is not None:
            ps.close()


def inject(run: Run, server: EmbeddedServer) -> None:
    """Terminate the listener's backend and restart the server, as planned."""
    try:
        for k, fault in enumerate(PLAN):
            while run.published < threshold(k) and not run.stop.is_set():
                run.check_time(f"waiting to inject fault {k}")
                time.sleep(0.005)
            # The previous fault's marker first: every fault is an outage of
            # its own, not a second blow to a reconnect still under way.
            while run.markers < k and not run.stop.is_set():
                run.check_time(f"waiting for the marker of fault {k - 1}")
                time.sleep(0.005)
            if run.stop.is_set():
                return
            # Only a live listener.
            while not (pids := listener_pids(run)):
                run.check_time(f"waiting for the listener before fault {k}")
                time.sleep(0.01)
            if fault == "restart":
                server.restart()
                run.restarted += 1
            else:
                # The backend listed may be the previous one, still exiting
                # after the last fault (terminate answers False): list again.
                while admin_query(run, "SELECT pg_terminate_backend(%s)", (pids[0],)) != [
                    (True,)
                ]:
                    run.check_time(f"terminating the listener for fault {k}")
                    time.sleep(0.01)
                    while not (pids := listener_pids(run)):
                        run.check_time(f"waiting for the listener before fault {k}")
                        time.sleep(0.01)
                run.terminated += 1
            run.faults_done = k + 1
    except BaseException as exc:
        run.errors.append(exc)
        run.stop.set()


def receive_with_pubsub(ps: pgcast.PubSub, run: Run) -> Iterator[Any]:
    yield from ps.events(select_timeout=0.1, yield_timeouts=True)


def receive_with_manager(ps: pgcast.PubSub, run: Run) -> Iterator[Any]:
    with pgcast.NotificationManager(ps, timeout=0.1, reconnect=True) as nm:
        for item in nm:
            if item is None:
                yield None
                continue
            _, events = item
            yield from events


@pytest.mark.parametrize(
    "receive", [receive_with_pubsub, receive_with_manager], ids=["pubsub", "manager"]
)
def test_durable_messages_survive_terminations_and_restarts(
    server: EmbeddedServer,
    unique_channel: str,
    receive: Callable[[pgcast.PubSub, Run], Iterator[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = Run(server.dsn, unique_channel)
    # Count what arrives by replay, to show that faults did make the listener
    # miss messages it then read from the log.
    replayed = [0]
    original = DurableState.replay_steps

    def counting(self: DurableState, batch: int = REPLAY_BATCH) -> Steps[int]:
        added = yield from original(self, batch)
        replayed[0] += added
        return added

    monkeypatch.setattr(DurableState, "replay_steps", counting)
    with psycopg.connect(run.dsn, autocommit=True) as c:
        install_schema(c)
    payloads: list[str] = []
    event_ids: list[int] = []
    markers = 0
    backoff = pgcast.Backoff(initial=0.05, maximum=0.5, max_time=60)
    with pgcast.connect(run.dsn, application_name=LISTENER_APP,
                        reconnect_backoff=backoff) as sub:
        sub.listen(unique_channel, durable=True, since=0)
        threads = [
            threading.Thread(target=publish, args=(run,), name="publisher"),
            threading.Thread(target=inject, args=(run, server), name="injector"),
        ]
        for t in threads:
            t.start()
        try:
            for item in receive(sub, run):
                if isinstance(item, pgcast.Reconnected):
                    markers += 1
                    run.markers = markers
                elif item is not None:
                    payloads.append(item.payload)
                    event_ids.append(item.id)
                if len(payloads) >= TOTAL or run.errors:
                    break
                if time.monotonic() - run.started > DEADLINE:
                    break
        finally:
            run.stop.set()
            for t in threads:
                t.join(30)
        assert not run.errors, run.errors
        assert not any(t.is_alive() for t in threads), "a helper thread did not stop"
        # Nothing more arrives: no duplicate came late.
        for item in sub.wait(0.5):
            if item is None:
                break
            assert isinstance(item, pgcast.Reconnected), f"unexpected late event {item!r}"

    print(f"faults: {run.terminated} terminations, {run.restarted} restarts; {markers} "
          f"markers; {replayed[0]} replayed; {time.monotonic() - run.started:.1f} s")
    assert (run.terminated, run.restarted) == (TERMINATIONS, RESTARTS)
    assert len(payloads) == TOTAL, f"received {len(payloads)} of {TOTAL}"
    assert payloads == [str(i) for i in range(TOTAL)]  # each once, in order
    assert event_ids == sorted(set(event_ids))
    assert markers >= TERMINATIONS + RESTARTS
    assert replayed[0] > 0
    # The log itself holds every message once: the publisher lost and
    # doubled nothing either.
    rows = admin_query(
        run, "SELECT count(*), count(DISTINCT payload) FROM pgcast.log WHERE channel = %s",
        (unique_channel,),
    )
    assert rows == [(TOTAL, TOTAL)]
