"""The documentation's code, checked against the package and run in the example project.

A public name renamed or re-signed, a command option dropped, a setting, check or command
added without documentation, or an example that stopped working fails here instead of in a
reader's project:

* Every Python block of README.md and docs/ compiles; what it imports from spark_decl exists,
  its calls of spark_decl functions fit their signatures, and it uses no name it neither
  defines nor imports, other than the placeholders in ``PLACEHOLDERS``.
* ``process_spark_sources --option`` (any spark_decl command), written anywhere in the docs,
  is an option of that command.
* Every public name, ``SPARK_DECL`` key, system check and management command is documented.
* In the example project (a subprocess on an in-memory database): the ``spark.py`` of
  README.md and of docs/quickstart.rst handle a saved challenge, and docs/tutorial.rst's
  shell sessions and ``manage.py`` commands print what the page shows.
* docs/migrating.rst's migration copies django-spark's keys.

``python tests/test_docs.py --example`` is the subprocess.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import inspect
import io
import json
import logging
import re
import shlex
import subprocess
import sys
import textwrap
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [
    ROOT / "README.md",
    *sorted(path for path in DOCS.rglob("*.rst") if "_build" not in path.parts),
]
COMMANDS = sorted(path.stem for path in (ROOT / "spark_decl/management/commands").glob("[!_]*.py"))

# Names the docs use without defining them: the example domain and stand-ins for "yours".
PLACEHOLDERS = frozenset(
    {
        "alice",
        "BASE_DIR",
        "Challenge",
        "challenge",
        "ChallengeContext",
        "Donation",
        "pks",
        "send_challenge_mails",
        "sentry_sdk",
        "Site",
        "statsd",
        "today",
    }
)
# Snippets may also use, without importing them, spark_decl's public names (a renamed one is
# then reported as undefined) and names from these modules.
WELL_KNOWN = (
    "typing",
    "collections.abc",
    "datetime",
    "django.apps",
    "django.core.mail",
    "django.db",
    "django.db.models",
    "django.dispatch",
    "django.utils",
)
PYTHON = {"python", "python3", "py", "pycon"}


# -- reading the docs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A code block: ``language`` is ``""`` for reStructuredText's ``::`` blocks."""

    path: Path
    line: int  # of the block's first line of code, 1-based
    language: str
    code: str

    def __str__(self) -> str:
        return f"{shown(self.path)}:{self.line}"


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        return list(_markdown_blocks(path, lines))
    return list(_rst_blocks(path, lines))


def _markdown_blocks(path: Path, lines: list[str]) -> Iterator[Block]:
    start, language = -1, ""
    for number, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start < 0:
            start, language = number + 1, line[3:].strip()
        else:
            yield Block(path, start + 1, language, "\n".join(lines[start:number]) + "\n")
            start = -1


def _rst_blocks(path: Path, lines: list[str]) -> Iterator[Block]:
    for number, line in enumerate(lines):
        directive = re.match(r"(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)", line)
        if directive:
            indent, language = len(directive[1]), directive[2]
        elif line.rstrip().endswith("::") and not re.match(r"\s*\.\. ", line):
            indent, language = len(line) - len(line.lstrip()), ""
        else:
            continue
        body = number + 1
        # Skip the directive's options and the blank line after them.
        while body < len(lines) and (
            not lines[body].strip() or (directive and lines[body].strip().startswith(":"))
        ):
            body += 1
        end = body
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
        ):
            end += 1
        if end > body:
            code = textwrap.dedent("\n".join(lines[body:end])).strip("\n") + "\n"
            yield Block(path, body + 1, language, code)


@dataclass(frozen=True)
class Example:
    """One ``>>>`` statement (or ``$`` command line) and the output shown after it."""

    line: int
    source: str
    want: str


