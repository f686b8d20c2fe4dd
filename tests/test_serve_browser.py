"""The search page of `mamfusion serve` in a real headless Chromium (Debian's, driven by Playwright).

Types a query, checks the results (thumbnails decoded, a timeline per hit), clicks the first hit and checks
the player lands inside the matched span and stops at its end; then the MPEG-4 Part 2 AVI (which Chromium
cannot play) through the server's H.264 preview, the frame-strip fallback when even that fails, and the
visible states for an empty query, a server error and a server with no model yet. `make test` installs
Chromium (`make browser`); without it the test is skipped locally and fails on CI. A screenshot goes to
$MAMFUSION_SERVE_SCREENSHOT, or the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_serve import QUERIES, ServeGallery, expected, hash_text_encoder, running

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "browser-test-token"
SLACK = 0.15  # seconds: the preview starts at the span's start rounded to 0.1 s; a frame is 0.1 s


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM}: run `make browser` (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
        )
        try:
            yield browser
        finally:
            browser.close()


def played_moment(page) -> dict:
    """Where the player is in the source video's time (a preview's time plus the span start it began at)."""
    return page.evaluate(
        """() => { const v = document.getElementById('video');
                   return { mode: v.dataset.mode, state: v.dataset.state, id: v.dataset.videoId,
                            at: Number(v.dataset.offset) + v.currentTime, error: v.error && v.error.code,
                            start: Number(v.dataset.start), end: Number(v.dataset.end) }; }"""
    )


def play_and_check(page, video_id: str, mode: str) -> dict:
    """Click the hit, see it play inside its span, and pause at the span's end."""
    page.click(f'#results li.hit[data-video-id="{video_id}"]')
    page.wait_for_function(
        f"""() => {{ const v = document.getElementById('video');
                     return v.dataset.videoId === '{video_id}' && v.dataset.state === 'playing' && !v.paused
                            && v.currentTime > 0; }}""",
        timeout=30_000,
    )
    now = played_moment(page)
    assert now["mode"] == mode and now["error"] is None, now
    assert now["start"] - SLACK <= now["at"] <= now["end"] + SLACK, now
    page.wait_for_function("() => document.getElementById('video').dataset.state === 'done'", timeout=30_000)
    done = played_moment(page)
    assert done["start"] - SLACK <= done["at"] <= done["end"] + SLACK, done
    assert done["at"] >= done["end"] - 0.35, done  # it played through the span, then stopped
    return done


def test_search_page_in_chromium(tmp_path, browser):
    with hash_text_encoder():
        gallery = ServeGallery(tmp_path / "gallery")
        query = QUERIES[0]
        want = expected(gallery.searcher("v1"), [query], 10)[0]
        with running(gallery.output, token=TOKEN) as (client, _):
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.goto(f"http://127.0.0.1:{client.port}/?token={TOKEN}")
            page.wait_for_function("() => document.getElementById('model-status').dataset.state === 'ok'")
            assert page.inner_text("#model-status") == "model v1 · 4 videos"
            assert "token" not in page.url  # moved out of the address bar, kept for the tab

            page.click("#go")  # nothing typed
            assert page.get_attribute("#message", "data-state") == "empty-query"
            assert "query is empty" in page.inner_text("#message")

            page.fill("#q", query)
            page.press("#q", "Enter")
            page.wait_for_function("() => document.getElementById('message').dataset.state === 'done'")
            hits = page.locator("#results li.hit")
            assert hits.count() == len(want) == 4
            ids = [hits.nth(i).get_attribute("data-video-id") for i in range(hits.count())]
            assert ids == [h["video_id"] for h in want]  # the server's ranking, in order
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img.thumb')]"
                ".every(i => i.complete && i.naturalWidth === 160)"
            )
            clips = len(want[0].get("profile", ()))
            timelines = page.locator("#results svg.timeline")
            assert timelines.nth(0).get_attribute("data-clips") == str(clips)
            page.wait_for_function(  # the video's duration arrived from /api/videos
                "() => document.querySelector('#results svg.timeline').dataset.duration === '6'"
            )
            assert timelines.nth(0).locator("rect.span").count() == 1

            first = want[0]
            first_mode = "preview" if first["path"].endswith(".avi") else "original"
            done = play_and_check(page, first["video_id"], first_mode)
            assert (done["start"], done["end"]) == (
                pytest.approx(first["start"]),
                pytest.approx(first["end"]),
            )
            shot = Path(os.environ.get("MAMFUSION_SERVE_SCREENSHOT") or tmp_path / "serve.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            avi = gallery.record(".avi").video_id  # MPEG-4 Part 2: Chromium plays it only as a preview
            play_and_check(page, avi, "preview")
            for other in {h["video_id"] for h in want} - {avi, first["video_id"]}:
                play_and_check(page, other, "original")

            page.route("**/preview?*", lambda route: route.abort())  # even the preview fails: frames
            page.click(f'#results li.hit[data-video-id="{avi}"]')
            page.wait_for_function("() => document.getElementById('video').dataset.state === 'frames'")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#strip img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            assert page.locator("#strip img").count() == 6 and page.is_hidden("#video")

            page.route(  # a server error is shown with its message, and the old results are cleared
                "**/api/search?*",
                lambda route: route.fulfill(
                    status=500, content_type="application/json", body='{"detail":"boom"}'
                ),
            )
            page.press("#q", "Enter")
            page.wait_for_function(
                "() => document.getElementById('message').dataset.state === 'server-error'"
            )
            assert page.inner_text("#message") == "Server error (500): boom"
            assert page.locator("#results li").count() == 0 and page.is_enabled("#go")
            assert problems == []
            page.close()

        empty = tmp_path / "no-model-yet"
        (empty / "models").mkdir(parents=True)
        with running(empty) as (client, _):
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{client.port}/")
            page.wait_for_function("() => document.getElementById('message').dataset.state === 'no-model'")
            assert "no model has been published yet" in page.inner_text("#message")
            page.fill("#q", "a dog")
            page.press("#q", "Enter")
            page.wait_for_function("() => document.getElementById('message').dataset.state === 'no-model'")
            assert page.locator("#results li").count() == 0
            page.close()
