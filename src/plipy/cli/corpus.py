"""`plipy corpus ...`: check that a corpus's character positions land on the right tokens of a model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from plipy.corpus import STATUSES, SamplePositions, corpus_positions, load_corpus
from plipy.errors import PlipyError

app = typer.Typer(
    help="Corpora of marked code samples: check how their positions convert to tokens.",
    no_args_is_help=True,
)

STATUS_STYLE = {
    "perfect": "green",
    "ok": "cyan",
    "fallback": "yellow",
    "causal-violation": "magenta",
    "failed": "bold red",
}


@app.command()
def verify(
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        help="Model alias, local dir, .gguf file or HF id; only its tokenizer loads.",
    ),
    corpus: Path | None = typer.Option(
        None, "--corpus", help="Corpus JSON file (default: the bundled PLIP universal corpus)."
    ),
    groups: str | None = typer.Option(None, "--groups", help="Comma-separated groups to check (default: all)."),
    bos: bool = typer.Option(False, "--bos", help="Prepend the BOS token (PLIP adds none)."),
    offsets: str = typer.Option(
        "chars", "--offsets", help="How the file counts positions: chars, or bytes (UTF-8, PLIP-rs files)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
) -> None:
    """Convert every sample's marker and targets to token positions and report how each converted.

    Exit code 1 if a sample failed to convert; targets after the marker are reported, not failures.
    """
    if offsets not in ("chars", "bytes"):
        raise PlipyError(f"--offsets must be 'chars' or 'bytes', not {offsets!r}")
    group_list = [g.strip() for g in groups.split(",") if g.strip()] if groups else None

    # Corpus first: a bad file should fail before the (slower) tokenizer load.
    corp = load_corpus(corpus, offsets=offsets)
    corp.samples(group_list)  # unknown group names -> CorpusError now
    from plipy.models import load_tokenizer  # lazy: keeps `plipy --help` fast

    tokenizer, tok_provenance = load_tokenizer(model)
    positions = corpus_positions(corp, tokenizer, groups=group_list, bos=bos)

    console = Console()
    console.print(_table(positions, model))
    counts = Counter(sp.status for sp in positions)
    summary = {s: counts.get(s, 0) for s in STATUSES}
    parts = [f"{n} {s}" for s, n in summary.items() if n]
    console.print(f"{len(positions)} samples: " + ", ".join(parts))
    if summary["causal-violation"]:
        console.print(
            f"[magenta]{summary['causal-violation']} samples have targets after the marker (marked !): "
            "attention to those is causally impossible; scans report them, knockout/steering refuse those "
            "edges[/magenta]"
        )
    if summary["fallback"]:
        console.print(
            f"[yellow]{summary['fallback']} samples have positions no token covers (marked ~): "
            "mapped to the token with the nearest midpoint[/yellow]"
        )
    if summary["failed"]:
        console.print(f"[bold red]{summary['failed']} samples failed: a position has no token[/bold red]")

    if json_out is not None:
        from plipy import provenance
        from plipy.io import write_json

        prov = provenance.build(corpus=corp, config={"groups": group_list})
        prov.update(model=tok_provenance, bos=bos, offsets=offsets)
        report = {
            "provenance": prov,
            "summary": summary,
            "samples": [_sample_json(sp) for sp in positions],
        }
        write_json(json_out, report)
        console.print(f"wrote {json_out}")

    if summary["failed"]:
        raise typer.Exit(1)


def _table(positions: list[SamplePositions], model: str) -> Table:
    table = Table(title=f"token positions ({model})", title_justify="left")
    for col in ("id", "group", "marker", "targets", "status"):
        table.add_column(col, overflow="fold")
    for sp in positions:
        # Text objects, not markup strings: token texts such as "#[" would be read as rich markup.
        marker = Text(_mark(sp.marker_token, sp.marker_text, sp.marker_match, False))
        targets = Text(
            " ".join(
                _mark(t, text, how, after)
                for t, text, how, after in zip(
                    sp.target_tokens, sp.target_texts, sp.target_matches, sp.after_marker, strict=True
                )
            )
        )
        status = Text(sp.status, style=STATUS_STYLE.get(sp.status, ""))
        table.add_row(Text(sp.sample.id), Text(sp.sample.group), marker, targets, status)
    return table


def _mark(token: int | None, text: str | None, how: str, after: bool) -> str:
    """`12:' add'`, prefixed by `~` for a fallback match and `!` for a target after the marker."""
    if token is None:
        return "?"
    return ("!" if after else "") + ("~" if how == "fallback" else "") + f"{token}:{text!r}"


def _sample_json(sp: SamplePositions) -> dict:
    return {
        "id": sp.sample.id,
        "group": sp.sample.group,
        "marker_token": sp.marker_token,
        "marker_text": sp.marker_text,
        "marker_match": sp.marker_match,
        "target_tokens": sp.target_tokens,
        "target_texts": sp.target_texts,
        "target_matches": sp.target_matches,
        "after_marker": sp.after_marker,
        "status": sp.status,
        "conversion": sp.conversion,
        "n_tokens": sp.seq_len,
    }
