"""`plipy scan`: the attention layer scan with positional controls and full statistics."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from plipy.cli.common import console, err_console, progress_bars, split_list
from plipy.report import fmt_num, fmt_p, fmt_pct


def scan(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, local dir, .gguf file or HF id."),
    corpus: Path | None = typer.Option(None, "--corpus", help="PLIP universal corpus JSON (default: bundled)."),
    groups: list[str] | None = typer.Option(None, "--groups", help="Groups to measure; the first two are compared."),
    layers: str = typer.Option("all", "--layers", help="all | plip (n/3…n−1) | 0-12 | 3,5,7"),
    heads: str = typer.Option("all", "--heads", help="all | 0,3 | 0-4 (the metric averages these heads)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON result (default results/scan-<model>.json)."),
    plot: bool = typer.Option(False, "--plot", help="Write PNG plots beside the JSON."),
    bos: bool = typer.Option(False, "--bos", help="Prepend the BOS token (PLIP never did)."),
    offsets: str = typer.Option("chars", "--offsets", help="Corpus positions are 'chars' or UTF-8 'bytes'."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation tests."),
    resamples: int = typer.Option(10000, "--resamples", help="Bootstrap / permutation resamples."),
    table_format: str = typer.Option("parquet", "--table-format", help="Per-sample rows: parquet or csv."),
    token_sample: str | None = typer.Option(None, "--token-sample", help="Sample id for the token-level plot."),
    token_layer: int | None = typer.Option(None, "--token-layer", help="Layer for the token-level plot."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Measure marker → target attention on every layer and head, beside the uniform and token-0 nulls."""
    from plipy.corpus import load_corpus
    from plipy.errors import PlipyError
    from plipy.experiments import scan as sc
    from plipy.io import write_json, write_table
    from plipy.models import load_model

    if table_format not in ("parquet", "csv"):
        raise PlipyError(f"--table-format must be parquet or csv, got {table_format!r}")
    corp = load_corpus(corpus, offsets=offsets)
    group_list = split_list(groups)
    sc.choose_groups(corp, group_list)  # fail on bad groups before loading the model
    lm = load_model(model, dtype=dtype, device=device)
    n = lm.n_layers
    layer_list = sc.parse_indices(layers, n, "layer", plip=range(n // 3, n))
    head_list = sc.parse_indices(heads, lm.n_heads, "head")
    out = out or Path("results") / f"scan-{lm.name}.json"
    cfg = sc.ScanConfig(groups=group_list, layers=layer_list, heads=head_list, bos=bos, seed=seed,
                        n_resamples=resamples, extra={"offsets": offsets})
    with progress_bars() as start:
        result = sc.run_scan(lm, corp, cfg, progress=start)
    table_path = out.with_suffix(f".{table_format}")
    result["files"] = {"json": str(out), "table": str(table_path)}
    if plot:
        result["files"]["plots"] = _plots(result, out, corp, lm, token_sample, token_layer)
    write_table(table_path, sc.sample_rows(result))
    write_json(out, result)
    _print(result)
    console.print(f"\nwrote {out}, {table_path}" + ("".join(f", {p}" for p in result["files"].get("plots", []))))


def _plots(result, out: Path, corp, lm, token_sample, token_layer) -> list[str]:
    from plipy import report
    from plipy.corpus import token_positions
    from plipy.errors import PlipyError

    stem = out.with_suffix("")
    paths = [
        report.scan_layers_plot(result, Path(f"{stem}-layers.png")),
        report.scan_heads_plot(result, Path(f"{stem}-heads.png")),
    ]
    measured = [s for s in result["samples"] if "attention" in s]
    sample = next((s for s in measured if s["id"] == token_sample), None) if token_sample else measured[0]
    if sample is None:
        raise PlipyError(f"--token-sample {token_sample!r} is not a measured sample of this scan")
    layers = result["layers_scanned"]
    layer = token_layer if token_layer is not None else result["best"]["holm"]["layer"] or layers[-1]
    if layer not in layers:
        raise PlipyError(f"--token-layer {layer} was not scanned")
    import torch

    from plipy.engine import Capture, Engine

    sp = token_positions(corp.sample(sample["id"]), lm.tokenizer, bos=result["provenance"]["config"]["bos"])
    with torch.inference_mode(), Engine(lm.model).run(capture=Capture(rows=[sp.marker_token], layers=[layer])) as rec:
        lm.model(torch.tensor([sp.input_ids], device=lm.device))
    row = rec.attn[layer][0, :, 0].mean(0).cpu().tolist()
    tokens = [lm.tokenizer.decode([t]) for t in sp.input_ids]
    title = f"{sample['id']} — layer {layer}, head-mean attention of the marker row"
    paths.append(report.token_row_plot(tokens, row, sp.marker_token, sample["measured_targets"], title,
                                       Path(f"{stem}-tokens.png")))
    return [str(p) for p in paths]


def _print(result: dict) -> None:
    ga, gb = result["groups_compared"]
    t = Table(title=f"Layer scan: {ga} vs {gb} (attention marker → targets, head mean)", header_style="bold")
    for col in ("layer", f"{ga}", f"{gb}", "ratio", "t", "df", "p", "", "p Holm", "null ratio", "excess ratio",
                "p excess Holm", f"tok0 {ga}", f"tok0 {gb}"):
        t.add_column(col, justify="right")
    for r in result["layers"]:
        e = r["excess"]
        t.add_row(
            str(r["layer"]), fmt_pct(r["groups"][ga]["mean"]), fmt_pct(r["groups"][gb]["mean"]),
            fmt_num(r["ratio"]) + "×", fmt_num(r["t"]), fmt_num(r["df"], ".1f"), fmt_p(r["p"]), r["stars"],
            fmt_p(r["p_holm"]), fmt_num(r["null_ratio"]) + "×", fmt_num(e["ratio"]) + "×", fmt_p(e["p_holm"]),
            fmt_pct(r["first_token_share"][ga]), fmt_pct(r["first_token_share"][gb]),
        )
    console.print(t)
    nr = result["null_ratio"]
    console.print(
        f"uniform null 1/(m+1): {ga} {fmt_pct(result['uniform_null'][ga]['mean'])}, "
        f"{gb} {fmt_pct(result['uniform_null'][gb]['mean'])} → null ratio {fmt_num(nr)}× "
        "(a ratio near this is explained by marker position alone)"
    )
    b = result["best"]
    console.print(
        f"best layer, PLIP rule ({ga} > {gb}, min p): {b['plip_rule']['layer']} (p={fmt_p(b['plip_rule']['p'])}); "
        f"by Holm-corrected p: {b['holm']['layer']} (p_holm={fmt_p(b['holm']['p_holm'])}); "
        f"position-controlled (excess): {b['excess_holm']['layer']} (p_holm={fmt_p(b['excess_holm']['p_holm'])})"
    )
    skipped = [s for s in result["samples"] if "attention" not in s]
    for s in skipped:
        err_console.print(f"[yellow]not measured[/] {s['id']} ({s['group']}): {s['status']} — {s.get('note', '')}")
    partial = [s["id"] for s in result["samples"] if s["status"] == "partial-targets"]
    if partial:
        err_console.print(f"[yellow]targets after the marker left out of the mean[/] for: {', '.join(partial)}")
