from __future__ import annotations

from django.db import models


class ItemColumns(models.Model):
    name = models.CharField(max_length=100)
    created = models.DateField()

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return self.name


class Item(ItemColumns):
    """What the sources and handlers of every figure are registered for."""


class PlainItem(ItemColumns):
    """:class:`Item`'s twin that no source is ever registered for: the plain saves of the
    autocommit figure alternate with saves of items, one by one."""
