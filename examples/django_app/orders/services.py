"""Placing an order: the row and its notification in one transaction.

``pgcast.notify()`` on Django's own connection joins the transaction
``atomic()`` opened: listeners get the notification when it commits, and
never if it rolls back, so nobody hears of an order that does not exist.
"""

from __future__ import annotations

from django.db import connection, transaction

import pgcast

from .models import Order


def notify(channel: str, payload: pgcast.Payload) -> None:
    """NOTIFY from the current transaction of Django's connection."""
    connection.ensure_connection()
    pgcast.notify(connection.connection, channel, payload)


def place_order(item: str, quantity: int, *, fail_after_notify: bool = False) -> Order:
    """Save an order and announce it on ``orders``, atomically.

    *fail_after_notify* raises after the NOTIFY, inside the transaction, to
    show that a rolled-back order is never announced.
    """
    with transaction.atomic():
        order = Order.objects.create(item=item, quantity=quantity)
        notify("orders", {"id": order.pk, "item": item, "quantity": quantity})
        if fail_after_notify:
            raise RuntimeError(f"order {order.pk} failed after its NOTIFY: rolled back")
    return order
