"""One CLI grammar: every command spells the shared flags the same way, with the same defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from plipy.cli import _register, app


def _commands():
    """(path, click command) of every leaf command of `plipy`."""
    _register()
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append((" ".join(path), cmd))

    walk(root, [])
    return out


COMMANDS = dict(_commands())


def _flags(cmd):
    return {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_command_is_walked():
    assert {
        "scan",
        "knockout",
        "steer calibrate",
        "steer dose",
        "steer generate",
        "sae attention",
        "sae train",
        "sae latents",
        "sae pipeline",
        "entities label",
        "entities build",
        "corpus verify",
        "corpus convert",
        "corpus show",
        "lens run",
        "lens emergence",
        "probe",
        "models pull",
    } <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_renders_and_shared_flags_are_spelled_alike(path):
    res = CliRunner().invoke(app, [*path.split(), "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    flags = _flags(COMMANDS[path])
    for flag in flags:
        assert flags[flag].name is not None
    # retired spellings: one flag per meaning
    for old in ("--json", "--batch", "--group", "--model-batch"):
        assert old not in flags, f"{path} still has {old}"
    if "--model" in flags:
        assert "-m" in flags and flags["--model"].default == "smollm2-135m"
        if path not in ("corpus verify", "corpus show"):  # only their tokenizer loads
            for flag in ("--dtype", "--device"):
                assert flags[flag].default == "auto", f"{path} {flag}"
    if "--out" in flags:
        assert "-o" in flags
    if "--batch-size" in flags:
        assert "-b" in flags and "per model forward" in (flags["--batch-size"].help or "")
    if "--layers" in flags:
        assert "all | plip (n/3…n−1) | A-B | a,b,c" in flags["--layers"].help
    if "--heads" in flags:
        assert "A-B | a,b,c" in flags["--heads"].help
    if "--bos" in flags:
        assert "--no-bos" in flags, f"{path}: --bos needs its --no-bos"
        # sae commands prepend BOS by default (SAELens' convention); qk decides by its input (corpus no, prompts yes)
        expected = None if path == "qk" else path.startswith("sae")
        assert flags["--bos"].default is expected, f"{path}: --bos default"


@pytest.mark.parametrize(
    "path",
    [
        "scan",
        "knockout",
        "steer calibrate",
        "steer dose",
        "steer generate",
        "sae attention",
        "sae train",
        "sae latents",
        "sae pipeline",
        "entities label",
        "lens run",
        "lens emergence",
        "probe",
        "corpus convert",
    ],
)
def test_commands_that_write_results_take_out(path):
    assert "--out" in _flags(COMMANDS[path])


@pytest.mark.parametrize("path", ["scan", "knockout", "steer calibrate", "steer dose"])
def test_corpus_commands_share_corpus_groups_offsets(path):
    flags = _flags(COMMANDS[path])
    assert {"--corpus", "--groups", "--offsets", "--table-format", "--plot"} <= set(flags)


def test_version_through_the_entry_point():
    from plipy import __version__

    out = subprocess.run([sys.executable, "-m", "plipy", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == __version__
