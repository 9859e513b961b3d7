"""Logit lens: what each layer would predict if the model stopped there.

For every decoder layer L, the residual stream after layer L (resid_post, captured by the engine) at the chosen
positions goes through the model's own final norm and unembedding (and its final logit transform: Gemma-2/3's tanh
softcap, Granite's `logits_scaling`, Cohere's `logit_scale`), then a float32 softmax. Layer L = after decoder layer
L, so the last layer's lens is the model's own next-token distribution: every run checks that it equals the logits
the model itself returns, which catches a family whose head does something this module does not know.

Ranks are 1 + the number of vocabulary entries with a strictly larger float32 logit (1 = the top token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from plipy import options as opt
from plipy.engine import Engine, ResidualCapture
from plipy.errors import ParameterError, PlipyError
from plipy.finite import naming, require_finite
from plipy.models import LoadedModel
from plipy.results import LensResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, chunks

DEFAULT_TOP_K = 10
CHECK_ULPS = 64  # last-layer lens vs the model's logits: rounding of the same ops on differently shaped tensors
LAYERS_PER_BATCH = 4  # a batch of lens units: layers of the one forward (its unembeddings), never more forwards


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


# -- the text ------------------------------------------------------------------------------------------------------


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


def run_pass(lm: LoadedModel, ids: list[int], positions: list[int], engine: Engine | None = None) -> LensPass:
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


def has_weights(lm: LoadedModel) -> bool:
    """Whether `lm` can run a forward here: a Ray driver's model is wholly on the meta device (its workers compute);
    a model offloaded by a device map keeps some of its weights on the meta device, not all."""
    return any(p.device.type != "meta" for p in lm.model.parameters())


# -- one text ------------------------------------------------------------------------------------------------------


def decode_token(tokenizer: Any, tid: int) -> str:
    """The text of one token id, special tokens kept."""
    return tokenizer.decode([int(tid)], skip_special_tokens=False)


def tracked_sources(given: list[int], final_top: int, next_id: int | None) -> dict[int, list[str]]:
    """The tokens followed at one position, in order: the given ones, the final layer's top-1, the actual next
    token; each with why it is followed."""
    out: dict[int, list[str]] = {}
    for tid in given:
        out.setdefault(tid, []).append("given")
    out.setdefault(final_top, []).append("final-top1")
    if next_id is not None:
        out.setdefault(next_id, []).append("next-token")
    return out


def _next_id(ids: list[int], pos: int) -> int | None:
    return ids[pos + 1] if pos + 1 < len(ids) else None


@dataclass
class LensPlan:
    """The text's tokens, the resolved positions, layers and given tokens, and the forward (None on a driver that
    holds no weights: there the units come from Ray workers, each running the forward once in its own plan)."""

    ids: list[int]
    positions: list[int]
    layers: list[int]
    given: list[int]
    forward: LensPass | None


@dataclass
class Lens(Experiment[LensPlan, LensResult]):
    """The logit lens of one text (`plipy lens`). One forward (in the plan); a unit is one shown layer: its top-k
    tokens and the tracked tokens' ranks and probabilities at every position. `positions`: "last", "all", "marker"
    (`marker`: a corpus sample's marker token) or token indices (negative from the end); `tokens`: token ids or
    single-token strings to follow through the layers; `layers` None = all."""

    kind = "lens"
    label = "logit lens"
    default_batch_size = LAYERS_PER_BATCH

    text: str
    positions: Any = "last"
    top_k: int = DEFAULT_TOP_K
    tokens: Sequence[int | str] = ()
    layers: Sequence[int] | None = None
    bos: bool = False
    marker: int | None = None
    source: dict[str, Any] | None = None

    def plan(self, lm: LoadedModel) -> LensPlan:
        ids = encode(lm.tokenizer, self.text, self.bos)
        if lm.max_positions is not None and len(ids) > lm.max_positions:
            raise PlipyError(f"the text has {len(ids)} tokens, longer than the model's context ({lm.max_positions})")
        positions = opt.parse_positions(self.positions, len(ids), self.marker)
        layers = opt.parse_layers(self.layers, lm.n_layers)
        given = opt.parse_tokens(lm.tokenizer, self.tokens, lm.vocab_size)
        forward = None
        if has_weights(lm):
            src = self.source or {}
            with naming(f"sample {src['sample']!r}" if src.get("sample") else "the text"):
                forward = run_pass(lm, ids, positions)
        return LensPlan(ids, positions, layers, given, forward)

    def settings(self, lm: LoadedModel, plan: LensPlan, batch_size: int) -> Settings:
        asked = self.positions
        config = {
            "command": "lens",
            "positions": asked if isinstance(asked, str) else [asked] if isinstance(asked, int) else list(asked),
            "top_k": self.top_k,
            "tokens": list(self.tokens),
            "layers": plan.layers,
            "bos": self.bos,
            "softmax": "float32, full vocabulary",
            "rank": "1 + number of vocabulary entries with a strictly larger float32 logit",
        }
        return Settings(config, key={"text": self.text, "marker": self.marker})

    def work(self, plan: LensPlan, batch_size: int) -> Work:
        return Work(chunks(list(range(len(plan.layers))), batch_size))

    def compute(self, lm: LoadedModel, plan: LensPlan, batch: list[int]) -> list[Unit]:
        lp = plan.forward
        if lp is None:
            raise PlipyError("the logit lens needs the model's weights in this process")
        final_top = lp.model_logits.argmax(-1).tolist()
        tracked = [
            list(tracked_sources(plan.given, final_top[i], _next_id(plan.ids, pos)))
            for i, pos in enumerate(plan.positions)
        ]
        return [({**layer_unit(lp, plan.layers[j], self.top_k, tracked), "final_top": final_top}, {}) for j in batch]

    def assemble(
        self, lm: LoadedModel, plan: LensPlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> LensResult:
        tok = lm.tokenizer
        values = [units[j][0] for j in sorted(units)]  # layer order
        final_top = values[0]["final_top"]
        rows: list[dict[str, Any]] = []
        for i, pos in enumerate(plan.positions):
            nxt = _next_id(plan.ids, pos)
            tracked = tracked_sources(plan.given, final_top[i], nxt)
            rows.append(
                {
                    "position": pos,
                    "token_id": plan.ids[pos],
                    "token": decode_token(tok, plan.ids[pos]),
                    "next_token": None if nxt is None else decode_token(tok, nxt),
                    "layers": [],
                    "tracked": [
                        {"id": tid, "token": decode_token(tok, tid), "source": src, "ranks": [], "probs": []}
                        for tid, src in tracked.items()
                    ],
                }
            )
        for value in values:
            for rec, top, ranked in zip(rows, value["top"], value["tracked"], strict=True):
                rec["layers"].append(
                    {
                        "layer": value["layer"],
                        "top": [{"id": t, "token": decode_token(tok, t), "prob": p} for t, p in top],
                    }
                )
                for t, (rank, prob) in zip(rec["tracked"], ranked, strict=True):
                    t["ranks"].append(rank)
                    t["probs"].append(prob)
        for rec in rows:
            for t in rec["tracked"]:
                t["first_layer_in_top_k"] = next(
                    (lay for lay, r in zip(plan.layers, t["ranks"], strict=True) if r <= self.top_k), None
                )
        return LensResult(
            {
                "provenance": provenance,
                "text": self.text,
                "source": self.source or {"kind": "text"},
                "input_ids": plan.ids,
                "tokens": [decode_token(tok, t) for t in plan.ids],
                "n_layers": lm.n_layers,
                "layers_shown": plan.layers,
                "top_k": self.top_k,
                "check": values[0]["check"],
                "positions": rows,
            }
        )


def layer_unit(lp: LensPass, layer: int, top_k: int, tracked: list[list[int]]) -> dict[str, Any]:
    """One layer's lens at every position: the top-k (id, probability) pairs by logit, the tracked tokens' (rank,
    probability) pairs, and the forward's check."""
    logits = lp.logits(layer)  # [P, V]
    probs = torch.softmax(logits, -1)
    k = min(top_k, logits.shape[-1])
    top_ids = logits.topk(k, dim=-1).indices  # by logit: the order ranks use
    top, ranked = [], []
    for i, tids_i in enumerate(tracked):
        top.append([[int(t), float(probs[i, t])] for t in top_ids[i]])
        tids = torch.tensor(tids_i, device=logits.device)
        ranks = rank_of(logits[i : i + 1], tids)[0].tolist()
        ranked.append([[int(r), float(p)] for r, p in zip(ranks, probs[i, tids].tolist(), strict=True)])
    return {"layer": layer, "top": top, "tracked": ranked, "check": lp.check}
