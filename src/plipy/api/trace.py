"""`plipy.trace`: one forward, its activations in a cache keyed by TransformerLens' hook names (`run_with_cache`).

logits, cache = plipy.trace("smollm2-135m", "def add(a, b):", names=["hook_pattern"], rows="last")
cache["blocks.3.attn.hook_pattern"]      # [batch, head, 1, key_pos]: the last token's attention at layer 3
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, as_model
from plipy.engine.arch import adapter, config_value
from plipy.engine.cache import HEAD_AXIS, ActivationCache, TraceSpec, capture, check_names, estimate, human_bytes
from plipy.errors import ParameterError, PlipyError

DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB: full patterns of every layer blow up memory fast (T² per head)
ROW_WORDS = ("all", "last")


def _check_rows(rows: Any) -> None:
    """The grammar of `rows=` (its bounds need the token count): "all", "last", a position or a list of them."""
    if isinstance(rows, str) and rows.strip() in ROW_WORDS:
        return
    try:
        opt.indices(rows, param="rows", what="position")
    except ParameterError:
        raise ParameterError(
            "rows", f"cannot read {rows!r}: use all | last | token positions such as 0,5,-1 (negative: from the end)"
        ) from None


def _resolve_rows(rows: Any, n_tokens: int) -> tuple[int, ...] | None:
    """Query positions from `rows=` (None: all), unique in the order given; negative ones count from the end."""
    if isinstance(rows, str) and rows.strip() == "all":
        return None
    if isinstance(rows, str) and rows.strip() == "last":
        return (n_tokens - 1,)
    raw = opt.indices(rows, param="rows", what="position")
    bad = [p for p in raw if not -n_tokens <= p < n_tokens]
    if bad:
        raise ParameterError(
            "rows",
            f"position {bad[0]} does not exist: the input has {n_tokens} tokens (0-{n_tokens - 1}, or "
            f"-{n_tokens}…-1 from the end)",
        )
    if not raw:
        raise ParameterError("rows", "names no position")
    return tuple(dict.fromkeys(p % n_tokens for p in raw))


def _as_ids(text: Any) -> torch.Tensor | None:
    """Token ids `[batch, pos]` from ids given as a list, a list of equally long lists or a tensor; None for text."""
    if isinstance(text, str):
        if not text:
            raise ParameterError("text", "is empty: nothing to trace")
        return None
    if isinstance(text, bool) or text is None:
        raise ParameterError("text", f"expected a text or token ids, got {text!r}")
    try:
        ids = torch.as_tensor(text)
    except (TypeError, ValueError, RuntimeError):
        raise ParameterError("text", "expected a text, a list of token ids or an integer tensor [batch, pos]") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ParameterError("text", f"token ids must be integers, got {ids.dtype}")
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.numel() == 0:
        raise ParameterError("text", f"token ids must be [pos] or [batch, pos] and not empty, got {list(ids.shape)}")
    return ids.long()


def _encode(tokenizer: Any, text: str, bos: bool) -> torch.Tensor:
    """A text's ids as plipy's experiments feed it: no special tokens, BOS only when asked."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ParameterError("bos", f"tokenizer {type(tokenizer).__name__} has no BOS token")
        ids = [int(tokenizer.bos_token_id), *ids]
    if not ids:
        raise ParameterError("text", "is empty after tokenization: nothing to trace")
    return torch.tensor([ids])


def _model_and_ids(model: Any, text: Any, ids: torch.Tensor | None, bos: bool, load: dict) -> tuple[Any, Any]:
    """(the HF model, input ids on its device): a text needs the tokenizer; ids run on an HF model as it is."""
    if ids is not None and isinstance(model, torch.nn.Module) and load.get("tokenizer") is None:
        hf = model.eval()  # ids need no tokenizer: trace the module itself
    else:
        lm = as_model(model, **load)
        hf = lm.model
        if ids is None:
            ids = _encode(lm.tokenizer, text, bos)
    return hf, ids.to(next(hf.parameters()).device)


