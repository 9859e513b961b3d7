"""QK attribution: why a query attends to a key — its pre-softmax score split into query-side × key-side components.

Units are inputs: corpus samples (query = the marker token, keys = its targets before it, duplicates kept, as the
scan measures them) or entity prompts (query = the last token, keys = the entity's tokens). One forward per input
captures, at those rows only, the residual entering the layer and every earlier component's output
(`plipy.engine.qk.capture`); the decomposition is float64 maths on the captured rows (`plipy.engine.qk`). Per input
and head the matrix is the mean over its keys of each key's matrix: it sums to the mean over keys of the score (the
pre-softcap score on Gemma-2), as the scan averages attention over targets.

Components are the residual stream's parts (the embedding, each earlier layer's attention output — per head with
`per_head_components` — and MLP output, a steering vector, the model's own rounding) or, with an SAE reading the
residual entering the layer, its active latents (activation × decoder row), its decoder bias and its reconstruction
error; bias terms of the norm, the projections and the q/k norms are components of their own side. With an
intervention (SAE steering, or a knockout of query → key edges in earlier layers) every input runs twice and the
difference (intervened − original) is decomposed pair by pair.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plipy import stats
from plipy.corpus import Corpus, SamplePositions, token_positions
from plipy.corpus.prompts import EntityPrompt
from plipy.engine import EdgeEdit, ResidualAdd
from plipy.engine import qk as eq
from plipy.engine.arch import adapter
from plipy.errors import PlipyError
from plipy.experiments.knockout import condition_edits
from plipy.experiments.samples import after_marker, identity
from plipy.results.qk import COLUMNS, QkResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work
from plipy.sae.inputs import positions_for, tokenize_prompt
from plipy.sae.model import SAE
from plipy.sae.steering import Steering, steering_adds

STEER_POS_CORPUS = ("targets", "marker", "all")  # steered positions of a corpus sample (prompts: POS_TYPES)
MATRIX_SIZE = 24  # components per side in each heatmap of the document (the table holds them all)
SAE_BIAS, SAE_ERROR = "sae_bias", "sae_error"


# -- inputs ----------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One input: its record in the result, its tokens, the query row, the key rows and the steered rows."""

    record: dict[str, Any]
    input_ids: list[int]
    query: int | None
    keys: list[int]
    steer_at: list[int]

    @property
    def measurable(self) -> bool:
        return self.query is not None and bool(self.keys)


def corpus_item(sp: SamplePositions, steer_pos: str) -> Item:
    """A corpus sample: query = the marker, keys = the targets before it (duplicates kept, as the scan)."""
    keys = [t for t, after in zip(sp.target_tokens, sp.after_marker, strict=True) if t is not None and not after]
    rec = {**identity(sp), "targets_after_marker": after_marker(sp), "conversion": sp.conversion}
    m = sp.marker_token
    if sp.status == "failed" or m is None:
        rec["status"], rec["note"] = "failed", "marker or a target has no token"
    elif not keys:
        rec["status"], rec["note"] = "no-valid-targets", "no target before the marker: nothing to attend to"
    else:
        rec["status"] = "ok" if not any(sp.after_marker) else "partial-targets"
    rec["query_token"], rec["key_tokens"] = m, keys
    steer = {"targets": sorted(set(keys)), "marker": [] if m is None else [m], "all": list(range(sp.seq_len))}
    return Item(rec, list(sp.input_ids), m if keys else None, keys, steer[steer_pos])


def prompt_item(i: int, p: EntityPrompt, tokenizer: Any, bos: bool, steer_pos: str) -> Item:
    """An entity prompt: query = the last token, keys = the entity's tokens."""
    tok = tokenize_prompt(p, tokenizer, bos=bos, index=i)
    n = len(tok.input_ids)
    rec = {
        "id": f"p{i}",
        "group": "all" if p.label is None else str(p.label),
        "prompt": p.prompt,
        "entity": p.entity,
        "entity_type": p.entity_type,
        "label": p.label,
        "n_tokens": n,
        "query_token": n - 1,
        "key_tokens": tok.entity_tokens,
        "status": "ok",
    }
    return Item(rec, tok.input_ids, n - 1, tok.entity_tokens, positions_for(tok.entity_tokens, n, steer_pos))


