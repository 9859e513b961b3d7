"""Logit lens: what each layer would predict if the model stopped there.

For every decoder layer L, the residual stream after layer L (resid_post, captured by the engine) at the chosen
positions goes through the model's own final norm and unembedding (and its final logit transform: Gemma-2/3's tanh
softcap, Granite's `logits_scaling`, Cohere's `logit_scale`), then a float32 softmax. Layer L = after decoder layer
L, so the last layer's lens is the model's own next-token distribution: every run checks that it equals the logits
the model itself returns, which catches a family whose head does something this module does not know.

Ranks are 1 + the number of vocabulary entries with a strictly larger float32 logit (1 = the top token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from plipy import provenance
from plipy.engine import Engine, ResidualCapture
from plipy.errors import ParameterError, PlipyError
from plipy.finite import naming, require_finite
from plipy.options import _ints
from plipy.results import LensResult

DEFAULT_TOP_K = 10
POSITION_WORDS = ("last", "all", "marker")
CHECK_ULPS = 64  # last-layer lens vs the model's logits: rounding of the same ops on differently shaped tensors


@dataclass
class LensConfig:
    """One text through the lens. `positions`: "last", "all", "marker" (a corpus sample's marker token) or token
    indices (negative from the end); `tokens`: token ids or single-token strings to follow through the layers."""

    positions: Any = "last"
    top_k: int = DEFAULT_TOP_K
    tokens: Sequence[int | str] = ()
    layers: Sequence[int] | None = None
    bos: bool = False
    extra: dict = field(default_factory=dict)


# -- the model's own head ------------------------------------------------------------------------------------------


def logit_transform(model: torch.nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """What the family does to `lm_head`'s output before returning logits, op for op in the model dtype, and its
    name: Gemma-2/3's `final_logit_softcapping`, Granite's division by `logits_scaling`, Cohere's `logit_scale`."""
    from plipy.engine.arch import adapter

    arch = adapter(model)
    cap = arch.logit_softcap
    scaling = getattr(arch.config, "logits_scaling", None)
    scale = getattr(model, "logit_scale", None)
    if cap is not None:

        def softcap(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x / cap) * cap  # HF: logits / cap; tanh; * cap

        return softcap, f"tanh softcap {cap}"
    if scaling is not None and scaling != 1:
        return (lambda x: x / scaling), f"divided by logits_scaling {scaling}"
    if isinstance(scale, (int, float)) and scale != 1:
        return (lambda x: x * scale), f"multiplied by logit_scale {scale}"
    return (lambda x: x), "none"


def unembed(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of residual-stream vectors `[..., d]`: the model's final norm, unembedding and logit
    transform, each in the model dtype as the model applies them."""
    from plipy.engine.arch import adapter

    arch = adapter(model)
    fn, _ = logit_transform(model)
    return fn(arch.unembed()(arch.final_norm()(hidden))).float()


def rank_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1-based rank of each id in each row of `logits [P, V]` (ids `[P, n]` or `[n]`): 1 + #strictly larger."""
    ids = ids.expand(logits.shape[0], -1) if ids.ndim == 1 else ids
    chosen = logits.gather(1, ids)  # [P, n]
    return 1 + (logits[:, None, :] > chosen[:, :, None]).sum(-1)


# -- positions and tokens ------------------------------------------------------------------------------------------


def resolve_positions(spec: Any, n_tokens: int, marker: int | None = None) -> list[int]:
    """Token indices from "last", "all", "marker", an int, a list or "0,5,-1" (negative from the end); unique,
    in the order given."""
    if isinstance(spec, str) and spec.strip() in POSITION_WORDS:
        word = spec.strip()
        if word == "last":
            return [n_tokens - 1]
        if word == "all":
            return list(range(n_tokens))
        if marker is None:
            raise ParameterError(
                "positions", "'marker' needs a corpus sample (sample=…, --sample) whose marker has a token"
            )
        return [marker]
    if isinstance(spec, str) and not spec.strip():
        raise ParameterError("positions", "is empty: use last | all | marker | token indices such as 0,5,-1")
    try:
        raw = _ints(spec, "positions", "position")
    except ParameterError:
        raise ParameterError(
            "positions", f"cannot read {spec!r}: use last | all | marker | token indices such as 0,5,-1"
        ) from None
    bad = [p for p in raw if not -n_tokens <= p < n_tokens]
    if bad:
        raise ParameterError(
            "positions",
            f"position {bad[0]} does not exist: the text has {n_tokens} tokens "
            f"(0-{n_tokens - 1}, or -{n_tokens}…-1 from the end)",
        )
    out: list[int] = []
    for p in raw:
        p = p % n_tokens
        if p not in out:
            out.append(p)
    return out


def token_ids(tokenizer: Any, tokens: Sequence[int | str], vocab: int, *, param: str = "tokens") -> list[int]:
    """Vocabulary ids of `tokens`: ids as given, strings that are exactly one token (no special tokens)."""
    out: list[int] = []
    for t in tokens:
        if isinstance(t, bool):
            raise ParameterError(param, f"expected token ids or strings, got {t!r}")
        if isinstance(t, int):
            if not 0 <= t < vocab:
                raise ParameterError(param, f"token id {t} does not exist: the vocabulary has {vocab} entries")
            tid = t
        elif isinstance(t, str) and t:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                pieces = [tokenizer.decode([i]) for i in ids]
                raise ParameterError(
                    param,
                    f"{t!r} is {len(ids)} tokens {pieces}, not one: give a single token "
                    "(e.g. one of those pieces) or its id",
                )
            tid = int(ids[0])
        else:
            raise ParameterError(param, f"expected token ids or non-empty strings, got {t!r}")
        if tid not in out:
            out.append(tid)
    return out


def encode(tokenizer: Any, text: str, bos: bool) -> list[int]:
    """Token ids of a text as every PLIP experiment feeds it: no special tokens, BOS only when asked."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise PlipyError(f"--bos: tokenizer {type(tokenizer).__name__} has no BOS token")
        ids = [int(bos_id), *ids]
    if not ids:
        raise ParameterError("text", "is empty: nothing to put through the lens")
    return ids


# -- the forward ---------------------------------------------------------------------------------------------------


@dataclass
class LensPass:
    """One forward's lens: per layer, float32 logits `[P, V]` at the chosen positions (computed on demand), the
    model's own logits there, and the check that the last layer's lens reproduces them."""

    model: torch.nn.Module
    positions: list[int]
    resid: dict[int, torch.Tensor]  # layer → resid_post [P, d] (model dtype)
    model_logits: torch.Tensor  # [P, V] float32
    n_layers: int
    check: dict[str, Any]

    def logits(self, layer: int) -> torch.Tensor:
        with torch.inference_mode():
            return unembed(self.model, self.resid[layer])

    def layers(self, layers: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        for layer in range(self.n_layers) if layers is None else layers:
            yield layer, self.logits(layer)


def _keep_arg(model: torch.nn.Module, positions: list[int], device: torch.device) -> dict[str, Any]:
    import inspect

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    return {"logits_to_keep": torch.tensor(positions, device=device)}  # lm_head on exactly these rows, as we do


def run_pass(lm: Any, ids: list[int], positions: list[int], engine: Engine | None = None) -> LensPass:
    """One forward capturing resid_post of every layer at `positions`; checks the last layer's lens against the
    model's own logits (an error if they disagree beyond rounding: an unknown logit transform)."""
    model = lm.model
    engine = engine or Engine(model)
    x = torch.tensor([ids], device=lm.device)
    cap = ResidualCapture(layers=None, where=("post",), positions=positions)
    keep = _keep_arg(model, positions, x.device)
    with torch.inference_mode(), engine.run(residual_capture=cap) as rec:
        out = model(input_ids=x, attention_mask=torch.ones_like(x), **keep)
    own = (out.logits[0] if keep else out.logits[0, positions]).float()
    resid = {layer: rec.resid[(layer, "post")][0] for layer in range(lm.n_layers)}
    for layer, r in resid.items():  # the first layer whose output is NaN/inf is named, not a lens mismatch
        require_finite(r.reshape(-1), "the residual stream after the layer", layer)
    require_finite(own.reshape(-1), "the model's logits")
    lp = LensPass(model, positions, resid, own, lm.n_layers, {})
    last = lp.logits(lm.n_layers - 1)
    diff = float((last - own).abs().max())
    eps = torch.finfo(next(model.parameters()).dtype).eps
    tol = CHECK_ULPS * eps * (1.0 + float(own.abs().max()))
    _, transform = logit_transform(model)
    lp.check = {"last_layer_vs_model_logits_max_abs": diff, "tolerance": tol, "logit_transform": transform}
    if not diff <= tol:
        raise PlipyError(
            f"the lens of the last layer does not reproduce {type(model).__name__}'s own logits "
            f"(max |Δ| {diff:.3g} > {tol:.3g}; logit transform applied: {transform}): this family's "
            "head does something the lens does not know"
        )
    return lp


# -- one text ------------------------------------------------------------------------------------------------------


def _decode(tokenizer: Any, tid: int) -> str:
    return tokenizer.decode([int(tid)], skip_special_tokens=False)


def _tracked(tokenizer: Any, given: list[int], final_top: int, next_id: int | None) -> list[dict[str, Any]]:
    """The tokens followed at one position: the given ones, the final layer's top-1, the actual next token."""
    out: dict[int, list[str]] = {}
    for tid in given:
        out.setdefault(tid, []).append("given")
    out.setdefault(final_top, []).append("final-top1")
    if next_id is not None:
        out.setdefault(next_id, []).append("next-token")
    return [
        {"id": tid, "token": _decode(tokenizer, tid), "source": src, "ranks": [], "probs": []}
        for tid, src in out.items()
    ]


def lens_positions(
    lm: Any,
    lp: LensPass,
    ids: list[int],
    layers: list[int],
    top_k: int,
    given: list[int],
    step: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """Per position: the top-k tokens of every layer and the tracked tokens' rank and probability per layer."""
    tok = lm.tokenizer
    P = len(lp.positions)
    final_top = lp.model_logits.argmax(-1).tolist()
    out = []
    for i, pos in enumerate(lp.positions):
        nxt = ids[pos + 1] if pos + 1 < len(ids) else None
        out.append(
            {
                "position": pos,
                "token_id": ids[pos],
                "token": _decode(tok, ids[pos]),
                "next_token": None if nxt is None else _decode(tok, nxt),
                "layers": [],
                "tracked": _tracked(tok, given, final_top[i], nxt),
            }
        )
    for layer in layers:
        logits = lp.logits(layer)  # [P, V]
        probs = torch.softmax(logits, -1)
        k = min(top_k, logits.shape[-1])
        top_ids = logits.topk(k, dim=-1).indices  # by logit: the order ranks use
        for i in range(P):
            rec = out[i]
            rec["layers"].append(
                {
                    "layer": layer,
                    "top": [
                        {"id": int(t), "token": _decode(tok, int(t)), "prob": float(probs[i, t])} for t in top_ids[i]
                    ],
                }
            )
            tids = torch.tensor([t["id"] for t in rec["tracked"]], device=logits.device)
            ranks = rank_of(logits[i : i + 1], tids)[0].tolist()
            for t, r, p in zip(rec["tracked"], ranks, probs[i, tids].tolist(), strict=True):
                t["ranks"].append(int(r))
                t["probs"].append(float(p))
        step()
    for rec in out:
        for t in rec["tracked"]:
            t["first_layer_in_top_k"] = next(
                (lay for lay, r in zip(layers, t["ranks"], strict=True) if r <= top_k), None
            )
    return out


def run_lens(
    lm: Any,
    text: str,
    config: LensConfig,
    *,
    marker: int | None = None,
    source: dict | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> LensResult:
    """The logit lens of one text at the chosen positions and layers (`plipy lens`)."""
    from plipy.options import check_positive, parse_layers

    check_positive(config.top_k, param="top_k")
    ids = encode(lm.tokenizer, text, config.bos)
    if lm.max_positions is not None and len(ids) > lm.max_positions:
        raise PlipyError(f"the text has {len(ids)} tokens, longer than the model's context ({lm.max_positions})")
    positions = resolve_positions(config.positions, len(ids), marker)
    layers = parse_layers(config.layers, lm.n_layers)
    given = token_ids(lm.tokenizer, config.tokens, lm.vocab_size)
    t0 = time.perf_counter()
    with naming(f"sample {source['sample']!r}" if source and source.get("sample") else "the text"):
        lp = run_pass(lm, ids, positions)
    step = progress("logit lens", len(layers)) if progress else (lambda: None)
    rows = lens_positions(lm, lp, ids, layers, config.top_k, given, step)
    settings = {
        "command": "lens",
        "positions": config.positions if isinstance(config.positions, str) else list(config.positions),
        "top_k": config.top_k,
        "tokens": list(config.tokens),
        "layers": layers,
        "bos": config.bos,
        "softmax": "float32, full vocabulary",
        "rank": "1 + number of vocabulary entries with a strictly larger float32 logit",
        **config.extra,
    }
    prov = provenance.build(model=lm, config=settings)
    prov["timing"] = {"seconds": time.perf_counter() - t0}
    return LensResult(
        {
            "provenance": prov,
            "text": text,
            "source": source or {"kind": "text"},
            "input_ids": ids,
            "tokens": [_decode(lm.tokenizer, t) for t in ids],
            "n_layers": lm.n_layers,
            "layers_shown": layers,
            "top_k": config.top_k,
            "check": lp.check,
            "positions": rows,
        }
    )


def lens_rows(result: dict) -> list[dict[str, Any]]:
    """One row per (position, layer, token): every top-k token and every tracked token (a tracked token in the
    top-k is one row)."""
    rows = []
    for pos in result["positions"]:
        tracked = {t["id"]: t for t in pos["tracked"]}
        for li, lay in enumerate(pos["layers"]):
            seen = set()
            for r, t in enumerate(lay["top"], 1):
                tr = tracked.get(t["id"])
                rows.append(
                    {
                        "position": pos["position"],
                        "position_token": pos["token"],
                        "layer": lay["layer"],
                        "token_id": t["id"],
                        "token": t["token"],
                        "prob": t["prob"],
                        "rank": r,
                        "in_top_k": True,
                        "tracked": ",".join(tr["source"]) if tr else None,
                    }
                )
                seen.add(t["id"])
            for tid, tr in tracked.items():
                if tid not in seen:
                    rows.append(
                        {
                            "position": pos["position"],
                            "position_token": pos["token"],
                            "layer": lay["layer"],
                            "token_id": tid,
                            "token": tr["token"],
                            "prob": tr["probs"][li],
                            "rank": tr["ranks"][li],
                            "in_top_k": tr["ranks"][li] <= result["top_k"],
                            "tracked": ",".join(tr["source"]),
                        }
                    )
    return rows
