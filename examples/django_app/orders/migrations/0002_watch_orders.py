"""Every change to ``orders_order`` is published on the channel ``orders_changed``.

The SQL beside this file is what ``pgcast watch orders_order --channel
orders_changed --sql`` printed (``pgcast.triggers.sql_text()`` in Python)
once 0001 had created the table: pgcast's trigger functions and this table's
triggers, as plain SQL that migrates with the schema. Re-create it after
changing the table's key. Reversing drops the triggers (the functions stay:
other tables may use them).
"""

from pathlib import Path

from django.db import migrations

SQL = Path(__file__).with_suffix(".sql").read_text(encoding="utf-8")
REVERSE = "\n".join(line for line in SQL.splitlines() if line.startswith("DROP TRIGGER"))


class Migration(migrations.Migration):
    dependencies = [("orders", "0001_initial")]

    operations = [migrations.RunSQL(SQL, reverse_sql=REVERSE)]
