"""README.md and docs/*.md run as written: every ```python block and every `plipy …` line of a ```bash block, in
order, one namespace and one working folder per page — or the block is marked `<!-- not run: why -->` just before it.
docs/tutorial.md is run by tests/test_tutorial.py. Blocks of other languages (JSON shapes, diagrams) are not code.

The fast tests check the marks and that every `plipy` line (synopses included) names real commands and flags; the
slow test executes the pages on the default model, with the bundled corpus cut to 3 samples per group so that the
whole set takes minutes (the commands and calls are unchanged)."""

from __future__ import annotations

import re
import shlex
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "tutorial.md")]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<why>.*?)-->\s*$")
CODE = {"python", "bash", "sh", "shell", "console"}
SETUP = ("echo ", "printf ")  # the shell lines a bash block may use to write its own inputs


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = NOT_RUN.match(before)
        code = textwrap.dedent(m.group("indent") + m.group("body").replace("\n" + m.group("indent"), "\n"))
        line = text[: m.start()].count("\n") + 1
        out.append(Block(page, line, m.group("lang"), code, mark.group("why").strip() if mark else None))
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def shell_lines(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [re.sub(r"(^|\s+)#\s.*$", "", ln).strip() for ln in joined.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


# -- fast: the marks and the flags -----------------------------------------------------------------------------------


def test_pages_are_found():
    assert any(b.page.name == "README.md" and b.lang == "python" for b in ALL)
    assert len(PAGES) > 10


def test_every_mark_gives_a_reason():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"<!--\s*not run:(.*?)-->", text):
            assert m.group(1).strip(), f"{page.name}: a 'not run' mark without its reason"
    marked = sum(1 for b in ALL if b.not_run)
    assert marked == len(re.findall(r"<!--\s*not run:", "".join(p.read_text(encoding="utf-8") for p in PAGES))), (
        "a 'not run' mark that is not right before a code block"
    )


def test_bash_blocks_that_run_are_plipy_commands():
    for b in ALL:
        if b.lang in CODE - {"python"} and not b.not_run:
            for ln in shell_lines(b.code):
                assert ln.startswith(("plipy ", *SETUP)), f"{b.where}: {ln!r} is not a plipy command"


def _commands() -> dict[str, object]:
    from plipy.cli import _register, app

    _register()
    found: dict[str, object] = {}

    def walk(cmd: object, path: list[str]) -> None:
        found[" ".join(path)] = cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def _command_paths(words: list[str], commands: dict[str, object]) -> list[str]:
    """The command(s) a doc line names: `steer dose`; `lens TEXT` is `lens run`; `a|b` names both."""
    paths = [""]
    for w in words:
        nxt = [f"{p} {alt}".strip() for p in paths for alt in w.split("|")]
        if not all(n in commands for n in nxt):
            break
        paths = nxt
    return [p + " run" if p == "lens" else p for p in paths]


def test_doc_commands_name_real_flags():
    """Every `plipy …` line (synopses too) names commands that exist and only flags they show: the README once
    showed `steer calibrate --layers`, which calibrate has not."""
    commands = _commands()
    checked = 0
    for b in ALL:
        if b.lang not in CODE - {"python"}:
            continue
        for ln in shell_lines(b.code):
            if not ln.startswith("plipy "):
                continue
            words = ln.split()[1:]
            paths = _command_paths([w for w in words if not w.startswith(("-", "["))][:2], commands)
            assert paths != [""], f"{b.where}: no command in {ln!r}"
            flags = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", ln))
            for path in paths:
                known = {o for p in commands[path].params if not getattr(p, "hidden", False) for o in p.opts}
                known |= {o for p in commands[path].params for o in p.secondary_opts} | {"--help"}
                if path == "sweep":  # the experiment's own options pass through
                    known |= {o for e in ("scan", "knockout") for p in commands[e].params for o in p.opts}
                unknown = flags - known
                assert not unknown, f"{b.where}: plipy {path} has no {sorted(unknown)} ({ln!r})"
                checked += 1
    assert checked > 50


# -- slow: the pages run ---------------------------------------------------------------------------------------------


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in CODE and not b.not_run for b in blocks(p))]


def run_shell(line: str, where: str, cwd: Path) -> None:
    from plipy.cli import main

    if not line.startswith("plipy "):
        subprocess.run(["bash", "-c", line], cwd=cwd, check=True)
        return
    try:
        main(shlex.split(line)[1:])
    except SystemExit as e:
        assert e.code in (0, None), f"{where}: `{line}` exited {e.code}"


@pytest.fixture
def small_default_corpus(tmp_path_factory, monkeypatch):
    """The bundled corpus, 3 samples per group, where a page asks for the default one."""
    import plipy.corpus as pc
    from conftest import corpus_subset

    folder = tmp_path_factory.mktemp("corpus")
    corpus_subset(folder, {"python_doctest": 3, "rust_test": 3, "python_baseline": 3, "rust_baseline": 3})
    small = folder / "small.json"
    read = pc.read_corpus_bytes
    monkeypatch.setattr(pc, "read_corpus_bytes", lambda path: read(small if path is None else path))
    return small


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.name)
def test_page_runs(page, smollm, small_default_corpus, tmp_path, monkeypatch):
    import plipy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLIPY_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(plipy, "load_model", lambda *a, **k: smollm, raising=False)  # the session's model
    ns: dict = {}
    for b in blocks(page):
        if b.lang not in CODE or b.not_run:
            continue
        if b.lang == "python":
            try:
                exec(compile(b.code, b.where, "exec"), ns)
            except Exception as e:  # name the block that failed
                raise AssertionError(f"{b.where} failed: {type(e).__name__}: {e}\n{b.code}") from e
        else:
            for ln in shell_lines(b.code):
                run_shell(ln, b.where, tmp_path)
