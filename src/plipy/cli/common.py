"""What every command shares: the consoles, progress bars, the shared options (one spelling, one grammar each),
writing a result and printing its report.

Defaults are the same everywhere, with two deliberate exceptions (docs/cli.md): `--bos` is off for the PLIP
experiments (PLIP-rs' corpus positions assume no BOS) and on for the SAE commands (TransformerLens, which the SAE
pipeline reproduces, prepends it); `--layers` defaults to what each experiment means by "all".
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, overload

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from plipy.errors import ParameterError, PlipyError
from plipy.options import HEADS_GRAMMAR, LAYERS_GRAMMAR

# Piped or redirected, rich would cut tables to 80 columns ("6.…"): draw them at their natural width instead.
console = Console() if sys.stdout.isatty() else Console(width=4096)
err_console = Console(stderr=True)

DEFAULT_MODEL = "smollm2-135m"
# Defaults that depend on the corpus or the model, as `--help` shows them (`[default: …]`).
PLIP_GROUPS = "python_doctest,rust_test, else every group"
PLIP_LAYER = "PLIP's layer: 16 for 28-31 layers as SmolLM2's 30, 20 for ≥ 32, else 14"

# -- shared options ------------------------------------------------------------------------------------------------

MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, local dir, .gguf file or HF id.")
CORPUS = typer.Option(None, "--corpus", help="PLIP universal corpus JSON.", show_default="bundled")
OFFSETS = typer.Option("chars", "--offsets", help="Corpus positions are 'chars' or UTF-8 'bytes' (PLIP-rs files).")
HEADS = typer.Option("all", "--heads", help=f"Query heads: {HEADS_GRAMMAR}.")
OUT = typer.Option(None, "--out", "-o", help="JSON result.", show_default="results/<kind>-<model>….json")
PLOT = typer.Option(False, "--plot", help="Write PNG plots beside the JSON.")
HTML = typer.Option(False, "--html", help="Also write the interactive report <stem>.html (one offline file).")
BOS = typer.Option(False, "--bos/--no-bos", help="Prepend the BOS token (PLIP never did).")
SEED = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation tests.")
RESAMPLES = typer.Option(10000, "--resamples", help="Bootstrap / permutation resamples (≥ 1).")
TABLE_FORMAT = typer.Option("parquet", "--table-format", help="Per-sample rows: parquet or csv.")
RUNNER = typer.Option("auto", "--runner", help="auto | fast | naive (naive: one full forward per condition).")
CONDITION_BATCH = typer.Option(32, "--condition-batch", help="Conditions per batched forward on the fast path.")
SKIP_INVALID = typer.Option(
    False, "--skip-invalid", help="Leave out (and list) samples whose targets come after the marker."
)
DTYPE = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
BATCH_SIZE = typer.Option(
    None,
    "--batch-size",
    "-b",
    help="Samples per model forward, left-padded (results equal one-by-one runs within fp32 rounding).",
    show_default="16 on CPU, 64 on GPU",
)
DEVICE_MAP = typer.Option(
    None,
    "--device-map",
    help="Spread a model too big for one device: auto | balanced | balanced_low_0 | sequential | a JSON file of "
    "module → device (accelerate).",
)
MAX_MEMORY = typer.Option(None, "--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB.")
RAY = typer.Option(
    None,
    "--ray",
    is_flag=False,
    flag_value="",
    metavar="[ADDRESS]",
    help="Run the units on a Ray cluster: ADDRESS (auto | host:6379 | ray://host:10001), else "
    "$RAY_ADDRESS, else a local Ray instance. Same JSON as a local run.",
)
WORKERS = typer.Option(
    None,
    "--workers",
    help="With --ray: Ray actors, each loading the model once.",
    show_default="one per GPU, else one per node",
)
FRESH = typer.Option(
    False,
    "--fresh",
    help="Start over: discard the finished samples an interrupted run with the "
    "same settings left (a rerun resumes from them by default).",
)


# name → (type, option): what `@shared(...)` adds to a command
SHARED: dict[str, tuple[Any, Any]] = {
    "model": (str, MODEL),
    "corpus": (Path | None, CORPUS),
    "offsets": (str, OFFSETS),
    "out": (Path | None, OUT),
    "plot": (bool, PLOT),
    "html": (bool, HTML),
    "table_format": (str, TABLE_FORMAT),
    "bos": (bool, BOS),
    "seed": (int, SEED),
    "resamples": (int, RESAMPLES),
    "runner": (str, RUNNER),
    "condition_batch": (int, CONDITION_BATCH),
    "skip_invalid": (bool, SKIP_INVALID),
    "dtype": (str, DTYPE),
    "device": (str, DEVICE),
    "fresh": (bool, FRESH),
    "batch_size": (int | None, BATCH_SIZE),
    "device_map": (str | None, DEVICE_MAP),
    "max_memory": (str | None, MAX_MEMORY),
    "ray": (str | None, RAY),
    "workers": (int | None, WORKERS),
}

# A command's `o` parameter defaults to this: `@shared` always passes the command its own namespace of options.
OPTIONS = SimpleNamespace()


# Shared options most result-writing commands take, in their help order: where the result goes, and how it runs.
OUTPUT_OPTIONS = ("out", "plot", "html", "table_format")
RUN_OPTIONS = ("dtype", "device", "fresh", "batch_size", "device_map", "max_memory", "ray", "workers")


def shared(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the named shared options (after its own, in this order); it receives them as `o.<name>`.

    One definition per option means one spelling, one default and one help text on every command."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "o"]
        extra = [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=SHARED[n][1], annotation=SHARED[n][0])
            for n in names
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            o = SimpleNamespace(**{n: kwargs.pop(n) for n in names})
            if "table_format" in names:
                from plipy.options import check_choice

                check_choice(o.table_format, ("parquet", "csv"), param="table_format")
            if "fresh" in names:  # the run keeps its finished units under PLIPY_RUNS
                from plipy.runtime.checkpoint import check_runs_writable

                check_runs_writable()
            if "out" in names:  # a bad path fails now, not after minutes of work; a symlink is resolved once
                o.out = check_out(o.out, table_format=getattr(o, "table_format", None), html=getattr(o, "html", False))
            return fn(o=o, **kwargs)

        command.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return command

    return decorate


def load_options(o: SimpleNamespace) -> dict[str, Any]:
    """How the model loads, from a command's shared options (those it has)."""
    names = ("dtype", "device", "device_map", "max_memory", "batch_size", "ray", "workers")
    return {n: getattr(o, n) for n in names if hasattr(o, n)}


