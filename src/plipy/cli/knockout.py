"""`plipy knockout`: remove marker ↔ target attention edges in some layers and measure the next-token KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from plipy.cli.common import console, err_console, progress_bars, split_list
from plipy.report import fmt_num, fmt_p


def knockout(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, local dir, .gguf file or HF id."),
    corpus: Path | None = typer.Option(None, "--corpus", help="PLIP universal corpus JSON (default: bundled)."),
    groups: list[str] | None = typer.Option(None, "--groups", help="Groups to measure; the first two are compared."),
    layer: int | None = typer.Option(None, "--layer", help="Knock out one layer (default mode; PLIP's default layer)."),
    layers: str | None = typer.Option(None, "--layers", help="Knock out a contiguous range A-B (inclusive)."),
    scan_layers: bool = typer.Option(False, "--scan-layers", help="Each layer alone."),
    scan_windows: bool = typer.Option(False, "--scan-windows", help="Expanding windows c±r, r = 0…max-radius."),
    center: int | None = typer.Option(None, "--center", help="Centre of --scan-windows (default: PLIP's layer)."),
    max_radius: int | None = typer.Option(None, "--max-radius", help="Largest radius of --scan-windows (5)."),
    slide_window: int | None = typer.Option(None, "--slide-window", help="Every window of W consecutive layers."),
    edges: str = typer.Option("marker-to-targets", "--edges",
                              help="marker-to-targets | to-marker (PLIP's --all-edges) | from-marker"),
    heads: str = typer.Option("all", "--heads", help="all | none | 0,3 | 0-4 (query heads knocked out)"),
    include_baselines: bool = typer.Option(False, "--include-baselines",
                                           help="Also measure the *_baseline groups (described, not tested)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON result (default results/knockout-….json)."),
    plot: bool = typer.Option(False, "--plot", help="Write PNG plots beside the JSON."),
    bos: bool = typer.Option(False, "--bos", help="Prepend the BOS token (PLIP never did)."),
    offsets: str = typer.Option("chars", "--offsets", help="Corpus positions are 'chars' or UTF-8 'bytes'."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation tests."),
    resamples: int = typer.Option(10000, "--resamples", help="Bootstrap / permutation resamples."),
    table_format: str = typer.Option("parquet", "--table-format", help="Per-sample rows: parquet or csv."),
    runner: str = typer.Option("auto", "--runner", help="auto | fast | naive (naive: one full forward each)."),
    batch: int = typer.Option(32, "--batch", help="Conditions per batched forward on the fast path."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Knock out attention edges (PLIP-rs' ablation) on every sample; KL of the next-token distribution."""
    from plipy.corpus import load_corpus
    from plipy.errors import PlipyError
    from plipy.experiments import knockout as ko
    from plipy.experiments import scan as sc
    from plipy.io import write_json, write_table
    from plipy.models import load_model

    if table_format not in ("parquet", "csv"):
        raise PlipyError(f"--table-format must be parquet or csv, got {table_format!r}")
    if edges not in ko.EDGE_KINDS:
        raise PlipyError(f"--edges must be one of {', '.join(ko.EDGE_KINDS)}, got {edges!r}")
    chosen = [name for name, on in (("layer", layer is not None), ("layers", layers is not None),
                                    ("scan-layers", scan_layers), ("scan-windows", scan_windows),
                                    ("slide-window", slide_window is not None)) if on]
    if len(chosen) > 1:
        raise PlipyError(f"choose one mode, got {', '.join('--' + c for c in chosen)}")
    mode = chosen[0] if chosen else "layer"
    if (center is not None or max_radius is not None) and mode != "scan-windows":
        raise PlipyError("--center and --max-radius only apply to --scan-windows")
    corp = load_corpus(corpus, offsets=offsets)
    group_list = split_list(groups)
    sc.choose_groups(corp, group_list)  # fail on bad groups before loading the model
    lm = load_model(model, dtype=dtype, device=device)
    conditions = ko.build_conditions(mode, lm.n_layers, layer=layer, layers=layers, center=center,
                                     max_radius=5 if max_radius is None else max_radius, window=slide_window)
    head_list = [] if heads.strip() == "none" else sc.parse_indices(heads, lm.n_heads, "head")
    out = out or Path("results") / f"knockout-{lm.name}-{mode}-{edges}.json"
    cfg = ko.KnockoutConfig(conditions=conditions, mode=mode, edges=edges, heads=head_list, groups=group_list,
                            include_baselines=include_baselines, bos=bos, seed=seed, n_resamples=resamples,
                            path=runner, max_batch=batch, extra={"offsets": offsets})
    with progress_bars() as start:
        result = ko.run_knockout(lm, corp, cfg, progress=start)
    table_path = out.with_suffix(f".{table_format}")
    result["files"] = {"json": str(out), "table": str(table_path)}
    if plot:
        stem = out.with_suffix("")
        result["files"]["plots"] = [str(heatmap_plot(result, Path(f"{stem}-heatmap.png"))),
                                    str(means_plot(result, Path(f"{stem}-means.png")))]
    write_table(table_path, ko.sample_rows(result))
    write_json(out, result)
    _print(result)
    if not chosen:
        console.print(f"no mode given: knocked out PLIP's default layer {conditions[0].label}")
    console.print(f"\nwrote {out}, {table_path}" + "".join(f", {p}" for p in result["files"].get("plots", [])))


