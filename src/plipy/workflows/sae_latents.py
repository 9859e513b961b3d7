"""Known / unknown entity latents of an SAE (upstream `feature_analysis*.py`, mech_interp_utils.py:564-753).

For each labelled entity, the prompt `The {entity_type} '{entity}'` is run up to the SAE's layer and the SAE's
latents are read at the entity's last token. Per entity type and latent: activation frequency (act > 1e-6) over
known and over unknown entities, `score_known = f_known − f_unknown`, `score_unknown = f_unknown − f_known`. A latent's
score for a label is the minimum over the entity types (a latent must separate the labels for every type). An
optional filter drops latents that fire on ≥ 2 % of general text tokens (upstream: the Pile; here offline text:
the Python standard library, prose docs included). Random-latent candidates are the latents whose minimum score is
exactly 0, as upstream.

Output: one latent file (upstream layer-file layout, readable by `plipy sae attention --latent-file`) and per label
an upstream `sorted_scores_min_{label}.json`-style `{"L{layer}F{idx}": score}` file (for `--random-candidates`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plipy.errors import PlipyError
from plipy.models import LoadedModel
from plipy.sae.model import SAE, steer_layer

LATENT_TEMPLATE = "The {entity_type} '{entity}'"  # upstream latent-discovery prompt (load_data.py:341-345)
ACTIVE = 1e-6  # upstream: a latent is active when its activation exceeds 1e-6
LABELS = ("known", "unknown")
FORMAT = "plipy-sae-latents/1"


def capture_layer(sae: SAE, layer: int | None = None) -> int:
    """The decoder layer whose output (resid_post) the SAE reads; `layer` is the steering layer if the SAE names no
    hook (resid_post of L − 1 is the input of L)."""
    point = sae.hook_point()
    steer = steer_layer(point) if point is not None else layer
    if steer is None:
        raise PlipyError(f"SAE {sae.source} names no hook: give the steering layer")
    if layer is not None and layer != steer:
        raise PlipyError(f"layer {layer} contradicts SAE {sae.source} (hook {sae.hook_name} steers at {steer})")
    if steer < 1:
        raise PlipyError(f"SAE {sae.source} reads the embeddings (input of layer 0): no decoder layer to capture")
    return steer - 1


def labelled_rows(labels: dict[str, Any], split: str | None = "train") -> list[dict[str, Any]]:
    """Known/unknown entities of a labels document (`split=None`: every split, as upstream scored)."""
    rows = [
        e for e in labels.get("entities", []) if e.get("label") in LABELS and (split is None or e.get("split") == split)
    ]
    if not rows:
        raise PlipyError(f"the labels contain no known/unknown entities in split {split!r}")
    return rows


def last_entity_token(tokenizer: Any, entity: str, entity_type: str, bos: bool = True) -> tuple[list[int], int]:
    """Token ids of the latent-discovery prompt (+ BOS) and the index of the entity's last token (by offsets)."""
    prefix = LATENT_TEMPLATE.split("{entity}")[0].format(entity_type=entity_type)
    text = LATENT_TEMPLATE.format(entity_type=entity_type, entity=entity)
    start, end = len(prefix), len(prefix) + len(entity)  # the entity's own span, not an earlier substring match
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    toks = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    if not entity or not toks:
        raise PlipyError(f"entity {entity!r}: no token of {text!r} covers it")
    shift = 0
    if bos and tokenizer.bos_token_id is not None:
        ids, shift = [tokenizer.bos_token_id, *ids], 1
    return ids, toks[-1] + shift


