"""The prediction page as a person uses it: headless Chromium (Debian's package) opens `hpo serve`'s
page, a PNG of a digit is put into the page's file input through the DevTools protocol (what
choosing a file in the dialog does), the page's own script uploads it, and the bars it draws show
the same three classes and probabilities as the JSON API. A screenshot is saved beside the test's
output for a person to look at.

No Chromium: skipped on a developer's machine, a failure in CI (CI set), which installs it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_dashboard_browser import _chromium
from tests.helpers import hpo_env, stop_process
from tests.serve.helpers import Server, digit_image, encode, get_json, predict, start_server

BROWSER_SECONDS = 120
WINDOW = (1000, 760)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self._ws = websocket.create_connection(ws_url, timeout=BROWSER_SECONDS,
                                               suppress_origin=True)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self._ws.recv())
            if message.get("id") == self._id:
                assert "error" not in message, (method, message["error"])
                return message.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        deadline = time.monotonic() + BROWSER_SECONDS
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the page never made {expression!r} true")

    def close(self) -> None:
        self._ws.close()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[DevTools]:
    """Headless Chromium on an empty page, driven over its DevTools port."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-allow-origins=*", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + BROWSER_SECONDS
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited {proc.returncode}"
            assert time.monotonic() < deadline, "chromium opened no DevTools port"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        pages = [t for t in get_json(f"http://127.0.0.1:{port}/json") if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        stop_process(proc)


@pytest.fixture
def served(finished_study: tuple[str, Path], tmp_path: Path) -> Iterator[Server]:
    _chromium()  # skip (or fail in CI) before paying for the server
    url, cwd = finished_study
    server = start_server([sys.executable, "-m", "search.cli", "serve", "done"], cwd=cwd,
                          log=tmp_path / "serve.log", env=hpo_env(url))
    yield server
    server.stop()


def test_uploading_a_digit_through_the_page_shows_the_apis_top_three(
    served: Server, chromium: DevTools, tmp_path: Path
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(encode(digit_image(0), "png-gray", size=96))
    status, api = predict(served.base, image.read_bytes(), "?threshold=0.7")
    assert status == 200

    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=f"{served.base}/")
    chromium.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    root = chromium.call("DOM.getDocument")["root"]["nodeId"]
    node = chromium.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    # What the file dialog does: the input gets the file and fires its change event.
    chromium.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
    state = chromium.wait_for(
        "['done', 'error'].includes(document.getElementById('results').dataset.state)"
        " && document.getElementById('results').dataset.state")
    assert state == "done", chromium.js("document.getElementById('error').textContent")

    shown = chromium.js("[...document.querySelectorAll('#bars .pred')].map(d =>"
                        " [d.dataset.name, Number(d.dataset.probability),"
                        " d.querySelector('.pct').textContent])")
    assert [row[0] for row in shown] == [p["name"] for p in api["predictions"]]
    assert [row[1] for row in shown] == [p["probability"] for p in api["predictions"]]
    assert [row[2] for row in shown] == [f"{100 * p['probability']:.1f}%"
                                         for p in api["predictions"]]
    verdict = chromium.js("document.getElementById('verdict').textContent")
    assert verdict.startswith("unknown") if api["unknown"] else verdict == api["label"]
    assert chromium.js("document.getElementById('preview').naturalWidth") == 96

    # The threshold field: at 0 nothing is unknown, and the page asks again with the new value.
    chromium.js("document.getElementById('results').dataset.state = 'stale';"
                " const t = document.getElementById('threshold'); t.value = '0';"
                " t.dispatchEvent(new Event('change')); true")
    chromium.wait_for("document.getElementById('results').dataset.state === 'done'")
    assert chromium.js("document.getElementById('verdict').textContent") == \
        api["predictions"][0]["name"]

    shot = tmp_path / "prediction-page.png"
    png = base64.b64decode(chromium.call("Page.captureScreenshot", format="png")["data"])
    shot.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 8_000
    print(f"screenshot: {shot}")
    assert os.path.getsize(shot) == len(png)