def pycon_examples(block: Block) -> list[Example]:
    lines, examples, number = block.code.splitlines(), [], 0
    while number < len(lines):
        if not lines[number].startswith(">>>"):
            number += 1
            continue
        start, source = number, [lines[number][4:]]
        number += 1
        while number < len(lines) and (lines[number] == "..." or lines[number][:4] == "... "):
            source.append(lines[number][4:])
            number += 1
        want = []
        while number < len(lines) and not lines[number].startswith(">>>"):
            want.append(lines[number])
            number += 1
        examples.append(Example(block.line + start, "\n".join(source) + "\n", "\n".join(want)))
    return examples


def console_examples(block: Block) -> list[Example]:
    examples: list[Example] = []
    for number, line in enumerate(block.code.splitlines()):
        if line.startswith("$ "):
            examples.append(Example(block.line + number, line[2:], ""))
        elif examples:
            last = examples[-1]
            examples[-1] = Example(last.line, last.source, f"{last.want}\n{line}".lstrip("\n"))
    return examples


def python_source(block: Block) -> str | None:
    """The block's Python code, or ``None`` if it is not Python (a ``::`` block that does not
    parse is taken for a shell or crontab snippet)."""
    if block.language == "pycon":
        return "".join(example.source for example in pycon_examples(block))
    if block.language in PYTHON:
        return block.code
    if block.language == "":
        try:
            ast.parse(block.code)
        except SyntaxError:
            return None
        return block.code
    return None


# -- static checks of the Python blocks ------------------------------------------------------

_UNKNOWN = object()


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return _UNKNOWN


