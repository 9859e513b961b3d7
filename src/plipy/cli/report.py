"""`plipy report`: saved results as one interactive HTML page (results of one kind side by side)."""

from __future__ import annotations

from pathlib import Path

import typer

from plipy.cli import common as c


def report(
    results: list[Path] = typer.Argument(
        ..., help="Result JSON files written by plipy commands (--out).", show_default=False
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="The HTML file.",
        show_default="<first result>.html, or <first result>-compare.html for several",
    ),
    title: str | None = typer.Option(None, "--title", help="Page title.", show_default="kinds and models"),
) -> None:
    """Write one self-contained interactive HTML report (plotly inlined, opens offline) of saved results."""
    from plipy.errors import PlipyError
    from plipy.report.html import html_report
    from plipy.results import ScanResult, load_result

    first = Path(results[0])
    path = out or first.with_name(first.stem + ("-compare" if len(results) > 1 else "") + ".html")
    if path.suffix.lower() not in (".html", ".htm"):
        raise PlipyError(f"--out {path}: a report is an .html file")
    c.check_out(path)
    loaded = [load_result(p) for p in results]  # every file checked before anything is drawn
    for p, r in zip(results, loaded, strict=True):
        if isinstance(r, ScanResult) and not r.has_rows:
            missing = r.extras.get("rows_missing")
            why = f"{missing} is missing" if missing else "it was saved without its attention rows"
            c.err_console.print(f"note: {p}: no token view ({why})", highlight=False)
    html_report(loaded, path, title=title)
    kinds = ", ".join(dict.fromkeys(r.kind for r in loaded))
    c.console.print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB: {len(loaded)} result(s), {kinds})",
        highlight=False,
        soft_wrap=True,
    )
