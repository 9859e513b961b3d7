"""Activation patches applied by the engine: per-head attention outputs (`HeadPatch`: a forward pre-hook on the
attention output projection rewrites the heads' slices of its input) and sublayer outputs (`SublayerPatch`: a
forward hook on the module whose output the sublayer adds to the residual stream rewrites that output).

The hooks are installed once per model, the first time a run asks for a patch, and do nothing unless the active
plan (`plipy.engine.attention.ACTIVE`) holds patches for their layer. Positions are absolute: the hook subtracts the
offset of the call's first query row, which the engine's attention function of the same layer recorded (a suffix
run from a KV cache starts at the cache's length), so one patch works for a full forward and a cached suffix alike.
Writing a value over itself changes nothing: a patch with the run's own values gives its bits exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from plipy.engine import attention
from plipy.engine.arch import adapter
from plipy.engine.spec import CompiledPatch
from plipy.errors import PlipyError


def install(model: torch.nn.Module) -> None:
    """Hook the output projections and sublayer modules of every layer (once per model; a family without an
    adapter row is refused here, naming the family)."""
    if getattr(model, "_plipy_patch_hooked", False):
        return
    arch = adapter(model)
    plan: list[tuple[torch.nn.Module, str, Callable[..., Any]]] = []
    for layer in range(arch.n_layers):
        plan.append((arch.output_projection(layer), "pre", _z_hook(layer, arch.n_heads)))
        for sub in ("attn", "mlp"):
            module, _scale = arch.contribution(layer, sub)
            plan.append((module, "post", _out_hook(layer, sub)))
    for module, where, fn in plan:
        # a plan only applies to the model it was made for (a plain attribute: Module.__setattr__ is typed for
        # tensors and modules)
        module.__dict__["_plipy_owner"] = id(model)
        if where == "pre":
            module.register_forward_pre_hook(fn)
        else:
            module.register_forward_hook(fn)
    model.__dict__["_plipy_patch_hooked"] = True


def _entries(layer: int, site: str, module: torch.nn.Module) -> tuple[list[CompiledPatch], int] | None:
    plan = attention.ACTIVE.get()
    if plan is None or not plan.patches or getattr(module, "_plipy_owner", None) != plan.owner:
        return None
    found = plan.patches.get((layer, site))
    if not found:
        return None
    return found, plan.record.offsets.get(layer, 0)


def _write(x: torch.Tensor, entries: list[CompiledPatch], offset: int, layer: int) -> torch.Tensor:
    """`x` ([batch, q, heads, d] or [batch, q, d]) with the entries' rows written at their local positions."""
    out = x.clone()
    batch, q_len = x.shape[0], x.shape[1]
    for e in entries:
        b, p, v = e.b.to(x.device), e.p.to(x.device) - offset, e.value.to(x.device, x.dtype)
        h = torch.zeros_like(b) if e.h is None else e.h.to(x.device)
        if (b >= batch).any():
            raise PlipyError(f"layer {layer}: a patch for batch item {int(b.max())}, but the batch has {batch} items")
        every = b < 0
        if every.any():  # rows for every item: repeated item by item
            n = int(every.sum())
            b = torch.cat([b[~every], torch.arange(batch, device=x.device).repeat_interleave(n)])
            p, h = (torch.cat([t[~every], t[every].repeat(batch)]) for t in (p, h))
            v = torch.cat([v[~every], v[every].repeat(batch, 1)])
        inside = (p >= 0) & (p < q_len)  # rows of this call (a cached suffix holds only the later positions)
        b, p, h, v = b[inside], p[inside], h[inside], v[inside]
        if e.h is None:
            out[b, p] = v
        else:
            out[b, p, h] = v
    return out


def _z_hook(layer: int, n_heads: int) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
        found = _entries(layer, "z", module)
        if found is None:
            return None
        x = args[0]
        z = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
        return (_write(z, found[0], found[1], layer).reshape(x.shape), *args[1:])

    return hook


def _out_hook(layer: int, sub: str) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        found = _entries(layer, sub, module)
        if found is None:
            return None
        first = output[0] if isinstance(output, tuple) else output
        new = _write(first, found[0], found[1], layer)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook
