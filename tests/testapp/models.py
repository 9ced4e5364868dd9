from __future__ import annotations

import datetime as dt

from django.db import models


class Challenge(models.Model):
    title = models.CharField(max_length=100)
    is_active = models.BooleanField(default=True)
    start_date = models.DateField(default=dt.date.today)
    end_date = models.DateField(default=dt.date.today)

    def __str__(self) -> str:
        return self.title


class Donation(models.Model):
    challenge = models.ForeignKey(Challenge, on_delete=models.CASCADE, related_name="donations")
    amount = models.PositiveIntegerField(default=1)

    def __str__(self) -> str:
        return f"{self.amount} for {self.challenge}"


class HandlerLog(models.Model):
    """Rows written by test handlers: lets tests count handler effects in the database."""

    handler = models.CharField(max_length=100)
    key = models.CharField(max_length=255)
    # The process that wrote the row, and what the handler saw (tests/workers.py).
    pid = models.IntegerField(default=0)
    detail = models.CharField(max_length=255, blank=True, default="")

    def __str__(self) -> str:
        return f"{self.handler}: {self.key}"
