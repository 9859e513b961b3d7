"""Every `--help` in one style (issue 26): rendered through the real entry point at a fixed width, no help text loses a
`[word]` to rich markup, every option with a default shows it as Typer's `[default: …]` (and only so), flags show no
`<bool>` type, and a flag means the same thing on every command that has it."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import typer

from plipy.cli import _register, app, main

DOCS_CLI = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = "200"


def _walk() -> dict[str, object]:
    """Every command and group of `plipy`, by path ("" is the root)."""
    _register()
    found: dict[str, object] = {}

    def walk(cmd: object, path: list[str]) -> None:
        found[" ".join(path)] = cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _walk()
LEAVES = {p: c for p, c in COMMANDS.items() if not getattr(c, "commands", None)}
_RENDERED: dict[str, str] = {}


def _help(path: str) -> str:
    """`plipy <path> --help` as a terminal of WIDTH columns shows it (cached: 30 renders, ~0.1 s each)."""
    if path not in _RENDERED:
        mp = pytest.MonkeyPatch()
        mp.setenv("COLUMNS", WIDTH)
        mp.delenv("TERMINAL_WIDTH", raising=False)
        import io
        import sys

        buf = io.StringIO()
        mp.setattr(sys, "stdout", buf)
        try:
            main([*path.split(), "--help"])
        except SystemExit as e:
            assert e.code in (0, None), f"plipy {path} --help exited {e.code}"
        finally:
            mp.undo()
        _RENDERED[path] = buf.getvalue()
    return _RENDERED[path]


def _visible(cmd: object) -> list:
    return [p for p in cmd.params if not getattr(p, "hidden", False)]


def _flat(text: str) -> str:
    """Rendered text without the panel borders and line breaks (a wrapped help text reads as one line)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _blocks(rendered: str) -> dict[str, str]:
    """Each option's rows in the rendered panel, by its first long flag."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in rendered.splitlines():
        m = re.match(r"^│\s+(?:\*\s+)?(--[A-Za-z0-9][\w-]*)", line)
        if m:
            current = m.group(1)
            blocks[current] = [line]
        elif line.startswith("╰"):
            current = None
        elif current is not None:
            blocks[current].append(line)
    return {k: _flat("\n".join(v)) for k, v in blocks.items()}


def _sources(cmd: object) -> list[str]:
    """The help strings a command's `--help` shows: its own and its visible parameters'."""
    return [s for s in [getattr(cmd, "help", None), *(getattr(p, "help", None) for p in _visible(cmd))] if s]


def test_every_command_is_rendered():
    assert {"scan", "sae attention", "sae train", "entities label", "lens run", "probe", "steer generate"} <= set(
        LEAVES
    )
    assert "" in COMMANDS and "sae" in COMMANDS  # groups are rendered too


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_no_markup_is_swallowed(path):
    """Every `[…]` of a help text (escaped `\\[` or not) is on screen: rich ate `[saelens]` once."""
    shown = _flat(_help(path))
    for source in _sources(COMMANDS[path]):
        for bracket in re.findall(r"\[[^\[\]]*\]", source.replace("\\[", "[")):
            assert _flat(bracket) in shown, f"plipy {path} --help lost {bracket!r} of {source!r}"


def test_the_saelens_extra_is_shown():
    assert "plipy[saelens]" in _help("sae attention")


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_default_is_shown_one_way(path):
    """An option with a default shows `[default: …]`; a plain on/off flag is off unless given. No help text states a
    default in words of its own ("(default: x)", "(default x)", "Default 9", "(5)")."""
    cmd = LEAVES[path]
    blocks = _blocks(_help(path))
    for p in _visible(cmd):
        if p.param_type_name != "option" or p.required:
            continue
        off_flag = getattr(p, "is_flag", False) and not p.secondary_opts and p.default is False
        has_default = p.default is not None or isinstance(p.show_default, str)
        flag = next(o for o in p.opts if o.startswith("--"))
        if has_default and not off_flag:
            assert "[default: " in blocks[flag], f"plipy {path} {flag}: no [default: …] in {blocks[flag]!r}"
        if off_flag:
            assert "[default:" not in blocks[flag]
    words = re.compile(r"\([Dd]efault\b|\b[Dd]efault:|\b[Dd]efault \d|;\s*default\b|\(\d+\)\.?$")
    for source in _sources(cmd):
        assert not words.search(source), f"plipy {path}: a default in words: {source!r}"
    assert not re.search(r"\(default[: ]", _flat(_help(path)).replace("[default: (", "[default: "))


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_no_bool_metavar(path):
    assert "<bool>" not in _help(path)


# A flag's meaning: the Python API parameter it feeds, named here where the parameter's name alone is not enough
# (the same name for two things across commands) or differs between commands for the same thing.
SAME = {"json_out": "out", "model_batch": "batch_size", "n_random": "random", "out_dir": "out"}
SAME |= {"max_tokens": "max_new_tokens"}
BY_COMMAND = {
    ("entities label", "k"): "samples per query",
    ("sae train", "k"): "TopK active latents",
    ("sae attention", "labels"): "labels to keep",
    ("sae latents", "labels"): "labels file",
    ("sae attention", "label"): "label of --entities",
    ("probe", "label"): "how classes are labelled",
}
AMBIGUOUS = {param for _, param in BY_COMMAND}


def _meaning(path: str, param: object) -> str:
    if param.name in AMBIGUOUS:
        assert (path, param.name) in BY_COMMAND, f"plipy {path}: say what its {param.name!r} means in BY_COMMAND"
        return BY_COMMAND[path, param.name]
    return SAME.get(param.name, param.name)


def test_one_meaning_per_flag():
    """`--k` was samples per query in `entities label` and TopK in `sae train`: each flag now means one thing on
    every command that shows it (hidden old spellings aside, see test_old_spellings_are_hidden_and_listed)."""
    meanings: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, cmd in LEAVES.items():
        for p in _visible(cmd):
            for flag in (*p.opts, *p.secondary_opts):
                if flag.startswith("-"):
                    meanings[flag][_meaning(path, p)].append(path)
    clashes = {flag: dict(m) for flag, m in meanings.items() if len(m) > 1}
    assert not clashes


OLD = {
    "--k": "--samples",
    "--max-tokens": "--max-new-tokens",
    "--tokens": "--n-tokens",
    "--C": "--inverse-regularization",
}
OLD |= {"--label": "--entity-label", "--labels": "--labels-file"}


def test_old_spellings_are_hidden_and_listed():
    """Renamed flags keep working for a release as hidden options, each listed in docs/cli.md."""
    docs = DOCS_CLI.read_text(encoding="utf-8")
    seen = set()
    for path, cmd in LEAVES.items():
        names = {f for p in _visible(cmd) for f in p.opts}
        for p in cmd.params:
            if not getattr(p, "hidden", False) or p.name == "keep_partial":
                continue
            (old,) = p.opts
            assert p.help == f"Old spelling of {OLD[old]}.", f"plipy {path} {old}"
            assert OLD[old] in names, f"plipy {path}: {old} is kept for {OLD[old]}, which it lacks"
            assert f"`{old}`" in docs and f"`{OLD[old]}`" in docs, f"docs/cli.md does not list {old} → {OLD[old]}"
            seen.add(old)
    assert seen == set(OLD)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["steer", "generate", "--max-tokens", "0"], "max_tokens"),
        (["probe", "--C", "0.5"], "C"),
        (["entities", "label", "--k", "3"], "k"),
        (["sae", "train", "--tokens", "7"], "n_tokens"),
    ],
)
def test_old_spellings_still_work(args, key, monkeypatch):
    """An old spelling reaches the same API parameter as the new one (the call is stopped right there)."""
    import plipy
    from plipy import api, steer

    seen = {}

    def stop(*a, **k):
        seen.update(k)
        raise SystemExit(0)

    for mod, name in ((steer, "generate"), (api, "probe"), (api, "label_entities"), (api, "train_sae")):
        monkeypatch.setattr(mod, name, stop)
    monkeypatch.setattr(plipy, "steer", steer)
    with pytest.raises(SystemExit):
        main(args)
    assert str(seen[key]) == args[-1]


def test_device_help_lists_what_the_loader_takes():
    from plipy.options import DEVICE_MAPS

    shown = _flat(_help("scan"))
    assert "auto | cpu | cuda | cuda:N" in shown
    for strategy in DEVICE_MAPS:
        assert strategy in shown
