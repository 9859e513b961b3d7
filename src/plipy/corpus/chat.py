"""Chat templates for instruct models: wrap a prompt (or a corpus sample) in the tokenizer's own chat template and
carry its character positions into the templated text.

PLIP-rs hard-coded the Qwen, Gemma and Phi-3 templates; plipy uses `tokenizer.apply_chat_template`, so any
instruct model's template works. The prompt is located in the templated text by rendering the template once with
a sentinel in its place: everything before the sentinel is the template's prefix, so a character c of the prompt
sits at prefix + c. A template that rewrites the content (trims it, say) is detected and refused, never guessed.

    from plipy.corpus import chat
    ct = chat.apply(tokenizer, "fn add(a: i32) -> i32 {")            # ChatText: .text, .offset
    s = chat.chat_sample(sample, tokenizer)                            # a Sample with shifted positions
    corpus = chat.chat_corpus(plipy.load_corpus(), tokenizer)          # every sample templated
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from plipy.errors import PlipyError

SENTINEL = "\ue000plipy-prompt\ue001"  # private-use characters: no template or prompt contains them


@dataclass(frozen=True)
class ChatText:
    """A templated prompt: the full text, where the prompt starts in it, and the prompt itself."""

    text: str
    offset: int
    prompt: str

    def position(self, c: int) -> int:
        """The templated-text position of character `c` of the prompt."""
        if not 0 <= c <= len(self.prompt):
            raise PlipyError(f"position {c} is outside the prompt ({len(self.prompt)} characters)")
        return self.offset + c


def messages(prompt: str, system: str | None = None, user: str = "{prompt}") -> list[dict[str, str]]:
    """The chat: an optional system message, then the user message `user` with the prompt in it."""
    out = [] if system is None else [{"role": "system", "content": system}]
    return [*out, {"role": "user", "content": user.replace("{prompt}", prompt)}]


def _render(tokenizer: Any, msgs: list[dict[str, str]], template: str | None) -> str:
    try:
        text = tokenizer.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=True,
            **({"chat_template": template} if template is not None else {}),
        )
    except Exception as e:  # noqa: BLE001 — jinja errors, a template that refuses a system role, …
        raise PlipyError(f"the chat template failed: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise PlipyError("the chat template did not render to text")
    return text


def apply(
    tokenizer: Any, prompt: str, *, system: str | None = None, user: str = "{prompt}", template: str | None = None
) -> ChatText:
    """`prompt` inside the tokenizer's chat template (or `template`, a Jinja string), with the generation prompt;
    `user` places it in the user message ("{prompt}" marks where)."""
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise PlipyError(f"{type(tokenizer).__name__} has no chat template (not an instruct model?)")
    if "{prompt}" not in user:
        raise PlipyError("the user message template must contain {prompt}")
    probe = _render(tokenizer, messages(SENTINEL, system, user), template)
    if probe.count(SENTINEL) != 1:
        raise PlipyError("the chat template does not include the user message exactly once")
    offset = probe.index(SENTINEL)
    text = _render(tokenizer, messages(prompt, system, user), template)
    after = probe[offset + len(SENTINEL) :]
    if (
        text[:offset] != probe[:offset]
        or text[offset : offset + len(prompt)] != prompt
        or text[offset + len(prompt) :] != after
    ):
        raise PlipyError(
            "the chat template changes the prompt text (trims or escapes it): its positions cannot be "
            "carried into the templated text"
        )
    return ChatText(text, offset, prompt)


def chat_sample(sample: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """A corpus `Sample` whose code is the templated text and whose marker and targets point at the same
    characters inside it (kwargs as `apply`)."""
    ct = apply(tokenizer, sample.code, **kwargs)
    return replace(
        sample,
        code=ct.text,
        marker_char_pos=ct.position(sample.marker_char_pos),
        target_char_positions=tuple(ct.position(t) for t in sample.target_char_positions),
    )


def chat_corpus(corpus: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """A `Corpus` with every sample templated (`chat_sample`). `path` still names the source file; `sha256` is that
    of the templated samples, so results and resumable runs never mix templated and plain samples."""
    import hashlib
    import json

    groups = {g: [chat_sample(s, tokenizer, **kwargs) for s in samples] for g, samples in corpus.groups.items()}
    content = {
        g: [[s.id, s.code, s.marker_char_pos, s.marker_pattern, list(s.target_char_positions)] for s in ss]
        for g, ss in groups.items()
    }
    sha = hashlib.sha256(("plipy.chat " + corpus.sha256 + json.dumps(content, sort_keys=True)).encode()).hexdigest()
    note = "chat template applied by plipy.chat"
    return replace(
        corpus, groups=groups, sha256=sha, description=f"{corpus.description} ({note})" if corpus.description else note
    )