def model_options(o: SimpleNamespace) -> dict[str, Any]:
    """`load_options` less those of the run (batch size, Ray): what `api.as_model` takes."""
    return {k: v for k, v in load_options(o).items() if k not in ("batch_size", "ray", "workers")}


def groups_option(meaning: str, default: str) -> Any:
    """`--groups A,B` (comma-separated or repeated); `meaning` says what the command does with them, `default` which
    groups it takes without the option."""
    return typer.Option(None, "--groups", help=f"Groups, comma-separated: {meaning}", show_default=default)


def layers_option(default: str | None, meaning: str) -> Any:
    """`--layers` with the one grammar; `meaning` says what the command does with them."""
    return typer.Option(default, "--layers", help=f"{meaning}: {LAYERS_GRAMMAR}.")


def old_spelling(flag: str, new: str) -> Any:
    """A hidden option that keeps a renamed flag working for a release (docs/cli.md lists them)."""
    return typer.Option(None, flag, hidden=True, help=f"Old spelling of {new}.")


def batch_size_option(default: int, what: str = "samples") -> Any:
    """`--batch-size`: always the number of inputs (samples, prompts, sequences) per model forward."""
    return typer.Option(default, "--batch-size", "-b", help=f"Inputs ({what}) per model forward.")


# -- parameters → flags --------------------------------------------------------------------------------------------

