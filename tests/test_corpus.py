"""Corpus loading/validation and PLIP-rs char -> token conversion, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import alias_gguf
from plipy.corpus import (
    CorpusError,
    Sample,
    char_to_token,
    corpus_positions,
    default_corpus_path,
    load_corpus,
    token_positions,
    valid_targets,
)
from plipy.errors import PlipyError
from plipy.io import sha256_file

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer (byte-level BPE, fast), straight from its GGUF (no model loaded)."""
    path, why = alias_gguf("smollm2-135m")
    if path is None:
        pytest.skip(why)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def positions(corpus, tok):
    return {sp.sample.id: sp for sp in corpus_positions(corpus, tok)}


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def good_sample(**over) -> dict:
    s = {
        "id": "s1",
        "code": 'def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return a + b',
        "marker_char_pos": 27,
        "marker_pattern": ">>>",
        "target_char_positions": [0, 4, 8, 11],
    }
    s.update(over)
    return s


# ---------------------------------------------------------------------------------------------------------------
# The bundled corpus


def test_bundled_corpus_loads(corpus):
    assert corpus.group_names == ["python_doctest", "rust_test", "python_baseline", "rust_baseline"]
    assert [len(corpus.groups[g]) for g in corpus.group_names] == [10, 10, 5, 5]
    assert corpus.format_version == "2.0"
    assert corpus.description
    assert len(corpus.sha256) == 64 and corpus.sha256 == sha256_file(corpus.path)
    assert corpus.path == default_corpus_path() and corpus.path.name == "attention_samples_universal.json"
    assert (corpus.path.parent / "LICENSE-plip-rs-Apache-2.0.txt").is_file()
    assert len(corpus.samples()) == 30
    assert all(s.code[s.marker_char_pos :].startswith(s.marker_pattern) for s in corpus.samples())
    first = corpus.groups["python_doctest"][0]
    assert (first.id, first.group, first.marker_char_pos, first.target_char_positions) == (
        "py_simple_add",
        "python_doctest",
        27,
        (0, 4, 8, 11),
    )


def test_bundled_corpus_is_the_shared_copy(corpus):
    shared = SHARED / "corpus" / "attention_samples_universal.json"
    if not shared.is_file():
        pytest.skip("shared corpus not available")
    assert corpus.sha256 == sha256_file(shared)


def test_samples_groups_and_lookup(corpus):
    picked = corpus.samples(["rust_baseline", "rust_test"])
    assert [s.group for s in picked] == ["rust_baseline"] * 5 + ["rust_test"] * 10
    assert len(corpus.samples("python_baseline")) == 5
    assert corpus.sample("rust_repr_c").group == "rust_baseline"
    with pytest.raises(CorpusError, match="unknown group 'nope'"):
        corpus.samples(["rust_test", "nope"])
    with pytest.raises(CorpusError, match="no sample with id 'zzz'"):
        corpus.sample("zzz")


def test_import_does_not_pull_torch():
    code = "import sys, plipy.corpus; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Conversion with the real tokenizer


def test_every_sample_converts_perfectly(positions):
    assert len(positions) == 30
    bad = {i: sp.conversion for i, sp in positions.items() if sp.conversion != "perfect"}
    assert bad == {}
    for sp in positions.values():
        assert sp.marker_match == "exact" and set(sp.target_matches) == {"exact"}
        assert None not in sp.target_tokens
        assert len(sp.target_tokens) == len(sp.sample.target_char_positions)


def test_test_groups_are_causal_and_start_at_token_0(positions):
    for sp in positions.values():
        if sp.sample.group in ("python_doctest", "rust_test", "python_baseline"):
            assert sp.status == "perfect", sp.sample.id
            assert not any(sp.after_marker)
            assert valid_targets(sp) == sp.target_tokens
        if sp.sample.group in ("python_doctest", "rust_test"):
            assert sp.target_tokens[0] == 0, sp.sample.id


def test_rust_baselines_are_causal_violations(positions):
    base = [sp for sp in positions.values() if sp.sample.group == "rust_baseline"]
    assert len(base) == 5
    for sp in base:
        assert sp.status == "causal-violation" and sp.conversion == "perfect"
        assert sp.marker_token == 0 and all(sp.after_marker)
        assert valid_targets(sp) == []


