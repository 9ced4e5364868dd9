# The two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtualenv and install everything on first use.

PYTHON ?= python3
VENV ?= .venv
# The Django line to install; CI overrides it to test Django 6.x on Python >= 3.12.
DJANGO ?= Django>=5.2,<5.3
BIN := $(VENV)/bin

.PHONY: demo test lint docs clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]' '$(DJANGO)'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python example/manage.py spark_demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy spark_decl tests example

docs: $(VENV)/.installed
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .mypy_cache .ruff_cache .hypothesis
