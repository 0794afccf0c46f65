"""A FastAPI application that mounts the pgcast gateway and publishes from a route.

Run it (``PGCAST_DSN`` names the database; without it, libpq's defaults)::

    pip install 'pgcast[gateway]' fastapi
    PGCAST_DSN=postgresql://localhost/app uvicorn app:app --app-dir examples/fastapi_app

then, in a browser's console (or any WebSocket client)::

    ws = new WebSocket("ws://localhost:8000/realtime/ws")
    ws.onmessage = (m) => console.log(m.data)
    ws.onopen = () => ws.send('{"type": "subscribe", "channels": ["orders"]}')

and ``curl -X POST localhost:8000/orders -H 'content-type: application/json'
-d '{"item": "tea", "quantity": 2}'``: the browser receives the order. So
does anything else LISTENing on ``orders`` (``pgcast listen orders``), and a
``NOTIFY orders`` sent from SQL reaches the browser too.

The gateway is started and stopped by the application's lifespan, and the
route publishes through ``realtime.gateway.publish()``, the gateway's public
API, on the gateway's own connection (no connection per request).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel, Field

from pgcast.gateway import create_app

#: The gateway: browsers may subscribe to ``orders`` (and publish nothing).
realtime = create_app(os.environ.get("PGCAST_DSN", ""), allow=["orders"])

app = FastAPI(lifespan=lambda app: realtime.gateway.running())
app.mount("/realtime", realtime)  # /realtime/ws, /realtime/sse, /realtime/metrics


class Order(BaseModel):
    """An order, as the client posts it."""

    item: str = Field(min_length=1, max_length=100)
    quantity: int = Field(ge=1, le=1000)


@app.post("/orders", status_code=202)
async def new_order(order: Order) -> dict[str, str]:
    """Take an order and tell every subscriber of ``orders`` about it."""
    await realtime.gateway.publish("orders", order.model_dump())
    return {"status": "published"}


@app.get("/status")
async def status() -> dict[str, object]:
    """The gateway's state, as the host application can read it."""
    gateway = realtime.gateway
    return {"database_up": gateway.database_up, "clients": gateway.clients,
            "listening": sorted(gateway.listening())}
