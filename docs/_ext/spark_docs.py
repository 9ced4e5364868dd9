"""Local Sphinx helpers: document management commands from their parsers, models from _meta.

``.. django-command:: process_spark_sources`` renders the command's help and every option
it adds (Django's common options are left out), so the reference never drifts from the code.
Model classes documented with autodoc get a list of their fields appended.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management import load_command_class
from django.core.management.base import BaseCommand
from django.db import models
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def _option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    common = {
        action.dest for action in BaseCommand().create_parser("manage.py", "command")._actions
    }
    return [action for action in parser._actions if action.dest not in common]


class DjangoCommandDirective(SphinxDirective):
    """``.. django-command:: name`` (optional ``:app:``, default ``spark_decl``)."""

    required_arguments = 1
    option_spec = {"app": str}

    def run(self) -> list[Any]:
        name = self.arguments[0]
        command = load_command_class(self.options.get("app", "spark_decl"), name)
        parser = command.create_parser("manage.py", name)
        lines = [f".. program:: manage.py {name}", "", str(command.help), ""]
        for action in _option_actions(parser):
            if not action.option_strings:
                continue
            metavar = ""
            if action.nargs != 0:
                metavar = " " + (action.metavar or action.dest.upper())
            flags = ", ".join(f"{flag}{metavar}" for flag in action.option_strings)
            text = (action.help or "") % {"default": action.default}
            lines += [f".. option:: {flags}", "", f"   {text}", ""]
        return self.parse_text_to_nodes("\n".join(lines))


def describe_model_fields(
    app: Sphinx, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    if what != "class" or not (isinstance(obj, type) and issubclass(obj, models.Model)):
        return
    lines += ["", "Fields:", ""]
    for field in obj._meta.get_fields():
        if field.auto_created:
            continue
        details = [type(field).__name__]
        if field.is_relation and field.related_model is not None:
            details.append(f"to {field.related_model.__name__}")
        if getattr(field, "max_length", None):
            details.append(f"max_length={field.max_length}")
        if getattr(field, "unique", False) and not getattr(field, "primary_key", False):
            details.append("unique")
        if getattr(field, "null", False):
            details.append("nullable")
        choices = getattr(field, "choices", None)
        if choices:
            details.append("one of " + ", ".join(f"``{value}``" for value, _ in choices))
        lines.append(f"* ``{field.name}`` ({', '.join(details)})")
    lines.append("")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("django-command", DjangoCommandDirective)
    app.connect("autodoc-process-docstring", describe_model_fields)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