class SnippetChecker:
    """The names a block takes from spark_decl, and how it uses them."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.objects: dict[str, Any] = {}
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        if f"{self.where}: {message}" not in self.problems:
            self.problems.append(f"{self.where}: {message}")

    def check(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                self.import_from(node)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.import_module(alias)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                self.resolve(node)
            elif isinstance(node, ast.Call):
                self.check_call(node)

    def import_from(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] != "spark_decl":
            return
        module = _import(node.module or "")
        if module is _UNKNOWN:
            self.problem(f"`from {node.module} import ...`: no such module")
        for alias in node.names:
            self.objects[alias.asname or alias.name] = self.attribute(module, alias.name)

    def import_module(self, alias: ast.alias) -> None:
        if alias.name.split(".")[0] != "spark_decl":
            return
        module = _import(alias.name)
        if module is _UNKNOWN:
            self.problem(f"`import {alias.name}`: no such module")
        elif alias.asname:
            self.objects[alias.asname] = module
        else:
            self.objects["spark_decl"] = importlib.import_module("spark_decl")

    def attribute(self, parent: Any, name: str) -> Any:
        if parent is _UNKNOWN:
            return _UNKNOWN
        if hasattr(parent, name):
            return getattr(parent, name)
        if isinstance(parent, types.ModuleType):
            module = _import(f"{parent.__name__}.{name}")
            if module is not _UNKNOWN:
                return module
            self.problem(f"{parent.__name__} has no attribute {name!r}")
        return _UNKNOWN

    def resolve(self, node: ast.expr) -> Any:
        """The spark_decl object ``node`` names (``api.event``), or ``_UNKNOWN``."""
        if isinstance(node, ast.Name):
            return self.objects.get(node.id, _UNKNOWN)
        if isinstance(node, ast.Attribute):
            parent = self.resolve(node.value)
            # Attributes of instances are not checked: only modules and classes.
            if isinstance(parent, types.ModuleType | type):
                return self.attribute(parent, node.attr)
        return _UNKNOWN

    def check_call(self, node: ast.Call) -> None:
        function = self.resolve(node.func)
        if function is _UNKNOWN or isinstance(function, type) or not callable(function):
            return
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return
        starred = any(isinstance(arg, ast.Starred) for arg in node.args) or any(
            keyword.arg is None for keyword in node.keywords
        )
        args = [None] * sum(not isinstance(arg, ast.Starred) for arg in node.args)
        kwargs = {keyword.arg: None for keyword in node.keywords if keyword.arg is not None}
        bind = signature.bind_partial if starred else signature.bind
        try:
            bind(*args, **kwargs)
        except TypeError as exc:
            name = f"{function.__module__}.{function.__qualname__}"
            self.problem(f"`{ast.unparse(node)}` does not fit {name}{signature}: {exc}")


def bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def public_api() -> set[str]:
    import spark_decl
    import spark_decl.api

    return {*spark_decl.__all__, *spark_decl.api.__all__}


def well_known(name: str) -> bool:
    return any(
        hasattr(importlib.import_module(module), name)
        or _import(f"{module}.{name}") is not _UNKNOWN
        for module in WELL_KNOWN
    )


def check_python_blocks(path: Path) -> list[str]:
    problems: list[str] = []
    # A page is read as one module: later blocks may use what earlier ones defined.
    defined = set(dir(builtins)) | PLACEHOLDERS | {"__name__", "__file__"} | public_api()
    for block in code_blocks(path):
        source = python_source(block)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            problems.append(f"{block}: not valid Python: {exc}")
            continue
        checker = SnippetChecker(str(block))
        checker.check(tree)
        problems += checker.problems
        defined |= bound_names(tree)
        used = {
            node.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
        }
        for name in sorted(name for name in used - defined if not well_known(name)):
            problems.append(
                f"{block}: uses {name!r} without importing or defining it (import it in the "
                "snippet; for a placeholder, add it to PLACEHOLDERS in tests/test_docs.py)"
            )
    return problems


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(shown(path)))
def test_python_blocks_use_the_public_api_as_it_is(path: Path) -> None:
    assert check_python_blocks(path) == []


def test_the_checker_notices_a_renamed_function_a_wrong_keyword_and_an_undefined_name(
    tmp_path: Path,
) -> None:
    page = tmp_path / "page.rst"
    page.write_text(
        ".. code-block:: python\n\n"
        "   from spark_decl import event_source, handle\n"
        "   from spark_decl import api\n\n"
        "   api.register_group_handler(pattern='^x', handler=print)\n"
        "   event_source(Challenge, on_commit=True)\n"
        "   process_querysets(Challenge.objects.all())\n"
    )
    problems = "\n".join(check_python_blocks(page))
    assert "spark_decl has no attribute 'handle'" in problems
    assert "register_group_handler(*, group" in problems
    # Python 3.13 says "required keyword-only argument".
    assert re.search(r"missing a required (keyword-only )?argument: 'group'", problems)
    assert "unexpected keyword argument 'on_commit'" in problems
    assert "uses 'process_querysets' without importing" in problems


INLINE_LITERAL = {".rst": re.compile(r"``([^`]+)``"), ".md": re.compile(r"(?<!`)`([^`]+)`(?!`)")}


def check_inline_calls(path: Path) -> list[str]:
    """Calls of public names in inline literals, ``@event_source(Challenge, on_save=False)``
    or ``api.register_group_handler(group=..., handler=...)``, fit the signatures."""
    import spark_decl
    import spark_decl.api

    public = {name: getattr(spark_decl, name) for name in spark_decl.__all__}
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        for literal in INLINE_LITERAL[path.suffix].findall(line):
            try:
                tree = ast.parse(literal.removeprefix("@"))
            except SyntaxError:
                continue
            checker = SnippetChecker(f"{shown(path)}:{number}")
            checker.objects = {**public, "api": spark_decl.api, "spark_decl": spark_decl}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    checker.check_call(node)
            problems += checker.problems
    return problems


def test_inline_calls_of_the_public_api_fit_their_signatures() -> None:
    assert [problem for path in DOC_FILES for problem in check_inline_calls(path)] == []


def test_the_inline_check_notices_a_wrong_keyword(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text("Use ``@event_source(Challenge, on_commit=False)`` or ``api.register()``.\n")
    problems = "\n".join(check_inline_calls(page))
    assert "unexpected keyword argument 'on_commit'" in problems
    assert "spark_decl.api has no attribute 'register'" in problems


# -- commands, settings, checks, public names -----------------------------------------------


def command_options() -> dict[str, set[str]]:
    from django.core.management import load_command_class

    return {
        name: set(
            load_command_class("spark_decl", name)
            .create_parser("manage.py", name)
            ._option_string_actions
        )
        for name in COMMANDS
    }


COMMAND_LINE = re.compile(rf"\b({'|'.join(COMMANDS)})\b((?:[ \t]+--[\w-]+(?:[ =](?!-)[^\s`]+)?)+)")


def test_every_command_option_in_the_docs_exists() -> None:
    options = command_options()
    problems = []
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in COMMAND_LINE.finditer(line):
                for flag in re.findall(r"(?<![\w-])--[\w-]+", match[2]):
                    if flag not in options[match[1]]:
                        problems.append(f"{shown(path)}:{number}: {match[1]} has no {flag}")
    assert problems == []


def test_every_command_is_documented_from_its_parser() -> None:
    text = "\n".join(path.read_text() for path in DOC_FILES)
    documented = set(re.findall(r"\.\. django-command:: (\w+)", text))
    assert set(COMMANDS) - documented == set()


def documented_settings() -> list[str]:
    text = (DOCS / "reference.rst").read_text()
    content = text.split(".. spark-settings::", 1)[1]
    keys = []
    for line in content.splitlines()[1:]:
        if line.strip() and not line.startswith("   "):
            break
        if re.fullmatch(r"   [A-Z_]+", line):
            keys.append(line.strip())
    return keys


def test_the_settings_reference_lists_every_key_and_the_docs_use_no_other() -> None:
    from spark_decl.conf import DEFAULTS

    assert sorted(documented_settings()) == sorted(DEFAULTS)
    used = set()
    for path in DOC_FILES:
        text = path.read_text()
        used |= set(re.findall(r"SPARK_DECL\[\s*[\"'](\w+)", text))
        for literal in re.findall(r"SPARK_DECL\s*=\s*\{([^}]*)\}", text):
            used |= set(re.findall(r"[\"'](\w+)[\"']\s*:", literal))
    assert used - set(DEFAULTS) == set()


CHECK_ID = re.compile(r"spark_decl\.[EW]\d{3}")


def test_every_system_check_is_documented_and_every_documented_one_exists() -> None:
    import spark_decl.checks

    in_code = {
        check_id
        for path in (ROOT / "spark_decl").rglob("*.py")
        for check_id in CHECK_ID.findall(path.read_text())
    }
    docs = "\n".join(path.read_text() for path in DOC_FILES)
    if ".. automodule:: spark_decl.checks" in docs:
        docs += spark_decl.checks.__doc__ or ""
    assert in_code - set(CHECK_ID.findall(docs)) == set()
    assert set(CHECK_ID.findall(docs)) - in_code == set()


def documented_objects() -> set[int]:
    """``id()`` of everything an autodoc or Python-domain directive in docs/ describes."""
    found: set[int] = set()
    for path in DOC_FILES:
        if path.suffix != ".rst":
            continue
        module = ""
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            match = re.match(
                r"\s*\.\. (auto)?(module|currentmodule|function|class|data|exception|"
                r"attribute|decorator)::\s+([\w.]+)",
                line,
            )
            if not match:
                continue
            auto, kind, name = match.groups()
            if kind in {"module", "currentmodule"}:
                module = name
                options = lines[number + 1 : number + 4]
                if auto and any(":members:" in option for option in options):
                    found |= {id(member) for member in module_members(name)}
                continue
            if "." not in name and module:
                name = f"{module}.{name}"
            owner, _, attribute = name.rpartition(".")
            with contextlib.suppress(ImportError, AttributeError):
                found.add(id(getattr(importlib.import_module(owner), attribute)))
    return found


def module_members(name: str) -> list[Any]:
    """What ``.. automodule:: name`` with ``:members:`` documents."""
    module = importlib.import_module(name)
    if hasattr(module, "__all__"):
        return [getattr(module, member) for member in module.__all__]
    return [
        value
        for member, value in vars(module).items()
        if not member.startswith("_") and getattr(value, "__module__", None) == name
    ]


def public_names() -> Iterator[str]:
    from django.db import models
    from django.dispatch import Signal

    import spark_decl
    import spark_decl.api
    import spark_decl.exceptions
    import spark_decl.models
    import spark_decl.signals

    yield from (f"spark_decl.{name}" for name in spark_decl.__all__)
    yield from (f"spark_decl.api.{name}" for name in spark_decl.api.__all__)
    wanted: list[tuple[types.ModuleType, type]] = [
        (spark_decl.signals, Signal),
        (spark_decl.models, models.base.ModelBase),
        (spark_decl.exceptions, type),
    ]
    for module, kind in wanted:
        yield from (
            f"{module.__name__}.{name}"
            for name, value in vars(module).items()
            if not name.startswith("_")
            and isinstance(value, kind)
            and getattr(value, "__module__", module.__name__) == module.__name__
        )


def test_every_public_name_is_documented() -> None:
    documented = documented_objects()
    missing = []
    for name in public_names():
        owner, _, attribute = name.rpartition(".")
        if id(getattr(importlib.import_module(owner), attribute)) not in documented:
            missing.append(name)
    assert missing == []


# -- the example project: README, quickstart, tutorial -------------------------------------

RESULT = "test_docs result: "


@pytest.fixture(scope="module")
def example_run() -> dict[str, list[str]]:
    """Run the docs' examples in the example project, in a subprocess (``--example``)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--example"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            result: dict[str, list[str]] = json.loads(line[len(RESULT) :])
            return result
    pytest.fail(f"The example run crashed:\n{done.stdout}\n{done.stderr}")


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.rst"])
def test_the_spark_py_of_the_page_handles_a_saved_challenge(
    example_run: dict[str, list[str]], page: str
) -> None:
    assert example_run[page] == []


