"""The URLs and mail backend of ``screenshot_settings``: for taking screenshots only.

``/screenshot-login/?next=/admin/...`` logs the demo superuser in and redirects, so that a
headless browser, started with an empty profile for each page, needs no password. It is
reachable only through ``screenshot_settings``'s ``ROOT_URLCONF`` and only from the loopback
interface; the example project's own ``urls.py`` does not have it.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from ipaddress import ip_address

from django.contrib import admin
from django.contrib.auth import get_user_model, login
from django.core.exceptions import PermissionDenied
from django.core.mail import EmailMessage
from django.core.mail.backends.locmem import EmailBackend
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import path
from django.utils.http import url_has_allowed_host_and_scheme

from .urls import urlpatterns as example_urlpatterns

#: The superuser the screenshots are taken as (its password is unusable).
DEMO_USERNAME = "demo"
#: Mail to this domain is refused, as an SMTP server refuses an unknown mailbox.
REFUSED_DOMAIN = "bounce.example.com"


def log_in(request: HttpRequest) -> HttpResponseRedirect:
    """Log the demo superuser in and redirect to ``?next=`` (a local path only)."""
    if not ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback:
        raise PermissionDenied("screenshot login from the loopback interface only")
    user = get_user_model().objects.get(username=DEMO_USERNAME)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    target = request.GET.get("next", "/admin/")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts=None):
        target = "/admin/"
    return HttpResponseRedirect(target)


class RefusingEmailBackend(EmailBackend):
    """Django's in-memory backend, refusing every recipient at :data:`REFUSED_DOMAIN`."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        for message in email_messages:
            refused = {
                address: (550, b"5.1.1 mailbox unavailable")
                for address in message.recipients()
                if address.endswith(f"@{REFUSED_DOMAIN}")
            }
            if refused:
                raise smtplib.SMTPRecipientsRefused(refused)
        return super().send_messages(email_messages)


urlpatterns = [path("screenshot-login/", log_in), *example_urlpatterns]

# The navigation sidebar (which users can fold away) would take a quarter of each
# screenshot's width, and push the event list's right-hand columns out of view.
admin.site.enable_nav_sidebar = False
