"""Two receivers on one PubSub, the flavours apart on purpose.

A sync PubSub waits on its socket with one ``poll()``: a second thread
iterating ``events()`` (or ``wait()``) while the first waits gets a
RuntimeError saying what to do (it was poll()'s own "concurrent poll()
invocation"), and the first thread keeps receiving. Asyncio tasks share one
event loop: two tasks iterating one AsyncPubSub share its events, each
delivered once.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pgcast
import pgcast.aio


def test_a_second_receiving_thread_is_told_and_the_first_keeps_receiving(
    dsn: str, unique_channel: str
) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        got: list[pgcast.Event] = []

        def first() -> None:
            for item in ps.events(select_timeout=30):
                got.append(item)
                return

        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        # The second receiver, until the first is inside its wait (bounded).
        deadline = time.monotonic() + 10
        message = ""
        while not message:
            assert time.monotonic() < deadline, "the first thread never started waiting"
            try:
                for _ in ps.events(select_timeout=0.05, yield_timeouts=True):
                    break
            except RuntimeError as exc:
                message = str(exc)
        assert "another thread is already receiving from this PubSub" in message
        assert "queue.Queue" in message and "one PubSub per thread" in message
        with pgcast.connect(dsn) as sender:
            sender.notify(unique_channel, "still heard")
        thread.join(10)
        assert not thread.is_alive(), "the first thread lost its event"
        assert [e.payload for e in got] == ["still heard"]


def test_two_tasks_share_one_asyncio_pubsub(dsn: str, unique_channel: str) -> None:
    async def body() -> list[str]:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            got: list[str] = []

            async def receive() -> None:
                async for item in ps.events(select_timeout=1.0, yield_timeouts=True):
                    if item is None:
                        return
                    got.append(item.payload)

            tasks = [asyncio.create_task(receive()) for _ in range(2)]
            await asyncio.sleep(0.1)
            for i in range(10):
                await ps.notify(unique_channel, str(i))
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            return got

    got = asyncio.run(body())
    assert sorted(got, key=int) == [str(i) for i in range(10)], got

