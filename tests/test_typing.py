"""Keep the type tests honest for both checkers, without running them.

``make lint`` runs mypy and pyright over tests/typing_pass.py and tests/typing_fail.py. Every
error expected in the fail file is a suppression comment naming its error code, and a
suppression the checker does not need is an error itself: so a line that stops failing, or
fails differently, fails ``make lint``. These tests check what that relies on, in
milliseconds, so the type checkers themselves run once per CI run instead of in every leg.
"""

from __future__ import annotations

import configparser
import io
import re
import tokenize
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPE_TESTS = ["tests/typing_pass.py", "tests/typing_fail.py"]
# A code list is required: a bare ignore hides any error, so it would prove nothing.
MYPY = re.compile(r"#\s*type:\s*ignore\b(\[(?P<codes>[^\]]*)\])?")
PYRIGHT = re.compile(r"#\s*pyright:\s*ignore\b(\[(?P<codes>[^\]]*)\])?")


def suppressions(path: str, pattern: re.Pattern[str]) -> dict[int, list[str]]:
    """Line number -> the codes of the ``pattern`` suppression on that line."""
    found: dict[int, list[str]] = {}
    source = (ROOT / path).read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        match = pattern.search(token.string)
        if match:
            codes = match["codes"] or ""
            found[token.start[0]] = [code.strip() for code in codes.split(",") if code.strip()]
    return found


def test_each_expected_error_is_expected_by_both_checkers_with_its_code() -> None:
    mypy = suppressions("tests/typing_fail.py", MYPY)
    pyright = suppressions("tests/typing_fail.py", PYRIGHT)

    assert len(mypy) >= 30, "the expected errors were not found: has the comment format changed?"
    assert sorted(mypy) == sorted(pyright), (
        f"lines expected to fail for mypy only: {sorted(set(mypy) - set(pyright))}, "
        f"for pyright only: {sorted(set(pyright) - set(mypy))}"
    )
    uncoded = sorted(
        line for found in (mypy, pyright) for line, codes in found.items() if not codes
    )
    assert not uncoded, f"suppressions without an error code on lines {uncoded}"


def test_the_pass_file_suppresses_nothing_for_mypy_and_only_named_rules_for_pyright() -> None:
    assert suppressions("tests/typing_pass.py", MYPY) == {}
    pyright = suppressions("tests/typing_pass.py", PYRIGHT)
    assert all(pyright.values()), f"pyright suppressions without a rule: {pyright}"


def test_both_checkers_report_suppressions_they_do_not_need() -> None:
    mypy = configparser.ConfigParser()
    mypy.read(ROOT / "mypy.ini")
    assert mypy.getboolean("mypy", "warn_unused_ignores")

    pyright = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pyright"]
    assert pyright["reportUnnecessaryTypeIgnoreComment"] == "error"
    # Otherwise pyright would let mypy's comments hide its errors too, code or no code.
    assert pyright["enableTypeIgnoreComments"] is False
    assert set(TYPE_TESTS) <= set(pyright["include"])
    for path in TYPE_TESTS:
        # Strict whatever the project settings: these files are what a user's code sees.
        assert "\n# pyright: strict\n" in (ROOT / path).read_text()
