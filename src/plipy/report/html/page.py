"""The page: each result's view is a list of blocks; results of one kind are laid out side by side, block by block
(matched by key), so two models from a sweep line up plot for plot. plotly.js, the style sheet, the page script and
all data are inlined once: the file opens offline and asks no host for anything (its Content-Security-Policy
forbids it)."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

# `default-src 'none'`: no request of any kind leaves the page; inline scripts and styles and data: images only.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:"
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def esc(text: Any) -> str:
    """Text for HTML (quotes too: it may land in an attribute)."""
    return html.escape(str(text), quote=True)


@dataclass
class Block:
    key: str
    title: str | None
    body: str
    note: str | None = None

    def render(self) -> str:
        head = f"<h3>{esc(self.title)}</h3>" if self.title else ""
        note = f'<p class="note">{esc(self.note)}</p>' if self.note else ""
        return f'<div class="block" data-key="{esc(self.key)}">{head}{self.body}{note}</div>'


class Section:
    """What a view draws into: one result's blocks, in order. Ids are unique on the page (prefixed per result)."""

    def __init__(self, page: Page, prefix: str, result: Any):
        self.page, self.prefix, self.result = page, prefix, result
        self.blocks: list[Block] = []

    def id(self, key: str) -> str:
        """The page-wide id of this section's block `key` (a click target can be named before it is drawn)."""
        return f"{self.prefix}-{key}"

    def _add(self, key: str, body: str, title: str | None, note: str | None) -> None:
        if any(b.key == key for b in self.blocks):
            raise ValueError(f"block {key!r} drawn twice")
        self.blocks.append(Block(key, title, body, note))

    def figure(
        self,
        key: str,
        fig: Any,
        *,
        title: str | None = None,
        note: str | None = None,
        click: dict[str, Any] | None = None,
    ) -> str:
        """A plotly figure. `click={"target": id, "fields": [...]}`: clicking a point sends its `customdata`,
        named by `fields`, to the token view or detail panel `id` (a None field is left as it is)."""
        import plotly.io as pio

        fid = self.id(key)
        spec = json.loads(pio.to_json(fig, validate=False))
        spec.get("layout", {}).pop("template", None)  # one template for the whole page (see Page.render)
        self.page.data["figures"][fid] = {
            "data": spec.get("data", []),
            "layout": spec.get("layout", {}),
            "click": click,
        }
        self._add(key, f'<div class="plot" id="{fid}"></div>', title, note)
        return fid

    def table(
        self, key: str, columns: list[str], rows: list[list[Any]], *, title: str | None = None, note: str | None = None
    ) -> None:
        """A plain table (cells are text; numbers are formatted by the caller)."""
        self._add(key, table_html(columns, rows), title, note)

    def markup(self, key: str, body: str, *, title: str | None = None, note: str | None = None) -> None:
        """Ready HTML (escape what you put in it: `page.esc`)."""
        self._add(key, body, title, note)

    def text(self, key: str, text: str, *, title: str | None = None, note: str | None = None) -> None:
        """A paragraph of plain text."""
        self._add(key, f"<p>{esc(text)}</p>", title, note)

    def tokens(self, key: str, payload: dict[str, Any], *, title: str | None = None, note: str | None = None) -> str:
        """The token view (see `plipy.report.html.tokens.payload`); returns its id, the target of clicks."""
        tid = self.id(key)
        self.page.data["tokens"][tid] = payload
        self._add(key, f'<div class="tokens" id="{tid}"></div>', title, note)
        return tid

    def detail(
        self,
        key: str,
        panels: dict[str, str],
        initial: str | None = None,
        *,
        title: str | None = None,
        note: str | None = None,
    ) -> str:
        """A panel showing one of `panels` (key → HTML); a click with field `key` switches it. Returns its id."""
        did = self.id(key)
        first = initial if initial in panels else next(iter(panels), None)
        self.page.data["details"][did] = {"panels": panels, "initial": first}
        self._add(key, f'<div class="detail" id="{did}"></div>', title, note)
        return did

    def image(self, key: str, png: bytes, *, title: str | None = None, note: str | None = None) -> None:
        """A static PNG (the generic view of a result kind without its own view)."""
        b64 = base64.b64encode(png).decode()
        self._add(key, f'<img class="png" alt="{esc(key)}" src="data:image/png;base64,{b64}">', title, note)