# -- interventions ---------------------------------------------------------------------------------------------------


@dataclass
class SteerSpec:
    """Add `coeff` × the decoder row of `latent` of `sae` at the input of `layer`, at the item's steered rows."""

    sae: SAE
    latent: int
    coeff: float
    pos: str
    layer: int

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "steer",
            "sae": self.sae.describe(),
            "latent": self.latent,
            "coeff": self.coeff,
            "positions": self.pos,
            "layer": self.layer,
        }


@dataclass
class KnockoutSpec:
    """Remove the query → key edges in `layers` (all before the decomposed layer), in `heads` (None: every head)."""

    layers: list[int]
    heads: list[int] | None

    def describe(self) -> dict[str, Any]:
        return {"kind": "knockout", "layers": self.layers, "heads": self.heads, "edges": "query-to-keys"}


def knockout_edits(spec: KnockoutSpec, item: Item, windows: Sequence[int | None]) -> list[EdgeEdit]:
    """The item's query → key edges in the spec's layers, built as knockout builds them (`condition_edits`: edges a
    sliding window already masks are dropped)."""
    assert item.query is not None
    edges = [(item.query, k) for k in sorted(set(item.keys))]
    return condition_edits(edges, spec.layers, spec.heads, list(windows))


# -- the decomposition of one input ----------------------------------------------------------------------------------

_LAYER = re.compile(r"L(\d+)(?:H(\d+)|\.(attn|attn_bias|attn_norm_bias|mlp))$")
_SUB = {None: 0, "attn": 0, "attn_bias": 1, "attn_norm_bias": 2, "mlp": 3}
_FIXED = [eq.STEER, SAE_BIAS, SAE_ERROR, eq.ROUNDING, "norm_bias", "q_bias", "k_bias", "q_norm_bias", "k_norm_bias"]


def order_key(name: str) -> tuple[int, ...]:
    """Components in model order: the embedding, layer by layer (heads, bias, norm bias, MLP), the steering vector,
    SAE latents by index, then the bias and rounding terms."""
    if name == eq.EMBED:
        return (0,)
    m = _LAYER.match(name)
    if m:
        return (1, int(m.group(1)), _SUB[m.group(3)], int(m.group(2) or 0))
    if name.startswith("F") and name[1:].isdigit():
        return (3, int(name[1:]))
    return (2,) if name == eq.STEER else (4, _FIXED.index(name) if name in _FIXED else len(_FIXED))


