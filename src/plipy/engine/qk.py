"""One attention score split into query-side × key-side components: the maths of `plipy.qk`.

The pre-softmax score of query position q and key position k in head h of layer L is

    s = scaling · ⟨rope_q(qnorm(W_q · norm(x_q) + b_q)), rope_k(knorm(W_k · norm(x_k) + b_k))⟩   (Gemma-2: then softcap)

with x_q, x_k the residual stream entering layer L. Once every norm's scale is frozen at the value the observed total
gives it (RMSNorm: x·g/rms(x); LayerNorm: (x − mean x)·g/σ(x) + β; the q/k norms the same over each head), every
step is linear (RoPE is a fixed rotation at each real position), so writing x = Σ_a c_a gives q = Σ_a q_a plus bias
terms, and s = Σ_a Σ_b scaling · ⟨q_a, k_b⟩: a matrix of contributions that sums to the score, in float64.

The frozen scales make this a linearisation exact for the observed total (the terms add up to the score), not a
counterfactual: removing a component would also change the norms' scales, which the terms do not show.

`capture` runs the one forward that decomposition needs: the residual entering layer L and every earlier component's
output (embedding, attention — per head if asked — and MLP) at the query and key rows only, the observed scores as the
check, and the RoPE cos/sin layer L received. `qk_map` reads the layer's weights in float64 through the family's
table row (`plipy.engine.arch.QkLayout`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from plipy.engine.arch import QkLayout, adapter
from plipy.engine.cache import TraceSpec
from plipy.engine.cache import capture as trace_capture
from plipy.engine.spec import EdgeEdit, ResidualAdd
from plipy.errors import PlipyError

ROUNDING = "rounding"  # the observed residual minus the sum of its components: the model's own fp rounding
EMBED, STEER = "embed", "steer"


# -- the frozen linear maps ------------------------------------------------------------------------------------------


@dataclass
class NormMap:
    """A norm with its scale frozen: x → (x − mean x if `centred`) · scale · gain, plus `bias` as its own term."""

    centred: bool  # LayerNorm removes the mean; RMSNorm does not
    gain: torch.Tensor | None  # float64, Gemma's (1 + weight) included
    bias: torch.Tensor | None
    eps: float

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, total: torch.Tensor) -> torch.Tensor:
        """1/rms (1/σ for LayerNorm) of the observed total `[..., n]` → `[..., 1]`: the value the scale is frozen at."""
        x = self._centre(total)
        return 1.0 / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)

    def apply(self, parts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The frozen map on components `[..., n]` (no bias: that is a term of its own)."""
        y = self._centre(parts) * scale
        return y if self.gain is None else y * self.gain


def _f64(t: torch.Tensor) -> torch.Tensor:
    """A weight in float64 on the CPU; a Ray driver's weightless (meta) model keeps meta tensors: its map only
    describes the layer, the workers compute with their own."""
    t = t.detach().double()
    return t if t.is_meta else t.cpu()


def norm_map(module: torch.nn.Module, plus_one: bool) -> NormMap:
    """The `NormMap` of a LayerNorm or an RMSNorm module (a PlipyError for anything else)."""
    if isinstance(module, torch.nn.LayerNorm):
        gain = None if module.weight is None else _f64(module.weight)
        bias = None if module.bias is None else _f64(module.bias)
        return NormMap(True, gain, bias, float(module.eps))
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if "RMSNorm" not in type(module).__name__ or eps is None or not isinstance(weight, torch.Tensor):
        raise PlipyError(f"{type(module).__name__}: plipy's QK decomposition knows LayerNorm and RMSNorm only")
    gain = _f64(weight) + (1.0 if plus_one else 0.0)
    return NormMap(False, gain, None, float(eps))


@dataclass
class QkMap:
    """Everything layer L's scores depend on besides the residual, in float64 (`qk_map`)."""

    layer: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm: NormMap | None  # the norm before attention (None: the attention reads the residual itself)
    w_q: torch.Tensor  # [heads, d, D]
    b_q: torch.Tensor | None  # [heads, d]
    w_k: torch.Tensor  # [kv_heads, d, D]
    b_k: torch.Tensor | None
    q_norm: NormMap | None
    k_norm: NormMap | None
    qk_norm_span: str  # "head" | "all"
    scaling: float
    softcap: float | None
    rope: bool  # whether the layer rotates q and k (GPT-2: no; SmolLM3's NoPE layers: no)

    def describe(self) -> dict[str, Any]:
        """The linearisation in words and numbers, for the result document."""
        norm = None if self.norm is None else "layernorm" if self.norm.centred else "rmsnorm"
        qk = (
            None
            if self.q_norm is None
            else ("layernorm" if self.q_norm.centred else "rmsnorm")
            + " per "
            + ("head" if self.qk_norm_span == "head" else "layer (every head at once)")
        )
        return {
            "norm": norm,
            "qk_norm": qk,
            "rope": self.rope,
            "scaling": self.scaling,
            "softcap": self.softcap,
            "q_bias": self.b_q is not None,
            "k_bias": self.b_k is not None,
        }


