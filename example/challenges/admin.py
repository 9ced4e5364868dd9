from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin

from .models import Challenge, Donation

# ModelAdmin is generic only for the type checker (django-stubs).
if TYPE_CHECKING:
    ChallengeAdminBase = admin.ModelAdmin[Challenge]
    DonationInlineBase = admin.TabularInline[Donation, Challenge]
else:
    ChallengeAdminBase = admin.ModelAdmin
    DonationInlineBase = admin.TabularInline


class DonationInline(DonationInlineBase):
    model = Donation
    extra = 0


@admin.register(Challenge)
class ChallengeAdmin(ChallengeAdminBase):
    list_display = ("title", "user", "is_active", "start_date", "end_date")
    list_filter = ("is_active",)
    inlines = (DonationInline,)