def sae_parts(sae: SAE, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The residual `x [D]` as SAE components: active latents (activation × decoder row), the decoder bias and the
    reconstruction error (x minus both), float64; they sum to x."""
    acts = sae.encode(x.to(sae.W_enc.dtype)[None])[0].detach().double().cpu()
    idx = torch.nonzero(acts).flatten()
    feats = acts[idx, None] * sae.W_dec[idx].detach().double().cpu()
    bias = sae.b_dec.detach().double().cpu()
    error = x - feats.sum(0) - bias
    return [f"F{int(i)}" for i in idx], torch.cat([feats, bias[None], error[None]])


@dataclass
class Decomposed:
    """One input's decomposition in one run: component names per side and the mean-over-keys matrix per head."""

    q_names: list[str]
    k_names: list[str]
    terms: np.ndarray  # [heads, A, B] float64
    value: dict[str, Any]


def _side(qmap: eq.QkMap, cap: eq.QkCapture, pos: int, side: str, sae: SAE | None) -> tuple[list[str], torch.Tensor]:
    i = cap.row(pos)
    if sae is None:
        names, parts = cap.names, cap.components[:, i]
    else:
        feats, parts = sae_parts(sae, cap.resid[i])
        names = [*feats, SAE_BIAS, SAE_ERROR]
    rope = None if cap.rope is None else (cap.rope[0][i], cap.rope[1][i])
    return eq.project(qmap, side, names, parts, cap.resid[i], rope)


def decompose(qmap: eq.QkMap, cap: eq.QkCapture, item: Item, heads: list[int], sae: SAE | None) -> Decomposed:
    """The score of `item`'s query to each of its keys, split and averaged over the keys the model lets it see."""
    assert item.query is not None
    q_names, q_parts = _side(qmap, cap, item.query, "q", sae)
    observed = cap.scores[:, cap.row(item.query)].double()  # [heads, keys]
    keys = [k for k in item.keys if bool(torch.isfinite(observed[:, k]).all())]
    masked = sorted({k for k in item.keys if k not in keys})
    if not keys:
        raise PlipyError(
            f"{item.record['id']}: every key lies outside layer {qmap.layer}'s sliding window as seen from the query: "
            "decompose a full-attention layer (layer=…), or leave this input out (groups=…)"
        )
    per_key: dict[int, tuple[list[str], torch.Tensor]] = {}
    for k in dict.fromkeys(keys):
        names, parts = _side(qmap, cap, k, "k", sae)
        per_key[k] = (names, eq.terms(qmap, q_parts, parts, heads))
    k_names = sorted({n for names, _ in per_key.values() for n in names}, key=order_key)
    col = {n: j for j, n in enumerate(k_names)}
    mean = torch.zeros(len(heads), len(q_names), len(k_names), dtype=torch.float64)
    for k in keys:  # duplicates count as often as they are listed
        names, t = per_key[k]
        mean[:, :, [col[n] for n in names]] += t
    mean /= len(keys)
    raw = torch.stack([per_key[k][1].sum((1, 2)) for k in keys], 1)  # [heads, keys]
    obs = observed[heads][:, keys]
    err = (eq.softcap(qmap, raw) - obs).abs().max().item()
    value = {
        "keys": keys,
        "masked_keys": masked,
        "score": obs.mean(1).tolist(),
        "raw_score": raw.mean(1).tolist(),
        "per_key": {"observed": obs.tolist(), "raw": raw.tolist()},
        "max_abs_error": err,
    }
    if sae is None:  # the model's own rounding, as a fraction of the residual (both rows)
        rows = [cap.row(p) for p in {item.query, *keys}]
        ratio = cap.components[-1][rows].norm(dim=-1) / cap.resid[rows].norm(dim=-1).clamp_min(1e-300)
        value["rounding_ratio"] = float(ratio.max())
    return Decomposed(q_names, k_names, mean.numpy(), value)


# -- the experiment --------------------------------------------------------------------------------------------------


@dataclass
class QkPlan:
    """Everything the units depend on, computed alike on the driver and on every Ray worker."""

    items: list[Item]
    qmap: eq.QkMap
    heads: list[int]
    groups: list[str]
    windows: list[int | None]


def _choose_groups(found: list[str], groups: Sequence[str] | None) -> list[str]:
    if not groups:
        from plipy.experiments.samples import DEFAULT_GROUPS

        return list(DEFAULT_GROUPS) if all(g in found for g in DEFAULT_GROUPS) else found
    unknown = [g for g in groups if g not in found]
    if unknown:
        raise PlipyError(f"unknown group(s) {', '.join(unknown)}; the inputs have: {', '.join(found)}")
    return list(groups)


def select_groups(corpus: Corpus | None, prompts: Sequence[EntityPrompt] | None, groups: Sequence[str] | None):
    """The groups a run decomposes: the corpus' groups (default PLIP's two when present, else all) or the prompts'
    labels (`all` for unlabelled prompts); refused before any model loads when a named group does not exist."""
    if corpus is not None:
        return _choose_groups(list(corpus.group_names), groups)
    labels = list(dict.fromkeys("all" if p.label is None else str(p.label) for p in prompts or []))
    return _choose_groups(labels, groups)


def _sae_key(sae: SAE | None) -> str | None:
    """A content hash of an SAE (its file's when it has one) for the checkpoint key."""
    if sae is None:
        return None
    if sae.sha256:
        return sae.sha256
    h = hashlib.sha256()
    for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.threshold):
        if t is not None:
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Qk(Experiment[QkPlan, QkResult]):
    """Split the score of each input's query to its keys at `layer` into query-side × key-side contributions.
    `heads` None = every head; `steer` / `knockout`: decompose an intervened run too, and the difference."""

    kind = "qk"
    label = "decomposing scores"
    default_batch_size = 1  # one input per forward: each keeps only its own rows

    layer: int
    corpus: Corpus | None = None
    prompts: list[EntityPrompt] | None = None
    groups: Sequence[str] | None = None
    heads: Sequence[int] | None = None
    per_head_components: bool = False
    sae: SAE | None = None
    steer: SteerSpec | None = None
    knockout: KnockoutSpec | None = None
    bos: bool = False
    top: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: Any) -> QkPlan:
        qmap = eq.qk_map(lm.model, self.layer)
        groups = select_groups(self.corpus, self.prompts, self.groups)
        pos = self.steer.pos if self.steer is not None else ("targets" if self.corpus is not None else "entity_last")
        if self.corpus is not None:
            items = [
                corpus_item(token_positions(s, lm.tokenizer, bos=self.bos, max_length=lm.max_positions), pos)
                for s in self.corpus.samples(groups)
            ]
        else:
            items = [
                prompt_item(i, p, lm.tokenizer, self.bos, pos)
                for i, p in enumerate(self.prompts or [])
                if ("all" if p.label is None else str(p.label)) in groups
            ]
        heads = list(self.heads) if self.heads is not None else list(range(lm.n_heads))
        if not any(it.measurable for it in items):
            raise PlipyError(
                "no input has a query and a key to decompose: "
                + "; ".join(sorted({f"{it.record['status']} ({it.record.get('note', '')})" for it in items}))
            )
        return QkPlan(items, qmap, heads, groups, adapter(lm.model).windows())

    def settings(self, lm: Any, plan: QkPlan, batch_size: int) -> Settings:
        config = {
            "layer": self.layer,
            "heads": plan.heads,
            "groups": plan.groups,
            "query": "marker" if self.corpus is not None else "last token",
            "basis": "sae" if self.sae is not None else "components",
            "per_head_components": self.per_head_components,
            "sae": None if self.sae is None else self.sae.describe(),
            "intervention": self.intervention(),
            "bos": self.bos,
            "top": self.top,
            "batch_size": batch_size,
            **self.extra,
        }
        key: dict[str, Any] = {"sae_content": _sae_key(self.sae)}
        if self.steer is not None:
            key["steer_sae_content"] = _sae_key(self.steer.sae)
        if self.prompts is not None:
            text = "\n".join(f"{p.prompt}\t{p.entity}\t{p.label}" for p in self.prompts)
            key["prompts_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        return Settings(config, corpus=self.corpus, key=key)

    def intervention(self) -> dict[str, Any] | None:
        """The intervention in words (None: none)."""
        spec = self.steer or self.knockout
        return None if spec is None else spec.describe()

    def work(self, plan: QkPlan, batch_size: int) -> Work:
        todo = [i for i, it in enumerate(plan.items) if it.measurable]
        return Work([[i] for i in todo], settled=len(plan.items) - len(todo))

    def _run(self, lm: Any, plan: QkPlan, item: Item, intervened: bool) -> Decomposed:
        edits: list[EdgeEdit] = []
        adds: list[ResidualAdd] = []
        if intervened and self.knockout is not None:
            edits = knockout_edits(self.knockout, item, plan.windows)
        if intervened and self.steer is not None:
            s = self.steer
            adds = steering_adds(s.sae, s.layer, Steering(s.latent, s.coeff), [item.steer_at])
        assert item.query is not None
        ids = torch.tensor([item.input_ids], dtype=torch.long, device=lm.device)
        with torch.no_grad():
            cap = eq.capture(
                lm.model,
                ids,
                self.layer,
                [item.query, *item.keys],
                per_head=self.per_head_components,
                edits=edits,
                residual_adds=adds,
            )
        return decompose(plan.qmap, cap, item, plan.heads, self.sae)

    def compute(self, lm: Any, plan: QkPlan, batch: list[int]) -> list[Unit]:
        out: list[Unit] = []
        for i in batch:
            item = plan.items[i]
            runs = [self._run(lm, plan, item, False)]
            if self.intervention() is not None:
                runs.append(self._run(lm, plan, item, True))
            value = {**runs[0].value, "query_components": runs[0].q_names, "key_components": runs[0].k_names}
            arrays = {"terms": runs[0].terms}
            if len(runs) > 1:
                value["intervened"] = {
                    **runs[1].value,
                    "query_components": runs[1].q_names,
                    "key_components": runs[1].k_names,
                }
                arrays["terms_intervened"] = runs[1].terms
            out.append((value, arrays))
        return out

    def assemble(self, lm: Any, plan: QkPlan, units: dict[int, Unit], provenance: dict[str, Any]) -> QkResult:
        samples = []
        for i, item in enumerate(plan.items):
            rec = dict(item.record)
            if i in units:
                value = units[i][0]
                rec.update({k: v for k, v in value.items() if k not in ("query_components", "key_components")})
                if "intervened" in rec:
                    rec["intervened"] = {
                        k: v for k, v in value["intervened"].items() if k not in ("query_components", "key_components")
                    }
            samples.append(rec)
        runs = [Runs.from_units(plan, units, "")]
        if self.intervention() is not None:
            runs.append(Runs.from_units(plan, units, "_intervened"))
        checks = [v for s in samples for v in (s, s.get("intervened")) if v and "max_abs_error" in v]
        result: dict[str, Any] = {
            "provenance": provenance,
            "layer": self.layer,
            "heads": plan.heads,
            "query": "marker" if self.corpus is not None else "last token",
            "keys": "targets before the marker" if self.corpus is not None else "entity tokens",
            "basis": "sae" if self.sae is not None else "components",
            "per_head_components": self.per_head_components,
            "sae": None if self.sae is None else self.sae.describe(),
            "intervention": self.intervention(),
            "linearisation": plan.qmap.describe(),
            "top": self.top,
            "groups": plan.groups,
            "compared": plan.groups[:2] if len(plan.groups) >= 2 else None,
            "check": check(checks, self.sae is None),
            "decomposition": decomposition(plan, runs, self.top),
            "samples": samples,
        }
        return QkResult(result, columns=table_columns(plan, runs))


def check(runs: list[dict[str, Any]], rounding: bool) -> dict[str, Any]:
    """The exactness check over every decomposed input and run: the largest |Σ terms − observed score| (softcap
    applied), the largest |score| beside it, and the model's own rounding as a fraction of the residual."""
    return {
        "max_abs_error": max(r["max_abs_error"] for r in runs),
        "max_abs_score": max(abs(x) for r in runs for row in r["per_key"]["observed"] for x in row),
        "rounding_ratio_max": max(r["rounding_ratio"] for r in runs) if rounding else None,
    }


# -- statistics over inputs ------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """One run's matrices of every computed input, in unit order: ids, groups, names per side, [heads, A, B]."""

    ids: list[str]
    groups: list[str]
    q_names: list[list[str]]
    k_names: list[list[str]]
    terms: list[np.ndarray]
    raw: list[list[float]]  # per input, per head: the mean raw score (what the terms sum to)

    @classmethod
    def from_units(cls, plan: QkPlan, units: dict[int, Unit], suffix: str) -> Runs:
        out = cls([], [], [], [], [], [])
        for i, (value, arrays) in units.items():
            v = value if not suffix else value["intervened"]
            out.ids.append(plan.items[i].record["id"])
            out.groups.append(plan.items[i].record["group"])
            out.q_names.append(v["query_components"])
            out.k_names.append(v["key_components"])
            out.terms.append(arrays[f"terms{suffix}"])
            out.raw.append(v["raw_score"])
        return out


@dataclass
class Pairs:
    """Every input's matrix of one head (or the head mean) on one shared set of (query, key) component pairs."""

    q_vocab: list[str]
    k_vocab: list[str]
    pq: np.ndarray  # [P] query component of each pair (index into q_vocab)
    pk: np.ndarray  # [P] key component
    values: list[np.ndarray]  # per run: [n, P]


def pairs_of(runs: list[Runs], head: int | None) -> Pairs:
    """Align every input of every run on the union of their (query, key) pairs (absent pairs are 0: an inactive SAE
    latent contributes nothing). `head` indexes the run's heads; None is their mean."""
    q_vocab = sorted({n for r in runs for ns in r.q_names for n in ns}, key=order_key)
    k_vocab = sorted({n for r in runs for ns in r.k_names for n in ns}, key=order_key)
    qi, ki = {n: i for i, n in enumerate(q_vocab)}, {n: i for i, n in enumerate(k_vocab)}
    nk = len(k_vocab)
    coded: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for r in runs:
        per = []
        for qn, kn, t in zip(r.q_names, r.k_names, r.terms, strict=True):
            m = t.mean(0) if head is None else t[head]
            codes = (np.array([qi[n] for n in qn])[:, None] * nk + np.array([ki[n] for n in kn])[None, :]).ravel()
            per.append((codes, m.ravel()))
        coded.append(per)
    universe = np.unique(np.concatenate([c for per in coded for c, _ in per]))
    values = []
    for per in coded:
        x = np.zeros((len(per), len(universe)))
        for s, (codes, vals) in enumerate(per):
            x[s, np.searchsorted(universe, codes)] = vals
        values.append(x)
    return Pairs(q_vocab, k_vocab, universe // nk, universe % nk, values)


def _f(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _sides(p: Pairs, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each input's per-side totals: query component a with the whole key side ([n, |q_vocab|]), and vice versa."""
    q = np.stack([np.bincount(p.pq, weights=row, minlength=len(p.q_vocab)) for row in x])
    k = np.stack([np.bincount(p.pk, weights=row, minlength=len(p.k_vocab)) for row in x])
    return q, k


def _rank(x: np.ndarray, mean: np.ndarray, total: float, top: int, label: Any) -> list[dict[str, Any]]:
    """The `top` columns of `x [n, C]` by |mean|, each with its mean, sd, share of `total`, how often an input has
    the mean's sign (`same_sign`) and how often it is among an input's `top` columns by |value| (`in_top`)."""
    n, c = x.shape
    kk = min(top, c)
    thr = -np.partition(-np.abs(x), kk - 1, axis=1)[:, kk - 1 : kk]  # each input's k-th largest |value|
    in_top = (np.abs(x) >= thr) & (np.abs(x) > 0)
    sd = x.std(0, ddof=1) if n > 1 else np.full(c, np.nan)
    out = []
    live = np.abs(x).max(0) > 0  # a column that is 0 in every input (layer 0's rounding) says nothing
    for j in [j for j in np.argsort(-np.abs(mean), kind="stable") if live[j]][:kk]:
        out.append(
            {
                **label(j),
                "mean": _f(mean[j]),
                "sd": _f(sd[j]),
                "share": _f(mean[j] / total) if total else None,
                "same_sign": _f(np.mean(np.sign(x[:, j]) == np.sign(mean[j]))) if mean[j] else None,
                "in_top": _f(in_top[:, j].mean()),
            }
        )
    return out


def _matrix(p: Pairs, mean: np.ndarray) -> dict[str, Any]:
    """The heatmap: the MATRIX_SIZE components per side with the largest absolute mass, in model order."""
    mass_q = np.bincount(p.pq, weights=np.abs(mean), minlength=len(p.q_vocab))
    mass_k = np.bincount(p.pk, weights=np.abs(mean), minlength=len(p.k_vocab))
    qs = np.sort(np.argsort(-mass_q, kind="stable")[:MATRIX_SIZE])
    ks = np.sort(np.argsort(-mass_k, kind="stable")[:MATRIX_SIZE])
    dense = np.zeros((len(p.q_vocab), len(p.k_vocab)))
    dense[p.pq, p.pk] = mean
    sub = dense[np.ix_(qs, ks)]
    return {
        "query": [p.q_vocab[i] for i in qs],
        "key": [p.k_vocab[i] for i in ks],
        "values": sub.tolist(),
        "covered": _f(np.abs(sub).sum() / np.abs(mean).sum()) if np.abs(mean).any() else None,
    }


def block(p: Pairs, x: np.ndarray, totals: np.ndarray, top: int) -> dict[str, Any]:
    """Statistics of one set of inputs' matrices `x [n, P]` whose rows sum to `totals [n]`: the score, the top pairs,
    each side's top components, the heatmap."""
    mean = x.mean(0)
    total = float(totals.mean())
    q, k = _sides(p, x)

    def pair(j: int) -> dict[str, Any]:
        return {"query": p.q_vocab[p.pq[j]], "key": p.k_vocab[p.pk[j]]}

    return {
        "n": int(x.shape[0]),
        "score": {"mean": _f(total), "sd": _f(totals.std(ddof=1)) if len(totals) > 1 else None},
        "pairs": _rank(x, mean, total, top, pair),
        "query_side": _rank(q, q.mean(0), total, top, lambda j: {"component": p.q_vocab[j]}),
        "key_side": _rank(k, k.mean(0), total, top, lambda j: {"component": p.k_vocab[j]}),
        "matrix": _matrix(p, mean),
    }


def _welch(a: np.ndarray, b: np.ndarray) -> dict[str, list[float | None]]:
    """Welch t, p and BH-adjusted p per column of a [n_a, C] vs b [n_b, C] (None without 2 inputs per group)."""
    if len(a) < 2 or len(b) < 2:
        none: list[float | None] = [None] * a.shape[1]
        return {"t": none, "p": none, "p_bh": none}
    w = stats.per_head_welch(a[:, :, None], b[:, :, None])
    return {k: [row[0] for row in w[k]] for k in ("t", "p", "p_bh")}


def contrast(p: Pairs, x: np.ndarray, totals: np.ndarray, in_a: np.ndarray, in_b: np.ndarray, top: int) -> dict:
    """Which pairs (and side components) account for the difference between two groups' mean scores: per pair the
    group means, their difference, its share of the score difference and a Welch test (BH over pairs)."""
    diff_total = float(totals[in_a].mean() - totals[in_b].mean())
    q, k = _sides(p, x)

    def ranked(v: np.ndarray, label: Any) -> list[dict[str, Any]]:
        ma, mb = v[in_a].mean(0), v[in_b].mean(0)
        d = ma - mb
        w = _welch(v[in_a], v[in_b])
        live = np.abs(v).max(0) > 0
        order = [j for j in np.argsort(-np.abs(d), kind="stable") if live[j]][:top]
        return [
            {
                **label(j),
                "mean_a": _f(ma[j]),
                "mean_b": _f(mb[j]),
                "diff": _f(d[j]),
                "share": _f(d[j] / diff_total) if diff_total else None,
                **{key: w[key][j] for key in ("t", "p", "p_bh")},
            }
            for j in order
        ]

    diff_mean = x[in_a].mean(0) - x[in_b].mean(0)
    return {
        "score": {"mean_a": _f(totals[in_a].mean()), "mean_b": _f(totals[in_b].mean()), "diff": _f(diff_total)},
        "pairs": ranked(x, lambda j: {"query": p.q_vocab[p.pq[j]], "key": p.k_vocab[p.pk[j]]}),
        "query_side": ranked(q, lambda j: {"component": p.q_vocab[j]}),
        "key_side": ranked(k, lambda j: {"component": p.k_vocab[j]}),
        "matrix": _matrix(p, diff_mean),
    }


def _head_entry(plan: QkPlan, runs: list[Runs], head: int | None, top: int) -> dict[str, Any]:
    p = pairs_of(runs, head)
    groups = np.array(runs[0].groups)
    totals = [np.array([np.mean(r) if head is None else r[head] for r in run.raw]) for run in runs]
    present = [g for g in plan.groups if (groups == g).any()]
    entry: dict[str, Any] = {
        "groups": {g: block(p, p.values[0][groups == g], totals[0][groups == g], top) for g in present},
        "contrast": None,
        "intervention": None,
    }
    if len(present) >= 2:
        entry["contrast"] = contrast(p, p.values[0], totals[0], groups == present[0], groups == present[1], top)
    if len(runs) > 1:
        d, dt = p.values[1] - p.values[0], totals[1] - totals[0]
        entry["intervention"] = {g: block(p, d[groups == g], dt[groups == g], top) for g in present}
    return entry


def decomposition(plan: QkPlan, runs: list[Runs], top: int) -> dict[str, Any]:
    """Per head (`H3`, …, and `mean` over several heads) the statistics over inputs."""
    out = {f"H{h}": _head_entry(plan, runs, i, top) for i, h in enumerate(plan.heads)}
    if len(plan.heads) > 1:
        out["mean"] = _head_entry(plan, runs, None, top)
    return out


def table_columns(plan: QkPlan, runs: list[Runs]) -> dict[str, np.ndarray]:
    """The long table: one row per (input, head, query component, key component), every component of either run
    (0 where a run lacks it), with the intervened contribution and the difference when there is an intervention."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    if len(runs) > 1:
        parts["intervened"], parts["difference"] = [], []
    first = runs[0]
    for s, sid in enumerate(first.ids):
        qn = sorted({n for r in runs for n in r.q_names[s]}, key=order_key)
        kn = sorted({n for r in runs for n in r.k_names[s]}, key=order_key)
        dense = []
        for r in runs:
            m = np.zeros((len(plan.heads), len(qn), len(kn)))
            m[
                np.ix_(range(len(plan.heads)), [qn.index(n) for n in r.q_names[s]], [kn.index(n) for n in r.k_names[s]])
            ] = r.terms[s]
            dense.append(m)
        size = len(plan.heads) * len(qn) * len(kn)
        parts["sample"].append(np.full(size, sid, dtype=object))
        parts["group"].append(np.full(size, first.groups[s], dtype=object))
        parts["head"].append(np.repeat(np.array(plan.heads, dtype=np.int64), len(qn) * len(kn)))
        parts["query_component"].append(np.tile(np.repeat(np.array(qn, dtype=object), len(kn)), len(plan.heads)))
        parts["key_component"].append(np.tile(np.array(kn, dtype=object), len(plan.heads) * len(qn)))
        parts["contribution"].append(dense[0].ravel())
        if len(runs) > 1:
            parts["intervened"].append(dense[1].ravel())
            parts["difference"].append(dense[1].ravel() - dense[0].ravel())
    return {
        k: np.concatenate(v) if v else np.array([], dtype=object if k in COLUMNS[:2] + COLUMNS[3:5] else float)
        for k, v in parts.items()
    }
