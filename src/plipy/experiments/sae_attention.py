"""SAE steering and its effect on attention: the "Do I know this entity?" analysis on any HF decoder.

Per prompt: one original forward and one steered forward per latent (`coeff × W_dec[latent]` added to the input of
the latent's layer at the steered positions), each capturing the last position's attention row and the value
states of every layer. From them, per layer and head, the four measures of `plipy.sae.measures` (attention from the
last position to the steered positions). Results are [N, layers, heads]; per head and label the top latent's
difference (steered − original) is tested against random latents'.

A unit is one prompt's arrays (original and every latent's steered measures); the prompts run in consecutive
batches of `batch_size` (default 16). The SAE's weights travel to Ray workers with the experiment (data); the
model's never do (each worker loads its spec).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from plipy.corpus.prompts import EntityPrompt
from plipy.engine import Engine
from plipy.engine.arch import head_output_weights
from plipy.errors import ParameterError
from plipy.finite import naming
from plipy.models import LoadedModel
from plipy.results.sae_attention import SaeAttentionResult, difference
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, chunks
from plipy.sae.inputs import Tokenized, tokenize_prompt
from plipy.sae.measures import MEASURES, forward_measures, make_batch
from plipy.sae.model import SAE
from plipy.sae.steering import Steering, needs_residual, steering_adds

EXPECTED = {"known": "decrease", "unknown": "increase"}  # upstream: known prompts get the unknown latent, and v.v.


@dataclass
class SaePlan:
    """What the batches of one analysis depend on: built alike on the driver and on every Ray worker."""

    engine: Engine
    layer: int
    latents: list[int]  # the top latent, then the random ones
    randoms: list[int]
    heads: list[tuple[int, int]]
    steerings: dict[int, Steering]
    w_o: dict[int, torch.Tensor]
    resid_layer: int | None
    pad_id: int
    toks: list[Tokenized]


def default_heads(layer: int, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Every head of the layers from the steering layer on (upstream `all_heads=True`)."""
    return [(la, h) for la in range(layer, n_layers) for h in range(n_heads)]


def pick_random_latents(
    sae: SAE, latent: int, ablate: Sequence[int], n_random: int, candidates: Sequence[int] | None, seed: int
) -> list[int]:
    """`n_random` latents drawn with `random.Random(seed).sample` from the candidates (None: every latent of the
    SAE), the steered and ablated ones excluded."""
    if n_random <= 0:
        return []
    pool = range(sae.d_sae) if candidates is None else candidates
    cands = sorted({int(c) for c in pool} - {latent, *ablate})
    if len(cands) < n_random:
        raise ParameterError("random", f"{n_random} random latents asked for, but only {len(cands)} candidates")
    return random.Random(seed).sample(cands, n_random)


