"""Steered generation: baseline and steered continuations of each prompt by the same decoding call, test-marker
detection in both, and Fisher's exact test across prompts.

The steered edge goes from the token of the last `query_text` of a prompt back to the token of its first
`key_text`; it acts during prefill and the KV cache carries it. A key after its query is refused (PLIP-rs'
generation experiment steered exactly such an edge: a no-op).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plipy.corpus import char_to_token, chat
from plipy.engine import EdgeEdit, Engine
from plipy.engine.batch import pad_left
from plipy.engine.runner import cache_argument, full_cache
from plipy.errors import ParameterError, PlipyError
from plipy.experiments.edge_steering import SteerCausalError
from plipy.finite import naming, require_finite
from plipy.results import GenerateResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, length_batches

if TYPE_CHECKING:
    from plipy.models import LoadedModel

DEFAULT_DETECT = (r"#\[test\]", r"assert_eq!", r"assert!", r"fn test_", r">>>")  # literal markers, as regexes
CHAT_SYSTEM = "You are a Rust programming assistant. Complete the function with idiomatic Rust code."
CHAT_USER = "Complete this Rust function:\n\n{prompt}"

Prompt = dict[str, Any]  # {"id", "category", "prompt"}
Edge = tuple[int, int]  # (query token, key token)


def load_prompts(path: str | Path | None = None) -> tuple[list[Prompt], str]:
    """Prompts `{"prompts": [{"id", "category"?, "prompt"}]}` (or a bare list); None = the bundled file."""
    import json
    from importlib import resources

    if path is None:
        res = resources.files("plipy") / "data" / "steer_prompts.json"
        text, where = res.read_text(encoding="utf-8"), str(res)
    else:
        p = Path(path)
        if not p.is_file():
            raise PlipyError(f"{p}: prompts file not found")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlipyError(f"{where}: invalid JSON at line {e.lineno}: {e.msg}") from None
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise PlipyError(f'{where}: expected {{"prompts": [{{"id", "prompt"}}, …]}}')
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("prompt"), str):
            raise PlipyError(f'{where}: prompt {i} has no "prompt" string')
        out.append({"id": str(it.get("id", i)), "category": it.get("category"), "prompt": it["prompt"]})
    return out, where


def prompt_edge(
    tokenizer: Any, text: str, pid: str, query_text: str, key_text: str, span: tuple[int, int] | None = None
) -> tuple[list[int], Edge | None, str | None]:
    """Token ids of a prompt and its steering edge (query = token of the last `query_text`, key = token of the
    first `key_text`, both searched within `span`: the prompt inside a chat template), or (ids, None, why). A key
    after its query raises SteerCausalError."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    lo, hi = span or (0, len(text))
    qc, kc = text.rfind(query_text, lo, hi), text.find(key_text, lo, hi)
    if qc < 0 or kc < 0:
        missing = query_text if qc < 0 else key_text
        return ids, None, f"prompt {pid!r} does not contain {missing!r}"
    (q, qhow), (k, khow) = char_to_token(offs, qc), char_to_token(offs, kc)
    if q is None or k is None or qhow != "exact" or khow != "exact":  # an exact match always has a token
        return ids, None, f"prompt {pid!r}: no exact token for the query or key text"
    if k > q:
        raise SteerCausalError(
            f"prompt {pid!r}: edge from query token {q} ({text[offs[q][0] : offs[q][1]]!r}) to key token {k} "
            f"({text[offs[k][0] : offs[k][1]]!r}) is causally masked — the key comes after the query, so there is "
            "no attention to steer"
        )
    return ids, (q, k), None