def _linear(attn: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the projection `name` of `attn`, float64 on the CPU (bias None when it has none)."""
    proj = getattr(attn, name)
    b = proj.bias
    return _f64(proj.weight), None if b is None else _f64(b)


def _weights(
    attn: torch.nn.Module, layout: QkLayout, h: int, k: int, d: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(W_q [h, d, D], b_q, W_k [k, d, D], b_k) in float64 from the family's projection layout."""
    if layout.proj == "split":
        wq, bq = _linear(attn, "q_proj")
        wk, bk = _linear(attn, "k_proj")
    elif layout.proj == "qkv":  # Phi-3: rows [q | k | v]
        w, b = _linear(attn, "qkv_proj")
        wq, wk = w[: h * d], w[h * d : (h + k) * d]
        bq, bk = (None, None) if b is None else (b[: h * d], b[h * d : (h + k) * d])
    elif layout.proj == "c_attn":  # GPT-2's Conv1D: y = x @ W, columns [q | k | v]
        w, b = _linear(attn, "c_attn")
        w = w.T
        wq, wk = w[: h * d], w[h * d : 2 * h * d]
        bq, bk = (None, None) if b is None else (b[: h * d], b[h * d : 2 * h * d])
    elif layout.proj == "neox":  # GPT-NeoX: rows per head [q, k, v]
        w, b = _linear(attn, "query_key_value")
        w3 = w.reshape(h, 3, d, -1)
        wq, wk = w3[:, 0].reshape(h * d, -1), w3[:, 1].reshape(h * d, -1)
        bq, bk = (None, None) if b is None else (b.reshape(h, 3, d)[:, 0].flatten(), b.reshape(h, 3, d)[:, 1].flatten())
    else:
        raise PlipyError(f"unknown QK projection layout {layout.proj!r}")
    return (
        wq.reshape(h, d, -1),
        None if bq is None else bq.reshape(h, d),
        wk.reshape(k, d, -1),
        None if bk is None else bk.reshape(k, d),
    )


def supported(model: torch.nn.Module) -> str | None:
    """Why plipy cannot decompose this model's scores (None: it can)."""
    arch = adapter(model)
    if arch.family is None:
        return f"plipy has no adapter for the {arch.model_type!r} family, so it does not know its query/key layout"
    if arch.family.qk.refused:
        return f"{arch.family.name}: {arch.family.qk.refused}"
    return None


def qk_map(model: torch.nn.Module, layer: int) -> QkMap:
    """Layer `layer`'s query/key maps in float64, from the family's `QkLayout` (a PlipyError says why a family is
    refused)."""
    why = supported(model)
    if why is not None:
        raise PlipyError(f"cannot decompose attention scores: {why}")
    arch = adapter(model)
    layout = arch.family.qk  # type: ignore[union-attr]  # supported() checked the family
    attn = arch.attention(layer)
    h, k, d = arch.n_heads, arch.n_kv_heads, arch.head_dim
    block = arch.layers()[layer]
    norm = None if layout.norm is None else norm_map(getattr(block, layout.norm), layout.gain_plus_one)
    wq, bq, wk, bk = _weights(attn, layout, h, k, d)
    qn, kn = (getattr(attn, n, None) for n in layout.qk_norms)
    q_norm = norm_map(qn, layout.gain_plus_one) if isinstance(qn, torch.nn.Module) else None
    k_norm = norm_map(kn, layout.gain_plus_one) if isinstance(kn, torch.nn.Module) else None
    scaling = getattr(attn, "scaling", None)
    softcap = getattr(attn, "attn_logit_softcapping", None)
    return QkMap(
        layer=layer,
        n_heads=h,
        n_kv_heads=k,
        head_dim=d,
        norm=norm,
        w_q=wq,
        b_q=bq,
        w_k=wk,
        b_k=bk,
        q_norm=q_norm,
        k_norm=k_norm,
        qk_norm_span=layout.qk_norm_span,
        scaling=float(d**-0.5 if scaling is None else scaling),
        softcap=None if softcap is None else float(softcap),
        rope=bool(getattr(attn, "use_rope", True)),
    )


# -- the decomposition -----------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half, on the first `cos.shape[-1]` dimensions) of `x [..., d]` at one position."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + turned * sin, rest], -1)


def _qk_norm(nm: NormMap, parts: torch.Tensor, span: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A q/k norm frozen at the total of `parts [n, heads, d]` → (normed parts, its bias broadcast to [heads, d])."""
    n, heads, d = parts.shape
    total = parts.sum(0)
    if span == "all":  # OLMo-2: one norm over every head's dimensions at once
        flat = nm.apply(parts.reshape(n, heads * d), nm.scale(total.reshape(heads * d)))
        bias = None if nm.bias is None else nm.bias.reshape(heads, d)
        return flat.reshape(n, heads, d), bias
    out = nm.apply(parts, nm.scale(total))
    return out, None if nm.bias is None else nm.bias.expand(heads, d)


def project(
    m: QkMap,
    side: str,
    names: Sequence[str],
    parts: torch.Tensor,
    total: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[list[str], torch.Tensor]:
    """Components `parts [n, D]` (float64) of the residual `total [D]` at one position, carried to the query
    (`side="q"`) or key (`"k"`) side: `(names, [n', heads or kv_heads, d])`, the bias terms appended (`norm_bias`,
    `q_bias`/`k_bias`, `q_norm_bias`/`k_norm_bias`) as components of their own."""
    out_names = list(names)
    x = parts
    if m.norm is not None:
        x = m.norm.apply(parts, m.norm.scale(total))
        if m.norm.bias is not None:
            x = torch.cat([x, m.norm.bias[None]])
            out_names.append("norm_bias")
    w, b = (m.w_q, m.b_q) if side == "q" else (m.w_k, m.b_k)
    y = torch.einsum("nD,hdD->nhd", x, w)
    if b is not None:
        y = torch.cat([y, b[None]])
        out_names.append(f"{side}_bias")
    nm = m.q_norm if side == "q" else m.k_norm
    if nm is not None:
        y, nb = _qk_norm(nm, y, m.qk_norm_span)
        if nb is not None:
            y = torch.cat([y, nb[None]])
            out_names.append(f"{side}_norm_bias")
    if m.rope and rope is not None:
        y = _rotate(y, rope[0], rope[1])
    return out_names, y


def terms(m: QkMap, q: torch.Tensor, k: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    """The contribution matrix `[len(heads), A, B]` of query-side parts `q [A, heads, d]` and key-side parts
    `k [B, kv_heads, d]` (GQA: each query head reads its key/value head); it sums to the pre-softcap score."""
    hs = torch.as_tensor(list(heads), dtype=torch.long)
    kv = hs // (m.n_heads // m.n_kv_heads)
    return m.scaling * torch.einsum("ahd,bhd->hab", q[:, hs], k[:, kv])


def softcap(m: QkMap, raw: torch.Tensor) -> torch.Tensor:
    """The score the softmax sees: Gemma-2's cap·tanh(raw/cap), else the raw score."""
    return raw if m.softcap is None else m.softcap * torch.tanh(raw / m.softcap)


# -- the capture -----------------------------------------------------------------------------------------------------


@dataclass
class QkCapture:
    """What one forward gives the decomposition of layer `layer`, at the absolute positions `rows` (axis R)."""

    layer: int
    rows: list[int]
    names: list[str]  # the residual components, in model order; the last is ROUNDING
    components: torch.Tensor  # [n, R, D] float64; they sum to `resid` (ROUNDING makes it exact)
    resid: torch.Tensor  # [R, D] float64: the residual entering the layer, as observed
    scores: torch.Tensor  # [heads, R, keys] float32: the observed scores (softcap, mask and edits included)
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [R, rot] float64 (None: no RoPE)

    def row(self, position: int) -> int:
        """The index on axis R of an absolute position."""
        return self.rows.index(position)


def _add_vectors(adds: Iterable[ResidualAdd], rows: Sequence[int], dtype: torch.dtype, keep) -> torch.Tensor | None:
    """Σ of the residual adds `keep(add)` selects, at `rows` `[R, D]` float64 (rounded to the model dtype first, as the
    engine adds them), or None when none applies."""
    out = None
    for a in adds:
        if not keep(a):
            continue
        vec = a.vector.to(dtype).double().cpu()
        vec = vec[0] if vec.ndim == 2 else vec
        at = [i for i, r in enumerate(rows) if a.positions is None or r in list(a.positions)]
        if not at:
            continue
        out = torch.zeros(len(rows), vec.shape[-1], dtype=torch.float64) if out is None else out
        out[at] += vec
    return out


def _head_parts(model: torch.nn.Module, layer: int, z: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """Layer `layer`'s attention contribution split per head from `z [R, heads, d]`: `z_h · W_O,h`, the output bias as
    its own term, Gemma-2/3's post-attention norm frozen at the total, Granite's multiplier applied."""
    arch = adapter(model)
    w_o = arch.head_output_weights(layer)  # [H, d, D]
    y = torch.einsum("rhd,hdD->hrD", z.double(), w_o)  # [H, R, D]
    bias = getattr(arch.output_projection(layer), "bias", None)
    parts = list(y)
    names = [f"L{layer}H{h}" for h in range(y.shape[0])]
    if bias is not None:
        parts.append(bias.detach().double().cpu().expand_as(y[0]))
        names.append(f"L{layer}.attn_bias")
    module, factor = arch.contribution(layer, "attn")
    if module is not arch.attention(layer):  # a post-attention norm: frozen at the observed total
        fam = arch.family
        assert fam is not None
        nm = norm_map(module, fam.qk.gain_plus_one)
        s = nm.scale(torch.stack(parts).sum(0))
        parts = [nm.apply(p, s) for p in parts]
        if nm.bias is not None:
            parts.append(nm.bias.expand_as(y[0]))
            names.append(f"L{layer}.attn_norm_bias")
    if factor is not None:
        parts = [p * factor for p in parts]
    return names, parts


def capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layer: int,
    rows: Sequence[int],
    *,
    per_head: bool = False,
    edits: Iterable[EdgeEdit] = (),
    residual_adds: Iterable[ResidualAdd] = (),
) -> QkCapture:
    """One forward of `input_ids [1, T]` keeping, at the positions `rows` only, what layer `layer`'s score
    decomposition needs (under `edits` / `residual_adds` if given)."""
    adds = list(residual_adds)
    arch = adapter(model)
    rows = sorted({int(r) for r in rows})
    earlier = tuple(range(layer))
    hooks: dict[str, tuple[int, ...]] = {
        "hook_resid_pre": tuple(sorted({0, layer})),
        "hook_attn_scores": (layer,),
        ("hook_z" if per_head else "hook_attn_out"): earlier,
        "hook_mlp_out": earlier,
    }
    spec = TraceSpec({k: v for k, v in hooks.items() if v}, rows=tuple(rows))
    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pe = kwargs.get("position_embeddings")
        seen["rope"] = None if pe is None else tuple(t[0, rows].detach().double().cpu() for t in pe)

    handle = arch.attention(layer).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, cache = trace_capture(model, input_ids, spec, edits=edits, residual_adds=adds)
    finally:
        handle.remove()
    dtype = next(model.parameters()).dtype
    resid = cache[f"blocks.{layer}.hook_resid_pre"][0].double()
    first = _add_vectors(adds, rows, dtype, lambda a: a.layer == 0 and a.where == "pre")
    embed = cache["blocks.0.hook_resid_pre"][0].double()
    names, parts = [EMBED], [embed if first is None else embed - first]
    for lay in earlier:
        if per_head:
            n, p = _head_parts(model, lay, cache[f"blocks.{lay}.attn.hook_z"][0])
            names += n
            parts += p
        else:
            names.append(f"L{lay}.attn")
            parts.append(cache[f"blocks.{lay}.hook_attn_out"][0].double())
        names.append(f"L{lay}.mlp")
        parts.append(cache[f"blocks.{lay}.hook_mlp_out"][0].double())
    steer = _add_vectors(adds, rows, dtype, lambda a: a.layer <= layer if a.where == "pre" else a.layer < layer)
    if steer is not None:
        names.append(STEER)
        parts.append(steer)
    stacked = torch.stack(parts)
    names.append(ROUNDING)
    comps = torch.cat([stacked, (resid - stacked.sum(0))[None]])
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0]
    return QkCapture(layer, rows, names, comps, resid, scores, seen.get("rope"))