def _fmt_kl(x: Any) -> str:
    return "—" if x is None else f"{x:.2e}"


def _print(result: dict) -> None:
    ga, gb = result["groups_compared"]
    heads = result["heads"]
    t = Table(title=f"Knockout ({result['edges']}, {len(heads)} heads): mean KL(base ‖ knockout) in nats\n"
                    f"A = {ga}, B = {gb}; flips = samples whose top-1 token changed", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("layers", "n A", "KL A", "n B", "KL B", "A/B", "p", "", "p Holm", "flips"):
        t.add_column(col, justify="right")
    for r in result["runs"]:
        a, b = r["groups"][ga], r["groups"][gb]
        flips = {g: sum(1 for s in r["samples"] if s["group"] == g and s.get("top1_changed")) for g in (ga, gb)}
        t.add_row(
            r["label"], str(a["n"]), _fmt_kl(a["mean"]), str(b["n"]), _fmt_kl(b["mean"]),
            "—" if r.get("ratio") is None else fmt_num(r["ratio"]) + "×", fmt_p(r.get("p")),
            r.get("stars", ""), fmt_p(r.get("p_holm")), f"{flips[ga]}/{flips[gb]}",
        )
    console.print(t)
    others = [g for g in result["provenance"]["config"]["groups"] if g not in (ga, gb)]
    for g in others:
        means = ", ".join(f"{r['label']}: {_fmt_kl(r['groups'][g]['mean'])}" for r in result["runs"][:8])
        more = " …" if len(result["runs"]) > 8 else ""
        console.print(f"{g} (described, not tested; n={result['runs'][0]['groups'][g]['n']}): {means}{more}")
    rn = result["provenance"]["config"]["runner"]
    how = ("fast path: baseline once per sample, suffix-only reruns from its cache, layers below the first "
           "knocked-out layer not recomputed") if rn["path"] == "fast" else "naive path: " + "; ".join(
        rn["fallback_reasons"])
    console.print(f"{how} — {result['timing']['seconds']:.1f} s")
    for e in result["excluded"]:
        where = f" (condition {e['condition']})" if e.get("condition") else ""
        err_console.print(f"[yellow]excluded[/] {e['id']} ({e['group']}){where}: {e['status']} — {e.get('note') or ''}")


def _samples_order(result: dict) -> list[tuple[str, str]]:
    groups = result["provenance"]["config"]["groups"]
    ok = {s["id"] for s in result["samples"] if s["status"] == "ok"}
    return [(s["id"], s["group"]) for g in groups for s in result["samples"] if s["group"] == g and s["id"] in ok]


def heatmap_plot(result: dict, path: Path) -> Path:
    """Condition × sample heatmap of log10 KL (samples grouped; KL = 0 drawn at the colour floor)."""
    import numpy as np

    from plipy import report

    plt = report._plt()
    order = _samples_order(result)
    runs = result["runs"]
    kl = {(i, s["id"]): s["kl"] for i, r in enumerate(runs) for s in r["samples"]}
    grid = np.array([[np.nan if kl.get((i, sid)) is None else kl[(i, sid)] for sid, _ in order]
                     for i in range(len(runs))], dtype=float)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    floor = float(positive.min()) if positive.size else 1e-12
    vals = np.log10(np.where(np.isfinite(grid), np.maximum(grid, floor), np.nan))
    fig, ax = plt.subplots(figsize=(2 + 0.28 * len(order), 1.5 + 0.25 * len(runs)))
    im = ax.imshow(vals, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(order)), [sid for sid, _ in order], rotation=90, fontsize=6)
    ax.set_yticks(range(len(runs)), [r["label"] for r in runs], fontsize=7)
    prev = None
    for j, (_, g) in enumerate(order):  # group boundaries
        if prev is not None and g != prev:
            ax.axvline(j - 0.5, color="white", lw=1.5)
        prev = g
    ax.set(xlabel="sample", ylabel="layers knocked out",
           title=f"log10 KL(base ‖ knockout), {result['edges']}")
    fig.colorbar(im, ax=ax, fraction=0.04, label="log10 KL (nats)")
    return report._save(fig, path)


def means_plot(result: dict, path: Path) -> Path:
    """Group mean KL per condition with t-based 95% CI of the mean."""
    import numpy as np

    from plipy import report

    plt = report._plt()
    runs = result["runs"]
    groups = result["provenance"]["config"]["groups"]
    x = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(runs) + 3), 4.2))
    for gi, g in enumerate(groups):
        stats = []
        for r in runs:
            vals = [s["kl"] for s in r["samples"] if s["group"] == g and s["status"] == "ok"]
            stats.append(report._mean_ci(vals) if vals else (np.nan, np.nan, np.nan))
        m = np.array(stats, dtype=float)
        if np.isnan(m[:, 0]).all():
            continue
        off = (gi - (len(groups) - 1) / 2) * 0.12
        ax.errorbar(x + off, m[:, 0], yerr=[m[:, 0] - m[:, 1], m[:, 2] - m[:, 0]], fmt="-o", ms=3, capsize=2,
                    color=report.COLORS[gi % len(report.COLORS)], label=g)
    ax.set_xticks(x, [r["label"] for r in runs], rotation=90 if len(runs) > 12 else 0, fontsize=7)
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set(xlabel="layers knocked out", ylabel="mean KL (nats)",
           title=f"Mean KL per condition with 95% CI ({result['edges']})")
    ax.legend(fontsize=7)
    return report._save(fig, path)
