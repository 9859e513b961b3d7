"""SAE steering and its effect on attention: the "Do I know this entity?" analysis on any HF decoder.

Per prompt: one original forward and one steered forward per latent (`coeff × W_dec[latent]` added to the input of
the latent's layer at the steered positions), each capturing the last position's attention row and the value
states of every layer. From them, per layer and head, four measures of attention from the last position to the
steered positions (summed over those positions):

- `attn_weights`           Σ a_qk
- `value_weighted`         Σ ‖a_qk v_k‖ = Σ a_qk ‖v_k‖
- `output_value_weighted`  Σ ‖a_qk v_k W_O^h‖ (L1 over d_model as upstream, L2 as an option)
- `distance_based`         Σ clip(‖o_q^h‖ − ‖f_qk^h − o_q^h‖, 1e-5), f_qk^h = a_qk v_k W_O^h, o_q^h = Σ_k f_qk^h

computed in float64 from per-key quantities (never a [batch, heads, q, k, d] tensor). Results are [N, layers, heads].
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plipy import provenance
from plipy.checkpoint import Units, fingerprint
from plipy.engine import Capture, Engine, ResidualAdd, ResidualCapture
from plipy.engine.arch import head_output_weights
from plipy.engine.batch import pad_left
from plipy.errors import PlipyError
from plipy.finite import naming, require_finite
from plipy.io import atomic_write_bytes
from plipy.results import SaeAttentionResult
from plipy.sae.inputs import EntityPrompt, Tokenized, positions_for, tokenize_prompt
from plipy.sae.measures import MEASURES, key_index, layer_measures
from plipy.sae.model import SAE, check_model, steer_layer
from plipy.sae.steering import Steering, needs_residual, steering_adds

EXPECTED = {"known": "decrease", "unknown": "increase"}  # upstream: known prompts get the unknown latent, and v.v.


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A left-padded batch: ids, mask, position_ids, and per item the steered absolute positions."""

    ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    steer_positions: list[list[int]]


def make_batch(items: Sequence[Tokenized], pos_type: str, pad_id: int, device: Any = "cpu") -> Batch:
    """Left-pad (`plipy.engine.batch.pad_left`); positions become absolute padded positions; position_ids restart at
    0 on each item's first real token, so a padded item computes what it computes alone."""
    p = pad_left([t.input_ids for t in items], pad_id, device)
    steer = p.shift([positions_for(t.entity_tokens, len(t.input_ids), pos_type) for t in items])
    return Batch(p.ids, p.mask, p.positions, steer)


def forward_measures(
    engine: Engine,
    model: torch.nn.Module,
    batch: Batch,
    w_o: dict[int, torch.Tensor],
    measures: Sequence[str],
    ovw_norm: str,
    adds: Sequence[ResidualAdd] = (),
    resid_layer: int | None = None,
) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
    """One forward: `{measure: [batch, layers, heads]}` and, if asked, the residual entering `resid_layer`."""
    length = batch.ids.shape[1]
    keys, kmask = key_index(batch.steer_positions)
    rc = ResidualCapture(layers=[resid_layer], where=("pre",)) if resid_layer is not None else None
    with (
        torch.inference_mode(),
        engine.run(capture=Capture(rows=[length - 1], values=True), residual_adds=adds, residual_capture=rc) as rec,
    ):
        # The decoder stack only: logits are not needed (the vocabulary projection is the costliest matmul).
        model.base_model(
            input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.position_ids, use_cache=False
        )
    per_layer = [
        layer_measures(rec.attn[layer][:, :, 0], rec.values[layer], keys, kmask, w_o.get(layer), measures, ovw_norm)
        for layer in range(engine.n_layers)
    ]
    for layer, pl in enumerate(per_layer):  # NaN value states (rows finite) would make NaN measures
        for m, t in pl.items():
            require_finite(t, f"the {m} measure", layer)
    out = {m: torch.stack([pl[m] for pl in per_layer], dim=1).cpu().numpy() for m in measures}
    resid = rec.resid.get((resid_layer, "pre")) if resid_layer is not None else None
    return out, resid


