"""Screenshots of the admin's operations console for the docs: ``make screenshots``.

Or ``.venv/bin/python scripts/screenshots.py [--out DIR]``. It

1. builds demo data for the example project in a throwaway SQLite database
   (``example_project.screenshot_settings``): events whose handler calls are done, failed,
   pending and given up, some referring to challenges deleted since;
2. starts ``manage.py runserver --noreload`` on a free port of 127.0.0.1;
3. for each page of :data:`PAGES` whose URL resolves: fetches it with ``urllib`` (through
   the screenshot-only login URL, with its session cookie) and fails unless it is the
   logged-in admin page expected, then screenshots it with headless Chromium and fails
   unless the PNG is a real picture (:func:`check_png`);
4. stops the server it started and writes the PNGs, reduced to 256 colours, to
   ``docs/_static/screenshots/``.

A page is one line of :data:`PAGES`. Chromium is Debian's ``chromium`` package (``make
screenshots`` installs it when missing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example"
OUT = ROOT / "docs" / "_static" / "screenshots"
SETTINGS = "example_project.screenshot_settings"
LOGIN_PATH = "/screenshot-login/"
WIDTH, HEIGHT = 1280, 1600
#: Measured with Chromium 156 at WIDTH x HEIGHT: an empty page is 9.3 kB, the admin's
#: login page 18.6 kB, the console's pages 60 to 150 kB. (Django's debug 404 page is 47 kB:
#: error pages are caught by :func:`check_html`, not by size.)
MIN_BYTES = 30_000
#: The same pages reduced to 256 colours (:func:`optimise`): 0.3 kB, 9 kB, 24 to 60 kB.
MIN_WRITTEN_BYTES = 15_000
#: An empty page has one colour; a page of anti-aliased text has hundreds.
MIN_COLOURS = 64
SERVER_START_SECONDS = 30
BROWSER_SECONDS = 90


class ScreenshotError(Exception):
    """A page could not be served, rendered, or its screenshot is not a real picture."""


@dataclass(frozen=True)
class Demo:
    """The demo objects the pages show (primary keys)."""

    failed_event: int


def no_args(demo: Demo) -> tuple[object, ...]:
    return ()


@dataclass(frozen=True)
class Page:
    """One screenshot: ``filename`` of the admin page ``url_name`` (reversed with
    ``args(demo)``), which must contain ``marker``; skipped when the URL name does not
    exist (yet)."""

    filename: str
    url_name: str
    marker: str = ""
    args: Callable[[Demo], tuple[object, ...]] = field(default=no_args)
    query: str = ""


PAGES: Sequence[Page] = (
    Page("event-list.png", "admin:spark_decl_eventrecord_changelist", "Select event to view"),
    Page(
        "event-failed.png",
        "admin:spark_decl_eventrecord_change",
        "SMTPRecipientsRefused",
        args=lambda demo: (demo.failed_event,),
    ),
    Page("dashboard.png", "admin:spark_decl_dashboard", "Event health"),
)


# -- the demo data ---------------------------------------------------------------------------


def build_demo_data() -> Demo:
    """Migrate the (empty) database and fill it: see the module docstring."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import override_settings
    from django.utils import timezone

    from challenges.models import Challenge
    from example_project.screenshot_site import DEMO_USERNAME, REFUSED_DOMAIN
    from spark_decl.models import EventRecord
    from spark_decl.retry import retry_events

    call_command("migrate", interactive=False, verbosity=0)
    User = get_user_model()
    User.objects.create_superuser(DEMO_USERNAME, f"{DEMO_USERNAME}@example.com", None)
    users = {
        name: User.objects.create_user(name, f"{name}@{domain}")
        for name, domain in [
            ("alice", "example.com"),
            ("bob", "example.com"),
            ("carol", "example.com"),
            # The mail backend refuses this domain: every mail to dave fails.
            ("dave", REFUSED_DOMAIN),
        ]
    }
    build_history(timezone.now())
    today = timezone.localdate()

    def challenge(title: str, owner: str, ends_in: int, started: int = 0) -> Challenge:
        return Challenge.objects.create(
            title=title,
            user=users[owner],
            start_date=today - dt.timedelta(days=started),
            end_date=today + dt.timedelta(days=ends_in),
        )

    def retry(*pks: int) -> None:
        """``retry_spark_events`` for the events of the challenges ``pks``, as if their
        next attempt were due (the second one waits BACKOFF_SECONDS)."""
        keys = EventRecord.objects.filter(key__regex=rf"_({'|'.join(map(str, pks))})$")
        retry_events(records=keys, ignore_schedule=True)

    # Done: saved, handled, mailed.
    challenge("Run 100 km", "alice", ends_in=30)
    challenge("Read 12 books", "bob", ends_in=7)
    challenge("Bake 50 loaves", "carol", ends_in=2)
    challenge("Plant 20 trees", "carol", ends_in=-1, started=20)
    # Done, and the challenge deleted since: the event refers to a row that is gone.
    challenge("Knit 5 scarves", "alice", ends_in=10).delete()
    # Failed twice: the save's call, then one retry.
    cycle = challenge("Cycle 500 km", "dave", ends_in=14).pk
    retry(cycle)
    # Given up: three attempts (screenshot_settings' MAX_ATTEMPTS).
    swim = challenge("Swim 10 km", "dave", ends_in=1).pk
    retry(swim)
    retry(swim)
    # Failed, then deleted (delete() sets pk to None: keep it): the retry cannot rebuild
    # the context.
    climb = challenge("Climb 3 peaks", "dave", ends_in=20)
    climb_pk = climb.pk
    climb.delete()
    retry(climb_pk)
    # Pending: stands in for a call a background worker has not run yet.
    with override_settings(
        SPARK_DECL={**getattr(settings, "SPARK_DECL", {}), "RUN_HANDLERS": False}
    ):
        challenge("Walk 1000 km", "bob", ends_in=60)

    failed = EventRecord.objects.get(key=f"challenge_created_{cycle}")
    return Demo(failed_event=failed.pk)