@dataclass
class SaeAttention(Experiment[SaePlan, SaeAttentionResult]):
    """Original vs steered attention measures for every prompt, plus the random-latent baseline. Settings are
    checked by `plipy.sae_attention`; `layer` is the steering layer (resolved), `heads` None = every head of the
    layers from it on."""

    kind = "sae-attention"
    label = "SAE steering"
    default_batch_size = 16

    sae: SAE
    prompts: list[EntityPrompt]
    latent: int
    layer: int
    coeff: float | str = 100.0
    direction: str = "decoder"
    ablate: tuple[int, ...] = ()
    pos_type: str = "entity_last"
    measures: tuple[str, ...] = MEASURES
    ovw_norm: str = "l1"
    heads: list[tuple[int, int]] | None = None
    expect: str = "auto"  # auto (by label, upstream) | increase | decrease | two-sided
    n_random: int = 10
    random_candidates: list[int] | None = None  # None = every other latent of the SAE
    seed: int = 42
    alpha: float = 0.05
    bos: bool = True
    attn_impl: str = "eager"  # idle layers: "eager" = HF eager op for op (TL-like numbers), "sdpa" = faster
    latent_means: dict[int, float] = field(default_factory=dict)

    def config(self, batch_size: int) -> dict[str, Any]:
        """The settings that shape the numbers, as provenance records them (also a pipeline stage's key)."""
        return {
            "latent": self.latent,
            "layer": self.layer,
            "coeff": self.coeff,
            "direction": self.direction,
            "ablate": tuple(self.ablate),
            "pos_type": self.pos_type,
            "measures": tuple(self.measures),
            "ovw_norm": self.ovw_norm,
            "heads": self.heads,
            "expect": self.expect,
            "n_random": self.n_random,
            "random_candidates": self.random_candidates,
            "seed": self.seed,
            "alpha": self.alpha,
            "batch_size": batch_size,
            "bos": self.bos,
            "attn_impl": self.attn_impl,
            "latent_means": dict(self.latent_means),
        }

    def random_latents(self) -> list[int]:
        """The random latents of the baseline (deterministic: the same on every process)."""
        return pick_random_latents(self.sae, self.latent, self.ablate, self.n_random, self.random_candidates, self.seed)

    def plan(self, lm: LoadedModel) -> SaePlan:
        model, tok = lm.model, lm.tokenizer
        n_layers, n_heads = lm.n_layers, lm.n_heads
        randoms = self.random_latents()
        latents = [self.latent, *randoms]
        toks = [tokenize_prompt(p, tok, bos=self.bos, index=i) for i, p in enumerate(self.prompts)]
        w_o = {}
        if {"output_value_weighted", "distance_based"} & set(self.measures):
            w_o = {la: head_output_weights(model, la, n_heads) for la in range(n_layers)}
        steerings = {
            lat: Steering(lat, self.coeff, self.direction, tuple(self.ablate), self.latent_means.get(lat))
            for lat in latents
        }
        heads = self.heads if self.heads is not None else default_heads(self.layer, n_layers, n_heads)
        return SaePlan(
            Engine(model, idle=self.attn_impl),
            self.layer,
            latents,
            randoms,
            list(heads),
            steerings,
            w_o,
            self.layer if any(needs_residual(s) for s in steerings.values()) else None,
            tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0),
            toks,
        )

    def settings(self, lm: LoadedModel, plan: SaePlan, batch_size: int) -> Settings:
        config = {
            **self.config(batch_size),
            "random_latents": plan.randoms,
            "latent_means": {str(k): v for k, v in self.latent_means.items() if k in plan.latents},
        }
        # the SAE is known by its description and its weights' own hash (a random SAE has no file to hash)
        sae = {**self.sae.describe(), "weights_sha256": self.sae.weights_sha256()}
        return Settings(config, seed=self.seed, key={"sae": sae, "prompts": [asdict(p) for p in self.prompts]})

    def work(self, plan: SaePlan, batch_size: int) -> Work:
        return Work(chunks(list(range(len(self.prompts))), batch_size))

    def compute(self, lm: LoadedModel, plan: SaePlan, batch: list[int]) -> list[Unit]:
        arrays = batch_arrays(lm, self, plan, [plan.toks[i] for i in batch], [f"prompt {i}" for i in batch])
        return [(None, {k: v[j] for k, v in arrays.items()}) for j in range(len(batch))]

    def assemble(
        self, lm: LoadedModel, plan: SaePlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> SaeAttentionResult:
        n = len(self.prompts)
        names = list(units[0][1])
        cat = {k: np.stack([units[i][1][k] for i in range(n)]) for k in names}
        arrays = {
            "original": {m: cat[f"original/{m}"] for m in self.measures},
            "steered": {lat: {m: cat[f"steered/{lat}/{m}"] for m in self.measures} for lat in plan.latents},
        }
        result = summarise(arrays, self, plan, lm.n_layers, lm.n_heads)
        result["sae"] = self.sae.describe()
        result["provenance"] = provenance
        return SaeAttentionResult(result, arrays=arrays)


def batch_arrays(
    lm: LoadedModel, exp: SaeAttention, plan: SaePlan, toks: Sequence[Tokenized], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The original and every latent's steered measures of one batch: `{"original/m" | "steered/lat/m": [b, L, H]}`.
    `names` say which prompts a non-finite value came from."""
    batch = make_batch(toks, exp.pos_type, plan.pad_id, lm.device)
    arrays: dict[str, np.ndarray] = {}
    with naming(list(names)):
        orig, resid = forward_measures(
            plan.engine, lm.model, batch, plan.w_o, exp.measures, exp.ovw_norm, resid_layer=plan.resid_layer
        )
    for m, v in orig.items():
        arrays[f"original/{m}"] = v
    for lat in plan.latents:
        with naming([f"{n}, steered by latent {lat}" for n in names]):
            adds = steering_adds(exp.sae, plan.layer, plan.steerings[lat], batch.steer_positions, resid)
            steered = (
                orig
                if not adds
                else forward_measures(plan.engine, lm.model, batch, plan.w_o, exp.measures, exp.ovw_norm, adds)[0]
            )
        for m, v in steered.items():
            arrays[f"steered/{lat}/{m}"] = v
    return arrays


def head_values(values: np.ndarray, heads: Sequence[tuple[int, int]], rows: np.ndarray | None = None) -> np.ndarray:
    """Values of the chosen heads `[N', len(heads)]` (rows = a prompt mask)."""
    v = values if rows is None else values[rows]
    return np.stack([v[:, la, h] for la, h in heads], axis=1)


def _direction(label: str | None, expect: str) -> str:
    if expect != "auto":
        return expect
    return EXPECTED.get(str(label).lower(), "two-sided")


def significance(top: np.ndarray, rand: np.ndarray, direction: str, alpha: float) -> dict[str, Any]:
    """One-tailed Welch test of top vs random latent (upstream `compare_means`): increase → H1 mean(top) >
    mean(random); decrease → H1 mean(random) > mean(top); two-sided otherwise. Effect size: Hedges' g (s1 vs s2)."""
    from plipy import stats

    s1, s2 = (rand, top) if direction == "decrease" else (top, rand)
    alt: Literal["two-sided", "greater"] = "two-sided" if direction == "two-sided" else "greater"
    w = stats.welch(s1, s2, alternative=alt)
    p = w["p"]
    return {
        "t": w["t"],
        "df": w["df"],
        "p": p,
        "significant": bool(p is not None and p < alpha),
        "hedges_g": stats.hedges_g(s1, s2),
        "mean_top": float(np.mean(top)),
        "mean_random": float(np.mean(rand)),
        "std_top": float(np.std(top, ddof=1)) if top.size > 1 else None,
        "std_random": float(np.std(rand, ddof=1)) if rand.size > 1 else None,
    }


def _by_label(
    arrays: dict[str, Any], exp: SaeAttention, plan: SaePlan, m: str, diff: np.ndarray, labels: list[Any]
) -> dict[str, Any]:
    """Per label: the top latent's mean difference and its Welch tests against every random latent."""
    out = {}
    for g in dict.fromkeys(labels):
        rows = np.array([lab == g for lab in labels])
        direction = _direction(g, exp.expect)
        top = head_values(diff, plan.heads, rows).ravel()
        tests = []
        for r in plan.randoms:
            rv = head_values(difference(arrays, r, m), plan.heads, rows).ravel()
            tests.append({"latent": r, **significance(top, rv, direction, exp.alpha)})
        k = sum(t["significant"] for t in tests)
        out[str(g)] = {
            "n_prompts": int(rows.sum()),
            "expected": direction,
            "mean_difference": float(top.mean()),
            "std_difference": float(top.std(ddof=1)) if top.size > 1 else None,
            "random": tests,
            "k_significant": k,
            "K": len(tests),
            "summary": f"top vs random latents: {k} of {len(tests)} significant (Welch, H1: {_phrase(direction)}, "
            f"p < {exp.alpha})"
            if tests
            else "no random latents",
        }
    return out


def summarise(arrays: dict[str, Any], exp: SaeAttention, plan: SaePlan, n_layers: int, n_heads: int) -> dict[str, Any]:
    """Per-head summaries for the top latent and the random-latent significance, per measure and label."""
    labels = [p.label for p in exp.prompts]
    heads = plan.heads
    measures: dict[str, Any] = {}
    for m in exp.measures:
        diff = difference(arrays, exp.latent, m)
        orig, steered = arrays["original"][m], arrays["steered"][exp.latent][m]
        hv = head_values(diff, heads)
        per_head = [
            {
                "head": f"L{la}H{h}",
                "layer": la,
                "head_index": h,
                "mean_original": float(orig[:, la, h].mean()),
                "mean_steered": float(steered[:, la, h].mean()),
                "mean_difference": float(hv[:, i].mean()),
                "std_difference": float(hv[:, i].std()),
            }
            for i, (la, h) in enumerate(heads)
        ]
        measures[m] = {
            "per_head": per_head,
            "mean_difference_layer_head": diff.mean(0).tolist(),  # [layers, heads] for the heatmap
            "by_label": _by_label(arrays, exp, plan, m, diff, labels),
        }
    return {
        "latent": exp.latent,
        "layer": plan.layer,
        "hook": f"blocks.{plan.layer}.hook_resid_pre",
        "random_latents": plan.randoms,
        "heads": [f"L{la}H{h}" for la, h in heads],
        "n_layers": n_layers,
        "n_heads": n_heads,
        "measures": measures,
        "prompts": [
            {**asdict(p), "n_tokens": len(t.input_ids), "entity_tokens": t.entity_tokens}
            for p, t in zip(exp.prompts, plan.toks, strict=True)
        ],
    }


def _phrase(direction: str) -> str:
    return {"increase": "top > random", "decrease": "top < random"}.get(direction, "top ≠ random")
