"""A fundraising challenge and the donations it collects: the seed's example domain."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from django.conf import settings
from django.db import models
from django.utils import timezone

if TYPE_CHECKING:
    from django.db.models.fields.related_descriptors import RelatedManager


class Challenge(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="challenges"
    )
    title = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    start_date = models.DateField(default=timezone.localdate)
    end_date = models.DateField()

    # Spelled out for the type checker: mypy's django-stubs plugin is configured with the
    # test suite's settings, which do not install this app, so it cannot add them itself.
    objects: ClassVar[models.Manager[Challenge]]
    donations: RelatedManager[Donation]

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return self.title


class Donation(models.Model):
    challenge = models.ForeignKey(Challenge, on_delete=models.CASCADE, related_name="donations")
    amount = models.PositiveIntegerField()

    objects: ClassVar[models.Manager[Donation]]

    def __str__(self) -> str:
        return f"{self.amount} for {self.challenge}"
