"""spark_decl and django-spark 0.3.0 side by side: ``make bench``.

Or ``python3.11 benchmarks/run.py [--postgres] [--json PATH] ...``. It creates (once) the
virtualenv ``.venv-bench`` with Python 3.11, Django 5.2, psycopg, django-spark 0.3.0 from
PyPI and spark_decl installed editable from this checkout, re-runs itself inside it, then
runs every measurement for both packages, each in a fresh interpreter
(``python -m benchmarks.worker``) with its own settings module and its own database, and
prints one table with the figures, the ratio django-spark / spark_decl, the target and
whether it is met. See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-bench"
STAMP = VENV / ".bench-installed"
REQUIREMENTS = ("Django>=5.2,<5.3", "psycopg[binary]", "django-spark==0.3.0")
BENCH_PYTHON = (3, 11)

PACKAGES = ("spark_decl", "django_spark")
TITLES = {"spark_decl": "spark_decl", "django_spark": "django-spark"}
MEASURES = ("bare", "batch", "dispatch", "save_autocommit", "save_atomic", "memory")
# A traced first pass (tmpfs database) takes about this many times the untraced first pass
# (file database) per row: tracemalloc's slowdown, less the disk time it does not pay. Only
# used to decide whether the memory figure fits in --memory-budget.
TRACE_SLOWDOWN = 1.0

Results = dict[str, dict[str, Any]]  # package -> measure -> the worker's JSON


# -- the virtualenv ---------------------------------------------------------------------------


def in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def bootstrap(argv: Sequence[str]) -> None:
    """Create or update ``.venv-bench`` as needed, then re-execute this script inside it."""
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    wanted = hashlib.sha256(repr((REQUIREMENTS, pyproject)).encode()).hexdigest()
    python = VENV / "bin" / "python"
    if not python.exists() or not STAMP.exists() or STAMP.read_text() != wanted:
        base = find_base_python()
        print(f"Setting up {VENV.relative_to(ROOT)} with {base} ...", file=sys.stderr)
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, *REQUIREMENTS, "-e", str(ROOT)], check=True)
        STAMP.write_text(wanted)
    os.execv(python, [str(python), str(Path(__file__).resolve()), *argv])


def find_base_python() -> str:
    if sys.version_info[:2] == BENCH_PYTHON:
        return sys.executable
    name = "python{}.{}".format(*BENCH_PYTHON)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"benchmarks: {name} is needed to create {VENV.name}, and is not on PATH.")
    return found


# -- machine facts ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fsync_latency_ms(directory: Path, samples: int = 30) -> float:
    """Median time of an fsync of one written 4 KiB block in ``directory``: what a commit
    costs at least on this disk, and so what most of these figures are made of."""
    times = []
    with tempfile.NamedTemporaryFile(dir=directory) as handle:
        for _ in range(samples):
            handle.write(b"x" * 4096)
            handle.flush()
            start = time.perf_counter()
            os.fsync(handle.fileno())
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)
    return done.stdout.decode().strip()


def working_tree_revision() -> str:
    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "spark_decl"):
        revision += " + uncommitted changes in spark_decl/"
    return revision


def snapshot(revision: str, work_dir: Path) -> tuple[Path, str]:
    """Extract ``spark_decl/`` as of ``revision`` into ``work_dir``; return the directory
    to put first on the workers' ``PYTHONPATH`` and the commit it is."""
    commit = git("rev-parse", "--short", "--verify", f"{revision}^{{commit}}")
    if not commit:
        sys.exit(f"benchmarks: {revision!r} is not a commit of this repository.")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "spark_decl"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target = work_dir / f"spark_decl-{commit}"
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target, commit


def machine_facts(work_dir: Path, spark_decl_revision: str) -> dict[str, Any]:
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="minutes"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "django": metadata.version("Django"),
        "django_spark": metadata.version("django-spark"),
        "spark_decl": f"{metadata.version('spark-decl')} ({spark_decl_revision})",
        "sqlite": sqlite3.sqlite_version,
        "fsync_ms": round(fsync_latency_ms(work_dir), 2),
    }