def test_the_tutorial_shows_what_the_example_project_prints(
    example_run: dict[str, list[str]],
) -> None:
    assert example_run["docs/tutorial.rst"] == []


def test_the_example_runners_report_wrong_pages(example_run: dict[str, list[str]]) -> None:
    assert example_run["the runners themselves"] == []


def setup_example_project() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "example")]
    import django
    from django.conf import settings
    from django.core.management import call_command

    from example_project import settings as example

    values = {name: getattr(example, name) for name in dir(example) if name.isupper()}
    values["DATABASES"] = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    settings.configure(**values)
    django.setup()
    call_command("migrate", verbosity=0)

    # What is logged shows in the terminal, between the lines printed: capture it with them.
    class CurrentStdout(io.TextIOBase):
        def write(self, text: str) -> int:
            return sys.stdout.write(text)

    for handler in logging.getLogger("spark_decl").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(CurrentStdout())


# Output that differs from run to run: when the tutorial was written and when it is tested.
VOLATILE = [
    (re.compile(r"^Date: .*$", re.MULTILINE), "Date: <date>"),
    (re.compile(r"^Message-ID: .*$", re.MULTILINE), "Message-ID: <id>"),
    (re.compile(r" in \d+\.\d+s$", re.MULTILINE), " in <seconds>s"),
    (
        re.compile(
            r"\b(?:(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, )?(?:Jan\.|Feb\.|March|April|"
            r"May|June|July|Aug\.|Sept\.|Oct\.|Nov\.|Dec\.) \d{1,2}\b"
        ),
        "<day>",
    ),
]