@torch.inference_mode()
def latent_activations(
    lm: LoadedModel,
    sae: SAE,
    layer: int,
    items: Sequence[tuple[list[int], int]],
    batch_size: int = 32,
    progress: Callable[[str, int], Callable[..., None]] | None = None,
    desc: str = "entity latents",
) -> torch.Tensor:
    """SAE latents `[n, d_sae]` of resid_post of `layer` at one position per sequence (right-padded batches:
    causal attention never looks at the padding after a position, so each row computes what it would alone)."""
    from plipy.workflows.sae_train import resid_post

    tok = lm.tokenizer
    ids_ok = (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
    pad = next((t for t in ids_ok if t is not None), 0)  # any id: right padding is never attended to
    out = []
    step = progress(desc, len(items)) if progress else None
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (seq, _) in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        h = resid_post(lm.model, layer, ids.to(lm.device), mask.to(lm.device))
        rows = h[torch.arange(len(chunk)), torch.tensor([p for _, p in chunk])]
        out.append(sae.encode(rows.float().cpu()))
        if step:
            step(len(chunk))
    return torch.cat(out) if out else torch.zeros((0, sae.d_sae))


def general_frequency(
    lm: LoadedModel,
    sae: SAE,
    layer: int,
    n_tokens: int = 4096,
    seq_len: int = 64,
    seed: int = 1,
    progress: Callable[[str, int], Callable[..., None]] | None = None,
) -> np.ndarray:
    """Per-latent activation frequency on offline general text (standard library sources and prose docs, BOS
    excluded) — plipy's stand-in for upstream's Pile filter."""
    from plipy.workflows.sae_train import collect_activations, text_chunks

    acts = collect_activations(
        lm, layer, text_chunks(lm.tokenizer, seq_len, seed=seed), n_tokens, batch=16, progress=progress
    )
    fired = torch.zeros(sae.d_sae)
    with torch.no_grad():
        for i in range(0, acts.shape[0], 4096):
            fired += (sae.encode(acts[i : i + 4096]) > ACTIVE).float().sum(0)
    return (fired / acts.shape[0]).numpy()


def score_latents(acts: np.ndarray | torch.Tensor, types: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Frequencies and scores per entity type, their minimum over types, and pooled means.

    `acts` `[n, d_sae]`, one row per entity; types with no known or no unknown entity are left out of the minimum
    (named in `skipped_types`)."""
    a = np.asarray(acts, dtype=np.float64)
    types_a, labels_a = np.asarray(types), np.asarray(labels)
    active = a > ACTIVE
    per_type: dict[str, dict[str, Any]] = {}
    skipped = []
    for t in dict.fromkeys(types):
        k = (types_a == t) & (labels_a == "known")
        u = (types_a == t) & (labels_a == "unknown")
        if not k.any() or not u.any():
            skipped.append(t)
            continue
        fk, fu = active[k].mean(0), active[u].mean(0)
        per_type[t] = {
            "n_known": int(k.sum()),
            "n_unknown": int(u.sum()),
            "freq_known": fk,
            "freq_unknown": fu,
            "score_known": fk - fu,
            "score_unknown": fu - fk,
        }
    if not per_type:
        raise PlipyError("no entity type has both known and unknown entities: latents cannot be scored")
    kn, un = labels_a == "known", labels_a == "unknown"
    return {
        "per_type": per_type,
        "skipped_types": skipped,
        "min_known": np.min([v["score_known"] for v in per_type.values()], axis=0),
        "min_unknown": np.min([v["score_unknown"] for v in per_type.values()], axis=0),
        "freq_known": active[kn].mean(0),
        "freq_unknown": active[un].mean(0),
        "mean_known": a[kn].mean(0),
        "mean_unknown": a[un].mean(0),
        "mean_all": a.mean(0),
        "mean_active": np.where(active.any(0), (a * active).sum(0) / np.maximum(active.sum(0), 1), 0.0),
    }


def select_latents(
    scores: dict[str, Any],
    steer_at: int,
    general_freq: np.ndarray | None = None,
    max_general_freq: float = 0.02,
    top_n: int = 20,
) -> dict[str, Any]:
    """The latent document: per label every latent sorted by its minimum score (upstream layer-file entries),
    the top latents (after the general-text filter if given) and the random candidates (minimum score exactly 0)."""
    d_sae = len(scores["min_known"])
    doc: dict[str, Any] = {"layer": steer_at, "top": {}, "random_candidates": {}, "sorted_scores_min": {}}
    for label in LABELS:
        s = scores[f"min_{label}"]
        order = sorted(range(d_sae), key=lambda i: (-s[i], i))
        entries = {}
        for rank, i in enumerate(order):
            e = {
                "layer": steer_at,
                "latent_idx": i,
                "score": float(s[i]),
                "scores_by_type": {t: float(v[f"score_{label}"][i]) for t, v in scores["per_type"].items()},
                "freq_acts_known": float(scores["freq_known"][i]),
                "freq_acts_unknown": float(scores["freq_unknown"][i]),
                # `--coeff mean` reads this: the mean over every scored entity prompt (both labels), so it is
                # useful for known and unknown latents alike (upstream's 'unknown'-label mean is ~0 for a known one)
                "mean_features_acts": float(scores["mean_all"][i]),
                "mean_acts_known": float(scores["mean_known"][i]),
                "mean_acts_unknown": float(scores["mean_unknown"][i]),
                "mean_act_when_active": float(scores["mean_active"][i]),
            }
            if general_freq is not None:
                e["freq_general"] = float(general_freq[i])
            entries[str(rank)] = e
        doc[label] = entries
        keep = [i for i in order if general_freq is None or general_freq[i] < max_general_freq]
        doc["top"][label] = [i for i in keep if s[i] > 0][:top_n]
        doc["random_candidates"][label] = sorted(i for i in range(d_sae) if s[i] == 0)
        doc["sorted_scores_min"][label] = {f"L{steer_at}F{i}": float(s[i]) for i in order}
    return doc


def run_latents(
    lm: LoadedModel,
    sae: SAE,
    labels: dict[str, Any],
    split: str | None = "train",
    general_filter: bool = True,
    general_tokens: int = 4096,
    max_general_freq: float = 0.02,
    top_n: int = 20,
    batch_size: int = 32,
    bos: bool = True,
    progress: Callable[[str, int], Callable[..., None]] | None = None,
) -> dict[str, Any]:
    """Score every latent of `sae` on the labelled entities and return the latent document (JSON-ready)."""
    from plipy.runtime import provenance
    from plipy.sae.model import check_model

    check_model(sae, lm.hidden_size, lm.n_layers)
    layer = capture_layer(sae)
    rows = labelled_rows(labels, split)
    items = [last_entity_token(lm.tokenizer, r["entity"], r["entity_type"], bos) for r in rows]
    acts = latent_activations(lm, sae, layer, items, batch_size, progress)
    scores = score_latents(acts, [r["entity_type"] for r in rows], [r["label"] for r in rows])
    gfreq = general_frequency(lm, sae, layer, general_tokens, progress=progress) if general_filter else None
    doc = select_latents(scores, layer + 1, gfreq, max_general_freq, top_n)
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["entity_type"], {"known": 0, "unknown": 0})[r["label"]] += 1
    config = {
        "split": split,
        "template": LATENT_TEMPLATE,
        "general_filter": general_filter,
        "general_tokens": general_tokens if general_filter else 0,
        "max_general_freq": max_general_freq,
        "top_n": top_n,
        "bos": bos,
        "active_threshold": ACTIVE,
    }
    return {
        "format": FORMAT,
        "hook_name": sae.hook_name,
        "capture_layer": layer,
        **doc,
        "counts": counts,
        "scored_types": list(scores["per_type"]),
        "skipped_types": scores["skipped_types"],
        "n_entities": len(rows),
        "sae": sae.describe(),
        "config": config,
        "provenance": provenance.build(model=lm, config=config),
    }


def default_path(doc: dict[str, Any]) -> Path:
    """Where `plipy sae latents` writes a latent file without `--out`: results/sae-latents-<model>-L<layer>.json."""
    return Path("results") / f"sae-latents-{doc['provenance']['model']['name']}-L{doc['layer']}.json"


def candidate_paths(out: str | Path) -> dict[str, Path]:
    """Sibling files of a latent file holding upstream `sorted_scores_min_{label}` dicts (for --random-candidates)."""
    p = Path(out)
    return {label: p.with_name(f"{p.stem}-scores-min-{label}.json") for label in LABELS}


def write_latents(doc: dict[str, Any], out: str | Path) -> list[Path]:
    """Write the latent file and its two `sorted_scores_min` siblings; returns the paths."""
    from plipy.io import write_json

    paths = [write_json(out, {k: v for k, v in doc.items() if k != "sorted_scores_min"})]
    for label, p in candidate_paths(out).items():
        paths.append(write_json(p, doc["sorted_scores_min"][label]))
    return paths