# -- running the workers ----------------------------------------------------------------------


@dataclass
class Backend:
    vendor: str  # "sqlite" or "postgresql"
    title: str
    work_dir: Path
    memory_dir: Path
    python_path: str

    def database(self, package: str, measure: str) -> str:
        if self.vendor == "postgresql":
            return f"spark_bench_{package}_{measure}"
        directory = self.memory_dir if measure == "memory" else self.work_dir
        return str(directory / f"{package}-{measure}.sqlite3")


def run_worker(
    backend: Backend, package: str, measure: str, options: list[str]
) -> dict[str, Any] | None:
    env = {
        **os.environ,
        "BENCH_DB_VENDOR": backend.vendor,
        "BENCH_DB_NAME": backend.database(package, measure),
        "PYTHONPATH": backend.python_path,
    }
    # -P: nothing but PYTHONPATH before the installed packages, so that a --spark-decl-rev
    # snapshot of spark_decl wins over the editable install of the working tree.
    command = [sys.executable, "-P", "-m", "benchmarks.worker", package, measure, *options]
    label = f"[{backend.vendor}] {measure} {' '.join(options)} ({TITLES[package]})"
    print(f"{label} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        print(f" FAILED after {elapsed:.1f} s:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f" {elapsed:.1f} s", file=sys.stderr)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_backend(backend: Backend, args: argparse.Namespace) -> Results:
    results: Results = {package: {} for package in PACKAGES}
    common = ["--repeats", str(args.repeats), "--slow", str(args.slow)]
    for measure in args.only or MEASURES:
        for package in PACKAGES:
            if measure == "memory":
                results[package][measure] = run_memory(backend, package, args, results[package])
                continue
            saves = {"save_autocommit": args.saves, "save_atomic": args.atomic_saves}
            options = [*common, "--rows", str(args.rows)]
            if measure in saves:
                options += ["--saves", str(saves[measure])]
            results[package][measure] = run_processes(
                args, partial(run_worker, backend, package, measure, options)
            )
    return results


