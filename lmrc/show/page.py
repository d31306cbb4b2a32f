"""The page itself: one HTML file with its style, script and data inline, opened by double-click, no network.

Why the data is a JSON script block and the page builds the DOM from it: documents, entity names and LLM answers
are untrusted text; the JSON is escaped so nothing in it can close the block (`<`, `>`, `&` and the two JavaScript
line separators become \\u escapes), and the script puts every string into the page as text, never as HTML. A
document is drawn when it is opened, so a page of 500 documents loads as fast as one of five.
"""

from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from lmrc.io import atomic_write_text

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(data: Any) -> str:
    """JSON that is safe inside `<script type="application/json">`: no `</script>` or `<!--` can appear in it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _asset(name: str) -> str:
    return resources.files("lmrc.show").joinpath("assets", name).read_text(encoding="utf-8")


def render(data: dict[str, Any]) -> str:
    """The whole page for `data` (lmrc.show.collect.payload)."""
    names = " · ".join(m["name"] for m in data["methods"])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>lmrc show: {html.escape(names)}</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>\n{_asset('page.css')}</style>\n</head>\n<body>\n"
        '<header id="header"></header>\n'
        '<div class="layout">\n<nav><input id="search" type="search" '
        'placeholder="Search titles and entity names" aria-label="search">'
        '<ul id="doc-list"></ul></nav>\n'
        '<main><section id="scores"></section><section id="doc-view"></section></main>\n</div>\n'
        f'<script id="lmrc-data" type="application/json">{script_json(data)}</script>\n'
        f"<script>\n{_asset('page.js')}</script>\n</body>\n</html>\n"
    )


def write_page(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    atomic_write_text(path, render(data))
    return path
