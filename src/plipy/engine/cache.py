"""Activations of one forward under TransformerLens' hook names: the cache `plipy.trace` returns.

    spec = TraceSpec({"hook_pattern": (3,), "hook_resid_post": (0, 1, 2, 3)}, rows=(9,))
    logits, cache = capture(model, input_ids, spec)
    cache["blocks.3.attn.hook_pattern"]     # [batch, head, query_pos, key_pos], query_pos = the rows asked (9)
    cache.stack("hook_resid_post")         # [layers, batch, pos, d_model]

Patterns, scores, values and residuals come from the engine (`Engine`, `Capture`, `ResidualCapture`); the per-head
outputs `z` (the input of the attention output projection), what the attention and MLP sublayers add to the residual
stream, and the embedding come from forward hooks on the modules the family's adapter names (`arch.py`). Every tensor
is moved to the CPU as soon as its layer has run, so the device holds one layer's worth at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from plipy.engine import Capture, EdgeEdit, Engine, ResidualAdd, ResidualCapture
from plipy.engine.arch import Arch, adapter
from plipy.engine.spec import Record
from plipy.errors import ParameterError
from plipy.options import layer_label

# Hook kind → its TransformerLens name ({L}: the layer), in the order a block computes them.
KINDS: dict[str, str] = {
    "hook_embed": "hook_embed",
    "hook_resid_pre": "blocks.{L}.hook_resid_pre",
    "hook_v": "blocks.{L}.attn.hook_v",
    "hook_attn_scores": "blocks.{L}.attn.hook_attn_scores",
    "hook_pattern": "blocks.{L}.attn.hook_pattern",
    "hook_z": "blocks.{L}.attn.hook_z",
    "hook_attn_out": "blocks.{L}.hook_attn_out",
    "hook_mlp_out": "blocks.{L}.hook_mlp_out",
    "hook_resid_post": "blocks.{L}.hook_resid_post",
}
LAYERLESS = ("hook_embed",)
HEAD_AXIS = ("hook_attn_scores", "hook_pattern", "hook_z")  # kinds whose head axis `heads=` selects
ATTENTION = ("hook_v", "hook_attn_scores", "hook_pattern")  # kinds the engine's attention capture fills
_FULL = re.compile(r"blocks\.(\d+)\.(.+)")
# The engine computes a captured layer's rows with eager maths: scores, masked scores, probabilities and the
# recorded copies, each [batch, heads, rows, keys] float32, live at once while that layer runs.
WORK_FACTOR = 4


def kind_of(name: str) -> str | None:
    """The hook kind of a short name: `hook_pattern`, `attn.hook_pattern` or TL's `pattern` (None if unknown)."""
    short = name.removeprefix("attn.")
    short = short if short.startswith("hook_") else f"hook_{short}"
    return short if short in KINDS else None


def parse_name(name: Any) -> tuple[str, int | None]:
    """(kind, layer) of a hook name: a full TL name (`blocks.3.attn.hook_pattern`: that layer) or a kind
    (`hook_pattern`, `pattern`: every layer asked with `layers=`, layer None); a ParameterError lists the names."""
    if isinstance(name, str):
        m = _FULL.fullmatch(name.strip())
        if m is not None:
            kind = kind_of(m.group(2))
            if kind is not None and kind not in LAYERLESS and KINDS[kind] == f"blocks.{{L}}.{m.group(2)}":
                return kind, int(m.group(1))
        elif kind_of(name.strip()) is not None:
            return str(kind_of(name.strip())), None
    valid = ", ".join(KINDS)
    raise ParameterError(
        "names",
        f"unknown hook name {name!r}: use one of {valid} (every layer asked), or a full name such as "
        "blocks.3.attn.hook_pattern or blocks.3.hook_resid_post (that layer)",
    )


def check_names(names: Any) -> list[tuple[str, int | None]]:
    """The (kind, layer) entries of `names=`: None (every kind), one name, or a list of names."""
    if names is None:
        return [(k, None) for k in KINDS]
    items = [names] if isinstance(names, str) else list(names) if isinstance(names, Iterable) else [names]
    if not items:
        raise ParameterError("names", "names no hook: give None (every hook) or a list of hook names")
    return [parse_name(n) for n in items]


