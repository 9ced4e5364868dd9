"""Local Sphinx helpers that keep the reference in step with the code.

``.. django-command:: process_spark_sources``
    Renders the command's usage line, its help and every option it adds (Django's common
    options are left out), from the command's own parser. The options are ``.. option::``
    targets of the program ``process_spark_sources``, so prose can link to them with
    ``:option:`process_spark_sources --mark-only```; a link to an option that no longer
    exists is a warning, and ``make docs`` builds with ``-W``.

``.. spark-settings::``
    The table of ``SPARK_DECL`` keys: the content gives each key's meaning, the defaults come
    from :data:`spark_decl.conf.DEFAULTS`. A key the code has and the page does not, or the
    other way round, is a warning.

Model classes documented with autodoc get a list of their fields appended.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from django.core.management import load_command_class
from django.core.management.base import BaseCommand
from django.db import models
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


def _option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    common = {
        action.dest for action in BaseCommand().create_parser("manage.py", "command")._actions
    }
    return [action for action in parser._actions if action.dest not in common]


def _usage(name: str, parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> str:
    formatter = argparse.HelpFormatter(f"manage.py {name}", width=10_000)
    formatter.add_usage(None, actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _plain(text: str) -> str:
    """Escape ``text`` so that reStructuredText shows it as written (help strings are
    plain text: ``'^challenge_'`` must not become a link)."""
    return re.sub(r"([\\*`|_])", r"\\\1", text)


class DjangoCommandDirective(SphinxDirective):
    """``.. django-command:: name`` (optional ``:app:``, default ``spark_decl``)."""

    required_arguments = 1
    option_spec = {"app": str}

    def run(self) -> list[Any]:
        name = self.arguments[0]
        command = load_command_class(self.options.get("app", "spark_decl"), name)
        parser = command.create_parser("manage.py", name)
        actions = _option_actions(parser)
        lines = [
            ".. code-block:: text",
            "",
            f"   {_usage(name, parser, actions)}",
            "",
            _plain(str(command.help)),
            "",
            f".. program:: {name}",
            "",
        ]
        for action in actions:
            if not action.option_strings:
                continue
            metavar = ""
            if action.nargs != 0:
                metavar = " " + (action.metavar or action.dest.upper())
            flags = ", ".join(f"{flag}{metavar}" for flag in action.option_strings)
            text = (action.help or "") % {"default": action.default}
            lines += [f".. option:: {flags}", "", f"   {_plain(text)}", ""]
        return self.parse_text_to_nodes("\n".join(lines))


class SparkSettingsDirective(SphinxDirective):
    """``.. spark-settings::`` whose content is ``KEY`` lines, each followed by its meaning
    (indented reStructuredText)."""

    has_content = True

    def run(self) -> list[Any]:
        from spark_decl.conf import DEFAULTS

        documented: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in self.content:
            if line and not line[0].isspace():
                current = documented.setdefault(line.strip(), [])
            elif current is not None:
                current.append(line.strip())
        location = (self.env.docname, self.lineno)
        for key in sorted(set(DEFAULTS) - set(documented)):
            logger.warning(
                "SPARK_DECL[%r] (default %r) is not documented in spark-settings",
                key,
                DEFAULTS[key],
                location=location,
            )
        for key in sorted(set(documented) - set(DEFAULTS)):
            logger.warning(
                "spark-settings documents SPARK_DECL[%r], which spark_decl.conf does not have",
                key,
                location=location,
            )
        rows = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 25 12 63",
            "",
            "   * - Key",
            "     - Default",
            "     - Meaning",
        ]
        for key, meaning in documented.items():
            default = f"``{DEFAULTS[key]!r}``" if key in DEFAULTS else "\\-"
            rows += [f"   * - ``{key}``", f"     - {default}", f"     - {meaning[0]}"]
            rows += [f"       {line}" if line else "" for line in meaning[1:]]
        return self.parse_text_to_nodes("\n".join(rows))


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
    app.add_directive("spark-settings", SparkSettingsDirective)
    app.connect("autodoc-process-docstring", describe_model_fields)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