def test_marker_token_texts(positions):
    for sp in positions.values():
        if sp.sample.marker_pattern == ">>>":
            assert ">>>" in sp.marker_text
        else:
            assert sp.marker_text.strip() == "#"
        assert all(isinstance(t, str) and t for t in sp.target_texts)


def test_known_positions(positions):
    # SmolLM2 positions (regression values, checked by hand against the token listing).
    sp = positions["py_simple_add"]
    assert (sp.marker_token, sp.target_tokens, sp.seq_len) == (10, [0, 1, 3, 5], 28)
    assert sp.target_texts == ["def", " add", "a", " b"] and sp.marker_text == " >>>"
    sp = positions["rust_simple_add"]
    assert (sp.marker_token, sp.target_tokens) == (28, [0, 1, 2])
    sp = positions["rust_cfg_test_module"]  # the inner #[test]: token " #" with its indentation
    assert sp.marker_text == " #" and sp.conversion == "perfect"


def test_brute_force_from_decoded_tokens(corpus, tok, positions):
    # Independent of offsets: for ASCII code, byte-level BPE tokens decode to consecutive slices of the code,
    # so cumulative decoded lengths give each token's span.
    for s in corpus.samples():
        ids = tok(s.code, add_special_tokens=False)["input_ids"]
        pieces = [tok.decode([i]) for i in ids]
        assert "".join(pieces) == s.code
        ends = []
        for p in pieces:
            ends.append((ends[-1] if ends else 0) + len(p))

        def containing(c, ends=ends):
            return next(i for i, e in enumerate(ends) if c < e)

        sp = positions[s.id]
        assert sp.input_ids == ids
        assert sp.marker_token == containing(s.marker_char_pos), s.id
        assert sp.target_tokens == [containing(c) for c in s.target_char_positions], s.id


def test_bos_shifts_by_one(corpus, tok, positions):
    with_bos = corpus_positions(corpus, tok, bos=True)
    assert len(with_bos) == 30
    for sp in with_bos:
        plain = positions[sp.sample.id]
        assert sp.input_ids[0] == tok.bos_token_id and sp.input_ids[1:] == plain.input_ids
        assert sp.offsets[0] == (0, 0) and sp.offsets[1:] == plain.offsets
        assert sp.marker_token == plain.marker_token + 1
        assert sp.target_tokens == [t + 1 for t in plain.target_tokens]
        assert sp.seq_len == plain.seq_len + 1 and sp.bos
        assert (sp.status, sp.marker_text, sp.target_texts) == (plain.status, plain.marker_text, plain.target_texts)


def test_max_length(corpus, tok, positions):
    s = corpus.sample("py_simple_add")
    n = positions["py_simple_add"].seq_len
    assert token_positions(s, tok, max_length=n).seq_len == n
    with pytest.raises(
        CorpusError, match=rf"sample 'py_simple_add' has {n} tokens, longer than the model's context \({n - 1}\)"
    ):
        token_positions(s, tok, max_length=n - 1)
    with pytest.raises(CorpusError, match=rf"has {n + 1} tokens"):
        token_positions(s, tok, bos=True, max_length=n)
    with pytest.raises(CorpusError) as e:
        corpus_positions(corpus, tok, groups=["python_doctest"], max_length=30)
    assert len(e.value.problems) == sum(positions[s.id].seq_len > 30 for s in corpus.groups["python_doctest"]) > 1


def test_duplicated_targets_are_kept(tok):
    s = Sample("dup", "g", "def f(x):\n    '''\n    >>> f(1)\n    '''", 22, ">>>", (4, 0, 4))
    sp = token_positions(s, tok)
    assert sp.target_tokens == [1, 0, 1] and valid_targets(sp) == [1, 0, 1]


# ---------------------------------------------------------------------------------------------------------------
# The rule itself, on hand-written offsets


def test_char_to_token_rule():
    offs = [(0, 3), (3, 3), (4, 7), (7, 8)]
    assert char_to_token(offs, 0) == (0, "exact")
    assert char_to_token(offs, 5) == (2, "exact")
    # No token covers char 3 (a zero-width token never matches exactly); nearest midpoint: (3+3)//2 = 3, token 1.
    assert char_to_token(offs, 3) == (1, "fallback")
    assert char_to_token([(0, 0), (0, 2)], 0) == (1, "exact")  # zero-width token skipped
    assert char_to_token([(0, 4), (2, 6)], 3) == (0, "exact")  # overlap: first wins
    assert char_to_token([(0, 2), (4, 6)], 3) == (0, "fallback")  # midpoints 1 and 5: tie -> first
    assert char_to_token([(0, 3), (5, 8)], 4) == (1, "fallback")  # midpoints 1 and 6: 6 is closer
    assert char_to_token([(0, 2), (5, 7)], 20) == (1, "fallback")  # past the end: last token
    assert char_to_token([], 0) == (None, "failed")


