"""Open a report in headless Chromium (Debian's `chromium`, driven by playwright) and record what the page does:
console errors, every request it makes, when it finished drawing. Used by the tests, the screenshot script and the
load-time benchmark; needs `pip install playwright` (the `test` extra) and a Chromium binary, never a download.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plipy.errors import PlipyError

# Without the background-networking flags Chromium itself calls Google hosts at start (and logs refused connections).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


def find_chromium() -> str | None:
    """The Chromium to use: $PLIPY_CHROMIUM, else `chromium` / `chromium-browser` on the PATH, else None."""
    env = os.environ.get("PLIPY_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium(executable: str | None = None) -> Iterator[Any]:
    """A headless Chromium (playwright Browser), closed afterwards."""
    exe = executable or find_chromium()
    if exe is None:
        raise PlipyError("no Chromium found: install Debian's `chromium` or set PLIPY_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise PlipyError("opening reports in a browser needs playwright: pip install 'plipy[test]'") from None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Opened:
    """A report open in a page, with everything it asked for and complained about."""

    page: Any
    url: str
    requests: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text): every console message
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console errors
    ready_ms: float | None = None  # navigation start → every figure drawn (page.js sets it)
    start_ms: float | None = None  # navigation start → page.js starts (plotly.js and the HTML parsed and run)
    metrics: dict[str, float] = field(default_factory=dict)  # Chromium's Performance metrics (`metrics=True`)

    def foreign_requests(self) -> list[str]:
        """Requests to anything but the report itself and inline data."""
        return [u for u in self.requests if u != self.url and not u.startswith(("data:", "blob:"))]


def open_report(
    browser: Any,
    path: str | Path,
    *,
    width: int = 1400,
    height: int = 900,
    timeout_ms: int = 60000,
    metrics: bool = False,
) -> Opened:
    """Load a report file in a new page and wait until page.js says every figure is drawn. `metrics`: also read
    Chromium's performance counters (`ThreadTime`: CPU seconds of the page's main thread, which a busy machine
    inflates far less than wall time)."""
    url = Path(path).resolve().as_uri()
    page = browser.new_page(viewport={"width": width, "height": height})
    opened = Opened(page, url)
    page.on("request", lambda r: opened.requests.append(r.url))
    page.on("console", lambda m: _console(opened, m.type, m.text))
    page.on("pageerror", lambda e: opened.errors.append(f"pageerror: {e}"))
    cdp = None
    if metrics:
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=timeout_ms)
    opened.ready_ms, opened.start_ms = page.evaluate("[window.plipyReadyMs, window.plipyStartMs]")
    if cdp is not None:
        opened.metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return opened


def _console(opened: Opened, kind: str, text: str) -> None:
    opened.console.append((kind, text))
    if kind == "error":
        opened.errors.append(f"console: {text}")


def screenshot(
    browser: Any, report: str | Path, png: str | Path, *, width: int = 1400, height: int = 900, full_page: bool = True
) -> Opened:
    """A PNG of a report (the whole page by default)."""
    opened = open_report(browser, report, width=width, height=height)
    opened.page.screenshot(path=str(png), full_page=full_page)
    return opened
