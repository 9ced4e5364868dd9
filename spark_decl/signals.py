"""Signals other apps can connect to.

All four are sent with ``sender=None`` (filter on the keyword arguments instead) through
``send_robust``: a receiver that raises is logged (by Django, on the ``django.dispatch``
logger) and does not stop the other receivers, the handlers, the claim or the batch.
With no receiver connected, ``events_claimed`` and ``call_finished`` cost a list check:
nothing is timed, counted or sent.

``event_dispatched``
    Sent once for every event that :func:`spark_decl.process_events` dispatches, after the
    event's handlers have run (whether they succeeded or not). Keyword arguments: ``event``
    (the event mapping) and ``handlers`` (the names of the handlers that were routed to it).
    Retries of single handler calls are not dispatches and do not send it.

``handler_failed``
    Sent after a handler raised, once its failure has been recorded. Keyword arguments:
    ``event``, ``handler`` (the handler's dotted name) and ``exception``. Connect to it to
    alert someone.

``events_claimed``
    Sent once per claim statement that claimed at least one key, once the claim has
    committed (never for a claim that rolled back). Keyword argument: ``counts``, ``{group:
    number of keys claimed now}``; keys claimed before, by this or another process, are not
    counted. Every claim sends it: a save's, a batch chunk's (``--mark-only`` too),
    :func:`spark_decl.only_new_events`' (one event per claim) and the outbox's that
    ``retry_spark_events --stale-after`` recovers.

``call_finished``
    Sent once for every handler call that ran, in process or in a background worker, first
    runs and retries alike, once spark_decl's transaction around the call is over (a
    receiver's queries never share it). Keyword
    arguments: ``event``, ``group`` (the event's), ``handler`` (the handler's dotted name),
    ``status`` (``"done"``, ``"failed"`` or ``"given_up"``: the call's status after this
    run), ``attempt`` (1 for a first run, above 1 for a retry), ``duration`` (seconds,
    a float: the handler alone, from :func:`time.perf_counter`) and ``background`` (whether
    it is a background handler). A call that did not run sends nothing: one another
    process ran first, and one whose stored context could not be rebuilt (its row counts
    a failed attempt, and the error is logged). Nor does a run whose transaction rolled
    back (the process is stopping, the database failed): the call stays owed and its next
    run is counted.

:doc:`/metrics` builds Prometheus metrics on the last two; :mod:`spark_decl.opentelemetry`
records them as OpenTelemetry metrics.
"""

from __future__ import annotations

from django.dispatch import Signal

event_dispatched = Signal()
handler_failed = Signal()
events_claimed = Signal()
call_finished = Signal()