# How the mail backend encodes a message: Django 6 writes bodies quoted-printable (soft line
# breaks "=\n") and orders these headers differently from Django 5.2.
ENCODING_HEADERS = re.compile(r"^(?:Content-Transfer-Encoding|MIME-Version): .*\n", re.MULTILINE)


def normalize(text: str) -> str:
    text = ENCODING_HEADERS.sub("", text).replace("=\n", "")
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def matches(want: str, got: str) -> bool:
    """Like doctest with ELLIPSIS: ``...`` in ``want`` stands for any text."""
    pattern = ".*?".join(re.escape(part) for part in normalize(want).split("..."))
    return re.fullmatch(pattern, normalize(got), re.DOTALL) is not None


def run_statement(where: str, source: str, namespace: dict[str, Any]) -> None:
    """Run ``source`` as the interactive shell does: an expression's value is printed."""
    exec(compile(source, where, "single"), namespace)


def run_captured(run: Callable[[], object]) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        try:
            run()
        except Exception:
            output.write(f"<raised>\n{traceback.format_exc()}")
    return output.getvalue()


def run_tutorial(path: Path) -> list[str]:
    """Run the page's ``pycon`` sessions and its ``$ python manage.py <spark command>``
    lines in order, in one shell, and compare what they print with the page.

    Other console lines (installing, ``cd``, ``migrate``) are not run: the database is
    fresh and migrated already.
    """
    from django.core.management import call_command

    namespace: dict[str, Any] = {"__name__": "__console__"}
    problems = []
    for block in code_blocks(path):
        if block.language == "pycon":
            examples = pycon_examples(block)
        elif block.language == "console":
            examples = console_examples(block)
        else:
            continue
        for example in examples:
            if block.language == "pycon":
                code = f"{path}:{example.line}", example.source
                got = run_captured(partial(run_statement, *code, namespace))
            else:
                argv = shlex.split(example.source)
                if argv[:2] != ["python", "manage.py"] or len(argv) < 3 or argv[2] not in COMMANDS:
                    continue
                got = run_captured(partial(call_command, *argv[2:]))
            if not matches(example.want, got):
                problems.append(
                    f"{shown(path)}:{example.line}: {example.source.strip()}\n"
                    f"--- the page shows:\n{example.want}\n--- it printed:\n{got}"
                )
    return problems


