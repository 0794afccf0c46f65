"""Drop-in modules for code written against other LISTEN/NOTIFY libraries.

Change one import line and the code runs on pgcast, with its channel quoting,
payload checks, health checks and (where asked) reconnecting:

* :mod:`pgcast.compat.pgpubsub`: ``import pgpubsub`` becomes
  ``from pgcast.compat import pgpubsub``.
* :mod:`pgcast.compat.postgresql` (py-postgresql): ``import postgresql``
  becomes ``from pgcast.compat import postgresql``, and
  ``from postgresql.notifyman import NotificationManager`` becomes
  ``from pgcast.compat.postgresql.notifyman import NotificationManager``.

These modules only map names onto pgcast's own objects: a pgpubsub ``PubSub``
wraps a :class:`pgcast.PubSub`; a py-postgresql connection *is* a
:class:`pgcast.PubSub` with py-postgresql's extra names, and its
``NotificationManager`` is :class:`pgcast.NotificationManager`. What behaves
differently from the originals is listed in the README ("Coming from
pgpubsub, py-postgresql or psycopg2").
"""
