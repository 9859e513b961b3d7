"""`plipy entities …`: build the entity lists from the raw WikiData dumps, label entities known/unknown by a model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

from plipy.cli import common as c
from plipy.cli.common import console, progress_bars

app = typer.Typer(help="Entity lists (players, movies, cities, songs) and known/unknown labels.", no_args_is_help=True)


@app.command("build")
def build(
    raw: Path = typer.Option(..., "--raw", help="Raw WikiData dump folder (sae_entities dataset/raw/wikidata)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: $PLIPY_CACHE/entity-lists; the shipped lists stay as is)."
    ),
) -> None:
    """Rebuild `{type}.json.gz` from the raw dumps: labels unique within the type, every attribute present."""
    from plipy.entities.build import UPSTREAM_COUNTS, build_entities, built_dir, write_entities

    folder = out or built_dir()
    c.check_out(folder / "player.json.gz")  # an unwritable folder fails before the dumps are read
    lists = build_entities(raw)
    paths = write_entities(lists, folder)
    from plipy.report.entities import build_summary

    c.print_report(build_summary(lists, paths, UPSTREAM_COUNTS))


@app.command("label")
@c.shared("model", "dtype", "device", "ray", "workers")
def label(
    types: str | None = typer.Option(None, "--types", help="Entity types, e.g. player,movie (default: all four)."),
    limit: int | None = typer.Option(
        None, "--limit", help="First N entities per type (default: the pipeline profile's; 0 = all, days on a CPU)."
    ),
    k: int | None = typer.Option(None, "--k", help="Samples at T=1 per query (default 10)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Tokens per completion (default 32)."),
    seed: int = typer.Option(42, "--seed", help="Sampling seed (the split always uses 42, as upstream)."),
    batch_size: int = c.batch_size_option(32, "attribute queries, each × (1+K) rows"),
    quick: bool = typer.Option(False, "--quick", help="Test profile: 2 entities per type, K=2, 8 new tokens."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Labels JSON (default results/entities-labels-<model>.json)."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Cache folder (default $PLIPY_CACHE/entities)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the cache."),
    o: SimpleNamespace = None,
) -> None:
    """Ask the model each entity's attribute queries (greedy + K samples), grade them, label known/unknown/dropped."""
    from plipy.api import check_cluster, ray_load
    from plipy.entities.build import check_types
    from plipy.entities.label import PROFILES, label_entities
    from plipy.io import write_json
    from plipy.models import load_model

    chosen = check_types(types)  # fail on bad types before loading the model
    cluster = check_cluster(o.ray, o.workers)
    prof = PROFILES["quick" if quick else "pipeline"]
    limit = prof["limit"] if limit is None else (limit or None)
    k = prof["k"] if k is None else k
    max_new_tokens = prof["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    if cluster is not None:
        from plipy.cluster.pool import driver_model

        lm = driver_model(o.model, o.dtype, o.device, cluster)  # the workers hold the weights
    else:
        lm = load_model(o.model, dtype=o.dtype, device=o.device)
    out = out or Path("results") / f"entities-labels-{lm.name}.json"
    with progress_bars() as start:
        doc = label_entities(
            lm,
            types=chosen,
            limit=limit,
            k=k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=start,
            use_cache=not no_cache,
            cluster=cluster,
            load=ray_load(o.device, None, None),
        )
    write_json(out, doc)
    from plipy.report.entities import labels_summary

    c.print_report(labels_summary(doc))
    cache = doc.get("cache", {})
    where = "from cache" if cache.get("hit") else f"{cache.get('generated_queries', 0)} queries generated"
    console.print(f"\nwrote {out} ({where})")