def table_html(columns: list[str], rows: list[list[Any]]) -> str:
    """An HTML table of text cells."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc('—' if v is None else v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _asset(name: str) -> str:
    return resources.files("plipy.report.html").joinpath(name).read_text(encoding="utf-8")


# Inside <script> the HTML parser, not JSON, decides where the element ends: "</script" ends it, and "<!--" followed
# by "<script" makes it swallow the rest of the page. JSON may spell any character as \uXXXX, so no "<" (nor ">",
# "&", or the JavaScript line separators) ever reaches the parser; JSON.parse reads the same strings.
_SCRIPT_ESCAPES: dict[str, str | int | None] = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _script_json(obj: Any) -> str:
    """`obj` as JSON safe to inline in a `<script>` element, whatever its strings hold."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.translate(str.maketrans(_SCRIPT_ESCAPES))


class Page:
    """A whole report: sections grouped by result kind, rendered to one HTML string."""

    def __init__(self, title: str):
        self.title = title
        self.data: dict[str, Any] = {"figures": {}, "tokens": {}, "details": {}}
        self.kinds: dict[str, list[tuple[Any, Section]]] = {}

    def section(self, result: Any) -> Section:
        """A new section for `result` (laid out beside the other results of its kind)."""
        n = sum(len(v) for v in self.kinds.values())
        sec = Section(self, f"r{n}", result)
        self.kinds.setdefault(result.kind or type(result).__name__, []).append((result, sec))
        return sec

    def render(self) -> str:
        import plotly.io as pio
        from plotly.offline import get_plotlyjs

        template = pio.templates["plotly_white"].to_plotly_json()
        self.data["template"], self.data["config"] = template, PLOTLY_CONFIG
        body = [f"<header><h1>{esc(self.title)}</h1>{self._contents()}</header>"]
        for kind, items in self.kinds.items():
            body.append(self._kind_html(kind, items))
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{_asset('page.css')}</style></head>\n<body>\n"
            + "\n".join(body)
            + f"\n<script>{get_plotlyjs()}</script>\n"
            + f'<script type="application/json" id="plipy-data">{_script_json(self.data)}</script>\n'
            + f"<script>{_asset('page.js')}</script>\n</body></html>\n"
        )

    def _contents(self) -> str:
        if len(self.kinds) < 2:
            return ""
        links = " · ".join(f'<a href="#kind-{esc(k)}">{esc(k)} ({len(v)})</a>' for k, v in self.kinds.items())
        return f'<nav class="contents">{links}</nav>'

    def _kind_html(self, kind: str, items: list[tuple[Any, Section]]) -> str:
        n = len(items)
        heads = "".join(f'<div class="cell result-head">{result_heading(r)}</div>' for r, _ in items)
        rows = [f'<div class="row" style="--n:{n}">{heads}</div>']
        keys: list[str] = []
        for _, sec in items:
            keys += [b.key for b in sec.blocks if b.key not in keys]
        for key in keys:
            cells = []
            for _, sec in items:
                block = next((b for b in sec.blocks if b.key == key), None)
                cells.append(f'<div class="cell">{block.render() if block else ""}</div>')
            rows.append(f'<div class="row" style="--n:{n}">{"".join(cells)}</div>')
        title = f"{kind}: {n} results side by side" if n > 1 else kind
        return f'<section class="kind" id="kind-{esc(kind)}"><h2>{esc(title)}</h2>{"".join(rows)}</section>'


def result_heading(result: Any) -> str:
    """The column heading of a result: its class, model and command."""
    prov = result.provenance
    model = prov.get("model", {})
    name = model.get("name") or model.get("spec") or "?"
    cmd = prov.get("command", "")
    return (
        f"<h3>{esc(type(result).__name__)} — {esc(name)}</h3>"
        f'<p class="note">{esc(cmd)} · {esc(prov.get("timestamp", ""))}</p>'
    )
