from __future__ import annotations

from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)
    created = models.DateField()

    def __str__(self) -> str:
        return self.name


class PlainItem(models.Model):
    """:class:`Item`'s twin that no source is ever registered for: the plain saves of the
    autocommit figure alternate with saves of items, one by one."""

    name = models.CharField(max_length=100)
    created = models.DateField()

    def __str__(self) -> str:
        return self.name