def spark_module_source(path: Path) -> str:
    """The page's blocks that start with ``# challenges/spark.py``, at their lines in the
    page (so that a traceback points into the page)."""
    source = ""
    for block in code_blocks(path):
        if block.language in PYTHON and block.code.startswith("# challenges/spark.py"):
            source += "\n" * (block.line - 1 - source.count("\n")) + block.code
    return source


def run_spark_module(path: Path) -> list[str]:
    """Run the page's ``challenges/spark.py`` instead of the example's, save a challenge,
    and check that each handler it declares ran and succeeded; then run the batch."""
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import override_settings
    from django.utils import timezone

    from challenges.models import Challenge
    from spark_decl.models import EventRecord
    from spark_decl.registry import registry

    source = spark_module_source(path)
    if not source:
        return [f"{shown(path)}: no block starts with '# challenges/spark.py'"]
    name = f"challenges.docs_{path.stem}"
    with (
        registry.isolated(),
        override_settings(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend"),
    ):
        registry.clear()
        module = types.ModuleType(name)
        module.__package__ = "challenges"
        sys.modules[name] = module
        exec(compile(source, str(path), "exec"), module.__dict__)
        handlers = {spec.name for spec in registry.handlers()}
        if not registry.sources(Challenge) or not handlers:
            return [f"{shown(path)}: its spark.py declares no source or no handler"]
        user = User.objects.create_user(f"reader_{path.stem}", "reader@example.com")
        challenge = Challenge.objects.create(
            user=user, title="Run 100 km", end_date=timezone.localdate() + timedelta(days=30)
        )
        record = EventRecord.objects.get(key=f"challenge_created_{challenge.pk}")
        got = record.handler_statuses()
        if got != dict.fromkeys(handlers, "done"):
            errors = list(record.outcomes.values_list("handler", "last_error"))
            return [f"{shown(path)}: saving a challenge gave {got} {errors}"]
        call_command("process_spark_sources", stdout=io.StringIO())
    return []


def example_main() -> None:
    setup_example_project()
    results = {"docs/tutorial.rst": run_tutorial(DOCS / "tutorial.rst")}
    for page in ("README.md", "docs/quickstart.rst"):
        results[page] = run_captured_problems(partial(run_spark_module, ROOT / page))
    results["the runners themselves"] = check_the_runners()
    print(RESULT + json.dumps(results))


def check_the_runners() -> list[str]:
    """Both runners report a page that is wrong (they are not tests that cannot fail)."""
    import tempfile

    problems = []
    with tempfile.TemporaryDirectory() as directory:
        page = Path(directory) / "page.rst"
        page.write_text(
            ".. code-block:: pycon\n\n   >>> 6 * 7\n   41\n\n"
            ".. code-block:: console\n\n   $ python manage.py retry_spark_events\n"
            "   0 due, 0 succeeded, 1 failed\n"
        )
        if len(run_tutorial(page)) != 2:
            problems.append(f"run_tutorial did not report both wrong outputs of:\n{page}")
        page.write_text(
            ".. code-block:: python\n\n   # challenges/spark.py\n"
            "   from spark_decl import event, event_source, handles\n"
            "   from .models import Challenge\n\n"
            "   @event_source(Challenge)\n"
            "   def source(challenge):\n"
            "       yield event('challenge_created', challenge.pk)\n\n"
            "   @handles('^challenge')\n"
            "   def handler(event):\n"
            "       raise RuntimeError('broken')\n"
        )
        if not run_spark_module(page):
            problems.append("run_spark_module did not report a handler that raises")
    return problems


def run_captured_problems(run: Callable[[], list[str]]) -> list[str]:
    try:
        return run()
    except Exception:
        return [traceback.format_exc()]


if __name__ == "__main__" and sys.argv[1:] == ["--example"]:
    example_main()


# -- docs/migrating.rst: copying django-spark's keys ---------------------------------------


def migration_code() -> str:
    for block in code_blocks(DOCS / "migrating.rst"):
        if "def copy_keys(" in block.code:
            return block.code
    raise AssertionError("docs/migrating.rst has no block that defines copy_keys")


@pytest.mark.django_db(transaction=True)
def test_the_migration_in_the_guide_claims_django_sparks_keys_once() -> None:
    from django.apps import apps
    from django.apps.registry import Apps
    from django.db import connection, models

    from spark_decl import process_queryset
    from spark_decl.models import EventRecord
    from tests.testapp.models import Challenge, HandlerLog

    namespace: dict[str, Any] = {}
    exec(compile(migration_code(), str(DOCS / "migrating.rst"), "exec"), namespace)
    copy_keys = namespace["copy_keys"]

    class OldEvent(models.Model):
        """django-spark 0.3's ``spark.models.Event``, in its own app registry."""

        key = models.CharField(max_length=100, primary_key=True)
        group = models.CharField(max_length=50, db_index=True)
        created_at = models.DateTimeField(auto_now_add=True)
        context = models.TextField(blank=True)

        class Meta:
            app_label = "spark"
            db_table = "spark_event"
            apps = Apps()

        def __str__(self) -> str:
            return self.key

    with connection.schema_editor() as editor:
        copy_keys(apps, editor)  # a database without django-spark's table: nothing to do
    assert not EventRecord.objects.exists()

    # bulk_create sends no post_save: neither challenge has been through spark_decl yet.
    seen, unseen = Challenge.objects.bulk_create([Challenge(title="seen"), Challenge(title="new")])
    with connection.schema_editor() as editor:
        editor.create_model(OldEvent)
    try:
        old = OldEvent._default_manager.create(
            key=f"challenge_created_{seen.pk}", group="challenge_created", context="{...}"
        )
        with connection.schema_editor() as editor:
            copy_keys(apps, editor)
            copy_keys(apps, editor)
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(OldEvent)

    copied = EventRecord.objects.get()
    assert (copied.key, copied.group, copied.context, copied.created_at) == (
        old.key,
        old.group,
        {},
        old.created_at,
    )
    assert not copied.outcomes.exists()
    process_queryset(Challenge.objects.all())
    handled = HandlerLog.objects.filter(handler="log_challenge_event")
    assert list(handled.values_list("key", flat=True)) == [f"challenge_created_{unseen.pk}"]
