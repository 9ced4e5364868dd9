"""OpenTelemetry metrics for spark_decl: claims, handler calls and their durations.

Needs the OpenTelemetry API, the ``opentelemetry`` extra (``pip install
'spark-decl[opentelemetry]'``); your application brings the SDK and an exporter, as for
any other instrumentation. Call :func:`instrument` once at startup, e.g. in an
``AppConfig.ready()``::

    from spark_decl.opentelemetry import instrument

    instrument()  # the global MeterProvider; or instrument(meter_provider=provider)

It connects receivers to :data:`~spark_decl.signals.events_claimed` and
:data:`~spark_decl.signals.call_finished` that record, on the meter ``spark_decl``:

``spark_decl.events.claimed``
    Counter of the keys claimed; attribute ``group``.
``spark_decl.calls``
    Counter of the handler calls that ran; attributes ``handler``, ``group``, ``status``
    (``done``, ``failed``, ``given_up``) and ``retry`` (whether the call ran before).
``spark_decl.call.duration``
    Histogram of the handlers' run times, in seconds; attributes ``handler``, ``group``,
    ``status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider, get_meter
except ImportError as exc:  # pragma: no cover - the test runs it in a subprocess
    raise ImportError(
        "spark_decl.opentelemetry needs the OpenTelemetry API, which the extra "
        "spark_decl[opentelemetry] installs: pip install 'spark-decl[opentelemetry]'"
    ) from exc

from .signals import call_finished, events_claimed

__all__ = ["instrument", "uninstrument"]

# The buckets OpenTelemetry's semantic conventions advise for durations in seconds (the
# SDK's defaults are made for milliseconds: every handler would fall in the first one).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
DISPATCH_UID = "spark_decl.opentelemetry"


@dataclass(frozen=True)
class _Recorder:
    """The instruments, and the two receivers that record on them."""

    claimed: Counter
    calls: Counter
    duration: Histogram

    def on_claimed(self, sender: object, *, counts: dict[str, int], **kwargs: Any) -> None:
        for group, number in counts.items():
            self.claimed.add(number, {"group": group})

    def on_call(
        self,
        sender: object,
        *,
        group: str,
        handler: str,
        status: str,
        attempt: int,
        duration: float,
        **kwargs: Any,
    ) -> None:
        attributes = {"handler": handler, "group": group, "status": status}
        self.calls.add(1, {**attributes, "retry": attempt > 1})
        self.duration.record(duration, attributes)


_recorder: _Recorder | None = None


def instrument(meter_provider: MeterProvider | None = None) -> None:
    """Record spark_decl's metrics on ``meter_provider`` (the global one if ``None``).

    Calling it again records on the new provider instead (never on both)."""
    global _recorder
    uninstrument()
    meter = get_meter("spark_decl", meter_provider=meter_provider)
    _recorder = _Recorder(
        claimed=meter.create_counter(
            "spark_decl.events.claimed", unit="{event}", description="Event keys claimed."
        ),
        calls=meter.create_counter(
            "spark_decl.calls", unit="{call}", description="Handler calls that ran."
        ),
        duration=meter.create_histogram(
            "spark_decl.call.duration",
            unit="s",
            description="How long handler calls ran.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        ),
    )
    # Strong references: the recorder lives until uninstrument().
    events_claimed.connect(_recorder.on_claimed, weak=False, dispatch_uid=DISPATCH_UID)
    call_finished.connect(_recorder.on_call, weak=False, dispatch_uid=DISPATCH_UID)


def uninstrument() -> None:
    """Stop recording (nothing happens if :func:`instrument` was not called)."""
    global _recorder
    events_claimed.disconnect(dispatch_uid=DISPATCH_UID)
    call_finished.disconnect(dispatch_uid=DISPATCH_UID)
    _recorder = None
