"""`plipy steer`: calibrate, dose-response and steered generation (post-softmax ×α on marker → target edges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from plipy.cli.common import console, err_console, progress_bars, split_list

app = typer.Typer(help="Attention steering: calibrate, dose-response, steered generation.", no_args_is_help=True)

MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Alias, local dir, .gguf file or HF id.")
CORPUS = typer.Option(None, "--corpus", help="PLIP universal corpus JSON (default: bundled).")
DTYPE = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
SKIP = typer.Option(False, "--skip-invalid", help="Leave out (and list) samples whose targets come after the marker.")


def _floats(text: str, what: str) -> list[float]:
    from plipy.errors import PlipyError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlipyError(f"cannot read {what} {text!r}: use comma-separated numbers, e.g. 0.5,1,2") from None


def _layers(layer: int | None, layers: str | None, n_layers: int) -> list[int] | None:
    from plipy.errors import PlipyError
    from plipy.experiments import scan as sc

    if layer is not None and layers is not None:
        raise PlipyError("give --layer or --layers, not both")
    if layers is not None:
        return sc.parse_indices(layers, n_layers, "layer")
    return None if layer is None else [layer]


def _heads(heads: str, n_heads: int) -> list[int] | None:
    from plipy.experiments import scan as sc

    return None if heads.strip() == "all" else [] if heads.strip() == "none" else sc.parse_indices(heads, n_heads,
                                                                                                   "head")


def _excluded(result: dict) -> None:
    for e in result.get("excluded", []) + result.get("skipped", []):
        err_console.print(f"[yellow]excluded[/] {escape(e['id'])}: {e['status']} — {escape(e.get('note') or '')}")


@app.command("calibrate")
def calibrate(
    model: str = MODEL,
    corpus: Path | None = CORPUS,
    layer: int | None = typer.Option(None, "--layer", help="Layer (default: PLIP's, 16 on 30 layers)."),
    groups: list[str] | None = typer.Option(None, "--groups", help="Groups A B: the scale brings B to A's level."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result JSON here."),
    skip_invalid: bool = SKIP,
    bos: bool = typer.Option(False, "--bos", help="Prepend the BOS token (PLIP never did)."),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Baseline attention of two groups at one layer, their ratio, and the scale that brings B to A's level."""
    from plipy.corpus import load_corpus
    from plipy.errors import PlipyError
    from plipy.experiments import steer as st
    from plipy.io import write_json
    from plipy.models import load_model
    from plipy.report import fmt_num

    group_list = split_list(groups) or ["python_doctest", "rust_test"]
    if len(group_list) != 2:
        raise PlipyError(f"--groups needs exactly two groups (A B), got {len(group_list)}")
    corp = load_corpus(corpus)
    st.prepare_check_groups(corp, group_list)
    lm = load_model(model, dtype=dtype, device=device)
    cfg = st.CalibrateConfig(layer=layer, groups=group_list, bos=bos, skip_invalid=skip_invalid)
    with progress_bars() as start:
        result = st.run_calibrate(lm, corp, cfg, progress=start)
    if json_out:
        write_json(json_out, result)
    ga, gb = result["groups_compared"]
    t = Table(title=f"Calibration at layer {result['layer']}: attention marker → targets (head mean)",
              box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("group", "n", "mean", "std"):
        t.add_column(col, justify="right")
    for g in (ga, gb):
        d = result["groups"][g]
        t.add_row(g, str(d["n"]), f"{d['mean']:.5f}", fmt_num(d["std"], ".5f"))
    console.print(t)
    console.print(f"ratio {ga}/{gb} = {fmt_num(result['ratio'], '.3f')}; scale that brings {gb}'s steered mean "
                  f"to {ga}'s: α = {fmt_num(result['scale_to_a'], '.4f')} (PLIP's ratio rule: "
                  f"{fmt_num(result['scale_plip'], '.4f')})")
    _excluded(result)
    if json_out:
        console.print(f"wrote {json_out}")


@app.command("dose")
def dose(
    model: str = MODEL,
    corpus: Path | None = CORPUS,
    groups: list[str] | None = typer.Option(None, "--group", "--groups", help="Group(s) to steer (rust_test)."),
    layer: int | None = typer.Option(None, "--layer", help="Steer one layer (default: PLIP's, 16 on 30 layers)."),
    layers: str | None = typer.Option(None, "--layers", help="Steer several layers at once: 14,16,18 or 10-14."),
    doses: str = typer.Option("0.5,1,2,3,4,6", "--doses", help="Comma-separated scales α."),
    heads: str = typer.Option("all", "--heads", help="all | none | 0,3 | 0-4 (query heads steered)."),
    target_attention: float | None = typer.Option(None, "--target-attention",
                                                  help="Also find, per sample, the α reaching this attention."),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON result (default results/steer-….json)."),
    plot: bool = typer.Option(False, "--plot", help="Dose-response plot (KL and attention achieved, 95% CI)."),
    skip_invalid: bool = SKIP,
    bos: bool = typer.Option(False, "--bos", help="Prepend the BOS token (PLIP never did)."),
    runner: str = typer.Option("auto", "--runner", help="auto | fast | naive (naive: one full forward each)."),
    batch: int = typer.Option(32, "--batch", help="Doses per batched forward on the fast path."),
    table_format: str = typer.Option("parquet", "--table-format", help="Per-sample rows: parquet or csv."),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Dose-response: KL(base ‖ steered) and attention achieved per dose and sample, group mean/std/n."""
    from plipy.corpus import load_corpus
    from plipy.errors import PlipyError
    from plipy.experiments import steer as st
    from plipy.io import write_json, write_table
    from plipy.models import load_model

    if table_format not in ("parquet", "csv"):
        raise PlipyError(f"--table-format must be parquet or csv, got {table_format!r}")
    dose_list = _floats(doses, "--doses")
    group_list = split_list(groups) or ["rust_test"]
    corp = load_corpus(corpus)
    st.prepare_check_groups(corp, group_list)
    lm = load_model(model, dtype=dtype, device=device)
    layer_list = _layers(layer, layers, lm.n_layers)
    cfg = st.DoseConfig(groups=group_list, layers=layer_list, doses=dose_list, heads=_heads(heads, lm.n_heads),
                        target_attention=target_attention, bos=bos, skip_invalid=skip_invalid, path=runner,
                        max_batch=batch)
    with progress_bars() as start:
        result = st.run_dose(lm, corp, cfg, progress=start)
    label = "-".join(map(str, result["layers"])) if len(result["layers"]) <= 4 else (
        f"{result['layers'][0]}..{result['layers'][-1]}")
    out = out or Path("results") / f"steer-{lm.name}-{'+'.join(group_list)}-L{label}.json"
    table_path = out.with_suffix(f".{table_format}")
    result["files"] = {"json": str(out), "table": str(table_path)}
    if plot:
        result["files"]["plots"] = [str(dose_plot(result, Path(f"{out.with_suffix('')}-dose.png")))]
    write_table(table_path, st.sample_rows(result))
    write_json(out, result)
    _print_dose(result)
    console.print(f"\nwrote {out}, {table_path}" + "".join(f", {p}" for p in result["files"].get("plots", [])))


def _print_dose(result: dict) -> None:
    from plipy.report import fmt_num

    t = Table(title=f"Steering layers {result['layers']} ({len(result['heads'])} heads), groups "
                    f"{', '.join(result['groups'])}: KL(base ‖ steered) in nats, attention achieved (head mean)",
              box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("scale", "n", "mean KL", "std KL", "attention"):
        t.add_column(col, justify="right")
    for r in result["doses"]:
        t.add_row(f"{r['scale']:g}", str(r["n"]), _e(r["mean_kl"]), _e(r["std_kl"]),
                  fmt_num(r["mean_attention_achieved"], ".5f"))
    if "target" in result:
        r = result["target"]
        t.add_row(f"v={r['target_attention']:g} (α̅={fmt_num(r['mean_scale'], '.3g')})", str(r["n"]),
                  _e(r["mean_kl"]), _e(r["std_kl"]), fmt_num(r["mean_attention_achieved"], ".5f"))
    console.print(t)
    mono = result["monotonicity"]
    console.print(f"monotonic: attention rises with α: {mono['attention_increasing']} "
                  f"(samples {mono['samples_attention_increasing']}); KL rises with α above 1: "
                  f"{mono['kl_increasing_above_1']}, as α falls below 1: {mono['kl_increasing_below_1']}")
    rn = result["provenance"]["config"]["runner"]
    console.print(f"runner: {rn['path']} path ({rn['forward_calls']} forward calls) — "
                  f"{result['timing']['seconds']:.1f} s")
    _excluded(result)


def _e(x: Any) -> str:
    return "—" if x is None else f"{x:.3e}"


def dose_plot(result: dict, path: Path) -> Path:
    """Mean KL and mean attention achieved per dose with t-based 95% CIs, one line per group."""
    import numpy as np

    from plipy import report

    plt = report._plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = sorted(result["doses"], key=lambda r: r["scale"])
    x = np.array([r["scale"] for r in runs])
    for gi, g in enumerate(result["groups"] if runs else []):  # --doses "" with a target: no curve
        col = report.COLORS[gi % len(report.COLORS)]
        for key, ax in (("kl", ax1), ("attention_achieved", ax2)):
            vals = [[s[key] for s in r["samples"] if s["group"] == g and s["status"] == "ok"] for r in runs]
            m = np.array([report._mean_ci(v) if v else (np.nan,) * 3 for v in vals], dtype=float)
            ax.plot(x, m[:, 0], "-o", ms=3, color=col, label=f"{g} (n={max(len(v) for v in vals)})")
            ax.fill_between(x, m[:, 1], m[:, 2], color=col, alpha=0.18)
    base = np.mean([s["attention_baseline"] for s in result["samples"]]) if result["samples"] else None
    if base is not None:
        ax2.axhline(base, color="grey", ls="--", lw=1, label="baseline")
    if "target" in result:
        ax2.axhline(result["target"]["target_attention"], color="black", ls=":", lw=1, label="target v")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    ax1.set(xlabel="scale α", ylabel="KL(base ‖ steered), nats", title="Next-token KL (95% CI)")
    ax2.set(xlabel="scale α", ylabel="attention achieved", title=f"Attention achieved, layers {result['layers']}")
    return report._save(fig, path)


@app.command("generate")
def generate(
    model: str = MODEL,
    prompts: Path | None = typer.Option(None, "--prompts", help="Prompts JSON (default: bundled Rust prompts)."),
    layer: int | None = typer.Option(None, "--layer", help="Steered layer (default: PLIP's, 16 on 30 layers)."),
    layers: str | None = typer.Option(None, "--layers", help="Several layers: 14,16,18 or 10-14."),
    scale: float = typer.Option(3.0, "--scale", help="α on the steered edge."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="New tokens per generation."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sampling (same seed for both)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler (set before each of the two generations)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the tokenizer's chat template."),
    detect: list[str] | None = typer.Option(None, "--detect", help="Regex of a test marker (repeatable)."),
    query_text: str = typer.Option("fn ", "--query-text", help="Edge query: the token of its last occurrence."),
    key_text: str = typer.Option("#[test]", "--key-text", help="Edge key: the token of its first occurrence."),
    heads: str = typer.Option("all", "--heads", help="all | 0,3 | 0-4 (query heads steered)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N prompts."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Leave out prompts whose key is after the query."),
    json_out: Path | None = typer.Option(None, "--json", "--out", help="Write the result JSON here."),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Baseline vs steered generation side by side (same decoding path), test-marker counts, Fisher's exact test."""
    from plipy.experiments import steer as st
    from plipy.io import write_json
    from plipy.models import load_model
    from plipy.report import fmt_p

    items, source = st.load_prompts(prompts)
    lm = load_model(model, dtype=dtype, device=device)
    cfg = st.GenerateConfig(layers=_layers(layer, layers, lm.n_layers), scale=scale, max_tokens=max_tokens,
                            temperature=temperature, seed=seed, chat=chat,
                            detect=tuple(detect) if detect else st.DEFAULT_DETECT, query_text=query_text,
                            key_text=key_text, heads=_heads(heads, lm.n_heads), skip_invalid=skip_invalid,
                            limit=limit)
    with progress_bars() as start:
        result = st.run_generate(lm, items, cfg, source=source, progress=start)
    if json_out:
        write_json(json_out, result)
    t = Table(title=f"Generation, layers {result['provenance']['config']['layers']}, α = {scale:g}",
              box=box.SIMPLE_HEAD, header_style="bold", show_lines=True)
    for col in ("id", "baseline", "steered", "change"):
        t.add_column(col, overflow="fold")
    for r in result["samples"]:
        # generated code is full of `[...]` (`#[test]`): not rich markup
        t.add_row(escape(r["id"]), escape(r["baseline"]), "(identical)" if r["identical"] else escape(r["steered"]),
                  r["change"])
    console.print(t)
    s = result["summary"]
    console.print(f"tests preserved: baseline {s['baseline_preserved']}/{s['total']}, steered "
                  f"{s['steered_preserved']}/{s['total']} (gained {s['gained']}, lost {s['lost']}, identical "
                  f"{s['identical']}); one-sided Fisher p = {fmt_p(s['fisher_exact_p'])}")
    _excluded(result)
    if json_out:
        console.print(f"wrote {json_out}")