class FakeTok:
    """A minimal fast tokenizer with hand-written offsets (e.g. trimmed ones that skip whitespace)."""

    is_fast = True

    def __init__(self, text: str, offsets: list[tuple[int, int]], bos_token_id: int | None = 7):
        self.text, self.offs, self.bos_token_id = text, offsets, bos_token_id

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        assert text == self.text and add_special_tokens is False and return_offsets_mapping
        return {"input_ids": [100 + i for i in range(len(self.offs))], "offset_mapping": list(self.offs)}

    def decode(self, ids, skip_special_tokens=True):
        s, e = self.offs[ids[0] - 100]
        return self.text[s:e]


def test_fallback_status_with_trimmed_offsets():
    code = "ab  >>> x"
    # Offsets that exclude the spaces (trim_offsets): char 2 is covered by no token.
    t = FakeTok(code, [(0, 2), (4, 7), (8, 9)])
    sp = token_positions(Sample("fb", "g", code, 4, ">>>", (0, 2)), t)
    assert (sp.marker_token, sp.marker_match) == (1, "exact")
    assert sp.target_tokens == [0, 0] and sp.target_matches == ["exact", "fallback"]
    assert sp.conversion == "fallback" and sp.status == "fallback"
    assert valid_targets(sp) == [0, 0] and valid_targets(sp, exact_only=True) == [0]
    # A fallback target after the marker: causality outranks the fallback.
    sp = token_positions(Sample("fb2", "g", code, 4, ">>>", (0, 7)), t)
    assert sp.target_tokens == [0, 2] and sp.after_marker == [False, True]
    assert (sp.conversion, sp.status) == ("fallback", "causal-violation")
    assert valid_targets(sp) == [0]


def test_ok_and_failed_statuses():
    code = "ab >>>"
    t = FakeTok(code, [(0, 1), (1, 4), (4, 6)])  # the marker token "b >" is not the marker
    sp = token_positions(Sample("ok", "g", code, 3, ">>>", (0,)), t)
    assert (sp.marker_token, sp.marker_text, sp.conversion, sp.status) == (1, "b >", "ok", "ok")
    # A target on the marker token itself is its self-attention, not a target: flagged, never a valid target.
    sp = token_positions(Sample("self", "g", code, 3, ">>>", (1, 2)), t)
    assert sp.after_marker == [False, False] and sp.on_marker == [True, True] and valid_targets(sp) == []
    assert sp.status == "target-on-marker" and sp.conversion == "ok"
    empty = FakeTok(code, [])
    sp = token_positions(Sample("none", "g", code, 3, ">>>", (0,)), empty)
    assert (sp.marker_token, sp.marker_match, sp.target_tokens) == (None, "failed", [None])
    assert sp.status == sp.conversion == "failed" and valid_targets(sp) == []


def test_tokenizer_requirements():
    code = "ab >>>"
    s = Sample("x", "g", code, 3, ">>>", (0,))
    slow = FakeTok(code, [(0, 6)])
    slow.is_fast = False
    with pytest.raises(PlipyError, match="fast"):
        token_positions(s, slow)
    with pytest.raises(PlipyError, match="no BOS"):
        token_positions(s, FakeTok(code, [(0, 6)], bos_token_id=None), bos=True)


# ---------------------------------------------------------------------------------------------------------------
# Unicode: char offsets vs UTF-8 byte offsets

UNI_CODE = '# héllo 🙂\ndef f(x):\n    """\n    >>> f(1)\n    """'


def uni_file(path: Path, unit: str) -> Path:
    def pos(c: int) -> int:
        return c if unit == "chars" else len(UNI_CODE[:c].encode())

    d = UNI_CODE.index("def")
    sample = {
        "id": "uni",
        "code": UNI_CODE,
        "marker_char_pos": pos(UNI_CODE.index(">>>")),
        "marker_pattern": ">>>",
        "target_char_positions": [pos(d), pos(d + 4), pos(d + 6)],
    }
    return write(path, {"_format_version": "2.0", "python_doctest": [sample]})