# ---------------------------------------------------------------------------------------------- the analysis


@dataclass
class AttentionConfig:
    """Everything that shapes the numbers of `run_attention` (all of it goes into provenance)."""

    latent: int
    layer: int | None = None  # steering layer (input of this decoder layer); None = from the SAE's hook
    coeff: float | str = 100.0
    direction: str = "decoder"
    ablate: tuple[int, ...] = ()
    pos_type: str = "entity_last"
    measures: tuple[str, ...] = MEASURES
    ovw_norm: str = "l1"
    heads: list[tuple[int, int]] | None = None  # None = every head of layers ≥ the steering layer
    expect: str = "auto"  # auto (by label, upstream) | increase | decrease | two-sided
    n_random: int = 10
    random_candidates: list[int] | None = None  # None = every other latent of the SAE
    seed: int = 42
    alpha: float = 0.05
    batch_size: int = 16
    bos: bool = True
    attn_impl: str = "eager"  # idle layers: "eager" = HF eager op for op (TL-like numbers), "sdpa" = faster
    latent_means: dict[int, float] = field(default_factory=dict)


def resolve_layer(sae: SAE, layer: int | None, n_layers: int) -> int:
    """The decoder layer at whose input the latent is added (upstream "latent layer")."""
    point = sae.hook_point()
    from_hook = None if point is None else steer_layer(point)
    if layer is None and from_hook is None:
        raise PlipyError(f"SAE {sae.source} names no hook: give the steering layer (--layer)")
    if layer is not None and from_hook is not None and layer != from_hook:
        raise PlipyError(
            f"--layer {layer} contradicts SAE {sae.source} (hook {sae.hook_name} is the input of layer {from_hook})"
        )
    out = from_hook if layer is None else layer
    if not 0 <= out < n_layers:
        raise PlipyError(
            f"SAE {sae.source}: steering at the input of layer {out}, but the model has layers 0-{n_layers - 1}"
            " (an SAE on the last layer's output has no attention after it)"
        )
    return out


def pick_random_latents(sae: SAE, config: AttentionConfig) -> list[int]:
    """K latents drawn with `random.Random(seed).sample` from the candidates, the steered/ablated ones excluded."""
    if config.n_random <= 0:
        return []
    pool = range(sae.d_sae) if config.random_candidates is None else config.random_candidates
    for c in config.random_candidates or []:
        sae.check_latent(c)
    skip = {config.latent, *config.ablate}
    cands = sorted({int(c) for c in pool} - skip)
    if len(cands) < config.n_random:
        raise PlipyError(f"{config.n_random} random latents asked for, but only {len(cands)} candidates")
    return random.Random(config.seed).sample(cands, config.n_random)


