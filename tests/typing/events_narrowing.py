"""What a user's loop looks like to mypy --strict (tests/test_typing.py runs
mypy on this file and expects exactly the errors marked ``# E:``)."""

from __future__ import annotations

import pgcast
import pgcast.aio


def handle(ps: pgcast.PubSub) -> None:
    for event in ps.events():  # no idle events: no None in the type
        print(event.payload)  # E: the Reconnected case is not handled
    for event in ps.events():
        if isinstance(event, pgcast.Event):
            print(event.payload)  # narrowed: fine
        elif isinstance(event, pgcast.Gap):
            print(event.oldest)  # a durable resume that was not complete
        else:
            print(event.downtime)  # a Reconnected marker
    for event in ps.events():
        if isinstance(event, pgcast.Event):
            continue
        print(event.downtime)  # E: the Gap case is not handled
    for item in ps.events(yield_timeouts=True):
        if item is None:
            continue  # an idle event
        if isinstance(item, pgcast.Reconnected | pgcast.Gap):
            continue
        print(item.payload)
    for event in ps.wait():  # timeout None: no idle events
        if isinstance(event, pgcast.Event):
            print(event.channel)
    for item in ps.wait(1.0):
        print(item.channel)  # E: None and Reconnected are not handled


async def ahandle(aps: pgcast.AsyncPubSub) -> None:
    async for event in aps.events():
        print(event.payload)  # E: the Reconnected case is not handled
    async for event in aps.events():
        if isinstance(event, pgcast.Event):
            print(event.payload)