def test_unicode_char_and_byte_offsets(tmp_path, tok):
    chars = load_corpus(uni_file(tmp_path / "chars.json", "chars"))
    byts = load_corpus(uni_file(tmp_path / "bytes.json", "bytes"), offsets="bytes")
    assert byts.offsets == "bytes"
    a, b = chars.sample("uni"), byts.sample("uni")
    assert a == b and a.marker_char_pos == UNI_CODE.index(">>>")
    pa, pb = token_positions(a, tok), token_positions(b, tok)
    assert (pa.marker_token, pa.target_tokens) == (pb.marker_token, pb.target_tokens)
    assert ">>>" in pa.marker_text and pa.target_texts == ["def", " f", "x"]
    assert pa.status == "perfect"


def test_byte_offsets_read_as_chars_suggest_bytes(tmp_path):
    with pytest.raises(CorpusError) as e:
        load_corpus(uni_file(tmp_path / "bytes.json", "bytes"))
    assert "'uni'" in str(e.value) and "pass --offsets bytes" in str(e.value)


def test_char_offsets_read_as_bytes_suggest_chars(tmp_path):
    with pytest.raises(CorpusError) as e:
        load_corpus(uni_file(tmp_path / "chars.json", "chars"), offsets="bytes")
    assert "'uni'" in str(e.value) and "pass --offsets chars" in str(e.value)


def test_byte_offset_inside_a_character(tmp_path):
    bad = {"id": "mid", "code": "é >>>", "marker_char_pos": 3, "marker_pattern": ">>>", "target_char_positions": [1]}
    with pytest.raises(CorpusError, match="'mid'.*inside a multi-byte UTF-8 character"):
        load_corpus(write(tmp_path / "c.json", {"g": [bad]}), offsets="bytes")


def test_bad_offsets_kind():
    with pytest.raises(CorpusError, match="offsets must be"):
        load_corpus(offsets="tokens")


# ---------------------------------------------------------------------------------------------------------------
# Validation: every problem is reported, naming its sample


def load_error(tmp_path: Path, obj) -> CorpusError:
    with pytest.raises(CorpusError) as e:
        load_corpus(write(tmp_path / "c.json", obj))
    return e.value


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found") as e:
        load_corpus(tmp_path / "nope.json")
    assert "nope.json" in str(e.value)


def test_malformed_json(tmp_path):
    e = load_error(tmp_path, '{\n  "g": [\n    {"id": "a",,}\n  ]\n}')
    assert "invalid JSON at line 3 column" in str(e) and str(tmp_path) in str(e)


@pytest.mark.parametrize("obj", [[1, 2], '"text"', "3"])
def test_not_an_object(tmp_path, obj):
    e = load_error(tmp_path, obj if isinstance(obj, str) else json.dumps(obj))
    assert "not an object" in str(e)


def test_no_groups(tmp_path):
    assert "no groups" in str(load_error(tmp_path, {"_format_version": "2.0", "_description": "x"}))
    assert "no samples" in str(load_error(tmp_path, {"a": [], "b": []}))


def test_group_that_is_not_a_list(tmp_path):
    e = load_error(tmp_path, {"python_doctest": {"id": "x"}})
    assert "'python_doctest' is neither a group" in str(e)


def test_missing_fields_and_wrong_types(tmp_path):
    no_pattern = good_sample(id="no_pattern")
    del no_pattern["marker_pattern"]
    no_id = good_sample()
    del no_id["id"]
    e = load_error(
        tmp_path,
        {
            "g": [
                no_pattern,
                no_id,
                good_sample(id="str_pos", marker_char_pos="27"),
                good_sample(id="bool_pos", marker_char_pos=True),
                good_sample(id="float_target", target_char_positions=[0, 4.0]),
                good_sample(id="code_num", code=5),
                "not a sample",
            ]
        },
    )
    p = e.problems
    assert len(p) == 7 and str(e).startswith(f"7 problems in {tmp_path / 'c.json'}: ")
    assert p[0] == "sample 'no_pattern': missing field marker_pattern"
    assert p[1] == "g[1]: missing field id"
    assert "sample 'str_pos'" in p[2] and "marker_char_pos must be an integer" in p[2]
    assert "sample 'bool_pos'" in p[3] and "marker_char_pos must be an integer" in p[3]
    assert "sample 'float_target'" in p[4] and "target_char_positions must be a list of integers" in p[4]
    assert "sample 'code_num'" in p[5] and "code must be a string" in p[5]
    assert p[6].startswith("g[6]: a sample must be an object")


