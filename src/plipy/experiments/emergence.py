"""Test-marker emergence (PLIP-rs' `test_emergence`): at which layer does the logit lens of a prompt's last token
first rank a token containing an expected string (`test` after `#[`, `>>>` in a docstring, …) in its top-k?

For each expected string, every vocabulary entry whose decoded text contains it is a match (PLIP-rs:
`token.contains(target)` on the top-k list). Per layer: the best-ranked match over the full vocabulary (its rank,
token and probability) and the total probability of all matches. A string enters the top-k at the first layer
whose best match has rank ≤ k — exactly when some top-k token contains it, as PLIP-rs tested.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from plipy import options as opt
from plipy.engine import Engine
from plipy.errors import PlipyError
from plipy.experiments.lens import decode_token, encode, run_pass
from plipy.finite import naming
from plipy.models import LoadedModel
from plipy.results import EmergenceResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, chunks

DEFAULT_TOP_K = 100  # PLIP-rs' default
BUILTIN = "emergence_prompts.json"
FINAL_TOP = 10


def _problem(where: str, msg: str) -> PlipyError:
    return PlipyError(f"{where}: {msg}")


def check_prompts(items: Any, where: str) -> list[dict[str, Any]]:
    """Prompts `[{id?, language?, prompt, expect: [str, …]}]`, validated (every problem names its prompt)."""
    if not isinstance(items, list) or not items:
        raise _problem(where, 'expected {"prompts": [{"id", "prompt", "expect": [...]}, …]} or a JSON list of them')
    out, seen = [], set()
    for i, it in enumerate(items):
        ref = f"prompt {i}"
        if not isinstance(it, dict):
            raise _problem(where, f"{ref} is not an object")
        pid = str(it.get("id", i))
        ref = f"prompt {pid!r}"
        if pid in seen:
            raise _problem(where, f"{ref}: duplicate id")
        seen.add(pid)
        if not isinstance(it.get("prompt"), str) or not it["prompt"]:
            raise _problem(where, f'{ref} has no "prompt" string')
        exp = it.get("expect")
        if isinstance(exp, str):
            exp = [exp]
        if not isinstance(exp, list) or not exp or not all(isinstance(e, str) and e for e in exp):
            raise _problem(where, f'{ref}: "expect" must be a non-empty list of non-empty strings')
        out.append({"id": pid, "language": it.get("language"), "prompt": it["prompt"], "expect": list(exp)})
    return out


def load_prompts(path: str | Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """Emergence prompts from a JSON file (`{"prompts": [...]}` or a list) or JSON Lines (one prompt per line);
    None = PLIP-rs' built-in set. Returns (prompts, where they came from)."""
    if path is None:
        res = resources.files("plipy") / "data" / BUILTIN
        text, where = res.read_text(encoding="utf-8"), f"built-in:{BUILTIN}"
    else:
        p = Path(path)
        if not p.is_file():
            raise PlipyError(f"{p}: prompts file not found")
        try:
            text, where = p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError as e:
            raise PlipyError(f"{p}: not UTF-8 text ({e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            data = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError:
            raise PlipyError(f"{where}: invalid JSON at line {first.lineno}: {first.msg} (nor JSON Lines)") from None
    if isinstance(data, dict) and "prompts" not in data:
        data = [data]  # a JSON Lines file of one prompt parses as one object
    items = data.get("prompts") if isinstance(data, dict) else data
    return check_prompts(items, where), where


def vocab_texts(tokenizer: Any, n: int) -> list[str]:
    """The decoded text of every vocabulary id below `n` (ids the tokenizer lacks decode to "")."""
    size = min(n, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return list(texts) + [""] * (n - size)


def _expected_record(s: str, matches: list[int]) -> dict[str, Any]:
    return {
        "string": s,
        "n_vocab_matches": len(matches),
        "ranks": [],
        "probs": [],
        "masses": [],
        "best_ids": [],
        "first_layer_in_top_k": None,
        "at_first_layer": None,
    }


def measure_prompt(
    lm: LoadedModel, engine: Engine, item: dict[str, Any], texts: list[str], layers: list[int], top_k: int, bos: bool
) -> dict[str, Any]:
    """One prompt: per expected string and layer, the best-ranked matching token, its probability, the matches'
    total probability; the first layer where a match is in the top-k."""
    ids = encode(lm.tokenizer, item["prompt"], bos)
    with naming(f"prompt {item['id']!r}"):
        lp = run_pass(lm, ids, [len(ids) - 1], engine)
    match_ids = {s: [i for i, t in enumerate(texts) if s in t] for s in item["expect"]}
    expected = [_expected_record(s, m) for s, m in match_ids.items()]
    dev = lp.model_logits.device
    idx = {s: torch.tensor(m, dtype=torch.long, device=dev) for s, m in match_ids.items()}
    for layer, logits in lp.layers(layers):
        row = logits[0]
        probs = torch.softmax(row, -1)
        for rec in expected:
            m = idx[rec["string"]]
            if m.numel() == 0:
                continue
            j = int(row[m].argmax())
            best = int(m[j])
            rank = 1 + int((row > row[best]).sum())
            rec["ranks"].append(rank)
            rec["probs"].append(float(probs[best]))
            rec["masses"].append(float(probs[m].sum()))
            rec["best_ids"].append(best)
            if rec["first_layer_in_top_k"] is None and rank <= top_k:
                rec["first_layer_in_top_k"] = layer
                rec["at_first_layer"] = {
                    "id": best,
                    "token": decode_token(lm.tokenizer, best),
                    "prob": float(probs[best]),
                    "rank": rank,
                }
    for rec in expected:
        if not rec["n_vocab_matches"]:
            rec["note"] = "no vocabulary entry contains this string"
        rec["best_tokens"] = [decode_token(lm.tokenizer, b) for b in rec.pop("best_ids")]
    own = lp.model_logits[0]
    p_own = torch.softmax(own, -1)
    top = own.topk(min(FINAL_TOP, own.numel())).indices.tolist()
    firsts = [r["first_layer_in_top_k"] for r in expected if r["first_layer_in_top_k"] is not None]
    return {
        "id": item["id"],
        "language": item["language"],
        "prompt": item["prompt"],
        "n_tokens": len(ids),
        "expected": expected,
        "earliest_layer": min(firsts) if firsts else None,
        "final_top": [{"id": t, "token": decode_token(lm.tokenizer, t), "prob": float(p_own[t])} for t in top],
        "check": lp.check,
    }


@dataclass
class EmergencePlan:
    """The layers looked at, every vocabulary entry's text (what expected strings are matched against), the engine."""

    layers: list[int]
    texts: list[str]
    engine: Engine


@dataclass
class Emergence(Experiment[EmergencePlan, EmergenceResult]):
    """Every prompt through the lens (`plipy lens emergence`); per expected string, the first layer where a
    matching token is in the top-k. A unit is one prompt, one forward of its own (prompts are never padded into
    one forward: that would change the numbers); `layers` None = every layer; `source` says where the prompts
    came from."""

    kind = "emergence"
    label = "emergence"
    default_batch_size = 1  # prompts per batch of work (each still its own forward)

    prompts: list[dict[str, Any]]
    source: str = ""
    top_k: int = DEFAULT_TOP_K
    layers: Sequence[int] | None = None
    bos: bool = False

    def plan(self, lm: LoadedModel) -> EmergencePlan:
        layers = opt.parse_layers(self.layers, lm.n_layers)
        return EmergencePlan(layers, vocab_texts(lm.tokenizer, lm.vocab_size), Engine(lm.model))

    def settings(self, lm: LoadedModel, plan: EmergencePlan, batch_size: int) -> Settings:
        config = {
            "command": "lens emergence",
            "prompts": self.source,
            "top_k": self.top_k,
            "layers": plan.layers,
            "bos": self.bos,
            "match": "a vocabulary entry whose decoded text contains the expected string",
            "rank": "of the best-ranked match: 1 + entries with a strictly larger float32 logit",
        }
        return Settings(config, key={"prompt_items": self.prompts})

    def work(self, plan: EmergencePlan, batch_size: int) -> Work:
        return Work(chunks(list(range(len(self.prompts))), batch_size))

    def compute(self, lm: LoadedModel, plan: EmergencePlan, batch: list[int]) -> list[Unit]:
        return [
            (measure_prompt(lm, plan.engine, self.prompts[i], plan.texts, plan.layers, self.top_k, self.bos), {})
            for i in batch
        ]

    def assemble(
        self, lm: LoadedModel, plan: EmergencePlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> EmergenceResult:
        rows = [units[i][0] for i in sorted(units)]  # prompt order
        return EmergenceResult(
            {
                "provenance": provenance,
                "top_k": self.top_k,
                "n_layers": lm.n_layers,
                "layers_shown": plan.layers,
                "prompts": rows,
            }
        )
