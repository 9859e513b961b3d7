"""The `plipy` command. Each sub-command lives in its own module; this one wires them and turns errors into one line."""

from __future__ import annotations

import sys

import typer

from plipy.errors import PlipyError

app = typer.Typer(
    name="plipy",
    help="Attention interpretability for HF language models: scans, knockout, steering, SAE steering.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from plipy.cli import corpus, models, scan

    app.add_typer(models.app, name="models")
    app.add_typer(corpus.app, name="corpus")
    app.command("scan")(scan.scan)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the plipy version and exit."),
) -> None:
    if version:
        from plipy import __version__

        typer.echo(__version__)
        raise typer.Exit()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a PlipyError becomes `error: <message>` on stderr and exit code 2."""
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except PlipyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Usage errors arrive here in non-standalone mode; typer may vendor its own click, so duck-type them.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