def default_heads(layer: int, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    return [(la, h) for la in range(layer, n_layers) for h in range(n_heads)]


def parse_heads(value: Any, n_layers: int, n_heads: int, layer: int | None = None) -> list[tuple[int, int]] | None:
    """Saved/tested heads. `L12H3,L14H0` names heads of layers; the common head grammar (`all`, `0,3`, `0-4`)
    names those heads in every layer from the steering `layer` on (`all` without a layer: every layer).
    None/'' → the default (every head of layers ≥ the steering layer)."""
    from plipy import options

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    if text.strip() == "all":
        return default_heads(0, n_layers, n_heads)
    if "H" not in text.upper():
        hs = options.parse_heads(text, n_heads)
        first = 0 if layer is None else layer
        return [(la, h) for la in range(first, n_layers) for h in hs or []]
    out = []
    for part in text.split(","):
        t = part.strip().upper()
        try:
            la, h = (int(x) for x in t.lstrip("L").split("H"))
        except ValueError:
            raise PlipyError(f"cannot read head {part!r}: write L12H3") from None
        if not (0 <= la < n_layers and 0 <= h < n_heads):
            raise PlipyError(f"head {part!r} does not exist (layers 0-{n_layers - 1}, heads 0-{n_heads - 1})")
        out.append((la, h))
    return out


def check_config(config: AttentionConfig) -> None:
    """Refuse settings that cannot run, before any model work."""
    bad = [m for m in config.measures if m not in MEASURES]
    if bad or not config.measures:
        raise PlipyError(f"unknown measure(s) {bad}: choose from {', '.join(MEASURES)}")
    if config.ovw_norm not in ("l1", "l2"):
        raise PlipyError(f"output_value_weighted norm must be l1 or l2, got {config.ovw_norm!r}")
    if config.direction not in ("decoder", "encoder"):
        raise PlipyError(f"direction must be decoder or encoder, got {config.direction!r}")
    if config.expect not in ("auto", "increase", "decrease", "two-sided"):
        raise PlipyError(f"expect must be auto, increase, decrease or two-sided, got {config.expect!r}")
    positions_for([0], 1, config.pos_type)  # validates the position type


@dataclass
class _Run:
    """Everything the batches of one analysis share."""

    engine: Engine
    layer: int
    latents: list[int]
    steerings: dict[int, Steering]
    w_o: dict[int, torch.Tensor]
    resid_layer: int | None
    pad_id: int


def _batch_arrays(
    lm: Any,
    sae: SAE,
    run: _Run,
    config: AttentionConfig,
    toks: Sequence[Tokenized],
    step: Callable[[], None],
    first: int = 0,
) -> dict[str, np.ndarray]:
    """The original and every latent's steered measures of one batch (prompts `first`…): `{"original/m" |
    "steered/lat/m": [b, L, H]}`."""
    batch = make_batch(toks, config.pos_type, run.pad_id, lm.device)
    arrays: dict[str, np.ndarray] = {}
    names = [f"prompt {first + j}" for j in range(len(toks))]
    with naming(names):
        orig, resid = forward_measures(
            run.engine, lm.model, batch, run.w_o, config.measures, config.ovw_norm, resid_layer=run.resid_layer
        )
    step()
    for m, v in orig.items():
        arrays[f"original/{m}"] = v
    for lat in run.latents:
        with naming([f"{n}, steered by latent {lat}" for n in names]):
            adds = steering_adds(sae, run.layer, run.steerings[lat], batch.steer_positions, resid)
            steered = (
                orig
                if not adds
                else forward_measures(run.engine, lm.model, batch, run.w_o, config.measures, config.ovw_norm, adds)[0]
            )
        for m, v in steered.items():
            arrays[f"steered/{lat}/{m}"] = v
        step()
    return arrays


@dataclass
class _Plan:
    """What the batches of one analysis depend on: built alike on the driver and on every Ray worker."""

    run: _Run
    toks: list[Tokenized]
    layer: int
    heads: list[tuple[int, int]]
    randoms: list[int]


def _plan(lm: Any, sae: SAE, prompts: Sequence[EntityPrompt], config: AttentionConfig) -> _Plan:
    model, tok = lm.model, lm.tokenizer
    n_layers, n_heads = lm.n_layers, lm.n_heads
    check_model(sae, lm.hidden_size, n_layers)
    sae.check_latent(config.latent)
    for a in config.ablate:
        sae.check_latent(a)
    check_config(config)
    if not prompts:
        raise PlipyError("no prompts to analyse")
    layer = resolve_layer(sae, config.layer, n_layers)
    heads = config.heads if config.heads is not None else default_heads(layer, n_layers, n_heads)
    randoms = pick_random_latents(sae, config)
    latents = [config.latent, *randoms]
    if config.coeff == "mean":
        missing = [lat for lat in latents if lat not in config.latent_means]
        if missing:
            raise PlipyError(f"coefficient 'mean': no mean activation for latent(s) {missing} in the latent file")
    toks = [tokenize_prompt(p, tok, bos=config.bos, index=i) for i, p in enumerate(prompts)]
    w_o = {}
    if {"output_value_weighted", "distance_based"} & set(config.measures):
        w_o = {la: head_output_weights(model, la, n_heads) for la in range(n_layers)}
    steerings = {
        lat: Steering(lat, config.coeff, config.direction, tuple(config.ablate), config.latent_means.get(lat))
        for lat in latents
    }
    run = _Run(
        Engine(model, idle=config.attn_impl),
        layer,
        latents,
        steerings,
        w_o,
        layer if any(needs_residual(s) for s in steerings.values()) else None,
        tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0),
    )
    return _Plan(run, toks, layer, list(heads), randoms)


