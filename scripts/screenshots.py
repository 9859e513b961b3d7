"""Regenerate the report screenshots in docs/img/ (shown in README.md): real runs of the default model, each report
opened in headless Chromium, a click made where the picture shows one, and the interesting blocks captured.

    PLIPY_MODELS=../shared/models HF_HUB_OFFLINE=1 .venv/bin/python scripts/screenshots.py [--out docs/img]

Needs Debian's `chromium` and playwright (the `test` extra). About 5 minutes on 2 CPU cores; the comparison
needs gemma3-270m (`plipy models pull gemma3-270m`) and is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import plipy
from plipy.report.html import browser as hb

PROMPTS = [  # for the SAE picture: entities SmolLM2 may or may not know (labels as the prompt file would give them)
    {"prompt": "The city Paris is located in", "entity": "Paris", "entity_type": "city", "label": "known"},
    {"prompt": "The city Tokyo is located in", "entity": "Tokyo", "entity_type": "city", "label": "known"},
    {"prompt": "The city Velmorath is located in", "entity": "Velmorath", "entity_type": "city", "label": "unknown"},
    {"prompt": "The city Quillistan is located in", "entity": "Quillistan", "entity_type": "city", "label": "unknown"},
    {"prompt": "The movie Titanic was directed by", "entity": "Titanic", "entity_type": "movie", "label": "known"},
    {
        "prompt": "The movie Grelbath Dawn was directed by",
        "entity": "Grelbath Dawn",
        "entity_type": "movie",
        "label": "unknown",
    },
]


def capture(browser, report: Path, png: Path, keys: list[str], click: str | None = None, width: int = 1300) -> None:
    """Screenshot the rows holding the blocks `keys` ("header": the result headings), after running `click` (JS)."""
    opened = hb.open_report(browser, report, width=width, height=1000)
    page = opened.page
    if opened.errors or opened.foreign_requests():
        raise SystemExit(f"{report}: {opened.errors} {opened.foreign_requests()}")
    if click:
        page.evaluate(click)
        page.wait_for_timeout(300)
    rects = page.evaluate(
        """(keys) => keys.map(k => {
        const sel = k === "header" ? ".result-head" : `.block[data-key="${k}"]`;
        const r = document.querySelector(sel).closest('.row').getBoundingClientRect();
        return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY]; })""",
        keys,
    )
    x0, y0 = min(r[0] for r in rects) - 8, min(r[1] for r in rects) - 8
    x1, y1 = max(r[2] for r in rects) + 8, max(r[3] for r in rects) + 8
    page.screenshot(path=str(png), full_page=True, clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    page.close()
    print(f"wrote {png} ({png.stat().st_size // 1024} KB; page drawn in {opened.ready_ms:.0f} ms)")


def click_cell(fid: str, xi: int, yi: int) -> str:
    """JS: a plotly click on category (xi, yi) of a heatmap, as the mouse would send it."""
    return (
        f"(() => {{ const gd = document.getElementById('{fid}'); const t = gd.data[0];"
        f" gd.emit('plotly_click', {{points: [{{customdata: t.customdata[{yi}][{xi}]}}]}}); }})()"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="plipy-shots-"))
    lm = plipy.load_model("smollm2-135m")
    scan = plipy.scan(lm)
    scan.to_html(work / "scan.html")
    knock = plipy.knockout(lm, scan_layers=True)
    knock.to_html(work / "knockout.html")
    dose = plipy.steer.dose(lm, layer=16, doses="0.5,1,2,3,4,6", target_attention=0.1)
    dose.to_html(work / "dose.html")
    from plipy import sae as saes

    sae_dir = work / "sae"
    saes.save_saelens(
        saes.random_sae(lm.hidden_size, 64, hook_name="blocks.8.hook_resid_post", seed=1),
        sae_dir,
        model_name="smollm2-135m",
    )
    sae = plipy.sae_attention(lm, sae_dir, 3, PROMPTS, coeff=40, random=4, measures="attn_weights")
    sae.to_html(work / "sae.html")
    compare = None
    try:
        gemma = plipy.scan("gemma3-270m")
        compare = work / "compare.html"
        plipy.html_report([scan, gemma], compare)
    except plipy.PlipyError as e:
        print(f"comparison skipped: {e}")
    with hb.chromium() as browser:
        diff = abs(np.array(scan["per_head"]["mean_diff"], dtype=float))
        li, hi = np.unravel_index(np.nanargmax(diff), diff.shape)  # the head whose groups differ most
        capture(browser, work / "scan.html", args.out / "report-scan-layers.png", ["layers"])
        capture(
            browser,
            work / "scan.html",
            args.out / "report-scan.png",
            ["heads", "tokens"],
            click=click_cell("r0-heads", int(hi), int(li)),
        )
        capture(browser, work / "knockout.html", args.out / "report-knockout.png", ["heatmap", "changed"])
        capture(browser, work / "dose.html", args.out / "report-dose.png", ["kl", "attention", "target"])
        capture(browser, work / "sae.html", args.out / "report-sae.png", ["bars-attn_weights", "heatmap-attn_weights"])
        if compare:
            capture(browser, compare, args.out / "report-compare.png", ["header", "layers", "heads"], width=1500)
    print(json.dumps({"work": str(work)}))


if __name__ == "__main__":
    main()
