# The two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtualenv and install everything on first use.
# `make screenshots` retakes the admin screenshots in the docs (docs/console.rst): see below.

PYTHON ?= python3
VENV ?= .venv
# The Django line to install; CI overrides it to test Django 6.x on Python >= 3.12.
DJANGO ?= Django>=5.2,<5.3
# Extras to install; the backport extra (Django's tasks framework for Django 5.2) is left out
# for Django 6.x, which has it built in.
EXTRAS ?= dev,docs,backport
BIN := $(VENV)/bin

.PHONY: demo test lint docs screenshots bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]' '$(DJANGO)'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python example/manage.py spark_demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The layers (import-linter: [tool.importlinter] in pyproject.toml); style; types with mypy
# (mypy.ini) and pyright ([tool.pyright] in pyproject.toml, what VS
# Code's Pylance runs), both including the type tests tests/typing_pass.py and
# tests/typing_fail.py; models without a migration. pyright runs on the Node.js and the
# pyright that its wheels bring: nothing is downloaded, nor a newer version looked up.
lint: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy spark_decl tests $(wildcard example) $(wildcard scripts)
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(BIN)/pyright --pythonpath $(BIN)/python
	DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python -m django makemigrations --check --dry-run

docs: $(VENV)/.installed
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# The admin's operations console in headless Chromium, for docs/console.rst: demo data in a
# throwaway SQLite database, the example project on a free port, one PNG per page of
# scripts/screenshots.py's PAGES written to docs/_static/screenshots/, each checked (the page
# is the logged-in admin page expected; the PNG has the window's size, is no blank page).
# Installs Debian's chromium first if there is no chromium or chromium-browser (as root).
screenshots: $(VENV)/.installed
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium fonts-dejavu-core; }
	$(BIN)/python scripts/screenshots.py $(SCREENSHOTS_ARGS)

# spark_decl vs django-spark 0.3.0 (own venv .venv-bench, Python 3.11); see benchmarks/README.md.
# e.g. make bench BENCH_ARGS="--postgres --json bench.json"
bench:
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .mypy_cache .ruff_cache .hypothesis
