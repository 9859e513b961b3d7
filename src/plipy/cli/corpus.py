"""`plipy corpus ...`: check that a corpus's character positions land on the right tokens of a model."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from plipy.corpus import SamplePositions, corpus_positions, load_corpus
from plipy.errors import PlipyError

app = typer.Typer(
    help="Corpora of marked code samples: check how their positions convert to tokens.",
    no_args_is_help=True,
)


@app.command()
def verify(
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        "-m",
        help="Model alias, local dir, .gguf file or HF id; only its tokenizer loads.",
    ),
    corpus: Path | None = typer.Option(
        None, "--corpus", help="Corpus JSON file (default: the bundled PLIP universal corpus)."
    ),
    groups: str | None = typer.Option(None, "--groups", help="Comma-separated groups to check (default: all)."),
    bos: bool = typer.Option(False, "--bos/--no-bos", help="Prepend the BOS token (PLIP adds none)."),
    offsets: str = typer.Option(
        "chars", "--offsets", help="How the file counts positions: chars, or bytes (UTF-8, PLIP-rs files)."
    ),
    json_out: Path | None = typer.Option(None, "--out", "-o", help="Also write the report as JSON to this file."),
) -> None:
    """Convert every sample's marker and targets to token positions and report how each converted.

    Exit code 1 if a sample failed to convert or is longer than the model's context; targets after the marker are
    reported, not failures.
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

    from plipy.report.base import print_all
    from plipy.report.corpus import verify_summary

    summary, renderables = verify_summary(positions, model)
    from plipy.models import context_length

    context = context_length(model)
    too_long = [sp for sp in positions if context is not None and sp.seq_len > context]
    summary["too_long"] = len(too_long)
    if too_long:  # scan, knockout and steer refuse these: say so here, not after a model load there
        shown = ", ".join(f"{sp.sample.id} ({sp.seq_len})" for sp in too_long[:10])
        more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        renderables.append(Text(f"{len(too_long)} samples are longer than the model's context ({context} tokens): "
                                f"{shown}{more}", style="bold red"))
    console = Console() if sys.stdout.isatty() else Console(width=4096)
    print_all(console, renderables)

    if json_out is not None:
        from plipy import provenance
        from plipy.io import write_json

        prov = provenance.build(corpus=corp, config={"groups": group_list})
        prov.update(model=tok_provenance, bos=bos, offsets=offsets)
        report = {
            "provenance": prov,
            "summary": summary,
            "context_length": context,
            "samples": [{**_sample_json(sp), "too_long": context is not None and sp.seq_len > context}
                        for sp in positions],
        }
        write_json(json_out, report)
        console.print(f"wrote {json_out}")

    if summary["failed"] or too_long:
        raise typer.Exit(1)


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
