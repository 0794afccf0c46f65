"""``python manage.py place_order ITEM QUANTITY [--fail]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from orders.services import place_order


class Command(BaseCommand):
    help = "Place an order (and announce it on the channel 'orders' at commit)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("item")
        parser.add_argument("quantity", type=int)
        parser.add_argument("--fail", action="store_true",
                            help="fail after the NOTIFY: the transaction rolls back")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            order = place_order(options["item"], options["quantity"],
                                fail_after_notify=options["fail"])
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"placed order {order.pk}")