def _no_step() -> None:
    pass


def unit_compute(
    lm: Any, sae: SAE, prompts: Sequence[EntityPrompt], config: AttentionConfig
) -> Callable[[list[int]], list]:
    """A Ray worker's `compute([batch index])` (`plipy.cluster`): the local path's own code on its model."""
    plan = _plan(lm, sae, prompts, config)
    bs = config.batch_size
    return lambda b: [
        (None, _batch_arrays(lm, sae, plan.run, config, plan.toks[b[0] * bs : (b[0] + 1) * bs], _no_step, b[0] * bs))
    ]


def run_attention(
    lm: Any,
    sae: SAE,
    prompts: Sequence[EntityPrompt],
    config: AttentionConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> SaeAttentionResult:
    """Original vs steered attention measures for every prompt, plus the random-latent baseline. With a `cluster`
    (`plipy.cluster.Cluster`) the prompt batches run on Ray workers that load the model with `load` options.

    The result's `arrays` = `{"original": {measure: [N, L, H]}, "steered": {latent: {measure: [N, L, H]}}}`."""
    from plipy.cluster import pool as cp

    model = lm.model
    n_layers, n_heads = lm.n_layers, lm.n_heads
    plan = _plan(lm, sae, prompts, config)
    run, toks, layer, heads, randoms = plan.run, plan.toks, plan.layer, plan.heads, plan.randoms
    latents = run.latents
    fp = fingerprint(
        {
            "config": asdict(config),
            "randoms": randoms,
            "layer": layer,
            "sae": sae.describe(),
            "model": lm.spec,
            "dtype": str(next(model.parameters()).dtype),
            "prompts": [asdict(p) for p in prompts],
        }
    )
    ckpt = Units(checkpoint_dir, fp)  # per-batch units beside the output: an interrupted run resumes
    bs = config.batch_size
    n_batches = -(-len(prompts) // bs)
    step = progress("SAE steering", n_batches * (1 + len(latents))) if progress else (lambda: None)
    here: set[int] = set()  # batches computed in this process: they stepped the bar forward by forward

    def compute(b: list[int]) -> list[tuple[None, dict[str, np.ndarray]]]:
        here.add(b[0])
        return [(None, _batch_arrays(lm, sae, run, config, toks[b[0] * bs : (b[0] + 1) * bs], step, b[0] * bs))]

    parts: list[dict[str, np.ndarray]] = []
    # the SAE's weights travel to the workers as data; the model's never do (each worker loads its spec)
    with cp.executor(
        cluster, lm, load, f"{__name__}:unit_compute", (sae, list(prompts), config), lambda: compute
    ) as ex:
        for bi, (_, arrays) in ckpt.batched([[b] for b in range(n_batches)], ex.compute, ex.remote):
            for _ in range(0 if bi in here else 1 + len(latents)):
                step()
            parts.append(arrays)
        where = ex.describe()
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out_arrays = {
        "original": {m: cat[f"original/{m}"] for m in config.measures},
        "steered": {lat: {m: cat[f"steered/{lat}/{m}"] for m in config.measures} for lat in latents},
    }
    result = summarise(out_arrays, prompts, toks, config, layer, heads, randoms, n_layers, n_heads)
    result["sae"] = sae.describe()
    result["provenance"] = provenance.build(
        model=lm,
        seed=config.seed,
        config={
            **asdict(config),
            "layer": layer,
            "random_latents": randoms,
            "fingerprint": fp,
            "latent_means": {str(k): v for k, v in config.latent_means.items() if k in latents},
        },
    )
    if where is not None:
        result["provenance"]["cluster"] = where
    return SaeAttentionResult(result, arrays=out_arrays)


def difference(arrays: dict[str, Any], latent: int, measure: str) -> np.ndarray:
    """steered − original, `[N, layers, heads]`."""
    return arrays["steered"][latent][measure] - arrays["original"][measure]


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
    alt = "two-sided" if direction == "two-sided" else "greater"
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


def summarise(
    arrays: dict[str, Any],
    prompts: Sequence[EntityPrompt],
    toks: Sequence[Tokenized],
    config: AttentionConfig,
    layer: int,
    heads: list[tuple[int, int]],
    randoms: list[int],
    n_layers: int,
    n_heads: int,
) -> dict[str, Any]:
    """Per-head summaries for the top latent and the random-latent significance, per measure and label."""
    labels = [p.label for p in prompts]
    groups = list(dict.fromkeys(labels))
    measures: dict[str, Any] = {}
    for m in config.measures:
        diff = difference(arrays, config.latent, m)
        orig, steered = arrays["original"][m], arrays["steered"][config.latent][m]
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
        by_label = {}
        for g in groups:
            rows = np.array([lab == g for lab in labels])
            direction = _direction(g, config.expect)
            top = head_values(diff, heads, rows).ravel()
            tests = []
            for r in randoms:
                rv = head_values(difference(arrays, r, m), heads, rows).ravel()
                tests.append({"latent": r, **significance(top, rv, direction, config.alpha)})
            k = sum(t["significant"] for t in tests)
            by_label[str(g)] = {
                "n_prompts": int(rows.sum()),
                "expected": direction,
                "mean_difference": float(top.mean()),
                "std_difference": float(top.std(ddof=1)) if top.size > 1 else None,
                "random": tests,
                "k_significant": k,
                "K": len(tests),
                "summary": f"top vs random latents: {k} of {len(tests)} significant (Welch, H1: {_phrase(direction)}, "
                f"p < {config.alpha})"
                if tests
                else "no random latents",
            }
        measures[m] = {
            "per_head": per_head,
            "mean_difference_layer_head": diff.mean(0).tolist(),  # [layers, heads] for the heatmap
            "by_label": by_label,
        }
    return {
        "latent": config.latent,
        "layer": layer,
        "hook": f"blocks.{layer}.hook_resid_pre",
        "random_latents": randoms,
        "heads": [f"L{la}H{h}" for la, h in heads],
        "n_layers": n_layers,
        "n_heads": n_heads,
        "measures": measures,
        "prompts": [
            {**asdict(p), "n_tokens": len(t.input_ids), "entity_tokens": t.entity_tokens}
            for p, t in zip(prompts, toks, strict=True)
        ],
    }


def _phrase(direction: str) -> str:
    return {"increase": "top > random", "decrease": "top < random"}.get(direction, "top ≠ random")


# ---------------------------------------------------------------------------------------------- outputs


def table_columns(arrays: dict[str, Any], prompts: Sequence[EntityPrompt], top: int) -> dict[str, np.ndarray]:
    """Long format as columns: one row per (latent, prompt, layer, head), original/steered/difference per measure."""
    measures = list(arrays["original"])
    n, n_layers, n_heads = arrays["original"][measures[0]].shape
    lats = list(arrays["steered"])
    per = n * n_layers * n_heads
    idx = np.arange(per)
    i, la, h = idx // (n_layers * n_heads), (idx // n_heads) % n_layers, idx % n_heads
    cols: dict[str, np.ndarray] = {
        "latent": np.repeat(np.array(lats, dtype=np.int64), per),
        "role": np.repeat(np.array(["top" if lat == top else "random" for lat in lats]), per),
        "prompt_index": np.tile(i, len(lats)),
        "entity": np.tile(np.array([p.entity for p in prompts], dtype=object)[i], len(lats)),
        "entity_type": np.tile(np.array([p.entity_type for p in prompts], dtype=object)[i], len(lats)),
        "label": np.tile(np.array([p.label for p in prompts], dtype=object)[i], len(lats)),
        "layer": np.tile(la, len(lats)),
        "head": np.tile(h, len(lats)),
    }
    for m in measures:
        o = np.tile(arrays["original"][m].reshape(-1), len(lats))
        s = np.concatenate([arrays["steered"][lat][m].reshape(-1) for lat in lats])
        cols[f"{m}_original"], cols[f"{m}_steered"], cols[f"{m}_difference"] = o, s, s - o
    return cols


def columns_bytes(cols: dict[str, np.ndarray], fmt: str = "parquet") -> bytes:
    """Columns as Parquet or CSV bytes."""
    import pyarrow as pa

    table = pa.table({k: pa.array(v.tolist() if v.dtype == object else v) for k, v in cols.items()})
    sink = pa.BufferOutputStream()
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, sink)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_columns(path: str | Path, cols: dict[str, np.ndarray]) -> Path:
    """Columns as Parquet (`.parquet`) or CSV (`.csv`), atomically."""
    return atomic_write_bytes(path, columns_bytes(cols, "csv" if Path(path).suffix == ".csv" else "parquet"))


def arrays_from_table(path: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """The `{original, steered}` arrays back from a saved long table (rows: latent, prompt, layer, head)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path)
    table = pcsv.read_csv(p) if p.suffix == ".csv" else pq.read_table(p)
    n, n_layers, n_heads = len(result["prompts"]), result["n_layers"], result["n_heads"]
    measures = list(result["measures"])
    lat = table.column("latent").to_numpy()
    latents = list(dict.fromkeys(int(x) for x in lat))
    per = n * n_layers * n_heads
    if len(lat) != per * len(latents):
        raise PlipyError(f"{p}: {len(lat)} rows, expected {per * len(latents)} for this result")
    cols = {m: (table.column(f"{m}_original").to_numpy(), table.column(f"{m}_steered").to_numpy()) for m in measures}
    shape = (n, n_layers, n_heads)
    return {
        "original": {m: cols[m][0][:per].astype(np.float64).reshape(shape) for m in measures},
        "steered": {
            lt: {m: cols[m][1][i * per : (i + 1) * per].astype(np.float64).reshape(shape) for m in measures}
            for i, lt in enumerate(latents)
        },
    }


def npy_bytes(
    arrays: dict[str, Any], heads: Sequence[tuple[int, int]], top: int, randoms: Sequence[int], stem: Path
) -> dict[Path, bytes]:
    """Upstream-compatible `.npy` dicts `{'L{l}H{h}': differences}` per measure (+ a list of dicts for the random
    latents), loadable with `np.load(path, allow_pickle=True).item()` (random: `.tolist()`). These are pickled
    object arrays: load them only from a source you trust."""
    out = {}
    for m in arrays["original"]:

        def as_dict(lat: int, m: str = m) -> dict[str, np.ndarray]:
            d = difference(arrays, lat, m)
            return {f"L{la}H{h}": d[:, la, h] for la, h in heads}

        for name, obj in ((f"{stem}-{m}.npy", as_dict(top)), (f"{stem}-{m}-random.npy", [as_dict(r) for r in randoms])):
            buf = io.BytesIO()
            np.save(buf, np.array(obj, dtype=object), allow_pickle=True)
            out[Path(name)] = buf.getvalue()
    return out


def save_npy(
    arrays: dict[str, Any], heads: Sequence[tuple[int, int]], top: int, randoms: Sequence[int], stem: Path
) -> list[Path]:
    """Write the `.npy` dicts of `npy_bytes`, atomically."""
    return [atomic_write_bytes(p, b) for p, b in npy_bytes(arrays, heads, top, randoms, stem).items()]
