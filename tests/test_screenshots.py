"""``make screenshots`` (scripts/screenshots.py): its checks, and the whole run in a real
headless Chromium when one is installed (CI installs Debian's ``chromium``)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from django.urls import NoReverseMatch, reverse
from PIL import Image
from pytest_django import Settings

from scripts.screenshots import (
    HEIGHT,
    MIN_BYTES,
    MIN_WRITTEN_BYTES,
    PAGES,
    ROOT,
    WIDTH,
    ScreenshotError,
    check_html,
    check_png,
    find_chromium,
)

CHANGELIST = "/admin/spark_decl/eventrecord/"


def page_like(path: Path, *, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """A PNG with as many colours and as little redundancy as a rendered page, or more."""
    rng = random.Random(16)
    image = Image.new("RGB", size, "white")
    image.putdata([(rng.randrange(256), rng.randrange(256), 200) for _ in range(40_000)])
    image.save(path)
    return path


# -- check_png ------------------------------------------------------------------------------


def test_a_page_like_png_passes(tmp_path: Path) -> None:
    assert check_png(page_like(tmp_path / "page.png")) > 1000


def test_a_blank_page_is_refused_by_its_size(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (WIDTH, HEIGHT), "white").save(blank)
    with pytest.raises(ScreenshotError, match=f"at most {MIN_BYTES}: a blank"):
        check_png(blank)


def test_a_large_png_of_few_colours_is_refused(tmp_path: Path) -> None:
    # Stripes of two colours, stored uncompressed: large, and still blank to the eye.
    striped = tmp_path / "striped.png"
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    image.paste((0, 0, 0), (0, 0, WIDTH, HEIGHT // 2))
    image.save(striped, compress_level=0)
    assert striped.stat().st_size > MIN_BYTES
    with pytest.raises(ScreenshotError, match="only 2 colours"):
        check_png(striped)


def test_the_wrong_size_is_refused(tmp_path: Path) -> None:
    small = page_like(tmp_path / "small.png", size=(800, 600))
    with pytest.raises(ScreenshotError, match="800x600 pixels, not 1280x1600"):
        check_png(small)


def test_a_file_that_is_not_a_png_is_refused(tmp_path: Path) -> None:
    html = tmp_path / "error.png"
    html.write_text("<html>Server Error (500)</html>" * 2000)
    with pytest.raises(ScreenshotError, match="not a PNG file"):
        check_png(html)


def test_a_truncated_png_is_refused(tmp_path: Path) -> None:
    whole = page_like(tmp_path / "whole.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    assert len(whole) // 2 > MIN_BYTES
    with pytest.raises(ScreenshotError, match="cannot be decoded"):
        check_png(cut)


# -- check_html, on the admin's real pages -----------------------------------------------------


@pytest.fixture(autouse=True)
def fast_passwords(settings: Settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.mark.django_db
def test_the_logged_in_event_list_passes(admin_client: Client) -> None:
    html = admin_client.get(CHANGELIST).content.decode()
    assert check_html(html, path=CHANGELIST, landed=CHANGELIST, status=200, marker="Select event")


@pytest.mark.django_db
def test_the_login_page_is_refused(client: Client) -> None:
    response = client.get(CHANGELIST, follow=True)
    landed = response.redirect_chain[-1][0]
    html = response.content.decode()
    with pytest.raises(ScreenshotError, match=r"redirected to /admin/login/\?next="):
        check_html(html, path=CHANGELIST, landed=landed, status=200)
    # Served at the URL itself (as a login view may be), it is refused as well.
    with pytest.raises(ScreenshotError, match="not a logged-in admin page"):
        check_html(html, path=CHANGELIST, landed=CHANGELIST, status=200)


@pytest.mark.django_db
def test_an_error_or_another_page_is_refused(admin_client: Client) -> None:
    missing = "/admin/spark_decl/eventrecord/999/change/"
    response = admin_client.get(missing, follow=True)
    html = response.content.decode()
    # The admin redirects a missing object to its index, with a message.
    with pytest.raises(ScreenshotError, match="redirected to /admin/"):
        check_html(html, path=missing, landed=response.redirect_chain[-1][0], status=200)
    with pytest.raises(ScreenshotError, match="HTTP 500"):
        check_html(html, path=missing, landed=missing, status=500)
    with pytest.raises(ScreenshotError, match="'SMTPRecipientsRefused' is not on the page"):
        check_html(html, path=missing, landed=missing, status=200, marker="SMTPRecipientsRefused")


# -- the whole run -----------------------------------------------------------------------------


@pytest.mark.skipif(
    find_chromium() is None,
    reason="no chromium or chromium-browser binary: `apt-get install chromium` "
    "(make screenshots installs it; CI does too)",
)
@pytest.mark.skipif(
    os.environ.get("SPARK_DECL_TEST_DB") == "postgresql",
    reason="the screenshots use a SQLite database of their own: run on the SQLite legs",
)
def test_screenshots_end_to_end(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/screenshots.py", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    expected = ["event-list.png", "event-failed.png"]
    try:
        reverse("admin:spark_decl_dashboard")
    except NoReverseMatch:
        assert "skipped dashboard.png: no URL named 'admin:spark_decl_dashboard'" in done.stdout
    else:
        expected.append("dashboard.png")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(expected)
    assert [page.filename for page in PAGES if page.filename in expected] == expected
    for name in expected:
        check_png(tmp_path / name, min_bytes=MIN_WRITTEN_BYTES)

    # The one server it started is gone (stopped and reaped).
    pid = int(done.stdout.split("runserver (pid ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