def chat_text(tokenizer: Any, prompt: str) -> chat.ChatText:
    """The prompt in the tokenizer's chat template (`plipy.corpus.chat`), with where it sits in the templated text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ParameterError("chat", "this tokenizer has no chat template")
    return chat.apply(tokenizer, prompt, system=CHAT_SYSTEM, user=CHAT_USER)


def generate_pairs(
    lm: LoadedModel,
    engine: Engine,
    items: Sequence[tuple[list[int], Edge]],
    layers: list[int],
    *,
    scale: float,
    max_tokens: int,
    heads: Sequence[int] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """Baseline and steered continuations of several prompts `(ids, (query, key))`, each pair by the very same
    call (`model.generate` on the left-padded batch, KV cache, same seed): only the steering differs. Greedy
    decoding gives each prompt what it gives alone (up to fp32 rounding of near-ties); sampling draws from one
    generator for the batch, so a prompt's sample depends on the batch it is in (fixed for a given batch size)."""
    from transformers import GenerationConfig

    tok = lm.tokenizer
    sample = temperature > 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gc = GenerationConfig(
        max_new_tokens=max_tokens,
        min_new_tokens=0,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=None if sample else None,
        top_p=None,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    padded = pad_left([ids for ids, _ in items], pad if pad is not None else 0, lm.device)
    width = padded.ids.shape[1]
    edges = [(j, q + p, k + p) for j, ((_, (q, k)), p) in enumerate(zip(items, padded.pads, strict=True))]
    steer = [EdgeEdit(layers=layers, edges=edges, scale=scale, heads=heads)]
    # A cache keeping every position: generate()'s default drops keys beyond a sliding window (Gemma-2/3,
    # StarCoder2), after which the engine cannot tell a key's absolute position (the window is the mask's job).
    cache_arg = cache_argument(lm.model) or "past_key_values"
    outs = []
    for e in ([], steer):
        torch.manual_seed(seed)  # the same draws for both: only the steering differs
        with torch.inference_mode(), engine.run(edits=e):
            out = lm.model.generate(
                padded.ids,
                attention_mask=padded.mask,
                generation_config=gc,
                logits_processor=[FiniteScores()],
                **{cache_arg: full_cache()},
            )
        outs.append([until_eos(out[j, width:].tolist(), tok.eos_token_id) for j in range(len(items))])
    return list(zip(outs[0], outs[1], strict=True))


class FiniteScores:
    """A logits processor refusing NaN/inf next-token logits: greedy decoding would turn them into tokens."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        require_finite(scores, "the next-token logits during generation")
        return scores


def until_eos(ids: list[int], eos: Any) -> list[int]:
    """A continuation cut after its first end-of-sequence token (a batch pads finished items after it)."""
    stops = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def fisher_one_sided(baseline_yes: int, steered_yes: int, n: int) -> float:
    """One-sided Fisher exact p that the steered rate is higher (PLIP-rs: P(X ≥ steered_yes), hypergeometric)."""
    from scipy.stats import fisher_exact

    return float(
        fisher_exact([[steered_yes, n - steered_yes], [baseline_yes, n - baseline_yes]], alternative="greater")[1]
    )


def generate_row(
    tokenizer: Any, p: Prompt, edge: Edge, b_ids: list[int], s_ids: list[int], patterns: list[re.Pattern[str]]
) -> dict[str, Any]:
    """One prompt's baseline and steered continuation, and which test markers each contains."""
    b_txt = tokenizer.decode(b_ids, skip_special_tokens=True)
    s_txt = tokenizer.decode(s_ids, skip_special_tokens=True)
    b_has, s_has = (any(pt.search(t) for pt in patterns) for t in (b_txt, s_txt))
    change = {(False, True): "gained", (True, False): "lost", (True, True): "kept", (False, False): "none"}
    return {
        "id": p["id"],
        "category": p["category"],
        "edge": list(edge),
        "baseline": b_txt,
        "steered": s_txt,
        "baseline_tokens": len(b_ids),
        "steered_tokens": len(s_ids),
        "identical": b_ids == s_ids,
        "baseline_has_test": b_has,
        "steered_has_test": s_has,
        "baseline_matches": [pt.pattern for pt in patterns if pt.search(b_txt)],
        "steered_matches": [pt.pattern for pt in patterns if pt.search(s_txt)],
        "change": change[(b_has, s_has)],
    }


@dataclass
class GeneratePlan:
    """The detection patterns, each steerable prompt with its token ids and edge, and the prompts left out."""

    patterns: list[re.Pattern[str]]
    prepared: list[tuple[Prompt, list[int], Edge]]
    skipped: list[dict[str, Any]]
    engine: Engine


@dataclass
class Generate(Experiment[GeneratePlan, GenerateResult]):
    """Baseline vs steered generation of each prompt (the first `limit`; `source` names where they came from),
    steering the edge last `query_text` → first `key_text` by `scale` on `layers` and `heads` (None = all)."""

    kind = "generate"
    label = "generating"

    prompts: list[Prompt]
    layers: list[int]
    source: str = ""
    scale: float = 3.0
    heads: list[int] | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    chat: bool = False
    detect: Sequence[str] = DEFAULT_DETECT
    query_text: str = "fn "
    key_text: str = "#[test]"
    skip_invalid: bool = False
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: LoadedModel) -> GeneratePlan:
        prompts = self.prompts[: self.limit] if self.limit else self.prompts
        prepared, skipped = [], []
        for p in prompts:
            ct = chat_text(lm.tokenizer, p["prompt"]) if self.chat else None
            text, span = (ct.text, (ct.offset, ct.offset + len(p["prompt"]))) if ct else (p["prompt"], None)
            try:
                ids, edge, why = prompt_edge(lm.tokenizer, text, p["id"], self.query_text, self.key_text, span)
            except SteerCausalError as e:
                if not self.skip_invalid:
                    raise SteerCausalError(f"{e}; --skip-invalid leaves such prompts out") from None
                skipped.append({"id": p["id"], "status": "causal-invalid", "note": str(e)})
                continue
            if edge is None:
                skipped.append({"id": p["id"], "status": "no-edge", "note": why})
                continue
            prepared.append((p, ids, edge))
        if not prepared:
            raise PlipyError("no prompt to steer: " + "; ".join(s["note"] for s in skipped[:3]))
        return GeneratePlan([re.compile(d) for d in self.detect], prepared, skipped, Engine(lm.model))

    def settings(self, lm: LoadedModel, plan: GeneratePlan, batch_size: int) -> Settings:
        config = {
            "command": "steer generate",
            "prompts": self.source,
            "layers": self.layers,
            "scale": self.scale,
            "heads": self.heads,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "chat": self.chat,
            "detect": list(self.detect),
            "query_text": self.query_text,
            "key_text": self.key_text,
            "decoding": "both by model.generate() with KV cache, same GenerationConfig and seed; "
            + ("sampling" if self.temperature > 0 else "greedy"),
            "batch_size": batch_size,
            **self.extra,
        }
        texts = [(p["id"], p["prompt"]) for p, _, _ in plan.prepared]
        return Settings(config, seed=self.seed, key={"prompt_texts": texts})

    def work(self, plan: GeneratePlan, batch_size: int) -> Work:
        lengths = [len(ids) for _, ids, _ in plan.prepared]
        return Work(length_batches(list(range(len(plan.prepared))), lengths, batch_size))

    def compute(self, lm: LoadedModel, plan: GeneratePlan, batch: list[int]) -> list[Unit]:
        items = [(plan.prepared[i][1], plan.prepared[i][2]) for i in batch]
        with naming([f"prompt {plan.prepared[i][0]['id']!r}" for i in batch]):
            pairs = generate_pairs(
                lm,
                plan.engine,
                items,
                self.layers,
                scale=self.scale,
                max_tokens=self.max_tokens,
                heads=self.heads,
                temperature=self.temperature,
                seed=self.seed,
            )
        return [
            (generate_row(lm.tokenizer, plan.prepared[i][0], plan.prepared[i][2], b, s, plan.patterns), {})
            for i, (b, s) in zip(batch, pairs, strict=True)
        ]

    def assemble(
        self, lm: LoadedModel, plan: GeneratePlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> GenerateResult:
        rows = [units[i][0] for i in range(len(plan.prepared))]  # prompt order, whatever the batches
        n = len(rows)
        by = sum(r["baseline_has_test"] for r in rows)
        sy = sum(r["steered_has_test"] for r in rows)
        cats: dict[str, dict[str, int]] = {}
        for r in rows:
            c = cats.setdefault(str(r["category"]), {"total": 0, "baseline_preserved": 0, "steered_preserved": 0})
            c["total"] += 1
            c["baseline_preserved"] += r["baseline_has_test"]
            c["steered_preserved"] += r["steered_has_test"]
        summary = {
            "total": n,
            "baseline_preserved": by,
            "steered_preserved": sy,
            "improvement": sy - by,
            "baseline_rate": by / n,
            "steered_rate": sy / n,
            "gained": sum(r["change"] == "gained" for r in rows),
            "lost": sum(r["change"] == "lost" for r in rows),
            "identical": sum(r["identical"] for r in rows),
            "fisher_exact_p": fisher_one_sided(by, sy, n),
        }
        return GenerateResult(
            {
                "provenance": provenance,
                "samples": rows,
                "skipped": plan.skipped,
                "summary": summary,
                "by_category": cats,
            }
        )
