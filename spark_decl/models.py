"""The tables: one row per claimed key, one per handler call it owes, and the outbox.

Every call has its :class:`HandlerOutcome` row, whatever its state (see
:mod:`spark_decl.outcomes`, which writes them). :class:`OutboxEvent` holds, for a moment,
the events of saves made inside a transaction (see :mod:`spark_decl.outbox`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    # django-stubs' fields are generic (set and get types); Django's are not subscriptable.
    _BigAutoField = models.BigAutoField[int, int]
else:
    _BigAutoField = models.BigAutoField


class RowIdField(_BigAutoField):
    """A ``BigAutoField`` that is SQLite's plain ``rowid`` (no ``AUTOINCREMENT``).

    ``AUTOINCREMENT`` only stops SQLite from reusing the id of the table's newest row
    after that row is deleted. Nothing refers to a deleted event or outcome by id, while the
    ``sqlite_sequence`` update it costs is a measurable part of each claim (see
    ``benchmarks/sqlite_writes.py``). Other databases keep their identity column.
    """

    def db_type_suffix(self, connection: BaseDatabaseWrapper) -> str | None:
        if connection.vendor == "sqlite":
            return None
        return connection.data_types_suffix.get(self.get_internal_type())


class EventRecord(models.Model):
    """A claimed event key. Its unique ``key`` is what makes every event happen once."""

    id = RowIdField(primary_key=True, serialize=False, verbose_name="ID")
    # Unique and indexed through Meta rather than the fields' unique=True and db_index=True,
    # which on PostgreSQL also make a varchar_pattern_ops ("_like") index each: no query
    # here reads them (LIKE 'prefix%'), and every claim would write both.
    key = models.CharField(_("key"), max_length=255)
    group = models.CharField(_("group"), max_length=255)
    context = models.JSONField(_("context"), default=dict, blank=True)
    # Not indexed: ids ascend with creation, so "newest first" is "-pk", and an index here
    # would be one more write per claim for reads that are rare (prune, the admin's filter).
    created_at = models.DateTimeField(_("created at"))
    outcomes: models.Manager[HandlerOutcome]

    class Meta:
        verbose_name = _("event")
        verbose_name_plural = _("events")
        ordering: ClassVar[list[str]] = ["-pk"]
        constraints: ClassVar[list[models.BaseConstraint]] = [
            # What makes a key claimed once: the claim's INSERT ... ON CONFLICT ("key").
            models.UniqueConstraint(fields=["key"], name="spark_decl_unique_key"),
        ]
        indexes: ClassVar[list[models.Index]] = [
            # retry --group, replay and the admin's group filter.
            models.Index(fields=["group"], name="spark_decl_group_idx"),
        ]

    def __str__(self) -> str:
        return self.key

    def handler_statuses(self) -> dict[str, str]:
        """The status of each handler call this event owes, by handler name, in the order
        the calls were written."""
        return dict(self.outcomes.order_by("pk").values_list("handler", "status"))


class HandlerOutcome(models.Model):
    """What became of one handler's call for one event."""

    id = RowIdField(primary_key=True, serialize=False, verbose_name="ID")

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        DONE = "done", _("done")
        FAILED = "failed", _("failed")
        GIVEN_UP = "given_up", _("given up")

    record = models.ForeignKey(
        EventRecord,
        on_delete=models.CASCADE,
        related_name="outcomes",
        verbose_name=_("event"),
        # The unique (record, handler) constraint's index starts with record and serves
        # every lookup by record; a second index would only slow down each claim.
        db_index=False,
    )
    # Not indexed: every lookup names the record too (the unique constraint's index), and
    # "retry --handler" is served by spark_decl_due_idx; on SQLite an index on handler
    # would even win there and read every call the handler ever had.
    handler = models.CharField(_("handler"), max_length=255)
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.PENDING
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    last_error = models.TextField(_("last error"), blank=True)
    traceback = models.TextField(_("traceback"), blank=True)
    created_at = models.DateTimeField(_("created at"))
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    next_attempt_at = models.DateTimeField(_("next attempt at"), null=True, blank=True)

    class Meta:
        verbose_name = _("handler outcome")
        verbose_name_plural = _("handler outcomes")
        ordering: ClassVar[list[str]] = ["pk"]
        constraints: ClassVar[list[models.BaseConstraint]] = [
            models.UniqueConstraint(
                fields=["record", "handler"], name="spark_decl_one_outcome_per_handler"
            ),
        ]
        indexes: ClassVar[list[models.Index]] = [
            # Only the calls a retry may pick up: a successful call, by far the most
            # common row, then costs no index entry (see retry.due_outcomes). handler and
            # created_at make it cover health()'s count of the open calls per handler,
            # which then reads no table row: 0.12 s instead of 2 s for 500,000 open calls
            # among ten million (benchmarks/README.md). Key columns, not include=: SQLite
            # has no covering indexes, and Django warns (models.W040) about include= there.
            models.Index(
                fields=["status", "next_attempt_at", "handler", "created_at"],
                name="spark_decl_due_idx",
                condition=~Q(status="done"),
            ),
        ]

    def __str__(self) -> str:
        # get_status_display() is made by Django; only django-stubs' mypy plugin declares it.
        return f"{self.handler}: {self.get_status_display()}"  # pyright: ignore[reportAttributeAccessIssue]


class OutboxEvent(models.Model):
    """An event of a save made inside a transaction, written in that transaction and
    claimed (then deleted) once it commits: a crash between the two leaves it here, for
    ``retry_spark_events --stale-after`` to claim."""

    id = RowIdField(primary_key=True, serialize=False, verbose_name="ID")
    # Not unique: a transaction may produce a key twice, or a key claimed meanwhile; the
    # claim (EventRecord's unique key) decides.
    key = models.CharField(_("key"), max_length=255)
    group = models.CharField(_("group"), max_length=255)
    context = models.JSONField(_("context"), default=dict, blank=True)
    # Not indexed: rows live from a save to its transaction's commit, so the table is
    # nearly always empty; a recovery reads it whole. Set by the database: a save binds
    # no datetime (binding one costs as much as the rest of the row).
    created_at = models.DateTimeField(_("created at"), db_default=Now())

    class Meta:
        verbose_name = _("outbox event")
        verbose_name_plural = _("outbox events")
        ordering: ClassVar[list[str]] = ["pk"]

    def __str__(self) -> str:
        return self.key
