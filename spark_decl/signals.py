"""Signals other apps can connect to.

``event_dispatched``
    Sent once for every event that :func:`spark_decl.process_events` dispatches, after the
    event's handlers have run (whether they succeeded or not). Keyword arguments: ``event``
    (the event mapping) and ``handlers`` (the names of the handlers that were routed to it).
    ``sender`` is always ``None``; filter on ``event["group"]`` instead. Retries of single
    handler calls are not dispatches and do not send it. Receivers run through
    ``send_robust``: a receiver that raises is logged on the ``spark_decl`` logger and does
    not stop the other receivers, the handlers or the batch.

``handler_failed``
    Sent after a handler raised, once its failure has been recorded. Keyword arguments:
    ``event``, ``handler`` (the handler's dotted name) and ``exception``. ``sender`` is
    ``None``. Connect to it to alert someone.
"""

from __future__ import annotations

from django.dispatch import Signal

event_dispatched = Signal()
handler_failed = Signal()