@dataclass(frozen=True)
class TraceSpec:
    """What one traced forward keeps: per kind the layers (`()` for `hook_embed`), the query heads on the head axis
    of patterns, scores and `z` (None: all), the query positions of every per-position hook (None: all)."""

    hooks: Mapping[str, tuple[int, ...]]
    heads: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None

    @classmethod
    def build(
        cls, entries: Sequence[tuple[str, int | None]], layers: Sequence[int], heads=None, rows=None
    ) -> TraceSpec:
        """A spec from `check_names` entries: a kind alone means every layer of `layers`, a full name its layer."""
        chosen: dict[str, set[int]] = {}
        for kind, layer in entries:
            at = chosen.setdefault(kind, set())
            if kind not in LAYERLESS:
                at.update(layers if layer is None else [layer])
        hooks = {k: tuple(sorted(chosen[k])) for k in KINDS if k in chosen}
        return cls(hooks, None if heads is None else tuple(heads), None if rows is None else tuple(rows))

    def layers(self, *kinds: str) -> list[int]:
        """The layers any of `kinds` is captured at, sorted."""
        return sorted({x for k in kinds for x in self.hooks.get(k, ())})

    def names(self) -> list[str]:
        """The TL names this spec captures, in cache order (embedding, then block by block)."""
        out = [k for k in LAYERLESS if k in self.hooks]
        for layer in self.layers(*KINDS):
            out += [KINDS[k].format(L=layer) for k, at in self.hooks.items() if layer in at]
        return out


# -- memory -----------------------------------------------------------------------------------------------------


def estimate(spec: TraceSpec, model: torch.nn.Module, batch: int, n_tokens: int) -> dict[str, int]:
    """Bytes per kind (all its layers together) of the cache `spec` asks for on a `[batch, n_tokens]` input, and
    `working`: what the engine holds on the device while one captured layer runs."""
    arch = adapter(model)
    s = next(model.parameters()).dtype.itemsize
    B, T, D, d = batch, n_tokens, arch.hidden_size, arch.head_dim
    R = T if spec.rows is None else len(spec.rows)
    H = arch.n_heads if spec.heads is None else len(spec.heads)
    per_layer = {
        "hook_embed": B * R * D * s,
        "hook_resid_pre": B * R * D * s,
        "hook_v": B * T * arch.n_kv_heads * d * s,
        "hook_attn_scores": B * H * R * T * 4,  # float32, as the engine records them
        "hook_pattern": B * H * R * T * 4,
        "hook_z": B * R * H * d * s,
        "hook_attn_out": B * R * D * s,
        "hook_mlp_out": B * R * D * s,
        "hook_resid_post": B * R * D * s,
    }
    out = {k: per_layer[k] * max(1, len(at)) for k, at in spec.hooks.items()}
    engine_rows = R if spec.layers("hook_pattern", "hook_attn_scores") else 1 if spec.hooks.get("hook_v") else 0
    out["working"] = WORK_FACTOR * B * arch.n_heads * engine_rows * T * 4
    return out