def _check_input(hf: Any, ids: torch.Tensor) -> None:
    """Ids within the vocabulary and the context, and a model whose decoder layers plipy finds."""
    vocab = config_value(hf.config, "vocab_size")
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= int(vocab)):
        raise ParameterError("text", f"token ids must lie in 0…{int(vocab) - 1} (the model's vocabulary)")
    limit = config_value(hf.config, "max_positions")
    if limit is not None and ids.shape[1] > int(limit):
        raise PlipyError(f"the input has {ids.shape[1]} tokens, longer than the model's context ({limit})")
    adapter(hf)  # the family's layers are found (or refused) before anything runs


def check_memory(spec: TraceSpec, hf: torch.nn.Module, ids: torch.Tensor, max_bytes: int | None) -> int:
    """The estimated bytes of the cache (plus the engine's working memory of one layer); a PlipyError above
    `max_bytes` naming the biggest parts, before anything runs."""
    parts = estimate(spec, hf, int(ids.shape[0]), int(ids.shape[1]))
    total = sum(parts.values())
    if max_bytes is not None and total > max_bytes:
        biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in biggest if v)
        raise PlipyError(
            f"the cache asked for would take about {human_bytes(total)} ({detail}), above max_bytes="
            f"{human_bytes(max_bytes)}: ask fewer names, layers or heads, rows='last', or raise max_bytes"
        )
    return total


def trace(
    model: Any = DEFAULT_MODEL,
    text: str | Sequence[int] | torch.Tensor | None = None,
    *,
    names: str | Sequence[str] | None = None,
    layers: Any = "all",
    heads: Any = "all",
    rows: Any = "all",
    bos: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    device_map: Any = None,
    max_memory: Any = None,
) -> tuple[torch.Tensor, ActivationCache]:
    """TransformerLens' `run_with_cache` for any HF decoder: one forward of `text` (a string, or token ids `[pos]` /
    `[batch, pos]`), returning (logits on the CPU, an `ActivationCache` of TL-named activations on the CPU).

    `names`: None (every hook), or hook kinds (`hook_pattern`, `pattern`; at every layer of `layers`) and full names
    (`blocks.3.attn.hook_pattern`); `heads` selects the head axis of patterns, scores and `z`; `rows` the query
    positions ("all", "last", or positions, negative from the end) of every per-position hook. The cache's size is
    estimated first and refused above `max_bytes` (None: no limit); docs/trace.md gives each hook's cost."""
    entries = check_names(names)
    opt.check_selection(layers, param="layers")
    opt.check_selection(heads, param="heads", what="head")
    _check_rows(rows)
    if max_bytes is not None:
        opt.check_positive(max_bytes, param="max_bytes")
    if text is None:
        raise ParameterError("text", "give the text (or token ids) to trace")
    ids = _as_ids(text)
    if bos and ids is not None:
        raise ParameterError("bos", "applies to a text; token ids are traced as given")
    load = {
        "dtype": dtype,
        "device": device,
        "tokenizer": tokenizer,
        "device_map": device_map,
        "max_memory": max_memory,
    }
    hf, ids = _model_and_ids(model, text, ids, bos, load)
    _check_input(hf, ids)
    spec = _spec(hf, entries, layers, heads, _resolve_rows(rows, int(ids.shape[1])))
    check_memory(spec, hf, ids, max_bytes)
    return capture(hf, ids, spec)


def _spec(
    hf: torch.nn.Module,
    entries: list[tuple[str, int | None]],
    layers: Any,
    heads: Any,
    rows: tuple[int, ...] | None,
) -> TraceSpec:
    """The trace spec once the model's sizes bound the layers and heads."""
    arch = adapter(hf)
    head_list = opt.parse_heads(heads, arch.n_heads)
    if not head_list and any(k in HEAD_AXIS for k, _ in entries):
        raise ParameterError("heads", "names no head, but hook_pattern, hook_attn_scores or hook_z has a head axis")
    layer_list = opt.parse_layers(layers, arch.n_layers)
    for _, layer in entries:
        if layer is not None and layer >= arch.n_layers:
            raise ParameterError(
                "names", f"layer {layer} does not exist: the model has {arch.n_layers} layers (0-{arch.n_layers - 1})"
            )
    every_head = head_list == list(range(arch.n_heads))
    return TraceSpec.build(entries, layer_list, heads=None if every_head else head_list, rows=rows)
