"""Property-based tests (hypothesis) of the corpus reader and char/byte → token conversion: random unicode code,
random offsets, random tokenizer offset maps (zero-width and overlapping spans included).

Each property is checked against an independent formulation (numpy, Python's own UTF-8 codec, the real tokenizer's
offsets), not against plipy's output. Runs are derandomized so CI sees the same examples every time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plipy.corpus import CorpusError, Sample, byte_to_char, char_to_token, load_corpus, token_positions

SETTINGS = settings(
    derandomize=True, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# any unicode scalar value (no lone surrogates: a JSON file with them is not UTF-8), ASCII weighted in
CODE = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(list("ab >#[]()_\n\t"))), max_size=60)
SPANS = st.lists(st.tuples(st.integers(0, 80), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])), max_size=20)


@SETTINGS
@given(CODE, st.data())
def test_byte_to_char_inverts_utf8_offsets(code, data):
    i = data.draw(st.integers(0, len(code)))
    assert byte_to_char(code, len(code[:i].encode("utf-8"))) == i
    b = data.draw(st.integers(-3, len(code.encode()) + 3))
    c = byte_to_char(code, b)
    starts = {len(code[:k].encode()) for k in range(len(code) + 1)}
    assert (c is not None) == (b in starts)  # None exactly inside a character or out of range


@SETTINGS
@given(SPANS, st.integers(-5, 100))
def test_char_to_token_is_plip_rule(spans, c):
    got, how = char_to_token(spans, c)
    if not spans:
        assert (got, how) == (None, "failed")
        return
    s, e = np.array(spans).T
    covering = np.flatnonzero((s <= c) & (c < e))  # zero-width spans (s == e) never cover
    if covering.size:
        assert (got, how) == (int(covering[0]), "exact")
    else:
        assert (got, how) == (int(np.argmin(np.abs(c - (s + e) // 2))), "fallback")  # argmin: first on ties


class OffsetsTokenizer:
    """A tokenizer that reports a given offset map (the real ones never produce the odd maps this test needs)."""

    is_fast = True
    bos_token_id = 1

    def __init__(self, spans):
        self.spans = spans

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        return {"input_ids": list(range(10, 10 + len(self.spans))), "offset_mapping": list(self.spans)}

    def decode(self, ids, skip_special_tokens=True):
        return f"<{ids[0]}>"


@SETTINGS
@given(CODE.filter(bool), SPANS.filter(bool), st.data(), st.booleans())
def test_token_positions_with_random_offset_maps(code, spans, data, bos):
    marker = data.draw(st.integers(0, len(code) - 1))
    targets = data.draw(st.lists(st.integers(0, len(code) - 1), min_size=1, max_size=5))
    sample = Sample("s", "g", code, marker, code[marker], tuple(targets))
    sp = token_positions(sample, OffsetsTokenizer(spans), bos=bos)
    shift = int(bos)
    assert len(sp.input_ids) == len(spans) + shift
    for c, t, how in zip(
        [marker, *targets], [sp.marker_token, *sp.target_tokens], [sp.marker_match, *sp.target_matches], strict=True
    ):
        assert t is not None and shift <= t < len(spans) + shift  # never the BOS token
        covering = [i for i, (s, e) in enumerate(spans) if s <= c < e]
        assert how == ("exact" if covering else "fallback")
        if covering:
            assert t - shift == covering[0]
    assert sp.after_marker == [t > sp.marker_token for t in sp.target_tokens]


@pytest.fixture(scope="module")
def tok():
    from plipy.models import load_tokenizer

    return load_tokenizer("smollm2-135m")[0]


@SETTINGS
@given(CODE.filter(lambda s: s.strip()), st.data())
def test_real_tokenizer_exact_tokens_cover_their_characters(tok, code, data):
    """With the real byte-level BPE: the ids are the tokenizer's own, and a character any token covers maps to the
    first token that covers it (by the tokenizer's own offsets)."""
    enc = tok(code, add_special_tokens=False, return_offsets_mapping=True)
    spans = [tuple(x) for x in enc["offset_mapping"]]
    marker = data.draw(st.integers(0, len(code) - 1))
    sp = token_positions(Sample("s", "g", code, marker, code[marker], (marker,)), tok)
    assert sp.input_ids == list(enc["input_ids"])
    covered = [s <= marker < e for s, e in spans]
    if any(covered):
        assert sp.marker_match == "exact" and sp.marker_token == covered.index(True)


@SETTINGS
@given(st.lists(CODE.filter(lambda s: len(s) >= 2), min_size=1, max_size=4), st.data())
def test_corpus_reader_chars_and_bytes_agree(tmp_path_factory, codes, data):
    """The same samples written with character offsets and with UTF-8 byte offsets load to the same characters."""
    chars, nbytes = {"_format_version": "2.0", "g": []}, {"_format_version": "2.0", "g": []}
    for k, code in enumerate(codes):
        m = data.draw(st.integers(0, len(code) - 1))
        # a target on the marker's own character is refused at load (its "attention" is the marker's self-attention)
        ts = data.draw(st.lists(st.integers(0, len(code) - 1).filter(lambda t, m=m: t != m), min_size=1, max_size=4))
        pattern = code[m : m + data.draw(st.integers(1, 3))]
        to_b = [len(code[:i].encode()) for i in range(len(code) + 1)]  # Python's own UTF-8 codec
        chars["g"].append(
            {"id": f"s{k}", "code": code, "marker_char_pos": m, "marker_pattern": pattern, "target_char_positions": ts}
        )
        nbytes["g"].append(
            {**chars["g"][-1], "marker_char_pos": to_b[m], "target_char_positions": [to_b[t] for t in ts]}
        )
    d = tmp_path_factory.mktemp("c")
    for name, doc, ensure_ascii in (("c.json", chars, True), ("b.json", nbytes, False)):
        (d / name).write_text(json.dumps(doc, ensure_ascii=ensure_ascii), encoding="utf-8")
    a, b = load_corpus(d / "c.json"), load_corpus(d / "b.json", offsets="bytes")
    for x, y, item in zip(a.groups["g"], b.groups["g"], chars["g"], strict=True):
        assert x == y and x.code == item["code"] and x.marker_char_pos == item["marker_char_pos"]
        assert list(x.target_char_positions) == item["target_char_positions"]


@SETTINGS
@given(CODE.filter(bool), st.integers(-50, 200))
def test_corpus_reader_refuses_positions_outside_the_code(tmp_path_factory, code, pos):
    doc = {
        "g": [
            {"id": "x", "code": code, "marker_char_pos": 0, "marker_pattern": code[0], "target_char_positions": [pos]}
        ]
    }
    d = tmp_path_factory.mktemp("o")
    (d / "c.json").write_text(json.dumps(doc), encoding="utf-8")
    if pos == 0:  # the marker's own character
        with pytest.raises(CorpusError, match="the marker's own position"):
            load_corpus(d / "c.json")
    elif 0 <= pos < len(code):
        assert load_corpus(d / "c.json").groups["g"][0].target_char_positions == (pos,)
    else:
        with pytest.raises(CorpusError, match="outside the code"):
            load_corpus(d / "c.json")