def run_processes(
    args: argparse.Namespace, run: Callable[[], dict[str, Any] | None]
) -> dict[str, Any] | None:
    """``run`` (one worker process) up to ``--processes`` times, but no further process once
    one took ``--process-budget`` seconds; the results merged by :func:`merge`. On a shared
    machine whole processes run at different speeds (the same bare pass took 0.06 s in one
    and 0.12 s in the next), which repeats inside one process cannot even out."""
    done: list[dict[str, Any]] = []
    while len(done) < args.processes:
        start = time.perf_counter()
        result = run()
        if result is None:
            break
        done.append(result)
        if time.perf_counter() - start >= args.process_budget:
            break
    return merge(done) if done else None


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker result from several processes' results of the same measurement: the best
    time (``seconds``, ``per_event_us``), every run (``runs``, ``over_bare``, ``overheads``),
    and the median of the per-process ratios (``overhead``: each process alternates its plain
    and registered saves or runs, so its own ratio is the comparable one)."""
    merged: dict[str, Any] = {}
    for key, value in results[0].items():
        values = [result[key] for result in results if key in result]
        if isinstance(value, dict):
            merged[key] = merge(values)
        elif key in ("seconds", "per_event_us"):
            merged[key] = min(values)
        elif key in ("runs", "over_bare", "overheads"):
            merged[key] = [run for process in values for run in process]
        elif key == "overhead":
            merged[key] = statistics.median(values)
        else:
            merged[key] = value
    if len(results) > 1 and "measure" in merged:
        merged["processes"] = len(results)
    return merged


def run_memory(
    backend: Backend, package: str, args: argparse.Namespace, done: dict[str, Any]
) -> dict[str, Any]:
    """The traced first pass over the small, then the large table, each only when its
    projected duration fits in ``--memory-budget``: the first projection comes from the
    untraced first pass measured before, the second from the traced small pass."""
    small, large = args.memory_rows
    budget = args.memory_budget
    batch = done.get("batch")
    if batch is not None and budget > 0:
        per_row = batch["first_pass"]["seconds"] / batch["first_pass"]["rows"] * TRACE_SLOWDOWN
        projected = per_row * (small + large)
        if projected > budget:
            return {
                "skipped": (
                    f"projected ~{projected / 60:.0f} min for {small:,} + {large:,} rows "
                    f"at the first pass's {per_row * 1000:.1f} ms/row, over "
                    f"--memory-budget {budget:g} s"
                )
            }
    runs: dict[str, Any] = {}
    for rows in (small, large):
        if runs and budget > 0:
            previous = runs[str(small)]
            projected = previous["seconds_traced"] / small * large
            if projected > budget:
                return {
                    "runs": runs,
                    "skipped": (
                        f"{large:,} rows: projected ~{projected / 60:.0f} min from the "
                        f"{small:,}-row pass, over --memory-budget {budget:g} s"
                    ),
                }
        result = run_worker(backend, package, "memory", ["--rows", str(rows)])
        if result is None:
            return {"runs": runs, "skipped": "the worker failed"}
        runs[str(rows)] = result["memory"]
    return {"runs": runs}


def postgres_backend(
    args: argparse.Namespace, work_dir: Path, python_path: str
) -> tuple[Backend | None, str]:
    """The PostgreSQL backend if ``--postgres`` was given and the server answers."""
    if not args.postgres:
        return None, "PostgreSQL: skipped (pass --postgres, with PGHOST/PGPORT/PGUSER set)."
    for variable, default in (("PGHOST", "127.0.0.1"), ("PGPORT", "5432"), ("PGUSER", "postgres")):
        os.environ.setdefault(variable, default)
    where = f"{os.environ['PGUSER']}@{os.environ['PGHOST']}:{os.environ['PGPORT']}"
    try:
        import psycopg

        with psycopg.connect(dbname="postgres", connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except Exception as exc:
        return None, f"PostgreSQL: skipped, cannot connect to {where}: {exc}".strip()
    version = row[0] if row else "?"
    backend = Backend(
        "postgresql", f"PostgreSQL {version} ({where})", work_dir, work_dir, python_path
    )
    return backend, ""


# -- the figures ------------------------------------------------------------------------------


@dataclass
class Figure:
    """One row of the table. Every figure is lower-is-better; ``ratio`` = django-spark /
    spark_decl, so a ratio above 1 means spark_decl is better."""

    label: str
    unit: str
    spark_decl: float | None
    django_spark: float | None
    target: str = ""
    met: str = ""
    show_ratio: bool = True

    @property
    def ratio(self) -> float | None:
        if self.show_ratio and self.spark_decl and self.django_spark is not None:
            return self.django_spark / self.spark_decl
        return None


def get(results: Results, package: str, *path: str) -> Any:
    value: Any = results.get(package)
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def figures(results: Results, args: argparse.Namespace) -> list[Figure]:
    """The rows of the table, for the measurements that were selected."""
    sections: dict[str, list[Figure]] = {measure: [] for measure in MEASURES}

    def both(*path: str) -> tuple[Any, Any]:
        return get(results, "spark_decl", *path), get(results, "django_spark", *path)

    def speedup(figure: Figure, factor: float) -> Figure:
        ratio = figure.ratio
        figure.target = f">= {factor:g}x faster"
        figure.met = verdict(None if ratio is None else ratio >= factor)
        return figure

    def at_most(figure: Figure, limit: float | None, target: str) -> Figure:
        figure.target = target
        value = figure.spark_decl
        figure.met = verdict(None if value is None or limit is None else value <= limit)
        return figure

    def divide(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    n = f"{args.rows:,}"
    bare = both("bare", "bare", "seconds")
    first = both("batch", "first_pass", "seconds")
    sections["bare"].append(
        Figure(f"1 bare: iterate {n} rows + call source", "s", *bare, "reference")
    )
    sd_paired, ds_paired = both("batch", "first_pass", "over_bare")
    over_bare = Figure(
        "  first pass / bare (paired, median)",
        "x",
        statistics.median(sd_paired) if sd_paired else None,
        statistics.median(ds_paired) if ds_paired else None,
        "aim <= 3x, bar <= 5x",
        show_ratio=False,
    )
    value = over_bare.spark_decl
    over_bare.met = (
        "n/a" if value is None else "aim" if value <= 3 else "bar only" if value <= 5 else "NO"
    )
    rerun = both("batch", "rerun", "seconds")
    sections["batch"] += [
        speedup(Figure(f"2 batch first pass, {n} rows", "s", *first), 50),
        over_bare,
        speedup(Figure("3 batch re-run, all keys seen", "s", *rerun), 20),
    ]
    dispatch = both("dispatch", "dispatch", "per_event_us")
    sections["dispatch"].append(
        speedup(Figure("4 process_events, 101 patterns, per event", "us", *dispatch), 10)
    )

    for number, measure, count, title in (
        ("5", "save_autocommit", args.saves, "autocommit"),
        ("6", "save_atomic", args.atomic_saves, "one atomic()"),
    ):
        overhead = Figure("  overhead (with / plain)", "x", *both(measure, "overhead"))
        if measure == "save_autocommit":
            reference = overhead.django_spark
            target = f"<= django-spark's ({reference:.2f}x)" if reference else "<= django-spark's"
            at_most(overhead, reference, target)
        else:
            at_most(overhead, 1.5, "<= 1.5x")
        sections[measure] += [
            Figure(
                f"{number} {count:,} saves, {title}: plain",
                "s",
                *both(measure, "plain", "seconds"),
            ),
            Figure("  with source + handler", "s", *both(measure, "registered", "seconds")),
            overhead,
        ]

    small, large = args.memory_rows
    peaks: dict[int, tuple[float | None, float | None]] = {}
    for rows_count, label in ((small, "7 batch peak memory"), (large, "  batch peak memory")):
        sd, ds = both("memory", "runs", str(rows_count), "peak_bytes")
        peaks[rows_count] = (
            sd / 2**20 if sd is not None else None,
            ds / 2**20 if ds is not None else None,
        )
        sections["memory"].append(
            Figure(f"{label}, {rows_count:,} rows", "MiB", *peaks[rows_count])
        )
    growth = Figure(
        f"  peak {large:,} / peak {small:,}",
        "x",
        divide(peaks[large][0], peaks[small][0]),
        divide(peaks[large][1], peaks[small][1]),
    )
    sections["memory"].append(at_most(growth, 1.25, "<= 1.25x"))
    selected = args.only or MEASURES
    return [row for measure in MEASURES if measure in selected for row in sections[measure]]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.3f} s" if value < 100 else f"{value:.1f} s"
    if unit == "us":
        return f"{value:.1f} us"
    return f"{value:.2f} {unit}"


def table(rows: list[Figure]) -> str:
    header = ("figure", "spark_decl", "django-spark", "ratio ds/sd", "target", "met?")
    lines = [
        (
            row.label,
            fmt(row.spark_decl, row.unit),
            fmt(row.django_spark, row.unit),
            fmt(row.ratio, "x") if row.ratio is not None else "",
            row.target,
            row.met,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    aligns: list[Callable[[str, int], str]] = [
        str.ljust,
        str.rjust,
        str.rjust,
        str.rjust,
        str.ljust,
        str.ljust,
    ]

    def render(line: Sequence[str]) -> str:
        return "  ".join(
            align(cell, width) for cell, width, align in zip(line, widths, aligns, strict=True)
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line).rstrip() for line in lines)])


def notes(results: Results) -> list[str]:
    lines = []
    for package in PACKAGES:
        for measure, result in results[package].items():
            if result is None:
                lines.append(f"{TITLES[package]} {measure}: the worker failed (see above).")
            elif "skipped" in result:
                lines.append(f"{TITLES[package]} {measure}: skipped, {result['skipped']}.")
    return lines


# -- entry point ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="spark_decl vs django-spark 0.3.0, side by side (see benchmarks/README.md).",
    )
    parser.add_argument("--rows", type=int, default=10_000, help="rows / events (10000)")
    parser.add_argument("--saves", type=int, default=1_000, help="saves in autocommit (1000)")
    parser.add_argument(
        "--atomic-saves", type=int, default=2_000, help="saves in one atomic() (2000)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="best of at most N runs (5)")
    parser.add_argument(
        "--slow",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="no further repeat of a measurement after a run this long (5)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=3,
        metavar="N",
        help="run each measurement in up to N fresh processes and keep the best (3)",
    )
    parser.add_argument(
        "--process-budget",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="no further process for a measurement after one took this long (20)",
    )
    parser.add_argument(
        "--memory-rows",
        type=int,
        nargs=2,
        default=(20_000, 100_000),
        metavar=("SMALL", "LARGE"),
        help="table sizes of the peak-memory figure (20000 100000)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="skip a package's memory figure when its projected duration is longer "
        "(120; 0: never skip)",
    )
    parser.add_argument(
        "--only", action="append", choices=MEASURES, help="run only this measurement (repeatable)"
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also run on PostgreSQL, at PGHOST/PGPORT/PGUSER (default 127.0.0.1:5432 postgres)",
    )
    parser.add_argument(
        "--spark-decl-rev",
        metavar="REV",
        help="benchmark spark_decl/ as committed at this git revision (default: the "
        "working tree), e.g. to compare before and after a change",
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers to PATH")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "benchmarks" / ".work",
        help="where the SQLite files go (benchmarks/.work)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not in_bench_venv():
        bootstrap(argv)
    args = parse_args(argv)
    work_dir: Path = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    memory_dir = (
        Path(tempfile.mkdtemp(prefix="spark-bench-", dir=shm)) if shm.is_dir() else work_dir
    )
    python_path = str(ROOT)
    revision = f"working tree: {working_tree_revision()}"
    if args.spark_decl_rev:
        extracted, commit = snapshot(args.spark_decl_rev, work_dir)
        python_path = os.pathsep.join([str(extracted), python_path])
        revision = f"commit {commit}"
    facts = machine_facts(work_dir, revision)
    print("spark_decl vs django-spark 0.3.0")
    for key, value in facts.items():
        print(f"  {key:18} {value}")
    print(flush=True)

    sqlite = f"SQLite {sqlite3.sqlite_version} (file)"
    backends = [Backend("sqlite", sqlite, work_dir, memory_dir, python_path)]
    postgres, skipped = postgres_backend(args, work_dir, python_path)
    if postgres is not None:
        backends.append(postgres)
    report: dict[str, Any] = {
        "machine": facts,
        "config": {key: str(value) for key, value in vars(args).items()},
        "backends": {},
    }
    outputs = []
    started = time.perf_counter()
    try:
        for backend in backends:
            results = run_backend(backend, args)
            rows = figures(results, args)
            report["backends"][backend.vendor] = {
                "title": backend.title,
                "results": results,
                "figures": [{**asdict(row), "ratio": row.ratio} for row in rows],
            }
            outputs.append((backend, rows, notes(results)))
    finally:
        if memory_dir != work_dir:
            shutil.rmtree(memory_dir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started

    for backend, rows, lines in outputs:
        print(
            f"\n{backend.title}: {args.rows:,} rows, best of up to {args.repeats} runs "
            f"in each of up to {args.processes} processes"
        )
        print(table(rows))
        for line in lines:
            print(f"  note: {line}")
    if skipped:
        print(f"\n{skipped}")
    print(f"\nTotal time: {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"Raw numbers written to {args.json}")


if __name__ == "__main__":
    main()
