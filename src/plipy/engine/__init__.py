"""The attention engine: one attention function for every HF decoder, steered by a context object.

    engine = Engine(lm.model)
    with engine.run(capture=Capture(rows=[m]), edits=[EdgeEdit(layers=[5], edges=[(m, 0)], scale=0.0)]) as rec:
        logits = lm.model(ids).logits
    rec.attn[5]   # [batch, heads, 1, keys] post-softmax row of query m at layer 5 (after the knockout)

The plan lives in a ContextVar, so `model.generate()` inside the `with` block is steered too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from plipy.engine import attention, patch, residual
from plipy.engine.arch import adapter, decoder_layers
from plipy.engine.attention import NAME, ActivePlan, QKVMix
from plipy.engine.spec import (
    Capture,
    EdgeEdit,
    HeadPatch,
    Record,
    ResidualAdd,
    ResidualCapture,
    SublayerPatch,
    compile_edits,
    compile_patches,
    rows_tensor,
)
from plipy.errors import PlipyError

__all__ = [
    "Engine",
    "Capture",
    "EdgeEdit",
    "HeadPatch",
    "SublayerPatch",
    "QKVMix",
    "ResidualAdd",
    "ResidualCapture",
    "Record",
    "NAME",
    "decoder_layers",
]


class Engine:
    """Installs plipy's attention function and residual hooks on one model (idle until `run()`)."""

    def __init__(self, model: torch.nn.Module, idle: str = "sdpa"):
        """`idle="sdpa"` (default, fast) makes untouched layers bit-identical to HF SDPA; `idle="eager"` computes
        every layer with HF eager's operations in eager's order, bit-identical to `attn_implementation="eager"`."""
        if idle not in ("sdpa", "eager"):
            raise PlipyError(f"idle must be 'sdpa' or 'eager', got {idle!r}")
        attention.register()
        self.idle = idle
        self.model = model
        arch = adapter(model)
        self.layers = arch.layers()
        self.n_layers = len(self.layers)
        self.n_heads = arch.n_heads
        attn_modules = [arch.attention(i) for i in range(self.n_layers)]
        missing = [i for i, m in enumerate(attn_modules) if getattr(m, "layer_idx", None) != i]
        if missing:
            raise PlipyError(
                f"{type(model).__name__}: the attention modules of layers {missing} do not carry their layer index"
            )
        for m in [*attn_modules, *self.layers]:
            m._plipy_owner = id(model)  # a plan only applies to the model it was made for
        # torch's stubs type Module.__setattr__/__getattr__ for tensors and submodules only: plain flags and the
        # transformers model's own methods are fine at run time
        for m in attn_modules:
            m._plipy_eager = idle == "eager"  # type: ignore[assignment]
        model.set_attn_implementation(NAME)  # type: ignore[operator]
        if not getattr(model, "_plipy_hooked", False):
            for i, layer in enumerate(self.layers):
                layer.register_forward_pre_hook(_pre_hook(i), with_kwargs=True)
                layer.register_forward_hook(_post_hook(i), with_kwargs=True)
            model._plipy_hooked = True  # type: ignore[assignment]

    @contextmanager
    def run(
        self,
        capture: Capture | None = None,
        edits: Iterable[EdgeEdit] = (),
        residual_adds: Iterable[ResidualAdd] = (),
        residual_capture: ResidualCapture | None = None,
        patches: Iterable[HeadPatch | SublayerPatch] = (),
        mix: dict[int, QKVMix] | None = None,
    ) -> Iterator[Record]:
        """Within the block, forwards of this model capture and edit as asked; yields the Record they fill.
        `patches` set head outputs and sublayer outputs (`plipy.engine.patch`); `mix` is path patching's twin
        batch (`QKVMix`, per layer)."""
        record = Record()
        layers: frozenset[int] = frozenset()
        rows = None
        if capture is not None:
            layers = frozenset(range(self.n_layers) if capture.layers is None else (int(x) for x in capture.layers))
            for layer in layers:
                if not 0 <= layer < self.n_layers:
                    raise PlipyError(f"layer {layer} does not exist (the model has {self.n_layers} layers)")
            rows = rows_tensor(capture.rows)
            record.rows = rows
        plan = ActivePlan(
            owner=id(self.model),
            capture_layers=layers,
            rows=rows,
            want_scores=bool(capture and capture.scores),
            want_value_norms=bool(capture and capture.value_norms),
            want_values=bool(capture and capture.values),
            edits=compile_edits(edits, self.n_layers, self.n_heads),
            record=record,
            residual=residual.ResidualPlan.build(list(residual_adds), residual_capture, self.n_layers),
            patches=compile_patches(patches, self.n_layers, self.n_heads) or None,
            mix=mix or None,
        )
        if plan.patches:
            patch.install(self.model)
        token = attention.ACTIVE.set(plan)
        try:
            yield record
        finally:
            attention.ACTIVE.reset(token)


def _residual_plan(module: torch.nn.Module) -> ActivePlan | None:
    """The active plan when it adds to or captures the residual stream of this module's model, else None."""
    plan = attention.ACTIVE.get()
    if (
        plan is not None
        and (bool(plan.residual.adds) or bool(plan.residual.capture))
        and getattr(module, "_plipy_owner", None) == plan.owner
    ):
        return plan
    return None


def _pre_hook(layer: int):
    def hook(module, args, kwargs):
        plan = _residual_plan(module)
        if plan is None:
            return None
        if args:
            new = residual.apply(plan.residual, plan.record, layer, "pre", args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = residual.apply(plan.residual, plan.record, layer, "pre", kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(layer: int):
    def hook(module, args, kwargs, output):
        plan = _residual_plan(module)
        if plan is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = residual.apply(plan.residual, plan.record, layer, "post", hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook
