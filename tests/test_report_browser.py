"""report.html of a finished segmentation run, opened in headless Chromium as a coordinator opens it.

One tiny simulated federation (`medfed data synth --task segmentation`, two sites, two rounds; one
site folder named like a real hospital, with a space, an apostrophe and a `#`) writes its report;
Chromium loads the page from disk and the test checks, through the Chrome DevTools Protocol, that
every image loaded and is drawn on the page, that the console shows no error (a failed load, a
script error), and that a full-page screenshot is a real PNG of a non-blank page.

The protocol runs over `--remote-debugging-pipe` (Chromium reads commands on its fd 3 and writes
replies and events, NUL-terminated JSON, on its fd 4): no port, no websocket client. Slow (about a
minute on 2 busy CPU cores); skipped where no Chromium is installed (Debian: `apt-get install
chromium`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import signal
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

from medfed.cli import app
from tests.conftest import REPO

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOSPITAL = "St. Mary's #2"  # a site folder's name becomes part of an image's file name
WIDTH, HEIGHT = 1100, 900


class DevTools:
    """A headless Chromium driven over the DevTools Protocol on a pipe (``--remote-debugging-pipe``)."""

    def __init__(self, browser: str, profile: Path, log: Path) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        # Chromium wants the pipe on fds 3 and 4 exactly: move both ends above them first so that
        # the two dup2 actions cannot overwrite one another.
        high_in = fcntl.fcntl(to_browser, fcntl.F_DUPFD_CLOEXEC, 10)
        high_out = fcntl.fcntl(from_browser, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_browser, from_browser):
            os.close(fd)
        args = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, high_in, 3),
            (os.POSIX_SPAWN_DUP2, high_out, 4),
        ]
        # its own process group: the renderer and utility processes are stopped with it
        self.pid = os.posix_spawn(browser, args, os.environ, file_actions=actions, setpgroup=0)
        os.close(high_in)
        os.close(high_out)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile go to ``events``)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self._read_until(lambda m: m.get("id") == self._next_id, 60, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, event: str, seconds: float) -> dict[str, Any]:
        """Wait for the first ``event`` not yet seen; return it."""
        for seen in self.events:
            if seen["method"] == event:
                self.events.remove(seen)
                return seen
        return self._read_until(lambda m: m.get("method") == event, seconds, event)

    def _read_until(self, wanted: Any, seconds: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                if "method" in message:
                    self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent no answer to {what} within {seconds} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe while waiting for {what}")
            self._buffer += chunk

    def close(self) -> None:
        """Ask the browser to quit; stop its process group if it has not gone within 10 s."""
        with contextlib.suppress(OSError):
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):  # a helper process of the browser left behind
            os.killpg(self.pid, signal.SIGKILL)
        os.close(self._to_browser)
        os.close(self._from_browser)


@dataclass
class PageCheck:
    """What Chromium saw of report.html."""

    images: list[dict[str, Any]]
    page_size: tuple[int, int]
    screenshot: bytes
    errors: list[str] = field(default_factory=list)


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions, failed loads and error log entries among ``events``."""
    found = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console." + params["type"] + ": " + " ".join(str(a.get("value")) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log: {params['entry']['text']} ({params['entry'].get('url', '')})")
        elif method == "Network.loadingFailed":
            found.append(f"load failed: {params.get('errorText')} ({params.get('type')})")
    return found


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}; Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageCheck]:
    browser = _browser()
    root = tmp_path_factory.mktemp("report-browser")
    runner = CliRunner()
    synth = runner.invoke(app, [
        "data", "synth", "--out", str(root / "data"), "--task", "segmentation", "--sites", "2", "--samples", "40",
        "--image-size", "32",
    ])  # fmt: skip
    assert synth.exit_code == 0, synth.output
    (root / "data" / "hospital-2").rename(root / "data" / HOSPITAL)
    run = runner.invoke(app, [
        "simulate", str(REPO / "configs" / "segmentation-synthetic.toml"), "--data", str(root / "data"),
        "--rounds", "2", "--out", str(root / "run"), "--set", "data.patch-size=16", "--set", "train.local-epochs=1",
        "--set", "evaluation.example-images=1",
    ])  # fmt: skip
    assert run.exit_code == 0, run.output
    report = root / "run" / "report.html"

    chromium = DevTools(browser, root / "profile", root / "chromium.log")
    try:
        target = chromium.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = chromium.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            chromium.call(f"{domain}.enable", session=session)
        chromium.call("Page.navigate", {"url": report.as_uri()}, session=session)
        chromium.wait_for("Page.loadEventFired", 60)
        images = chromium.call(
            "Runtime.evaluate",
            {
                "expression": "Array.from(document.images).map(i => { const r = i.getBoundingClientRect(); "
                "return {src: i.getAttribute('src'), url: i.currentSrc, complete: i.complete, "
                "width: i.naturalWidth, height: i.naturalHeight, "
                "box: [r.left + scrollX, r.top + scrollY, r.width, r.height]}; })",
                "returnByValue": True,
            },
            session=session,
        )["result"]["value"]
        size = chromium.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        width, height = int(size["width"]), int(size["height"])
        shot = chromium.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
            session=session,
        )  # fmt: skip
        screenshot = base64.b64decode(shot["data"])
        (root / "report.png").write_bytes(screenshot)
        yield PageCheck(images, (width, height), screenshot, _errors(chromium.events))
    finally:
        chromium.close()


def test_every_image_of_the_report_loads_and_is_drawn(page: PageCheck) -> None:
    sources = {image["src"] for image in page.images}
    expected = {"metric per round", "privacy spent per round", "cross-site matrix"}
    assert len(page.images) == len(expected) + 2, sources  # three plots + one example figure per site
    broken = [image for image in page.images if not (image["complete"] and image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert f"plots/examples-{urllib.parse.quote(HOSPITAL)}-0.png" in sources, sources
    shot = Image.open(io.BytesIO(page.screenshot)).convert("L")
    for image in page.images:
        x, y, w, h = (int(v) for v in image["box"])
        assert w >= min(image["width"], 900) - 1, f"{image['src']} is shrunk below its own size: {image}"
        tile = shot.crop((x, y, x + w, y + h))
        assert ImageStat.Stat(tile).stddev[0] > 5, f"{image['src']} is drawn as a flat area at {image['box']}"


def test_the_console_shows_no_error(page: PageCheck) -> None:
    assert not page.errors, "\n".join(page.errors)


def test_the_screenshot_is_a_png_of_the_whole_non_blank_page(page: PageCheck) -> None:
    assert page.screenshot.startswith(b"\x89PNG\r\n\x1a\n")
    shot = Image.open(io.BytesIO(page.screenshot))
    assert shot.format == "PNG" and shot.size == page.page_size
    assert page.page_size[0] >= WIDTH - 20 and page.page_size[1] > HEIGHT  # the report is longer than a screen
    gray = shot.convert("L")
    histogram = gray.histogram()
    assert max(histogram) < 0.97 * sum(histogram), "the page is (almost) one colour"
    assert ImageStat.Stat(gray).stddev[0] > 10