def test_marker_not_at_its_position(tmp_path):
    e = load_error(tmp_path, {"g": [good_sample(id="shifted", marker_char_pos=26)]})
    assert e.problems == ["sample 'shifted': marker_pattern '>>>' is not at marker_char_pos 26 (found ' >>')"]
    assert str(e) == f"{tmp_path / 'c.json'}: {e.problems[0]}"  # one problem: one line
    assert "--offsets" not in str(e)  # ASCII: the other convention would not help


def test_positions_outside_the_code(tmp_path):
    e = load_error(
        tmp_path,
        {
            "g": [
                good_sample(id="neg", target_char_positions=[0, -1]),
                good_sample(id="far", target_char_positions=[0, 999]),
                good_sample(id="marker_far", marker_char_pos=500),
                good_sample(id="at_len", target_char_positions=[71]),
            ]
        },
    )
    assert e.problems == [
        "sample 'neg': target_char_positions[1] -1 is outside the code (71 characters)",
        "sample 'far': target_char_positions[1] 999 is outside the code (71 characters)",
        "sample 'marker_far': marker_char_pos 500 is outside the code (71 characters)",
        "sample 'at_len': target_char_positions[0] 71 is outside the code (71 characters)",
    ]


def test_no_targets(tmp_path):
    e = load_error(tmp_path, {"g": [good_sample(id="empty", target_char_positions=[])]})
    assert e.problems == ["sample 'empty': no targets (target_char_positions is empty)"]


def test_duplicate_ids_across_groups(tmp_path):
    e = load_error(tmp_path, {"a": [good_sample(id="twice")], "b": [good_sample(id="other"), good_sample(id="twice")]})
    assert e.problems == ["sample 'twice': duplicate id (also in group 'a')"]


def test_any_group_names_and_metadata(tmp_path):
    c = load_corpus(
        write(tmp_path / "c.json", {"_notes": {"x": 1}, "mine": [good_sample()], "theirs": [good_sample(id="s2")]})
    )
    assert c.group_names == ["mine", "theirs"] and c.format_version is None and c.description is None
    assert [s.group for s in c.samples()] == ["mine", "theirs"]


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _cli_ready() -> bool:
    import importlib.util

    try:
        import plipy.models as models
    except ImportError:
        return False
    return hasattr(models, "load_tokenizer") and importlib.util.find_spec("plipy.cli.models") is not None


needs_cli = pytest.mark.skipif(not _cli_ready(), reason="plipy.models.load_tokenizer / plipy.cli.models not there yet")


def run_main(args: list[str]) -> int:
    from plipy.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@needs_cli
