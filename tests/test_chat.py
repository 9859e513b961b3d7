"""Chat templates: the text is the tokenizer's own rendering, positions land on the same characters inside it
(SmolLM2-Instruct's real template; a hand-made one on a tiny model), a template that rewrites the prompt is refused,
and `steer generate --chat` finds its edge inside the prompt, not in the template around it."""

from __future__ import annotations

import copy
import json

import pytest

from plipy.corpus import chat, load_corpus, token_positions
from plipy.errors import PlipyError
from plipy.models import load_tokenizer, wrap_model
from tiny_models import build

HAND = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[bot] {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")[0]


def test_smollm_template(tok):
    prompt = "fn add(a: i32, b: i32) -> i32 {\n"
    ct = chat.apply(tok, prompt, system="Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    assert ct.text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert ct.offset == len(head) and ct.text.startswith(head + prompt)
    assert ct.position(3) == len(head) + 3
    with pytest.raises(PlipyError, match="outside the prompt"):
        ct.position(len(prompt) + 1)
    # no system message: SmolLM2's template adds its own default; the prompt still sits after it
    ct2 = chat.apply(tok, prompt, user="Complete:\n\n{prompt}")
    assert "You are a helpful AI assistant named SmolLM" in ct2.text
    assert ct2.text[ct2.offset :].startswith(prompt) and ct2.text[ct2.offset - 11 : ct2.offset] == "Complete:\n\n"


def test_chat_sample_keeps_marker_and_targets(tok):
    corpus = load_corpus()
    templated = chat.chat_corpus(corpus, tok, system="You write code.")
    for s, t in zip(corpus.samples(), templated.samples(), strict=True):
        assert t.code[t.marker_char_pos : t.marker_char_pos + len(s.marker_pattern)] == s.marker_pattern
        assert [t.code[c : c + 3] for c in t.target_char_positions] == [
            s.code[c : c + 3] for c in s.target_char_positions
        ]
    assert templated.sha256 != corpus.sha256 and "plipy.chat" in templated.description
    assert chat.chat_corpus(corpus, tok, system="You write code.").sha256 == templated.sha256
    assert chat.chat_corpus(corpus, tok, system="Other.").sha256 != templated.sha256
    sp = token_positions(templated.sample("py_simple_add"), tok)
    plain = token_positions(corpus.sample("py_simple_add"), tok)
    assert sp.status == plain.status == "perfect" and sp.marker_text == plain.marker_text == " >>>"
    assert sp.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # the template's special tokens are real
    shift = sp.marker_token - plain.marker_token
    assert shift > 0 and [t - shift for t in sp.target_tokens] == plain.target_tokens


def test_hand_made_template(tok):
    ct = chat.apply(tok, "abc", system="S", template=HAND)
    assert ct.text == "[system] S\n[user] abc\n[bot] " and ct.offset == 18
    trimming = HAND.replace("m['content']", "m['content'] | trim")
    with pytest.raises(PlipyError, match="changes the prompt text"):
        chat.apply(tok, "  abc ", template=trimming)
    assert chat.apply(tok, "abc", template=trimming).offset == 7  # nothing to trim: fine
    with pytest.raises(PlipyError, match="exactly once"):
        chat.apply(tok, "abc", template="{{ messages[0]['content'] }}{{ messages[0]['content'] }}")
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(PlipyError, match="has no chat template"):
        chat.apply(no_template, "abc")
    with pytest.raises(PlipyError, match="must contain"):
        chat.apply(tok, "abc", user="no placeholder")


def test_steer_generate_chat_edge_inside_the_prompt(tok, tmp_path):
    """A template that itself mentions `#[test]` and `fn `: the edge must still come from the prompt."""
    import plipy

    t = copy.deepcopy(tok)
    t.chat_template = "Example: #[test] fn x\n" + HAND
    lm = wrap_model(build("llama", "sdpa", vocab_size=len(t), max_position_embeddings=512), t, spec="tiny-llama")
    prompt = "/// #[test]\n/// fn test_add() {}\nfn add(a: i32) -> i32 {\n"
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"prompts": [{"id": "p", "prompt": prompt}]}))
    g = plipy.steer.generate(lm, f, chat=True, layer=1, max_tokens=2, scale=3.0)
    from plipy.experiments.generate import CHAT_SYSTEM, CHAT_USER

    ct = chat.apply(t, prompt, system=CHAT_SYSTEM, user=CHAT_USER)
    enc = t(ct.text, add_special_tokens=False, return_offsets_mapping=True)
    q, k = g["samples"][0]["edge"]
    spans = enc["offset_mapping"]
    key_char, query_char = ct.offset + prompt.index("#[test]"), ct.offset + prompt.rindex("fn ")
    assert ct.text.startswith("Example: #[test] fn x\n") and ct.text.index("#[test]") < ct.offset
    assert spans[k][0] <= key_char < spans[k][1] and spans[q][0] <= query_char < spans[q][1]
    assert g["provenance"]["config"]["chat"] is True


def test_scan_runs_on_a_templated_corpus(tok, tmp_path):
    import plipy
    from conftest import corpus_subset

    corpus = corpus_subset(tmp_path, {"python_doctest": 2, "rust_test": 2})
    templated = chat.chat_corpus(corpus, tok)
    lm = wrap_model(build("llama", "sdpa", vocab_size=len(tok), max_position_embeddings=512), tok, spec="tiny-llama")
    r = plipy.scan(lm, templated, layers="0-1", resamples=10)
    plain = {s.id: plipy.token_positions(s, tok).marker_token for s in corpus.samples()}
    for s in r["samples"]:
        assert s["status"] == "ok" and s["marker_text"].strip() in (">>>", "#") and s["marker_token"] > plain[s["id"]]
    assert r["provenance"]["corpus"]["sha256"] == templated.sha256
