"""`plipy entities …`: build the entity lists from the raw WikiData dumps, label entities known/unknown by a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from plipy.cli.common import console, err_console, progress_bars

app = typer.Typer(help="Entity lists (players, movies, cities, songs) and known/unknown labels.", no_args_is_help=True)


@app.command("build")
def build(
    raw: Path = typer.Option(..., "--raw", help="Raw WikiData dump folder (sae_entities dataset/raw/wikidata)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: the shipped package data)."),
) -> None:
    """Rebuild `{type}.json.gz` from the raw dumps: labels unique within the type, every attribute present."""
    from plipy.entities.build import UPSTREAM_COUNTS, build_entities, shipped_dir, write_entities

    lists = build_entities(raw)
    paths = write_entities(lists, out or shipped_dir())
    t = Table(title="Entity lists", header_style="bold")
    for col in ("type", "entities", "upstream", "file"):
        t.add_column(col, justify="right")
    for (name, ents), p in zip(lists.items(), paths, strict=True):
        ok = "" if len(ents) == UPSTREAM_COUNTS[name] else " [yellow](differs)[/]"
        t.add_row(name, f"{len(ents):,}", f"{UPSTREAM_COUNTS[name]:,}{ok}", str(p))
    console.print(t)


@app.command("label")
def label(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, local dir, .gguf file or HF id."),
    types: str | None = typer.Option(None, "--types", help="Entity types, e.g. player,movie (default: all four)."),
    limit: int | None = typer.Option(None, "--limit", help="First N entities per type (default: the pipeline "
                                     "profile's; 0 = all, days on a CPU)."),
    k: int | None = typer.Option(None, "--k", help="Samples at T=1 per query (default 10)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Tokens per completion (default 32)."),
    seed: int = typer.Option(42, "--seed", help="Sampling seed (the split always uses 42, as upstream)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Queries per generate call (× (1+K) rows)."),
    quick: bool = typer.Option(False, "--quick", help="Test profile: 2 entities per type, K=2, 8 new tokens."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Labels JSON (default results/entities-labels-"
                                    "<model>.json)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Cache folder (default $PLIPY_CACHE/entities)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the cache."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Ask the model each entity's attribute queries (greedy + K samples), grade them, label known/unknown/dropped."""
    from plipy.entities.build import check_types
    from plipy.entities.label import PROFILES, label_entities
    from plipy.io import write_json
    from plipy.models import load_model

    chosen = check_types(types)  # fail on bad types before loading the model
    prof = PROFILES["quick" if quick else "pipeline"]
    limit = prof["limit"] if limit is None else (limit or None)
    k = prof["k"] if k is None else k
    max_new_tokens = prof["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    lm = load_model(model, dtype=dtype, device=device)
    out = out or Path("results") / f"entities-labels-{lm.name}.json"
    with progress_bars() as start:
        doc = label_entities(lm, types=chosen, limit=limit, k=k, seed=seed, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, cache_dir=cache_dir, progress=start, use_cache=not no_cache)
    write_json(out, doc)
    _print(doc)
    cache = doc.get("cache", {})
    where = "from cache" if cache.get("hit") else f"{cache.get('generated_queries', 0)} queries generated"
    console.print(f"\nwrote {out} ({where})")


def _print(doc: dict) -> None:
    cfg = doc["config"]
    t = Table(title=f"Known / unknown entities (K={cfg['k']}, attribute known at ≥{cfg['known_threshold']} correct)",
              header_style="bold")  # fmt: skip
    for col in ("type", "entities", "known", "unknown", "dropped", "test known", "test unknown", "balanced/label"):
        t.add_column(col, justify="right")
    for name, s in doc["summary"].items():
        t.add_row(name, str(s["n"]), str(s["known"]), str(s["unknown"]), str(s["dropped"]), str(s["test"]["known"]),
                  str(s["test"]["unknown"]), str(s["test_balanced_per_label"]))  # fmt: skip
    console.print(t)
    for note in doc.get("notes", [])[1:]:
        if "too small" in note:
            err_console.print(f"[yellow]{note}[/]")
