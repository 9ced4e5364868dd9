"""Registers a handler, then fails: autodiscovery must leave nothing of it registered."""

from __future__ import annotations

from typing import Any

from spark_decl import Event, handles


@handles(r"^broken")
def half_registered(event: Event[Any]) -> None:
    pass


raise ImportError("tests.brokenapp.spark cannot be imported")