FLAGS = {
    "n_resamples": "--resamples",
    "mode": "--layer/--layers/--scan-layers/--scan-windows/--slide-window",
    "random": "--random",
    "train_options": "options",
    "latent_means": "--latent-file",
    "max_tokens": "--max-new-tokens",
    "C": "--inverse-regularization",
    "label_limit": "--limit",
    "n_random": "--random",
    "tokens": "--token/--token-id",
    "text": "TEXT",
}


def flag_for(param: str) -> str:
    """The CLI flag of a Python API parameter."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def error_line(e: PlipyError) -> str:
    """The one line the CLI prints for a library error (parameters named as flags)."""
    if isinstance(e, ParameterError):
        return e.with_name(flag_for(e.param))
    return str(e)


# -- progress, outputs, reports ------------------------------------------------------------------------------------


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """Yields `start(description, total) -> step()`; bars draw on stderr so stdout stays a clean table. The display
    starts with the first bar, so an error raised before any work prints its one line and nothing else."""
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )

    def start(desc: str, total: int) -> Callable[[], None]:
        if not prog.live.is_started:
            prog.start()
        task = prog.add_task(desc, total=total)
        return lambda: prog.advance(task)

    failed = False
    try:
        yield start
    except Exception:
        failed = True
        prog.live.transient = True  # a failed run's bars vanish: its one `error:` line is all that is left
        raise
    finally:
        if prog.live.is_started:
            # Progress.stop() adds a blank line on a non-terminal stderr; Live.stop() alone leaves nothing
            (prog.live.stop if failed else prog.stop)()


def split_list(values: list[str] | None) -> list[str] | None:
    """`--groups a b`, `--groups a,b` and repeated options all give ['a', 'b']."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@overload
def check_out(path: Path, flag: str = ..., *, table_format: str | None = ..., html: bool = ...) -> Path: ...


@overload
def check_out(
    path: Path | None, flag: str = ..., *, table_format: str | None = ..., html: bool = ...
) -> Path | None: ...


def check_out(
    path: Path | None, flag: str = "--out", *, table_format: str | None = None, html: bool = False
) -> Path | None:
    """Refuse an output path that cannot be written, before any model loads, and return where it lands: a symlink
    resolved once (`plipy.io.output_path`), so the JSON and its siblings (table, rows, plots, HTML) all go beside
    its target. With `table_format`, also refuse a name the table or the HTML would share with the JSON.
    None stays None (the default `results/…`)."""
    from plipy.errors import OutputError
    from plipy.io import output_path

    p = Path(path) if path is not None else Path("results") / "result.json"
    shown = f"{flag} {p}" if path is not None else "the default output folder results/"
    try:
        p = output_path(p)
    except OutputError as e:
        raise PlipyError(f"{flag}: {e}") from None
    if p.is_dir():
        raise PlipyError(f"{shown} is a directory: give a file name, e.g. {p / 'result.json'}")
    parent = next((a for a in p.parents if a.exists()), Path("."))
    if not parent.is_dir():
        raise PlipyError(f"{shown}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PlipyError(f"{shown}: {parent} is not writable")
    if table_format is not None:
        from plipy.results.base import sibling_clash

        clash = sibling_clash(p, table_format, html)
        if clash:
            raise PlipyError(f"{shown}: {clash}")
    return None if path is None else p


def print_report(renderables: list[Any]) -> None:
    """A report on stdout: tables as tables, plain strings as text (never rich markup)."""
    from plipy.report.base import print_all

    print_all(console, renderables, notes=err_console)


def save_and_report(
    result: Any,
    out: Path | None,
    *,
    plot: bool = False,
    html: bool = False,
    table_format: str = "parquet",
    **save_options: Any,
) -> dict[str, Any]:
    """Write the result's files, print its console report and the list of files written."""
    files = result.save(out, plots=plot, html=html, table_format=table_format, **save_options)
    print_report(result.summary_renderables())
    written = [
        files["json"],
        files["table"],
        *[files[k] for k in ("rows", "html") if k in files],
        *files.get("npy", []),
        *files.get("plots", []),
    ]
    console.print(Text("\nwrote " + ", ".join(written)), soft_wrap=True)
    return files