def test_cli_verify_bundled_corpus(tmp_path, capsys):
    out = tmp_path / "verify.json"
    assert run_main(["corpus", "verify", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "py_simple_add" in stdout and "causally impossible" in stdout
    report = json.loads(out.read_text())
    prov = report["provenance"]
    assert prov["corpus"]["sha256"] == load_corpus().sha256 and prov["corpus"]["format_version"] == "2.0"
    assert prov["bos"] is False and prov["offsets"] == "chars" and prov["plipy_version"] and prov["timestamp"]
    assert prov["command"] and prov["model"]["weights_sha256"]
    assert report["summary"] == {
        "perfect": 25,
        "ok": 0,
        "fallback": 0,
        "causal-violation": 5,
        "failed": 0,
        "too_long": 0,
    }
    assert report["context_length"] == 8192
    assert len(report["samples"]) == 30
    keys = {
        "id",
        "group",
        "marker_token",
        "marker_text",
        "marker_match",
        "target_tokens",
        "target_texts",
        "target_matches",
        "after_marker",
        "status",
        "conversion",
        "n_tokens",
        "too_long",
    }
    assert all(set(s) == keys for s in report["samples"])
    first = report["samples"][0]
    assert (first["id"], first["marker_token"], first["target_tokens"], first["n_tokens"]) == (
        "py_simple_add",
        10,
        [0, 1, 3, 5],
        28,
    )


@needs_cli
def test_cli_verify_flags_a_sample_longer_than_the_context(tmp_path, capsys):
    """scan refuses a sample longer than the model's context; verify says so first (exit 1), not later."""
    base = good_sample()
    long = good_sample(id="long", code=base["code"] + "\n" + "x = 1\n" * 4000)
    path = write(tmp_path / "long.json", {"g": [base, long]})
    out = tmp_path / "v.json"
    assert run_main(["corpus", "verify", "--corpus", str(path), "--out", str(out)]) == 1
    assert "longer than the model's context (8192 tokens): long (" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["summary"]["too_long"] == 1 and [s["too_long"] for s in report["samples"]] == [False, True]
    assert report["samples"][1]["n_tokens"] > 8192


@needs_cli
def test_cli_bad_corpus_exits_2(tmp_path, capsys):
    bad = write(tmp_path / "bad.json", {"g": [good_sample(id="shifted", marker_char_pos=26)]})
    assert run_main(["corpus", "verify", "--corpus", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "shifted" in err


def test_cli_app_with_fake_loader(tmp_path, monkeypatch, tok):
    """The verify command itself, with a stand-in for plipy.models.load_tokenizer (always runs)."""
    import types

    from typer.testing import CliRunner

    import plipy.cli.corpus as cli

    fake = types.ModuleType("plipy.models")
    fake.load_tokenizer = lambda spec="smollm2-135m": (tok, {"spec": spec})
    fake.context_length = lambda spec: None
    monkeypatch.setitem(sys.modules, "plipy.models", fake)
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(cli.app, ["verify", "--groups", "rust_baseline,rust_test", "--bos", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["provenance"]["model"] == {"spec": "smollm2-135m"} and report["provenance"]["bos"] is True
    assert [s["group"] for s in report["samples"]] == ["rust_baseline"] * 5 + ["rust_test"] * 10
    assert report["samples"][0]["marker_token"] == 1 and "!" in res.output
    assert report["provenance"]["config"] == {"groups": ["rust_baseline", "rust_test"]}

    # A sample that fails to convert -> exit code 1 (still reported).
    real = cli.corpus_positions

    def one_failed(*a, **k):
        sps = real(*a, **k)
        sps[0].status = sps[0].conversion = "failed"
        return sps

    monkeypatch.setattr(cli, "corpus_positions", one_failed)
    res = runner.invoke(cli.app, ["verify", "--groups", "rust_test"])
    assert res.exit_code == 1 and "1 failed" in res.output


def test_target_on_the_marker_token_is_flagged_and_never_measured(tok):
    """A target character inside the marker's own token (not the marker's character, which loading refuses) would
    make the scan average the marker's self-attention into "target attention": it is flagged and left out."""
    from plipy.corpus import Sample, token_positions, valid_targets
    from plipy.experiments.edge_steering import steer_sample
    from plipy.experiments.knockout import knockout_edges
    from plipy.experiments.scan import sample_record

    code = "def f(x):\n    return x\n>>> f(2)\n"
    marker = code.index(">>>")
    offs = tok(code, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    (tm,) = [i for i, (a, b) in enumerate(offs) if a <= marker < b]
    assert offs[tm][1] - offs[tm][0] >= 2, "the test needs a marker token of several characters"
    inside = marker + 1  # the marker token's second character
    x = code.index("x")  # `x` in the signature: a real target, before the marker
    sp = token_positions(Sample("s", "g", code, marker, ">>>", (x, inside)), tok)
    assert sp.on_marker == [False, True] and sp.after_marker == [False, False]
    assert sp.status == "target-on-marker" and sp.target_tokens[1] == sp.marker_token == tm
    assert valid_targets(sp) == [sp.target_tokens[0]]
    rec = sample_record(sp)
    assert rec["status"] == "partial-targets" and rec["targets_on_marker"] == [tm]
    edges, status, _ = knockout_edges(sp, "marker-to-targets")
    assert status == "ok" and edges == [(tm, sp.target_tokens[0])]
    assert steer_sample(sp).status == "target-on-marker"
    only = token_positions(Sample("t", "g", code, marker, ">>>", (inside,)), tok)
    assert sample_record(only)["status"] == "no-valid-targets"
    assert knockout_edges(only, "marker-to-targets")[1] == "no-edges"
