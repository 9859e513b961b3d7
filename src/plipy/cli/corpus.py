"""`plipy corpus ...`: check that a corpus's character positions land on the right tokens of a model (`verify`,
`--fix` repairs positions a few characters off), make a corpus from code (`convert`), list a sample's tokens
(`show`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from plipy.corpus import CorpusError, SamplePositions, corpus_positions, load_corpus
from plipy.errors import PlipyError

app = typer.Typer(
    help="Corpora of marked code samples: convert code to a corpus, check and repair positions, show tokens.",
    no_args_is_help=True,
)
MODEL = typer.Option(
    "smollm2-135m", "--model", "-m", help="Model alias, local dir, .gguf file or HF id; only its tokenizer loads."
)
CORPUS = typer.Option(None, "--corpus", help="Corpus JSON file.", show_default="the bundled PLIP universal corpus")
BOS = typer.Option(False, "--bos/--no-bos", help="Prepend the BOS token (PLIP adds none).")
OFFSETS = typer.Option(
    "chars", "--offsets", help="How the file counts positions: chars, or bytes (UTF-8, PLIP-rs files)."
)


@app.command()
def verify(
    model: str = MODEL,
    corpus: Path | None = CORPUS,
    groups: str | None = typer.Option(None, "--groups", help="Comma-separated groups to check.", show_default="all"),
    bos: bool = BOS,
    offsets: str = OFFSETS,
    json_out: Path | None = typer.Option(None, "--out", "-o", help="Also write the report as JSON to this file."),
    fix: bool = typer.Option(
        False,
        "--fix",
        help="Repair markers and targets a few characters off, list every "
        "change, write the corrected corpus (--fix-out) and verify that.",
    ),
    fix_out: Path | None = typer.Option(
        None,
        "--fix-out",
        help="Where --fix writes (the input is never overwritten unless named here).",
        show_default="<corpus>.fixed.json beside it",
    ),
    window: int = typer.Option(8, "--window", help="--fix moves a position at most this many characters."),
) -> None:
    """Convert every sample's marker and targets to token positions and report how each converted.

    Exit code 1 if a sample failed to convert or is longer than the model's context; targets after the marker are
    reported, not failures. With --fix, a corpus whose positions are a few characters off is repaired first.
    """
    if offsets not in ("chars", "bytes"):
        raise PlipyError(f"--offsets must be 'chars' or 'bytes', not {offsets!r}")
    group_list = [g.strip() for g in groups.split(",") if g.strip()] if groups else None
    if fix:
        corpus = _fix(corpus, offsets, fix_out, window)
    elif fix_out is not None:
        raise PlipyError("--fix-out needs --fix")

    # Corpus first: a bad file should fail before the (slower) tokenizer load.
    try:
        corp = load_corpus(corpus, offsets=offsets)
    except CorpusError as e:
        if any("is not at marker_char_pos" in p for p in e.problems):
            raise PlipyError(f"{e} — `plipy corpus verify --fix` repairs positions a few characters off") from None
        raise
    if not fix:
        _note_suspicious(corp)
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
        renderables.append(
            Text(
                f"{len(too_long)} samples are longer than the model's context ({context} tokens): {shown}{more}",
                style="bold red",
            )
        )
    console = Console() if sys.stdout.isatty() else Console(width=4096)
    print_all(console, renderables)

    if json_out is not None:
        from plipy.io import write_json
        from plipy.runtime import provenance

        prov = provenance.build(corpus=corp, config={"groups": group_list})
        prov.update(model=tok_provenance, bos=bos, offsets=offsets)
        report = {
            "provenance": prov,
            "summary": summary,
            "context_length": context,
            "samples": [
                {**_sample_json(sp), "too_long": context is not None and sp.seq_len > context} for sp in positions
            ],
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


def _out_console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=4096)


def _note_suspicious(corp: Any) -> None:
    """Say (on stderr) which targets look a few characters off; `--fix` would move them."""
    from plipy.corpus.tools import suspicious_target

    odd = [
        f"{s.id}[{k}]"
        for s in corp.samples()
        for k, t in enumerate(s.target_char_positions)
        if suspicious_target(s.code, t)
    ]
    if odd:
        Console(stderr=True).print(
            Text(
                f"{len(odd)} targets sit on whitespace or inside an identifier ("
                f"{', '.join(odd[:8])}{' …' if len(odd) > 8 else ''}): --fix would move "
                "them to the identifier's start",
                style="yellow",
            )
        )


def _fix(corpus: Path | None, offsets: str, fix_out: Path | None, window: int) -> Path:
    """Repair the corpus file, print every change, write it; returns the path to verify next."""
    from plipy.corpus import decode_corpus, read_corpus_bytes
    from plipy.corpus.tools import corpus_bytes, fix_document
    from plipy.io import write_outputs

    if window < 1:
        raise PlipyError(f"--window must be ≥ 1, got {window}")
    path, raw = read_corpus_bytes(corpus)
    doc = decode_corpus(raw, path)
    fixed, changes, left = fix_document(doc, offsets, window)
    con = _out_console()
    for line in changes:
        con.print(Text("fixed " + line), soft_wrap=True)
    if left:
        shown = "; ".join(left[:10]) + (f"; … and {len(left) - 10} more" if len(left) > 10 else "")
        raise PlipyError(f"{len(left)} problem(s) --fix cannot repair, nothing written: {shown}")
    if not changes:
        con.print(f"{path}: nothing to fix")
        return path
    out = fix_out or (
        path.with_name(path.stem + ".fixed.json") if corpus is not None else Path(path.stem + ".fixed.json")
    )
    from plipy.cli.common import check_out

    check_out(out, "--fix-out")
    write_outputs({out: corpus_bytes(fixed)})
    con.print(f"wrote {out} ({len(changes)} change{'s' if len(changes) != 1 else ''}); verifying it")
    return out


@app.command()
def convert(
    inputs: list[Path] = typer.Argument(
        ...,
        help="Code files (.py, .rs, .go), folders of them, or JSON / JSON Lines "
        "of snippets {code, id?, group?, rule?} (or a legacy PLIP corpus).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The universal corpus JSON to write."),
    rule: str | None = typer.Option(
        None,
        "--rule",
        help="python | rust | rust-universal | rust-baseline | pytest | go-test.",
        show_default="by file suffix or group name",
    ),
    group: str | None = typer.Option(None, "--into", help="Put every sample in this group.", show_default="the rule's"),
    marker: list[str] | None = typer.Option(
        None, "--marker", help="Marker text, tried in order (repeatable); overrides the rule's."
    ),
    keyword: str | None = typer.Option(None, "--keyword", help="Definition keyword with its space, e.g. 'def '."),
    params: str | None = typer.Option(
        None, "--params", help="Targets after the name: python | rust | go | paren | none."
    ),
    skip: str | None = typer.Option(
        None, "--skip", help="Regex of function names that are not the target (pytest: test_)."
    ),
) -> None:
    """Make a universal corpus from code by finding markers and function targets (PLIP-rs' convert_corpus rules;
    configurable for other test markers). Samples without a marker or a definition are listed and left out."""
    from plipy.cli.common import check_out
    from plipy.corpus.tools import check_not_input, corpus_bytes, input_files, read_inputs
    from plipy.corpus.tools import convert as run_convert
    from plipy.io import write_outputs

    out = check_out(out)
    check_not_input(out, input_files(inputs))
    snippets = read_inputs(inputs)
    doc, skipped = run_convert(snippets, rule, group, markers=marker, keyword=keyword, params=params, skip=skip)
    write_outputs({out: corpus_bytes(doc)})
    con = _out_console()
    for g, samples in doc.items():
        if not g.startswith("_"):
            for smp in samples:
                con.print(
                    Text(
                        f"{g}: {smp['id']}: marker {smp['marker_pattern']!r} at {smp['marker_char_pos']}, "
                        f"targets {smp['target_char_positions']}"
                    ),
                    soft_wrap=True,
                )
    err = Console(stderr=True)
    for sk in skipped:
        err.print(
            Text(f"skipped {sk['id']} ({sk['origin']}, rule {sk['rule']}): {sk['reason']}", style="yellow"),
            soft_wrap=True,
        )
    n = sum(len(v) for k, v in doc.items() if not k.startswith("_"))
    con.print(f"wrote {out}: {n} samples" + (f", {len(skipped)} skipped" if skipped else ""))


@app.command()
def show(
    sample: str = typer.Argument(..., help="The sample id."),
    model: str = MODEL,
    corpus: Path | None = CORPUS,
    bos: bool = BOS,
    offsets: str = OFFSETS,
) -> None:
    """A sample's tokens with their index, character span and role (marker, target k)."""
    from rich.table import Table

    from plipy.corpus import token_positions
    from plipy.corpus.tools import token_rows
    from plipy.models import load_tokenizer

    if offsets not in ("chars", "bytes"):
        raise PlipyError(f"--offsets must be 'chars' or 'bytes', not {offsets!r}")
    smp = load_corpus(corpus, offsets=offsets).sample(sample)
    tokenizer, _ = load_tokenizer(model)
    sp = token_positions(smp, tokenizer, bos=bos)
    t = Table(
        title=f"{smp.id} ({smp.group}) — {model}: {sp.seq_len} tokens, conversion {sp.status}", title_justify="left"
    )
    for col in ("index", "token", "id", "chars", "role"):
        t.add_column(col, justify="right" if col in ("index", "id") else "left")
    for r in token_rows(sp):
        t.add_row(
            str(r["index"]),
            Text(repr(r["text"])),
            str(r["id"]),
            f"{r['start']}-{r['end']}",
            Text(r["role"], style="bold" if r["role"] else ""),
        )
    _out_console().print(t)
