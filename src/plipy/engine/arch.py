"""One adapter per model family (nnterp's idea): where a family keeps its decoder layers, attention modules,
per-head output projection, final norm and unembedding, which config keys name its sizes, and its quirks.

Every module that needs such knowledge asks here (`adapter(model)`), so a new family is one table row.
Unknown families fall back to discovery (the usual attribute names, then any ModuleList of the layer count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from plipy.errors import PlipyError

# Standardized names → the config keys families use for them (first present wins).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "multi_query_group_num"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions", "n_ctx"),
    "attn_softcap": ("attn_logit_softcapping",),
    "final_softcap": ("final_logit_softcapping",),
}


@dataclass(frozen=True)
class QkLayout:
    """How a family's attention reads the residual stream into queries and keys (`plipy.engine.qk`, the exact score
    decomposition): the decoder-layer norm before it (None: it reads the residual itself, OLMo-2 and EXAONE-4), the
    projection layout, Gemma's (1 + weight) RMSNorm gains, the q/k norms' attribute names and span ("head": over
    each head, "all": over every head at once, OLMo-2). RoPE is rotate-half on the first dimensions, with the cos/sin
    the layer received. `refused`: why plipy does not decompose this family."""

    norm: str | None = "input_layernorm"
    proj: str = "split"  # q_proj + k_proj | "qkv": Phi-3's rows | "c_attn": GPT-2's Conv1D | "neox": per head [q, k, v]
    gain_plus_one: bool = False
    qk_norms: tuple[str, str] = ("q_norm", "k_norm")
    qk_norm_span: str = "head"
    refused: str | None = None


_INTERLEAVED = "its rotary embedding rotates interleaved pairs of dimensions, which plipy's decomposition does not"
_GEMMA_QK = QkLayout(gain_plus_one=True)


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts (dotted attribute paths from the *ForCausalLM model) and its quirks."""

    name: str
    layers: str = "model.layers"
    attention: str = "self_attn"  # attribute of a decoder layer
    o_proj: str = "o_proj"  # attribute of the attention module
    o_proj_conv1d: bool = False  # GPT-2's Conv1D stores its weight as [in, out], not Linear's [out, in]
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    softmax_upcast: bool = True  # GPT-2's eager attention takes the softmax in the model dtype; the rest in fp32
    mlp: str = "mlp"  # attribute of a decoder layer
    # What each sublayer adds to the residual stream is the output of this decoder-layer attribute (None: of the
    # attention / MLP module itself): Gemma-2/3, OLMo-2 and EXAONE-4 normalise it first ("sandwich" norms).
    attn_out: str | None = None
    mlp_out: str | None = None
    residual_multiplier: bool = False  # Granite scales both contributions by config.residual_multiplier
    qk: QkLayout = QkLayout()


_LLAMA = Family("llama-like")
_ATTN_NORM, _MLP_NORM = "post_attention_layernorm", "post_feedforward_layernorm"  # sandwich norms
FAMILIES: dict[str, Family] = {
    **{
        t: Family(t)
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "qwen2_moe",
            "qwen3_moe",
            "starcoder2",
            "smollm3",
        )
    },
    "gemma": Family("gemma", qk=_GEMMA_QK),
    "olmo": Family("olmo", qk=QkLayout(refused="its optional q/k/v clipping is not linear")),
    **{t: Family(t, qk=QkLayout(refused=_INTERLEAVED)) for t in ("cohere", "cohere2", "helium", "glm")},
    **{t: Family(t, attn_out=_ATTN_NORM, mlp_out=_MLP_NORM, qk=_GEMMA_QK) for t in ("gemma2", "gemma3_text")},
    "olmo2": Family("olmo2", attn_out=_ATTN_NORM, mlp_out=_MLP_NORM, qk=QkLayout(norm=None, qk_norm_span="all")),
    "exaone4": Family("exaone4", attn_out=_ATTN_NORM, mlp_out=_MLP_NORM, qk=QkLayout(norm=None)),
    "granite": Family("granite", residual_multiplier=True),
    # multimodal Gemma-3 nests the text stack one level deeper
    "gemma3": Family(
        "gemma3",
        layers="model.language_model.layers",
        final_norm="model.language_model.norm",
        attn_out=_ATTN_NORM,
        mlp_out=_MLP_NORM,
        qk=_GEMMA_QK,
    ),
    "gpt2": Family(
        "gpt2",
        layers="transformer.h",
        attention="attn",
        o_proj="c_proj",
        o_proj_conv1d=True,
        final_norm="transformer.ln_f",
        softmax_upcast=False,
        qk=QkLayout(norm="ln_1", proj="c_attn"),
    ),
    "gpt_neox": Family(
        "gpt_neox",
        layers="gpt_neox.layers",
        attention="attention",
        o_proj="dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="embed_out",
        qk=QkLayout(proj="neox"),
    ),
    "phi": Family(
        "phi", o_proj="dense", final_norm="model.final_layernorm", qk=QkLayout(qk_norms=("q_layernorm", "k_layernorm"))
    ),
    "phi3": Family("phi3", qk=QkLayout(proj="qkv")),
}
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_O_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
_GPT2_MODULE = "transformers.models.gpt2."