def build_history(now: dt.datetime) -> None:
    """A day of events before the demo's own, oldest first (ids must ascend with time: see
    :mod:`spark_decl.health`), so that the dashboard has a day to draw: every call done
    until six hours ago, then about one in four failing."""
    from spark_decl.models import EventRecord, HandlerOutcome

    handler = "challenges.spark.send_challenge_mails"
    groups = ("challenge_created", "challenge_ends_2d", "challenge_ended")
    trouble = now - dt.timedelta(hours=6)
    number = 0
    for hours_ago in range(23, 0, -1):
        hour = now - dt.timedelta(hours=hours_ago)
        # A day's rhythm: quiet at night, busy at noon (the same numbers on every run).
        for minute in range(0, 60, 60 // (3 + (7 * hours_ago) % 9)):
            at = hour + dt.timedelta(minutes=minute)
            number += 1
            group = groups[number % len(groups)]
            record = EventRecord.objects.create(
                key=f"{group}_history_{number}", group=group, created_at=at
            )
            failing = at >= trouble and number % 4 == 0
            HandlerOutcome.objects.create(
                record=record,
                handler=handler,
                status="failed" if failing else "done",
                attempts=1,
                last_error="SMTPServerDisconnected: Connection unexpectedly closed"
                if failing
                else "",
                created_at=at,
                finished_at=None if failing else at,
                next_attempt_at=now if failing else None,
            )


# -- the server and the browser --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=EXAMPLE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScreenshotError(f"runserver exited ({server.returncode}):\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise ScreenshotError(f"runserver did not listen within {SERVER_START_SECONDS}s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """Stop the one process :func:`start_server` started (``--noreload``: no children)."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or Ubuntu's older ``chromium-browser``), if on PATH."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def login_url(base: str, path: str) -> str:
    return f"{base}{LOGIN_PATH}?{urllib.parse.urlencode({'next': path})}"


def fetch_page(base: str, path: str) -> tuple[int, str, str]:
    """The status, final path and HTML the browser will get for ``path``, fetched the same
    way: through the login URL, following its redirect with the session cookie it set."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    try:
        with opener.open(login_url(base, path), timeout=30) as response:
            final = urllib.parse.urlsplit(response.url)
            body: bytes = response.read()
            status: int = response.status
    except urllib.error.HTTPError as error:
        final = urllib.parse.urlsplit(error.url)
        body, status = error.read(), error.code
    landed = final.path + (f"?{final.query}" if final.query else "")
    return status, landed, body.decode(errors="replace")


def check_html(html: str, *, path: str, landed: str, status: int, marker: str = "") -> str:
    """Return ``html`` if it is the logged-in admin page at ``path`` (containing
    ``marker``), else raise :class:`ScreenshotError` saying what it is instead."""
    if status != 200:
        raise ScreenshotError(f"{path}: HTTP {status} ({title(html)})")
    if landed != path:
        raise ScreenshotError(f"{path}: redirected to {landed} ({title(html)})")
    if 'id="login-form"' in html or 'id="user-tools"' not in html:
        raise ScreenshotError(f"{path}: not a logged-in admin page ({title(html)})")
    if marker not in html:
        raise ScreenshotError(f"{path}: {marker!r} is not on the page ({title(html)})")
    return html


def title(html: str) -> str:
    start, end = html.find("<title>"), html.find("</title>")
    return " ".join(html[start + 7 : end].split()) if 0 <= start < end else "no <title>"


def screenshot(chromium: str, url: str, png: Path, profile: Path) -> None:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={png}",
        url,
    ]
    try:
        done = subprocess.run(command, capture_output=True, timeout=BROWSER_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise ScreenshotError(f"{url}: Chromium took over {BROWSER_SECONDS}s") from None
    if done.returncode != 0 or not png.exists():
        output = done.stderr.decode(errors="replace")[-2000:]
        raise ScreenshotError(f"{url}: Chromium exited {done.returncode}:\n{output}")


# -- the checks ------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(
    png: Path, *, width: int = WIDTH, height: int = HEIGHT, min_bytes: int = MIN_BYTES
) -> int:
    """Return the number of colours in ``png`` (at least :data:`MIN_COLOURS`), or raise
    :class:`ScreenshotError` unless it is a PNG of ``width`` x ``height``, larger than
    ``min_bytes``, and not (nearly) one colour: not a blank or failed render."""
    data = png.read_bytes()
    # The signature, then the IHDR chunk: length 13, type, width, height.
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ScreenshotError(f"{png.name}: not a PNG file")
    got = struct.unpack(">II", data[16:24])
    if got != (width, height):
        raise ScreenshotError(f"{png.name}: {got[0]}x{got[1]} pixels, not {width}x{height}")
    if len(data) <= min_bytes:
        raise ScreenshotError(
            f"{png.name}: {len(data)} bytes, at most {min_bytes}: a blank or nearly blank page"
        )
    try:
        with Image.open(png) as image:
            pixels = image.convert("RGB")  # decodes every pixel: a corrupt file fails here
    except (OSError, SyntaxError) as error:  # what Pillow raises for a broken PNG
        raise ScreenshotError(f"{png.name}: cannot be decoded: {error}") from None
    colours = pixels.getcolors(maxcolors=width * height) or []
    if len(colours) < MIN_COLOURS:
        raise ScreenshotError(f"{png.name}: only {len(colours)} colours: a blank page")
    return len(colours)


def optimise(raw: Path, out: Path) -> None:
    """Write ``raw`` to ``out`` with a palette of 256 colours: a third of the size or less,
    the same to the eye for the admin's flat colours and text."""
    with Image.open(raw) as image:
        small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
        small.save(out, optimize=True)


# -- the run ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Screenshots of the admin's operations console for the docs."
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("screenshots: no chromium or chromium-browser on PATH", file=sys.stderr)
        print("  install Debian's: apt-get install chromium", file=sys.stderr)
        return 2
    try:
        written = run(chromium, args.out)
    except ScreenshotError as error:
        print(f"screenshots: FAILED: {error}", file=sys.stderr)
        return 1
    for line in written:
        print(line)
    return 0


def run(chromium: str, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spark-decl-screenshots-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "SPARK_DECL_SCREENSHOT_DB": str(tmp / "db.sqlite3"),
            "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(ROOT)]),
        }
        pages = prepare(env)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(port, env, tmp / "runserver.log")
        report = []
        try:
            for page, path in pages:
                if path is None:
                    report.append(f"skipped {page.filename}: no URL named {page.url_name!r}")
                    continue
                started = time.monotonic()
                status, landed, html = fetch_page(base, path)
                check_html(html, path=path, landed=landed, status=status, marker=page.marker)
                raw = tmp / page.filename
                screenshot(chromium, login_url(base, path), raw, tmp / f"profile-{raw.stem}")
                colours = check_png(raw)
                optimise(raw, out / page.filename)
                check_png(out / page.filename, min_bytes=MIN_WRITTEN_BYTES)
                report.append(
                    f"{out / page.filename}: {path}, {raw.stat().st_size // 1000} kB taken "
                    f"({colours} colours), {(out / page.filename).stat().st_size // 1000} kB "
                    f"written, {time.monotonic() - started:.1f}s"
                )
        finally:
            stop_server(server)
        report.append(f"runserver (pid {server.pid}) stopped")
        return report


def prepare(env: dict[str, str]) -> list[tuple[Page, str | None]]:
    """Build the demo data in this process (the server's settings) and resolve each page's
    URL: ``None`` for a URL name that does not exist."""
    os.environ.update(env)
    sys.path[:0] = [str(EXAMPLE), str(ROOT)]
    import django

    django.setup()
    from django.db import connections
    from django.urls import NoReverseMatch, reverse

    demo = build_demo_data()
    connections.close_all()
    pages: list[tuple[Page, str | None]] = []
    for page in PAGES:
        try:
            path = reverse(page.url_name, args=page.args(demo))
        except NoReverseMatch:
            pages.append((page, None))
        else:
            pages.append((page, f"{path}?{page.query}" if page.query else path))
    return pages


if __name__ == "__main__":
    sys.exit(main())