def human_bytes(n: float) -> str:
    """`1.5 GiB`, `320 MiB`, `12 KiB`, `80 B`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- the cache ----------------------------------------------------------------------------------------------------


class HookNotCaptured(KeyError):
    """A name the cache does not hold; the message lists what it holds."""

    def __str__(self) -> str:
        return str(self.args[0])


class ActivationCache(Mapping[str, torch.Tensor]):
    """Read-only mapping TL hook name → tensor, e.g. `cache["blocks.3.attn.hook_pattern"]` or TL's shorthand
    `cache["pattern", 3]`. `rows` are the query positions on the position axis of every per-position hook (all
    positions: `range(n_tokens)`), `heads` the query heads on the head axis of patterns, scores and `z`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, rows: Sequence[int], heads: Sequence[int]):
        self._tensors = dict(tensors)
        self.rows = list(rows)
        self.heads = list(heads)

    def _name(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int):
            kind = kind_of(str(key[0]))
            return key[0] if kind is None else KINDS[kind].format(L=key[1])
        return key if isinstance(key, str) else repr(key)

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        name = self._name(key)
        if name in self._tensors:
            return self._tensors[name]
        raise HookNotCaptured(f"{name!r} was not captured; this cache holds {self.summary()} (see .names())")

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        """The hook names held, in order (embedding, then block by block)."""
        return list(self._tensors)

    def layers(self, kind: str) -> list[int]:
        """The layers a kind (`hook_pattern`, `pattern`, …) was captured at."""
        k = kind_of(kind)
        if k is None or k in LAYERLESS:
            return []
        pattern = re.compile(re.escape(KINDS[k]).replace(r"\{L\}", r"(\d+)"))
        return sorted(int(m.group(1)) for n in self._tensors if (m := pattern.fullmatch(n)))

    def summary(self) -> str:
        """What the cache holds, one entry per kind: `hook_embed, blocks.{0-29}.attn.hook_pattern`."""
        parts = []
        for k, template in KINDS.items():
            if k in LAYERLESS:
                parts += [k] if k in self._tensors else []
            elif at := self.layers(k):
                label = layer_label(at)
                parts.append(template.replace("{L}", label if len(at) == 1 else "{" + label + "}"))
        return ", ".join(parts) or "nothing"

    @property
    def nbytes(self) -> int:
        """Bytes the tensors take."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def to(self, device: str | torch.device) -> ActivationCache:
        """A copy with every tensor on `device`."""
        return ActivationCache({n: t.to(device) for n, t in self._tensors.items()}, rows=self.rows, heads=self.heads)

    def stack(self, kind: str) -> torch.Tensor:
        """One kind's tensors of every captured layer stacked in layer order: `[layers, …]` (`cache.layers(kind)`
        says which)."""
        at = self.layers(kind)
        if not at:
            raise HookNotCaptured(f"no layer of {kind!r} was captured; this cache holds {self.summary()}")
        k = str(kind_of(kind))
        return torch.stack([self._tensors[KINDS[k].format(L=layer)] for layer in at])

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors, {human_bytes(self.nbytes)}: {self.summary()})"


# -- one traced forward ---------------------------------------------------------------------------------------------


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy owning its memory (never a view keeping a device tensor or a large base alive)."""
    return t.detach().to("cpu", copy=True).contiguous()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class _Collector:
    """Fills the cache layer by layer: module hooks for what the engine does not capture, and a hook after each
    decoder layer that moves that layer's engine captures to the CPU."""

    spec: TraceSpec
    rows: torch.Tensor | None  # query positions (None: all)
    heads: torch.Tensor | None  # query heads (None: all)
    record: Record | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def _rows(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return t if self.rows is None else t.index_select(dim, self.rows.to(t.device))

    def _heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t if self.heads is None else t.index_select(dim, self.heads.to(t.device))

    def z_hook(self, layer: int, n_heads: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            z = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)  # [batch, pos, head, d_head]
            self.tensors[KINDS["hook_z"].format(L=layer)] = _keep(self._heads(self._rows(z), 2))

        return hook

    def out_hook(self, name: str, scale: float | None) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = _first(output)
            out = out if scale is None else out * scale  # the family's own op, so the same rounding
            self.tensors[name] = _keep(self._rows(out))

        return hook

    def harvest(self, layer: int) -> None:
        """Move what the engine recorded for `layer` into the cache (and out of the record)."""
        rec, spec = self.record, self.spec
        if rec is None:
            return
        found = {
            "hook_pattern": rec.attn.pop(layer, None),
            "hook_attn_scores": rec.scores.pop(layer, None),
            "hook_v": rec.values.pop(layer, None),
            "hook_resid_pre": rec.resid.pop((layer, "pre"), None),
            "hook_resid_post": rec.resid.pop((layer, "post"), None),
        }
        for kind, t in found.items():
            if t is None or layer not in spec.hooks.get(kind, ()):
                continue
            if kind == "hook_v":
                t = t.transpose(1, 2)  # [batch, kv_head, pos, d] → TL's [batch, pos, kv_head, d]
            elif kind in HEAD_AXIS:
                t = self._heads(t, 1)
            self.tensors[KINDS[kind].format(L=layer)] = _keep(t)

    def layer_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.harvest(layer)

        return hook


def _install(arch: Arch, model: torch.nn.Module, col: _Collector) -> list[Any]:
    """Module hooks for z, the sublayer outputs, the embedding and the per-layer harvest; their handles. Every module
    is looked up first, so an unknown family is refused before anything is hooked or run."""
    spec = col.spec
    plan: list[tuple[torch.nn.Module, str, Callable[..., None]]] = []
    for layer in spec.hooks.get("hook_z", ()):
        plan.append((arch.output_projection(layer), "pre", col.z_hook(layer, arch.n_heads)))
    for sub in ("attn", "mlp"):
        for layer in spec.hooks.get(f"hook_{sub}_out", ()):
            module, scale = arch.contribution(layer, sub)
            plan.append((module, "post", col.out_hook(KINDS[f"hook_{sub}_out"].format(L=layer), scale)))
    if "hook_embed" in spec.hooks:
        embed: torch.nn.Module = model.get_input_embeddings()  # type: ignore[operator]
        plan.append((embed, "post", col.out_hook("hook_embed", None)))
    for layer in spec.layers(*ATTENTION, "hook_resid_pre", "hook_resid_post"):
        block: torch.nn.Module = arch.layers()[layer]
        plan.append((block, "post", col.layer_hook(layer)))
    return [m.register_forward_pre_hook(fn) if where == "pre" else m.register_forward_hook(fn) for m, where, fn in plan]


def _engine_requests(spec: TraceSpec, n_tokens: int) -> tuple[Capture | None, ResidualCapture | None]:
    """The engine's capture: rows only where patterns or scores are asked (values alone: one cheap row)."""
    attn_layers = spec.layers(*ATTENTION)
    cap = None
    if attn_layers:
        wants_rows = spec.layers("hook_pattern", "hook_attn_scores")
        rows = list(range(n_tokens)) if spec.rows is None else list(spec.rows)
        cap = Capture(
            rows=rows if wants_rows else [n_tokens - 1],
            layers=attn_layers,
            scores="hook_attn_scores" in spec.hooks,
            values="hook_v" in spec.hooks,
        )
    where = tuple(w for w in ("pre", "post") if f"hook_resid_{w}" in spec.hooks)
    res_layers = spec.layers("hook_resid_pre", "hook_resid_post")
    resid = None
    if res_layers:
        positions = None if spec.rows is None else list(spec.rows)
        resid = ResidualCapture(layers=res_layers, where=where, positions=positions)
    return cap, resid


def capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    spec: TraceSpec,
    *,
    attention_mask: torch.Tensor | None = None,
    edits: Iterable[EdgeEdit] = (),
    residual_adds: Iterable[ResidualAdd] = (),
) -> tuple[torch.Tensor, ActivationCache]:
    """One forward of `model` on `input_ids [batch, pos]` keeping what `spec` asks → (logits on the CPU, cache).
    `edits` / `residual_adds` run the forward under those interventions (the cache then shows their effect)."""
    arch = adapter(model)
    n_tokens = int(input_ids.shape[1])
    engine = Engine(model)
    rows = None if spec.rows is None else torch.tensor(spec.rows, dtype=torch.long)
    heads = None if spec.heads is None else torch.tensor(spec.heads, dtype=torch.long)
    col = _Collector(spec, rows, heads)
    cap, resid = _engine_requests(spec, n_tokens)
    handles = _install(arch, model, col)
    try:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with (
            torch.no_grad(),
            engine.run(capture=cap, residual_capture=resid, edits=edits, residual_adds=residual_adds) as rec,
        ):
            col.record = rec
            out = model(input_ids=input_ids, attention_mask=mask)
        for layer in range(arch.n_layers):  # anything a layer hook did not see
            col.harvest(layer)
    finally:
        for h in handles:
            h.remove()
    ordered = {n: col.tensors[n] for n in spec.names() if n in col.tensors}
    all_rows = list(range(n_tokens)) if spec.rows is None else list(spec.rows)
    all_heads = list(range(arch.n_heads)) if spec.heads is None else list(spec.heads)
    return out.logits.detach().cpu(), ActivationCache(ordered, rows=all_rows, heads=all_heads)