def text_config(config: Any) -> Any:
    """The text part of a config (multimodal configs nest it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """A standardized size (`n_layers`, `n_heads`, … see CONFIG_KEYS) from any family's config."""
    cfg = text_config(config)
    for name in CONFIG_KEYS[key]:
        v = getattr(cfg, name, None)
        if v is not None:
            return v
    return default


def _path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def softmax_upcast(module: torch.nn.Module) -> bool:
    """Whether this attention module's eager softmax runs in fp32 (every family but GPT-2)."""
    return not type(module).__module__.startswith(_GPT2_MODULE)


class Arch:
    """The parts and sizes of one loaded model, found once through its family's table row."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = text_config(model.config)
        self.model_type = str(getattr(model.config, "model_type", ""))
        self.family = FAMILIES.get(self.model_type) or FAMILIES.get(str(getattr(self.config, "model_type", "")))
        n = config_value(model.config, "n_layers")
        if n is None:
            raise PlipyError(f"config {type(model.config).__name__} names no layer count")
        self.n_layers = int(n)
        self._layers = self._find_layers()

    # -- sizes -----------------------------------------------------------------------------------------------

    @property
    def n_heads(self) -> int:
        return int(config_value(self.config, "n_heads"))

    @property
    def n_kv_heads(self) -> int:
        return int(config_value(self.config, "n_kv_heads") or self.n_heads)

    @property
    def hidden_size(self) -> int:
        return int(config_value(self.config, "hidden_size"))

    @property
    def head_dim(self) -> int:
        return int(config_value(self.config, "head_dim") or self.hidden_size // self.n_heads)

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-2's final tanh softcap of the logits (None: none)."""
        v = config_value(self.config, "final_softcap")
        return None if v is None else float(v)

    # -- parts -----------------------------------------------------------------------------------------------

    def _find_layers(self) -> torch.nn.ModuleList:
        model, n = self.model, self.n_layers
        candidates = [self.family.layers] if self.family else []
        candidates += [p for p in (f.layers for f in FAMILIES.values()) if p not in candidates]
        for dotted in candidates:
            layers = _path(model, dotted)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
                return layers
        for _, mod in model.named_modules():  # unknown family: the one ModuleList of the layer count
            if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
                return mod
        raise PlipyError(f"cannot find the {n} decoder layers of {type(model).__name__}")

    def layers(self) -> torch.nn.ModuleList:
        """The decoder blocks, in order."""
        return self._layers

    def attention(self, layer: int) -> torch.nn.Module:
        """The attention module of decoder layer `layer`."""
        block = self._layers[layer]
        names = ((self.family.attention,) if self.family else ()) + _ATTENTION_NAMES
        for name in names:
            m = getattr(block, name, None)
            if isinstance(m, torch.nn.Module):
                return m
        for m in block.modules():
            if type(m).__name__.endswith("Attention"):
                return m
        raise PlipyError(f"no attention module in {type(block).__name__}")

    def head_output_weights(self, layer: int) -> torch.Tensor:
        """W_O per head, `[heads, head_dim, d_model]` (float64): a Linear `[d_model, H·d]` weight sliced by columns,
        or GPT-2's Conv1D `[H·d, d_model]` weight sliced by rows."""
        attn = self.attention(layer)
        names = ((self.family.o_proj,) if self.family else ()) + _O_PROJ_NAMES
        proj = next((getattr(attn, n) for n in names if hasattr(getattr(attn, n, None), "weight")), None)
        if proj is None:
            raise PlipyError(f"layer {layer}: cannot find the attention output projection of {type(attn).__name__}")
        w = proj.weight.detach().double()
        h = self.n_heads
        if type(proj).__name__ == "Conv1D":  # GPT-2: y = x @ W, W [in, out]
            return w.reshape(h, w.shape[0] // h, w.shape[1])
        return w.T.reshape(h, w.shape[1] // h, w.shape[0])  # Linear: y = x @ W.T, W [out, in]

    def known_family(self, what: str) -> Family:
        """This model's family row, or a PlipyError naming the family: `what` needs knowledge discovery lacks."""
        if self.family is None:
            known = ", ".join(sorted(FAMILIES))
            raise PlipyError(
                f"{what}: plipy has no adapter for the {self.model_type!r} family ({type(self.model).__name__}), "
                f"so it does not know which module that is (known families: {known}; attention patterns, scores, "
                "values and residuals work for any family)"
            )
        return self.family

    def output_projection(self, layer: int) -> torch.nn.Module:
        """The attention output projection of decoder layer `layer` (its input is the per-head outputs, `z`)."""
        fam = self.known_family("the attention output projection (hook_z)")
        proj = getattr(self.attention(layer), fam.o_proj, None)
        if not isinstance(proj, torch.nn.Module):
            raise PlipyError(f"layer {layer}: {fam.name} attention has no output projection {fam.o_proj!r}")
        return proj

    def contribution(self, layer: int, sublayer: str) -> tuple[torch.nn.Module, float | None]:
        """What the `"attn"` or `"mlp"` sublayer of decoder layer `layer` adds to the residual stream: the module
        whose output (the first element of a tuple) is it, and the factor the family multiplies it by (or None)."""
        fam = self.known_family(f"the {sublayer} output (hook_{sublayer}_out)")
        block: Any = self._layers[layer]
        name = fam.attn_out if sublayer == "attn" else fam.mlp_out
        module: Any = (
            self.attention(layer) if name is None and sublayer == "attn" else getattr(block, name or fam.mlp, None)
        )
        if not isinstance(module, torch.nn.Module):
            raise PlipyError(f"layer {layer}: {type(block).__name__} has no module {name or fam.mlp!r}")
        scale = float(block.residual_multiplier) if fam.residual_multiplier else None
        return module, scale

    def final_norm(self) -> torch.nn.Module:
        """The norm applied to the last layer's output before the unembedding."""
        m = _path(self.model, self.family.final_norm) if self.family else None
        if m is None:
            for dotted in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
                m = _path(self.model, dotted)
                if m is not None:
                    break
        if not isinstance(m, torch.nn.Module):
            raise PlipyError(f"cannot find the final norm of {type(self.model).__name__}")
        return m

    def unembed(self) -> torch.nn.Module:
        """The vocabulary projection (`lm_head`; GPT-NeoX's `embed_out`)."""
        get = getattr(self.model, "get_output_embeddings", None)  # a transformers model's method
        m = get() if get is not None else None
        if m is None and self.family:
            m = _path(self.model, self.family.unembed)
        if not isinstance(m, torch.nn.Module):
            raise PlipyError(f"cannot find the unembedding of {type(self.model).__name__}")
        return m

    def windows(self) -> list[int | None]:
        """Per decoder layer, the sliding-window size (key k is visible from query q when q − k < window), or None."""
        try:
            from transformers.cache_utils import get_layer_types_and_kwargs

            types, kwargs = get_layer_types_and_kwargs(self.config)
            out = [
                kw.get("sliding_window") if t == "sliding_attention" else None
                for t, kw in zip(types, kwargs, strict=False)
            ]
        except Exception:  # noqa: BLE001 — configs without per-layer information: assume full attention
            out = []
        return (out + [None] * self.n_layers)[: self.n_layers]


def adapter(model: torch.nn.Module) -> Arch:
    """The (cached) adapter of a model."""
    a = model.__dict__.get("_plipy_arch")
    if a is None:
        a = Arch(model)
        model.__dict__["_plipy_arch"] = a
    return a


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks of any supported family."""
    return adapter(model).layers()


def head_output_weights(model: torch.nn.Module, layer: int, n_heads: int | None = None) -> torch.Tensor:
    """W_O per head of one layer, `[heads, head_dim, d_model]` (float64)."""
    a = adapter(model)
    if n_heads is not None and n_heads != a.n_heads:
        raise PlipyError(f"{n_heads} heads asked, the model has {a.n_heads}")
    return a.head_output_weights(layer)
