"""`plipy entities …`: build the entity lists from the raw WikiData dumps, label entities known/unknown by a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import typer

from plipy.cli import common as c
from plipy.cli.common import progress_bars
from plipy.errors import ParameterError

app = typer.Typer(help="Entity lists (players, movies, cities, songs) and known/unknown labels.", no_args_is_help=True)


@app.command("build")
def build(
    raw: Path = typer.Option(..., "--raw", help="Raw WikiData dump folder (sae_entities dataset/raw/wikidata)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output folder (the shipped lists stay as they are).",
        show_default="$PLIPY_CACHE/entity-lists",
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


@contextmanager
def _renamed(param: str, as_param: str) -> Iterator[None]:
    """A bad value of the API's `param` is named after the flag that gave it (`k` comes from --samples here)."""
    try:
        yield
    except ParameterError as e:
        if e.param != param:
            raise
        raise ParameterError(as_param, e.message) from None


@app.command("label")
@c.shared("model", "out", "table_format", "dtype", "device", "fresh", "ray", "workers")
def label(
    types: str | None = typer.Option(None, "--types", help="Entity types, e.g. player,movie.", show_default="all four"),
    limit: int | None = typer.Option(
        None, "--limit", help="First N entities per type (0: all, days on a CPU).", show_default="36; --quick: 2"
    ),
    k: int | None = typer.Option(
        None, "--samples", help="Samples at T=1 per query (upstream's K).", show_default="10; --quick: 2"
    ),
    old_k: int | None = c.old_spelling("--k", "--samples"),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="New tokens per completion.", show_default="32; --quick: 8"
    ),
    seed: int = typer.Option(42, "--seed", help="Sampling seed (the split always uses 42, as upstream)."),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        help="Inputs (attribute queries, each × (1+K) rows) per model forward.",
        show_default="32",
    ),
    quick: bool = typer.Option(False, "--quick", help="Test profile: 2 entities per type, K=2, 8 new tokens."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache folder.", show_default="$PLIPY_CACHE/entities"
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the cache."),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Ask the model each entity's attribute queries (greedy + K samples), grade them, label known/unknown/dropped."""
    from plipy import api

    with progress_bars() as start, _renamed("k", "samples"):
        result = api.label_entities(
            o.model,
            types=types,
            limit=limit,
            k=k if old_k is None else old_k,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            quick=quick,
            cache_dir=cache_dir,
            cache=not no_cache,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, table_format=o.table_format)
