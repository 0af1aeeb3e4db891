"""Driving the teaching page (``mamlops serve --meta``, at ``/``) in a real browser.

Shared by ``tests/test_teach_browser.py`` and ``screenshots.py --only teach`` so both press
the same buttons through the page's documented hooks (the comment at the top of
``src/mamlops/resources/teach.html``), as a user would: typing, choosing files, drawing with a
pointer, clicking.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from webdriver import Point, WebDriver, image_strokes

STATE = "document.body.dataset.state"  # a JavaScript expression
PAD_PX, PEN_PX = 210, 7  # the page's drawing pads: canvas pixels, and its pen's width in them


class TeachPage:
    """The page at ``url`` in ``web``; class cards are addressed by position (0 first)."""

    def __init__(self, web: WebDriver, url: str) -> None:
        self.web = web
        self.url = url

    def open(self) -> None:
        """Load the page and wait until it has read the meta-model."""
        self.web.get(self.url)
        self.wait_state("ready", "the page to load the meta-model")

    def state(self) -> str:
        return self.web.js(f"return {STATE}")

    def wait_state(self, state: str, what: str = "", seconds: float = 30) -> None:
        self.web.wait(f"return {STATE} === {json.dumps(state)}", seconds, what or f"state {state}")

    def card(self, i: int, css: str = "") -> str:
        """The element ``css`` inside the i-th class card (the card itself without ``css``)."""
        return self.web.find(f".class-card:nth-child({i + 1}) {css}".strip())

    def count(self, css: str) -> int:
        return len(self.web.find_all(css))

    def set_classes(self, names: Sequence[str]) -> None:
        """As many cards as ``names`` (adding them with "Add class"), named in that order."""
        while self.count(".class-card") < len(names):
            self.web.click(self.web.find("#add-class"))
        for i, name in enumerate(names):
            field = self.card(i, "input.class-name")
            self.web.clear(field)
            self.web.send_keys(field, name)

    def upload(self, i: int, paths: Sequence[Path]) -> None:
        """Add image files as shots of card ``i`` through its file input."""
        before = self.count(f".class-card:nth-child({i + 1}) .shot")
        self.web.send_files(self.card(i, "input.upload"), paths)
        self.wait_shots(i, before + len(paths))

    def draw_shot(self, i: int, strokes: Sequence[Sequence[Point]]) -> None:
        """Draw ``strokes`` on card ``i``'s pad and press its "Add drawing"."""
        before = self.count(f".class-card:nth-child({i + 1}) .shot")
        self.web.draw(self.card(i, "canvas.draw"), strokes)
        self.web.click(self.card(i, "button.add-drawing"))
        self.wait_shots(i, before + 1)

    def wait_shots(self, i: int, n: int) -> None:
        shots = f"document.querySelectorAll('.class-card:nth-child({i + 1}) .shot').length"
        self.web.wait(f"return {shots} === {n}", 10, f"{n} shot(s) in card {i + 1}")

    def teach(self) -> str:
        """Press Teach and wait for the classifier; its id."""
        self.web.click(self.web.find("#teach"))
        self.wait_state("taught", "the classifier to be taught", 60)
        return self.web.js("return document.querySelector('#classifier-id').textContent")

    def classify_files(self, paths: Sequence[Path]) -> dict[str, str]:
        """Choose ``paths`` in the test file input; ``{file name: best label}`` once shown."""
        self.web.send_files(self.web.find("#test-upload"), paths)
        rows = "document.querySelectorAll('#file-predictions .prediction')"
        self.web.wait(
            f"return {rows}.length === {len(paths)} && {STATE} === 'taught'",
            30,
            f"predictions for {len(paths)} files",
        )
        pairs = f"return [...{rows}].map(r => [r.dataset.filename, r.dataset.label])"
        return dict(self.web.js(pairs))

    def draw_test(self, strokes: Sequence[Sequence[Point]]) -> str:
        """Clear the test pad and draw on it; the best label shown once the predictions have
        settled."""
        self.web.click(self.web.find("#test-clear"))
        self.web.draw(self.web.find("#test-canvas"), strokes)
        label = "document.querySelector('#drawing-prediction').dataset.label"
        self.web.wait(f"return {label} && {STATE} === 'taught'", 30, "a drawing's prediction")
        return self.web.js(f"return {label}")

    def strokes(self, png: bytes, pad: str) -> list[list[Point]]:
        """Strokes that redraw the image ``png`` on the drawing pad ``pad`` (a CSS selector),
        in its CSS pixels, with the pen's width kept inside the image's strokes."""
        side = self.web.call("GET", f"/element/{self.web.find(pad)}/rect")["width"]
        return image_strokes(png, side, pen=PEN_PX * side / PAD_PX)
