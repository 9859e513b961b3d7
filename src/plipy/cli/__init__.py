"""The `plipy` command. Each sub-command lives in its own module; this one wires them and turns errors into one line."""

from __future__ import annotations

import sys
from typing import Any

import typer

from plipy.errors import PlipyError

app = typer.Typer(
    name="plipy",
    help="Attention interpretability for HF language models: scans, knockout, steering, SAE steering, logit lens, "
    "probes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Idempotent: main() may be called many times in one process (tests, notebooks).
    from plipy.cli import corpus, entities, knockout, lens, models, patch, probe, qk, report, sae, scan, steer, sweep

    groups = {g.name for g in app.registered_groups}
    commands = {c.name for c in app.registered_commands}
    for name, sub in (
        ("models", models.app),
        ("corpus", corpus.app),
        ("sae", sae.app),
        ("steer", steer.app),
        ("entities", entities.app),
        ("lens", lens.app),
        ("patch", patch.app),
    ):
        if name not in groups:
            app.add_typer(sub, name=name)
    for name, fn in (
        ("scan", scan.scan),
        ("knockout", knockout.knockout),
        ("probe", probe.probe),
        ("qk", qk.qk),
        ("report", report.report),
    ):
        if name not in commands:
            app.command(name)(fn)
    if "sweep" not in commands:  # the experiment's own options pass through to it
        app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(sweep.sweep)


def _plain_flags(command: Any) -> Any:
    """On/off flags (and --help) show no `<bool>` type in the help: a flag takes no value. Newer Typer prints one
    for every flag unless the option has a metavar, so give them an empty one."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    help_option = command.get_help_option(command.context_class(command))
    if help_option is not None and help_option.metavar is None:
        help_option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)
    return command


def _print_version(value: bool) -> None:
    if value:
        from plipy import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the plipy version and exit.", is_eager=True, callback=_print_version
    ),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Allow pickle-based weights (.bin/.pt): "
        "unpickling runs code from the file. Default: safetensors and GGUF only.",
    ),
) -> None:
    """Attention interpretability for HF language models."""
    if allow_pickle:
        import os

        os.environ["PLIPY_ALLOW_PICKLE"] = "1"  # read by plipy.models.load_model wherever a command loads one


RUNS = ("scan", "knockout", "steer", "sae", "entities")


def optional_values(argv: list[str]) -> list[str]:
    """`--ray` without an ADDRESS (last, before another option, or before a sweep's experiment) gets the empty
    address: a local Ray instance or $RAY_ADDRESS. Typer has no optional option values, so argv says it."""
    out: list[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--ray" and (nxt is None or nxt.startswith("-") or nxt in RUNS):
            out.append("")
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a PlipyError becomes `error: <message>` on stderr and exit code 2, Ctrl-C prints
    `interrupted` and exits 130, and a command's own exit code reaches the shell."""
    from plipy.cli.common import error_line

    _register()
    try:
        command = _plain_flags(typer.main.get_command(app))
        rv = command(args=optional_values(sys.argv[1:] if argv is None else argv), standalone_mode=False)
    except PlipyError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Usage errors arrive here in non-standalone mode; typer may vendor its own click, so duck-type them.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
    if isinstance(rv, int) and rv:  # non-standalone mode returns `ctx.exit(n)` codes instead of exiting
        if rv == 130:  # typer turns Ctrl-C into exit code 130, silently
            print("interrupted", file=sys.stderr)
        sys.exit(rv)
