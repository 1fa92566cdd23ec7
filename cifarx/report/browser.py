"""Open a built report in headless Chromium (driven by Playwright) and read what the page computed.

Used by the real-browser test and `benchmarks/browser_parity.py`. Playwright drives the system's Chromium
(`executable_path`): its own browser downloads are not needed.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path
from typing import Iterator

from cifarx.errors import CifarxError
from cifarx.io import atomic_path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    """The system Chromium (Debian's `chromium` package, or whatever of that name is on PATH)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm"}  # module scripts and streaming compile

    def log_message(self, format, *args):  # one line per request would bury the test output
        pass


@contextlib.contextmanager
def serve(folder: str | Path) -> Iterator[str]:
    """Serve `folder` over http on 127.0.0.1 (a free port) for as long as the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def open_report(site: str | Path, *, chromium: str | None = None, screenshot: str | Path | None = None,
                timeout_s: float = 300, probe: str | None = None) -> dict:
    """Load SITE/index.html over http in headless Chromium, wait for the demo to finish, return its results.

    Returns {"results": [{model, image, predicted, probability, ms}], "table_rows": [model names in the
    overview table], "status": the page's status line}; `screenshot` keeps a PNG of the overview section; `probe`, a
    JavaScript expression, is evaluated once the demo is done and its value returned as "probe".
    """
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise CifarxError("no chromium on PATH (Debian: apt-get install -y chromium)")
    with serve(site) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "index.html")
            page.wait_for_function("document.body.dataset.ready !== 'false'", timeout=timeout_s * 1000)
            status = page.inner_text("#status")
            if page.evaluate("document.body.dataset.ready") != "true":
                raise CifarxError(f"the report page failed: {status} {' '.join(errors)}".strip())
            results = page.eval_on_selector_all("#samples [data-predicted]", """elements => elements.map(e => ({
                model: e.dataset.model, image: e.dataset.image, predicted: e.dataset.predicted,
                probability: Number(e.dataset.probability), ms: Number(e.dataset.ms)}))""")
            rows = page.eval_on_selector_all("#models tbody tr", "rows => rows.map(r => r.dataset.rowModel)")
            probed = page.evaluate(probe) if probe is not None else None
            if screenshot is not None:
                with atomic_path(screenshot) as temporary:
                    page.locator("#overview").screenshot(path=str(temporary), type="png")
        finally:
            browser.close()
    return {"results": results, "table_rows": rows, "status": status, "probe": probed}
