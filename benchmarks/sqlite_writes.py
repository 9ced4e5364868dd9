"""What the second transaction of a save in autocommit mode costs SQLite, by table shape.

A diagnostic for figure 5 (saves in autocommit), with ``sqlite3`` alone: no Django, no
Python of either package. Each "save" inserts an item (its own commit, as ``Model.save()``
in autocommit mode), then one transaction writes what a package writes for its event:

* ``plain``: nothing (the reference);
* ``django_spark``: one row of django-spark 0.3.0's table (``key`` primary key, ``group``
  index): three b-trees;
* ``claim_done``: one ``EventRecord`` row as spark_decl's migration creates it (rowid ``id``,
  unique ``key``, ``group`` index, the call recorded in its ``done_at_claim``): what
  spark_decl writes, in three b-trees too;
* ``claim_no_group``: the same without the ``group`` index (what writing less than
  django-spark would take);
* ``claim_outcome``: the rows as spark_decl wrote them before ``done_at_claim`` (the claim,
  with a ``created_at`` index too, and the call's ``HandlerOutcome`` row);
* ``claim_outcome_old``: those rows in the tables as they were before ``0001_initial`` was
  revised for the ids (``AUTOINCREMENT`` ids, the due index over every call).

The variants run interleaved, one save each in turn, on database files in one directory
(``benchmarks/.work`` by default, where the benchmarks' SQLite files live), with SQLite's
defaults (rollback journal, ``synchronous=FULL``); the median per save is shown, and its
ratio to ``plain``. Every page a transaction changes is written to the journal and to the
database file before the commit returns, so each b-tree a row goes into shows::

    python3 benchmarks/sqlite_writes.py [--saves 400] [--directory DIR]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ITEM = (
    'CREATE TABLE item ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
    '"name" varchar(100) NOT NULL, "created" date NOT NULL)'
)
EVENT_RECORD = (
    'CREATE TABLE er ("id" integer NOT NULL PRIMARY KEY {autoincrement}, '
    '"key" varchar(255) NOT NULL UNIQUE, "group" varchar(255) NOT NULL, '
    '"context" text NOT NULL CHECK ((JSON_VALID("context") OR "context" IS NULL)), '
    '"created_at" datetime NOT NULL{done_at_claim})'
)
DONE_AT_CLAIM = (
    ", \"done_at_claim\" text DEFAULT '{}' NOT NULL "
    'CHECK ((JSON_VALID("done_at_claim") OR "done_at_claim" IS NULL))'
)
GROUP_INDEX = 'CREATE INDEX er_group ON er ("group")'
CREATED_AT_INDEX = 'CREATE INDEX er_created_at ON er ("created_at")'
HANDLER_OUTCOME = (
    'CREATE TABLE ho ("id" integer NOT NULL PRIMARY KEY {autoincrement}, '
    '"handler" varchar(255) NOT NULL, "status" varchar(16) NOT NULL, '
    '"attempts" integer unsigned NOT NULL CHECK ("attempts" >= 0), "last_error" text NOT NULL, '
    '"traceback" text NOT NULL, "created_at" datetime NOT NULL, "finished_at" datetime NULL, '
    '"next_attempt_at" datetime NULL, "record_id" bigint NOT NULL REFERENCES "er" ("id") '
    'DEFERRABLE INITIALLY DEFERRED, UNIQUE ("record_id", "handler"))'
)
DUE_INDEX = 'CREATE INDEX ho_due ON ho ("status", "next_attempt_at"){condition}'
DJANGO_SPARK = (
    'CREATE TABLE ds ("key" varchar(100) NOT NULL PRIMARY KEY, "group" varchar(50) NOT NULL, '
    '"created_at" datetime NOT NULL, "context" text NOT NULL)',
    'CREATE INDEX ds_group ON ds ("group")',
)
CONTEXT = '{"item": {"__spark__": "model", "model": "benchapp.item", "pk": 1}}'
NOW = "2026-11-27 10:00:00.123456"
DONE = '{"benchmarks.benchapp.workload.noop_handler": true}'


def schema(variant: str) -> list[str]:
    if variant == "plain":
        return []
    if variant == "django_spark":
        return list(DJANGO_SPARK)
    if variant == "claim_outcome_old":
        autoincrement, condition = "AUTOINCREMENT", ""
    else:
        autoincrement, condition = "", """ WHERE NOT ("status" = 'done')"""
    if variant.startswith("claim_outcome"):
        record = EVENT_RECORD.format(autoincrement=autoincrement, done_at_claim="")
        statements = [record, GROUP_INDEX, CREATED_AT_INDEX]
    else:
        statements = [EVENT_RECORD.format(autoincrement="", done_at_claim=DONE_AT_CLAIM)]
        if variant == "claim_done":
            statements.append(GROUP_INDEX)
    return [
        *statements,
        HANDLER_OUTCOME.format(autoincrement=autoincrement),
        DUE_INDEX.format(condition=condition),
    ]


def event_writer(variant: str, cursor: sqlite3.Cursor) -> Callable[[int], None]:
    def django_spark(n: int) -> None:
        cursor.execute(
            "INSERT INTO ds VALUES (?, ?, ?, ?)", (f"item_created_{n}", "item_created", NOW, "{}")
        )

    def claim_done(n: int) -> None:
        cursor.execute(
            'INSERT INTO er ("key", "group", "context", "created_at", "done_at_claim") '
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            (f"item_created_{n}", "item_created", CONTEXT, NOW, DONE),
        ).fetchone()

    def claim_outcome(n: int) -> None:
        record_id = cursor.execute(
            'INSERT INTO er ("key", "group", "context", "created_at") VALUES (?, ?, ?, ?) '
            "ON CONFLICT DO NOTHING RETURNING id",
            (f"item_created_{n}", "item_created", CONTEXT, NOW),
        ).fetchone()[0]
        cursor.execute(
            "INSERT INTO ho (record_id, handler, status, attempts, last_error, traceback, "
            "created_at, finished_at) VALUES (?, ?, 'done', 1, '', '', ?, ?)",
            (record_id, "benchapp.workload.noop", NOW, NOW),
        )

    if variant == "django_spark":
        return django_spark
    return claim_outcome if variant.startswith("claim_outcome") else claim_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=400)
    parser.add_argument(
        "--directory", type=Path, default=Path(__file__).resolve().parent / ".work"
    )
    args = parser.parse_args()
    args.directory.mkdir(exist_ok=True)
    variants = [
        "plain",
        "django_spark",
        "claim_done",
        "claim_no_group",
        "claim_outcome",
        "claim_outcome_old",
    ]
    connections: dict[str, sqlite3.Connection] = {}
    for variant in variants:
        path = args.directory / f"sqlite-writes-{variant}.sqlite3"
        path.unlink(missing_ok=True)
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA foreign_keys = ON")
        for statement in [ITEM, *schema(variant)]:
            connection.execute(statement)
        connections[variant] = connection
    writers = {v: event_writer(v, connections[v].cursor()) for v in variants}
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for n in range(args.saves):
        for variant in variants:
            connection = connections[variant]
            started = time.perf_counter()
            connection.execute(
                "INSERT INTO item (name, created) VALUES (?, ?)", (f"saved {n}", "2026-11-27")
            )
            if variant != "plain":
                connection.execute("BEGIN")
                writers[variant](n)
                connection.execute("COMMIT")
            times[variant].append(time.perf_counter() - started)
    plain = statistics.median(times["plain"])
    print(f"SQLite {sqlite3.sqlite_version}, {args.saves} saves each, in {args.directory}")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"{variant:18} {median * 1e3:6.3f} ms per save  {median / plain:5.2f}x plain")
    for variant, connection in connections.items():
        connection.close()
        (args.directory / f"sqlite-writes-{variant}.sqlite3").unlink()


if __name__ == "__main__":
    main()
