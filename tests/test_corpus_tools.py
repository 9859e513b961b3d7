"""Corpus tools: conversion reproduces the hand-curated PLIP corpus and hand-counted positions, `verify --fix`
repairs what is a few characters off (and says so, and refuses what it cannot), `show` lists tokens and roles."""

from __future__ import annotations

import json

import pytest

from plipy import cli
from plipy.corpus import load_corpus, token_positions
from plipy.corpus import tools as ct
from plipy.errors import PlipyError

BUNDLED_RULES = {
    "python_doctest": "python",
    "rust_test": "rust-universal",
    "python_baseline": "python",
    "rust_baseline": "rust-baseline",
}


def _run(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
        raise SystemExit(0)
    return e.value.code


def test_rules_reproduce_the_bundled_corpus():
    """The 30 hand-curated PLIP samples: marker, pattern and every target, from the code alone."""
    corpus = load_corpus()
    for group, name in BUNDLED_RULES.items():
        for s in corpus.groups[group]:
            out, why = ct.convert_sample(s.id, s.code, ct.rule(name))
            assert why is None
            assert (out["marker_char_pos"], out["marker_pattern"], out["target_char_positions"]) == (
                s.marker_char_pos,
                s.marker_pattern,
                list(s.target_char_positions),
            ), s.id


def test_plip_convert_corpus_rust_rule_by_hand():
    """PLIP-rs' convert_corpus Rust rule adds parameter names (text before ':'), not the parenthesis."""
    code = "fn mul(x: i32, mut y: i32) -> i32 { x * y }\n\n#[test]\nfn t() { assert_eq!(mul(2, 3), 6); }\n"
    out, _ = ct.convert_sample("m", code, ct.rule("rust"))
    assert out["marker_char_pos"] == code.index("#[test]") and out["target_char_positions"] == [0, 3, 7, 15]
    assert code[15:20] == "mut y"
    cfg = "#[cfg(test)]\nmod tests {}\nfn g() {}\n"
    out, _ = ct.convert_sample("c", cfg, ct.rule("rust"))
    assert out["marker_pattern"] == "#[cfg(test)]" and out["marker_char_pos"] == 0


def test_other_languages_by_hand():
    go = "package m\n\nfunc Add(a, b int) int { return a + b }\n\nfunc TestAdd(t *testing.T) {}\n"
    out, _ = ct.convert_sample("g", go, ct.rule("go-test"))
    assert out["marker_pattern"] == "func Test" and out["marker_char_pos"] == go.index("func TestAdd")
    assert [go[t] for t in out["target_char_positions"]] == ["f", "A", "a", "b"]
    assert out["target_char_positions"] == [11, 16, 20, 23]
    py = "def test_double():\n    assert double(2) == 4\n\ndef double(x, *, k: int = 2):\n    return x * k\n"
    out, _ = ct.convert_sample("p", py, ct.rule("pytest"))
    d = py.index("def double")
    assert out["marker_char_pos"] == 0 and out["target_char_positions"] == [d, d + 4, d + 11, d + 14, d + 17]
    # a custom marker and keyword: a Kotlin test annotation
    kt = "fun sq(n: Int) = n * n\n\n@Test\nfun sqTest() {}\n"
    out, _ = ct.convert_sample("k", kt, ct.rule("rust", markers=["@Test"], keyword="fun "))
    assert out["marker_pattern"] == "@Test" and out["target_char_positions"] == [0, 4, 7]


def test_convert_reports_what_it_leaves_out(tmp_path):
    (tmp_path / "ok.py").write_text('def add(a, b):\n    """\n    >>> add(1, 2)\n    3\n    """\n')
    (tmp_path / "plain.py").write_text("def helper(x):\n    return x\n")
    (tmp_path / "t.rs").write_text("fn f(a: u8) {}\n#[test]\nfn t() {}\n")
    snippets = ct.read_inputs([tmp_path])
    doc, skipped = ct.convert(snippets)
    assert [s["id"] for s in doc["python_doctest"]] == ["ok"] and [s["id"] for s in doc["rust_test"]] == ["t"]
    assert skipped == [
        {"id": "plain", "origin": str(tmp_path / "plain.py"), "rule": "python", "reason": "no marker ('>>>' not found)"}
    ]
    with pytest.raises(PlipyError, match="nothing converted"):
        ct.convert([ct.Snippet("x", "no marker here")])
    with pytest.raises(PlipyError, match="unknown rule"):
        ct.rule("cobol")


def test_convert_json_inputs(tmp_path):
    legacy = {
        "python_doctest": [
            {
                "id": "a",
                "code": "def f(x):\n    '''\n    >>> f(1)\n    '''\n",
                "doctest_token_pos": 9,
                "function_param_positions": [0],
            }
        ],
        "rust_baseline": [{"id": "b", "code": "#[derive(Debug)]\nstruct P {}\nfn new() {}\n"}],
    }
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    doc, _ = ct.convert(ct.read_inputs([tmp_path / "legacy.json"]))
    assert doc["python_doctest"][0]["target_char_positions"] == [0, 4, 6]
    assert doc["rust_baseline"][0]["target_char_positions"] == [17, 24, 29, 32]
    (tmp_path / "s.jsonl").write_text(
        '{"code": "x = 1\\n>>> x", "group": "g", "rule": "python", "id": "n"}\n{"code": "def f(q):\\n  >>> f(2)"}\n'
    )
    doc, skipped = ct.convert(ct.read_inputs([tmp_path / "s.jsonl"]), group="all")
    assert [s["id"] for s in doc["all"]] == ["s_1"] and skipped[0]["reason"].startswith("no target")
    (tmp_path / "out.json").write_bytes(ct.corpus_bytes(doc))
    assert load_corpus(tmp_path / "out.json").sample("s_1").marker_char_pos == 12


def test_fix_targets_and_markers_by_hand():
    code = 'def add(a, b):\n    """\n    >>> add(2, 3)\n    """\n'
    m = code.index(">>>")
    doc = {
        "g": [
            {
                "id": "s",
                "code": code,
                "marker_char_pos": m - 2,
                "marker_pattern": ">>>",
                "target_char_positions": [0, 5, 7, 9, 11],
            }
        ]
    }
    fixed, changes, left = ct.fix_document(doc)
    assert left == [] and fixed["g"][0]["marker_char_pos"] == m
    # 5 is inside `add` → 4; 7 is '(' (punctuation: left alone); 9 is ',' (left); 11 is 'b' (a word start: kept)
    assert fixed["g"][0]["target_char_positions"] == [0, 4, 7, 9, 11]
    assert len(changes) == 2 and "marker_char_pos" in changes[0] and "target_char_positions[1] 5 → 4" in changes[1]
    # whitespace: the nearest identifier start, the following one on a tie
    assert ct.fix_target("f(a,  b)", 4) == 6 and ct.fix_target("ab  cd", 3) == 4
    assert ct.fix_target("x" + " " * 20 + "y", 10) is None
    far = {"g": [{**doc["g"][0], "marker_char_pos": m + 30}]}
    _, _, left = ct.fix_document(far)
    assert left and "not within 8 characters" in left[0]
    _, _, left = ct.fix_document({"g": [{"id": "z", "code": "x"}]})
    assert "not a well-formed sample" in left[0]


def test_fix_leaves_the_bundled_corpus_alone():
    from importlib import resources

    raw = json.loads(resources.files("plipy").joinpath("data", "attention_samples_universal.json").read_text())
    fixed, changes, left = ct.fix_document(raw)
    assert (changes, left) == ([], []) and fixed == raw


def test_fix_in_utf8_bytes():
    code = "def é(a, bb):\n    # ünïcode\n    >>> é(1, 2)\n"
    b = code.encode()
    m = len(code[: code.index(">>>")].encode())
    doc = {
        "g": [
            {
                "id": "u",
                "code": code,
                "marker_char_pos": m + 1,
                "marker_pattern": ">>>",
                "target_char_positions": [0, 4, len(code[: code.index("bb")].encode()) + 1],
            }
        ]
    }
    fixed, changes, left = ct.fix_document(doc, offsets="bytes")
    assert left == [] and fixed["g"][0]["marker_char_pos"] == m
    assert b[fixed["g"][0]["target_char_positions"][2] :].startswith(b"bb")
    assert len(changes) == 2


def test_token_rows_roles(smollm):
    s = load_corpus().sample("py_simple_add")
    sp = token_positions(s, smollm.tokenizer, bos=True)
    rows = ct.token_rows(sp)
    assert rows[0]["text"] == "<bos>" and len(rows) == sp.seq_len
    assert rows[sp.marker_token]["role"] == "marker" and ">>>" in rows[sp.marker_token]["text"]
    assert [r["index"] for r in rows if r["role"].startswith("target")] == sorted(set(sp.target_tokens))
    assert "".join(r["text"] for r in rows[1:]) == s.code  # the spans tile the code


def test_cli_convert_fix_show(tmp_path, capsys):
    src = tmp_path / "code"
    src.mkdir()
    (src / "add.py").write_text('def add(a, b):\n    """\n    >>> add(1, 2)\n    3\n    """\n')
    (src / "none.py").write_text("x = 1\n")
    out = tmp_path / "c.json"
    assert _run(["corpus", "convert", str(src), "-o", str(out)]) == 0
    io = capsys.readouterr()
    assert "wrote" in io.out and "skipped none" in io.err
    doc = json.loads(out.read_text())
    assert load_corpus(out).sample("add").target_char_positions == (0, 4, 8, 11)
    doc["python_doctest"][0]["marker_char_pos"] += 3
    doc["python_doctest"][0]["target_char_positions"][1] = 6
    off = tmp_path / "off.json"
    off.write_text(json.dumps(doc))
    before = off.read_bytes()
    assert _run(["corpus", "verify", "--corpus", str(off)]) == 2
    assert "verify --fix` repairs positions" in capsys.readouterr().err
    assert _run(["corpus", "verify", "--corpus", str(off), "--fix"]) == 0
    text = capsys.readouterr().out
    assert "fixed sample 'add': marker_char_pos" in text and "target_char_positions[1] 6 → 4" in text
    assert off.read_bytes() == before  # never overwritten
    fixed = tmp_path / "off.fixed.json"
    assert load_corpus(fixed).sample("add").marker_char_pos == load_corpus(out).sample("add").marker_char_pos
    doc["python_doctest"][0]["marker_char_pos"] += 30
    off.write_text(json.dumps(doc))
    fixed.unlink()
    assert _run(["corpus", "verify", "--corpus", str(off), "--fix"]) == 2
    assert "nothing written" in capsys.readouterr().err and not fixed.exists()
    assert _run(["corpus", "show", "py_simple_add"]) == 0
    shown = capsys.readouterr().out
    assert "marker" in shown and "target 3" in shown and "' >>>'" in shown
    assert _run(["corpus", "show", "nope"]) == 2
    assert "no sample with id 'nope'" in capsys.readouterr().err
