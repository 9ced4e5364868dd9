"""docs/metrics.rst's Prometheus recipe, shown there from this file (below the marker) and
scraped by tests/test_metrics.py. Not imported by the test app: the tests connect it."""

from __future__ import annotations

# -- recipe --
# yourapp/metrics.py: import it in your AppConfig.ready() to connect the receivers.
from typing import Any

from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from spark_decl.signals import call_finished, events_claimed

EVENTS_CLAIMED = Counter("spark_decl_events_claimed", "Event keys claimed.", ["group"])
CALLS = Counter(
    "spark_decl_calls", "Handler calls that ran.", ["handler", "group", "status", "retry"]
)
CALL_DURATION = Histogram(
    "spark_decl_call_duration_seconds",
    "How long handler calls ran.",
    ["handler", "group", "status"],
)


@receiver(events_claimed)
def count_claimed(sender: None, counts: dict[str, int], **kwargs: Any) -> None:
    for group, number in counts.items():
        EVENTS_CLAIMED.labels(group=group).inc(number)


@receiver(call_finished)
def observe_call(
    sender: None,
    group: str,
    handler: str,
    status: str,
    attempt: int,
    duration: float,
    **kwargs: Any,
) -> None:
    retry = "true" if attempt > 1 else "false"
    CALLS.labels(handler=handler, group=group, status=status, retry=retry).inc()
    CALL_DURATION.labels(handler=handler, group=group, status=status).observe(duration)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus' scrape target: ``path("metrics", metrics_view)`` in your URLconf."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
