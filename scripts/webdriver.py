"""Headless Chromium driven through chromedriver's W3C WebDriver HTTP API, with urllib only.

Shared by ``screenshots.py`` (pictures for the docs) and ``tests/test_teach_browser.py`` (the
teaching page in a real browser). Talking HTTP to chromedriver keeps selenium out of the
project's dependencies; the W3C endpoints used here are few and stable. Needs Debian's
``chromium`` and ``chromium-driver`` (apt-get install chromium chromium-driver).

    with browser(1280, 900) as web:
        web.get("http://127.0.0.1:8000/")
        web.send_files(web.find("input[type=file]"), [Path("a.png")])
        web.draw(web.find("canvas"), [[(10, 10), (80, 60)]])
        web.screenshot(Path("page.png"))
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1600, 1000
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
# JavaScript: true once the page shows no loading indicator
IDLE_JS = """return !document.querySelector(
    '[role="progressbar"], [aria-busy="true"], [data-testid*="spinner" i], [class*="spinner" i]')"""

Point = tuple[float, float]


class BrowserError(RuntimeError):
    """chromedriver refused a command, or the page never showed what was waited for."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrowserError(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.3)
    raise BrowserError(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def process(args: list[str], ready_url: str, seconds: float, **kw: Any) -> Iterator[None]:
    """Run ``args`` in its own process group until the block ends; wait for ``ready_url``."""
    proc = subprocess.Popen(args, start_new_session=True, **kw)
    try:
        wait_http(ready_url, seconds, proc)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group: servers may start workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class WebDriver:
    """A headless Chromium session through chromedriver's W3C WebDriver HTTP API, its viewport
    ``width`` x ``height`` CSS pixels at device scale 1 (screenshots are that many pixels)."""

    def __init__(self, base: str, width: int = WIDTH, height: int = HEIGHT) -> None:
        self.base = base
        self.width, self.height = width, height
        args = ["--headless=new", "--disable-gpu", "--hide-scrollbars", "--lang=en-US"]
        args += [f"--window-size={width},{height}", "--force-device-scale-factor=1"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        options: dict[str, Any] = {"args": args}
        binary = shutil.which("chromium")
        if binary:
            options["binary"] = binary
        caps = {"browserName": "chrome", "goog:chromeOptions": options}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.sid = self.session["sessionId"]
        self.cdp("Emulation.setDeviceMetricsOverride", width=width, height=height,
                 deviceScaleFactor=1, mobile=False)  # fmt: skip

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data, {"Content-Type": "application/json"}, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise BrowserError(f"WebDriver {method} {path}: {err.read()[:400]!r}") from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.sid}{path}", body)

    def cdp(self, cmd: str, **params: Any) -> Any:
        """A Chrome DevTools Protocol command (chromedriver's ``goog/cdp/execute``)."""
        return self.call("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})

    def get(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments[i]`` are ``args``, element ids given
        as ``ref(id)``) and return its result."""
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    # ------------------------------------------------------------------ elements

    @staticmethod
    def ref(element: str) -> dict[str, str]:
        """An element id as a script argument or an action's origin."""
        return {ELEMENT: element}

    def find_all(self, css: str) -> list[str]:
        """Ids of the elements matching ``css``, in document order (maybe none)."""
        found = self.call("POST", "/elements", {"using": "css selector", "value": css})
        return [next(iter(e.values())) for e in found]

    def find(self, css: str) -> str:
        """The id of the first element matching ``css``; BrowserError if there is none."""
        found = self.find_all(css)
        if not found:
            raise BrowserError(f"no element matches {css!r}")
        return found[0]

    def click(self, element: str) -> None:
        self.call("POST", f"/element/{element}/click", {})

    def clear(self, element: str) -> None:
        """Empty a text input (as a user selecting all and deleting would)."""
        self.call("POST", f"/element/{element}/clear", {})

    def send_keys(self, element: str, text: str) -> None:
        """Type ``text`` into ``element`` (real key events, as React expects)."""
        self.call("POST", f"/element/{element}/value", {"text": text})

    def type_into(self, css: str, text: str) -> None:
        """Type ``text`` into the element ``css``."""
        self.send_keys(self.find(css), text)

    def send_files(self, element: str, paths: Sequence[Path]) -> None:
        """Choose ``paths`` in the file input ``element`` (it fires its change event once);
        several need the input's ``multiple`` attribute."""
        self.send_keys(element, "\n".join(str(Path(p).resolve()) for p in paths))

    def draw(
        self, element: str, strokes: Sequence[Sequence[Point]], pointer: str = "mouse"
    ) -> None:
        """Draw ``strokes`` on ``element`` with a pointer held down along each one: points in
        CSS pixels from the element's top-left corner. ``pointer``: mouse, pen or touch."""
        self.js("arguments[0].scrollIntoView({block: 'center'})", self.ref(element))
        rect = self.call("GET", f"/element/{element}/rect")
        # W3C actions place points relative to the element's centre, in whole pixels
        cx, cy = rect["width"] / 2, rect["height"] / 2

        def move(p: Point, ms: int) -> dict[str, Any]:
            at = {"x": round(p[0] - cx), "y": round(p[1] - cy), "origin": self.ref(element)}
            return {"type": "pointerMove", "duration": ms, **at}

        steps: list[dict[str, Any]] = []
        for stroke in strokes:
            steps.append(move(stroke[0], 0))
            steps.append({"type": "pointerDown", "button": 0})
            steps += [move(p, 5) for p in stroke[1:]]
            steps.append({"type": "pointerUp", "button": 0})
        source = {"type": "pointer", "id": "drawing", "parameters": {"pointerType": pointer}}
        self.call("POST", "/actions", {"actions": [{**source, "actions": steps}]})
        self.call("DELETE", "/actions")

    # ------------------------------------------------------------------ waiting and pictures

    def poll(self, script: str, seconds: float) -> bool:
        """Whether ``script`` returns something truthy within ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.js(script):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def wait(self, script: str, seconds: float = 60, what: str = "") -> None:
        """Poll until ``script`` returns something truthy; on a timeout, keep what was shown."""
        if not self.poll(script, seconds):
            shot = self.screenshot(Path(tempfile.gettempdir()) / "webdriver-timeout.png")
            raise BrowserError(f"timed out after {seconds:.0f} s waiting for {what or script}"
                               f" (the page then: {shot})")  # fmt: skip

    def wait_text(self, *texts: str, seconds: float = 90) -> None:
        """Wait until the page shows every one of ``texts`` and no loading indicator."""
        shown = "const t = document.body ? document.body.innerText : '';"
        every = f"return {json.dumps(texts)}.every(s => t.includes(s))"
        self.wait(f"{shown} {every}", seconds, f"the texts {texts}")
        self.poll(IDLE_JS, 20)  # a spinner that never goes away: shoot anyway
        time.sleep(1.5)  # chart transitions

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """The viewport (or the whole page) as a PNG, written atomically."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.cdp("Page.getLayoutMetrics")["cssContentSize"]
            width = max(self.width, int(size["width"]))
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": int(size["height"]), "scale": 1},
            }
        data = base64.b64decode(self.cdp("Page.captureScreenshot", **params)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return path

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.call("DELETE", "")


def missing() -> str | None:
    """Why a browser cannot be started here, or None when chromium and chromedriver exist."""
    absent = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if absent:
        return f"{' and '.join(absent)} not found: apt-get install chromium chromium-driver"
    return None


@contextlib.contextmanager
def browser(width: int = WIDTH, height: int = HEIGHT) -> Iterator[WebDriver]:
    """chromedriver on a free port and one headless Chromium session, both ended afterwards."""
    driver = shutil.which("chromedriver")
    if driver is None:
        raise BrowserError("chromedriver not found: apt-get install chromium chromium-driver")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process([driver, f"--port={port}"], f"{base}/status", 30,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):  # fmt: skip
        web = WebDriver(base, width, height)
        try:
            yield web
        finally:
            web.quit()


def image_strokes(png: bytes, side: float, pen: float = 0, row_step: int = 3) -> list[list[Point]]:
    """Pointer strokes that redraw a black-on-white image on a ``side`` x ``side`` CSS px pad
    with a round pen ``pen`` CSS px wide: one stroke per run of dark pixels on every
    ``row_step``-th row, shortened by the pen's radius at both ends. Rows 3 px apart on
    Omniglot's 105 px drawings overlap into solid lines; a way to "draw" a real character with
    a pointer, for tests and screenshots."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        dark = np.asarray(im.convert("L")) < 128
    scale = side / dark.shape[1]
    strokes = []
    for y in range(row_step // 2, dark.shape[0], row_step):
        row = np.concatenate([[False], dark[y], [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(row))  # starts and ends of the dark runs
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            left, right = start * scale + pen / 2, end * scale - pen / 2
            if left > right:  # a run thinner than the pen: one dot in its middle
                left = right = (start + end) / 2 * scale
            yy = (y + 0.5) * scale
            strokes.append([(left, yy), (right, yy)])
    return strokes
