"""The two packages under test behind one small interface.

Each benchmark process has Django set up with exactly one of the two apps installed; the
worker calls :func:`get_package` with the name it was started for and drives the package
through this interface, i.e. through each package's own registration API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol
from unittest import mock

from .benchapp.models import Item
from .benchapp.workload import GROUP, item_events, noop_handler, unmatched_handler


class Package(Protocol):
    """What the benchmarks need from a package."""

    name: str

    def register(self) -> None:
        """Register :func:`item_events` for :class:`Item` (on save and in the batch) and
        :func:`noop_handler` for its group."""

    def unregister(self) -> None:
        """Undo :meth:`register`: saves are plain again."""

    def register_dispatch_handlers(self, unmatched: int) -> None:
        """Register ``unmatched`` never-matching patterns, then the one matching handler."""

    def process_events(self, events: Sequence[dict[str, Any]]) -> None:
        """Dispatch ``events`` to their handlers without deduplication."""

    def event_tables(self) -> list[str]:
        """The package's tables of seen keys, referencing tables first."""

    def seen_keys(self) -> int:
        """How many keys the package has recorded as seen."""


class SparkDecl:
    name = "spark_decl"

    def register(self) -> None:
        from spark_decl.registry import registry

        registry.add_source(Item, item_events)
        registry.add_handler(f"^{GROUP}$", noop_handler)

    def unregister(self) -> None:
        from spark_decl.registry import registry

        registry.clear()

    def register_dispatch_handlers(self, unmatched: int) -> None:
        from spark_decl.registry import registry

        for index in range(unmatched):
            registry.add_handler(f"^group_{index}$", unmatched_handler(index))
        registry.add_handler(f"^{GROUP}$", noop_handler)

    def process_events(self, events: Sequence[dict[str, Any]]) -> None:
        from spark_decl import process_events

        process_events(events)

    def event_tables(self) -> list[str]:
        from spark_decl.models import EventRecord, HandlerOutcome

        return [HandlerOutcome._meta.db_table, EventRecord._meta.db_table]

    def seen_keys(self) -> int:
        from spark_decl.models import EventRecord

        return EventRecord.objects.count()


class ClaimFloor(SparkDecl):
    """Not a package: the least that a claim made inside the saving transaction costs.

    Registering connects a ``post_save`` receiver for :class:`Item` that makes the one
    statement such a claim cannot do without, through Django's cursor: the ``INSERT ...
    ON CONFLICT (key) DO NOTHING RETURNING`` of the event's row into spark_decl's
    ``EventRecord`` (its indexes, the context as spark_decl stores it), every value
    computed as cheaply as possible. No source, no validation, no outcome row, no handler.
    The worker's ``save_floor`` measure runs figure 6 with it: the floor of that figure.
    """

    name = "claim_floor"

    def __init__(self) -> None:
        self._created_at: Any = None

    def register(self) -> None:
        from django.db import connection
        from django.db.models.signals import post_save
        from django.utils import timezone

        self._created_at = connection.ops.adapt_datetimefield_value(timezone.now())
        post_save.connect(self.claim, sender=Item, dispatch_uid="benchmarks.claim_floor")

    def unregister(self) -> None:
        from django.db.models.signals import post_save

        post_save.disconnect(sender=Item, dispatch_uid="benchmarks.claim_floor")

    def claim(self, sender: type[Item], instance: Item, using: str, **kwargs: Any) -> None:
        from django.db import connections

        connection = connections[using]
        json = "%s::jsonb" if connection.vendor == "postgresql" else "%s"
        context = '{"item": {"__spark__": "model", "model": "benchapp.item", "pk": %d}}'
        with connection.cursor() as cursor:
            cursor.execute(
                'INSERT INTO "spark_decl_eventrecord" ("key", "group", "context", "created_at") '
                f"VALUES (%s, %s, {json}, %s) "
                'ON CONFLICT ("key") DO NOTHING RETURNING "id"',
                [f"{GROUP}_{instance.pk}", GROUP, context % instance.pk, self._created_at],
            )
            cursor.fetchone()


class DjangoSpark:
    name = "django_spark"

    def __init__(self) -> None:
        self._receivers: list[Callable[..., Any]] = []

    def register(self) -> None:
        from django.db.models.signals import post_save
        from spark import api

        # django-spark has no way to unregister a source: note the post_save receiver that
        # register_model_event_source connects, so that unregister() can disconnect it.
        connect = post_save.connect

        def spy(receiver: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            self._receivers.append(receiver)
            connect(receiver, *args, **kwargs)

        with mock.patch.object(post_save, "connect", spy):
            api.register_model_event_source(sender=Item, source=item_events)
        api.register_group_handler(group=f"^{GROUP}$", handler=noop_handler)

    def unregister(self) -> None:
        from django.db.models.signals import post_save
        from spark import api

        while self._receivers:
            post_save.disconnect(self._receivers.pop(), sender=Item)
        api.MODEL_SOURCES.clear()
        api.HANDLERS.clear()

    def register_dispatch_handlers(self, unmatched: int) -> None:
        from spark import api

        for index in range(unmatched):
            api.register_group_handler(group=f"^group_{index}$", handler=unmatched_handler(index))
        api.register_group_handler(group=f"^{GROUP}$", handler=noop_handler)

    def process_events(self, events: Sequence[dict[str, Any]]) -> None:
        from spark import api

        api.process_events(events)

    def event_tables(self) -> list[str]:
        from spark.models import Event

        return [Event._meta.db_table]

    def seen_keys(self) -> int:
        from spark.models import Event

        return Event.objects.count()


PACKAGES: dict[str, Callable[[], Package]] = {
    "spark_decl": SparkDecl,
    "django_spark": DjangoSpark,
}


def get_package(name: str) -> Package:
    return PACKAGES[name]()
