"""What the engine is asked to do in one run: capture query rows, bias edges, touch the residual stream.

Positions are absolute token indices of the sequence as fed to the model (left padding included), so the same
spec works for a full forward and for `generate()` (where later calls only see new queries).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from plipy.errors import CausalEdgeError, PlipyError

Edge = tuple[int, int] | tuple[int, int, int]


@dataclass
class Capture:
    """Record, per layer, only the query rows asked for: post-softmax probabilities `[batch, heads, rows, keys]`.

    `rows` is one list of positions shared by the batch, or one equally long list per batch element.
    `scores` adds the pre-softmax scores (after scaling, softcap, mask and edits), `value_norms` the per-key
    ‖v_j‖ of every head `[batch, heads, keys]`, `values` the raw value states `[batch, kv_heads, keys, d]`.
    """

    rows: Sequence[int] | Sequence[Sequence[int]]
    layers: Iterable[int] | None = None
    scores: bool = False
    value_norms: bool = False
    values: bool = False


@dataclass
class EdgeEdit:
    """Multiply the post-softmax weight of each edge query→key by `scale`, then renormalise the row.

    Implemented as adding `log(scale)` to the pre-softmax score, which is exactly the renormalised post-softmax
    scaling; `scale=0` adds -inf (knockout). Edges are `(query, key)` for every batch element or
    `(batch, query, key)` for one, as tuples or one `[E, 2 | 3]` integer tensor (cheaper for thousands of edges).
    `heads=None` means every query head.

    `mass` (instead of `scale`, which it overrides): set the total weight of each query row's edited keys to a
    value, the row's other keys rescaled in their own proportions to carry the rest (1 − mass). One value per edge
    (`[E]`, every edited head alike) or per edge and edited head (`[E, heads]`, in `heads` order, every query head
    when `heads` is None); the edges of one row share their row's value. Mass 0 is a knockout; a row that already
    carries its mass is left as it is, bit for bit. Mean and resample ablation of edges set it from other runs.
    """

    layers: Iterable[int]
    edges: Sequence[Edge] | torch.Tensor
    scale: float = 0.0
    heads: Sequence[int] | None = None
    mass: torch.Tensor | Sequence[float] | None = None

    def bias(self) -> float:
        """The additive pre-softmax bias this edit stands for (0 for a mass edit: its bias depends on the row)."""
        if self.mass is not None:
            return 0.0
        if self.scale < 0 or math.isnan(self.scale):
            raise PlipyError(f"an attention scale must be ≥ 0, got {self.scale}")
        return -math.inf if self.scale == 0 else math.log(self.scale)


@dataclass
class ResidualAdd:
    """Add `vector` ([d] or [batch, d]) to the residual stream at the input (`pre`) or output (`post`) of `layer`.

    `positions=None` means every position. `skip_single_token=True` leaves cached generation steps (one new
    token) alone, as the SAE steering pipelines do.
    """

    layer: int
    vector: torch.Tensor
    positions: Sequence[int] | None = None
    where: str = "pre"
    skip_single_token: bool = False


@dataclass
class ResidualCapture:
    """Record the residual stream at the input (`pre`) and/or output (`post`) of the given layers."""

    layers: Iterable[int] | None = None
    where: Sequence[str] = ("pre",)
    positions: Sequence[int] | None = None


@dataclass
class Record:
    """What a run captured. Keys are layer indices (residual: `(layer, "pre"|"post")`)."""

    rows: torch.Tensor | None = None
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    resid: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # how each layer that did more than idle SDPA computed its edited rows: "explicit", "masked-sdpa" or "full"
    paths: dict[int, str] = field(default_factory=dict)
    # absolute position of each layer's first query row in the last call (patch hooks place their rows with it)
    offsets: dict[int, int] = field(default_factory=dict)

    def stack(self, what: str = "attn") -> torch.Tensor:
        """Captured tensors of all layers stacked in layer order: `[layers, ...]`."""
        d = getattr(self, what)
        return torch.stack([d[k] for k in sorted(d)])


@dataclass
class LayerEdit:
    """One compiled edit for one layer: absolute edges as tensors (`b` is -1 where the edge applies to every batch
    item), a head list (None: every head) and the additive bias, or per edge its row's mass `[E, heads]` (float64).
    Tensors, so a layer applies thousands of edges (every query → the marker on a long input) with one scatter
    instead of a Python loop."""

    b: torch.Tensor  # [E] long, -1 = every batch item
    q: torch.Tensor  # [E] long, absolute query positions
    k: torch.Tensor  # [E] long, absolute key positions
    heads: list[int] | None
    bias: float
    mass: torch.Tensor | None = None  # [E, heads] float64: a mass edit (`EdgeEdit.mass`)

    @property
    def edges(self) -> list[tuple[int | None, int, int]]:
        """The edges as (batch or None, query, key) tuples."""
        return [
            (None if b < 0 else b, q, k)
            for b, q, k in zip(self.b.tolist(), self.q.tolist(), self.k.tolist(), strict=True)
        ]


def edge_tensor(edges: Sequence[Edge] | torch.Tensor) -> torch.Tensor:
    """Edges as a `[E, 3]` long tensor of (batch, query, key), batch -1 for `(query, key)` edges."""
    if isinstance(edges, torch.Tensor):
        t = edges.to(dtype=torch.long, device="cpu")
    else:
        try:
            t = torch.as_tensor(edges, dtype=torch.long)
        except (TypeError, ValueError):  # a mix of 2- and 3-tuples: one at a time
            t = torch.as_tensor([(-1, *e) if len(e) == 2 else tuple(e) for e in edges], dtype=torch.long)
    if t.numel() == 0:
        return torch.empty(0, 3, dtype=torch.long)
    if t.ndim != 2 or t.shape[1] not in (2, 3):
        raise PlipyError("edges must be (query, key) or (batch, query, key) pairs")
    if t.shape[1] == 2:
        t = torch.cat([torch.full((t.shape[0], 1), -1, dtype=torch.long), t], 1)
    return t


def compile_edits(edits: Iterable[EdgeEdit], n_layers: int, n_heads: int) -> dict[int, list[LayerEdit]]:
    """Validate edits once and group them per layer; identity edits (scale 1, no edges, no heads) vanish,
    so an identity intervention runs exactly the baseline computation (KL exactly 0). An edge listed twice in one
    edit is edited once."""
    out: dict[int, list[LayerEdit]] = {}
    for e in edits:
        bias = e.bias()
        heads = None if e.heads is None else sorted({int(h) for h in e.heads})
        for h in heads or []:
            if not 0 <= h < n_heads:
                raise PlipyError(f"head {h} does not exist (the model has {n_heads} query heads: 0-{n_heads - 1})")
        t = edge_tensor(e.edges)
        _check_positions(t)
        if (bias == 0.0 and e.mass is None) or not len(t) or heads == []:
            continue
        mass = None if e.mass is None else _edge_mass(e, t, n_heads)
        t, inverse = torch.unique(t, dim=0, return_inverse=True)
        if mass is not None:
            mass = torch.empty(len(t), mass.shape[1], dtype=torch.float64).index_copy_(0, inverse, mass)
        layer_edit = LayerEdit(t[:, 0].contiguous(), t[:, 1].contiguous(), t[:, 2].contiguous(), heads, bias, mass)
        for layer in e.layers:
            if not 0 <= layer < n_layers:
                raise PlipyError(f"layer {layer} does not exist (the model has {n_layers} layers: 0-{n_layers - 1})")
            out.setdefault(int(layer), []).append(layer_edit)
    return out


def _check_positions(t: torch.Tensor) -> None:
    """CausalEdgeError for an edge whose key comes after its query; PlipyError for a negative position."""
    later = t[:, 2] > t[:, 1]
    if later.any():
        q, k = t[later][0, 1:].tolist()
        raise CausalEdgeError(
            f"edge query {q} → key {k} is causally masked (the key comes after the query): "
            "there is no attention to remove or steer"
        )
    if (t[:, 1:] < 0).any():
        q, k = t[(t[:, 1:] < 0).any(1)][0, 1:].tolist()
        raise PlipyError(f"edge query {q} → key {k}: positions must be ≥ 0")


def _edge_mass(e: EdgeEdit, t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A mass edit's values as `[E, heads]` float64, checked: finite, in [0, 1], one value per (row, head)."""
    width = n_heads if e.heads is None else len({int(h) for h in e.heads})
    m = torch.as_tensor(e.mass, dtype=torch.float64).detach().cpu()
    m = m[:, None].expand(-1, width) if m.ndim == 1 else m
    if m.shape != (len(t), width):
        raise PlipyError(
            f"edge mass of shape {tuple(m.shape)} for {len(t)} edges and {width} heads: give [{len(t)}] (every head "
            f"alike) or [{len(t)}, {width}] (one column per edited head, in `heads` order)"
        )
    if not bool(torch.isfinite(m).all()) or bool(((m < 0) | (m > 1)).any()):
        raise PlipyError("an edge mass is a total attention weight: finite, between 0 and 1")
    _, row = torch.unique(t[:, :2], dim=0, return_inverse=True)
    first = torch.zeros(int(row.max()) + 1, width, dtype=torch.float64).index_copy_(0, row, m)
    if not torch.equal(first[row], m):
        raise PlipyError("the edges of one query row were given different masses: a row has one total weight")
    return m.contiguous()


def rows_tensor(rows: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
    """Capture rows as a `[batch or 1, r]` long tensor."""
    t = torch.as_tensor(rows, dtype=torch.long)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] == 0:
        raise PlipyError("capture rows must be a non-empty list of positions, or one equal-length list per batch item")
    if (t < 0).any():
        raise PlipyError("capture rows must be ≥ 0")
    return t


@dataclass
class HeadPatch:
    """Set the per-head attention outputs `z` of `layer` — each head's contribution before the output projection
    (`o_proj`, GPT-2's `c_proj`, GPT-NeoX's and Phi's `dense`): the slice of its input that belongs to the head —
    to `value` at absolute `positions` (as fed to the model, left padding included).

    `value` is `[positions, heads, d_head]`, or `[batch, positions, heads, d_head]` (one value per batch item).
    `batch` names the one batch item the patch applies to (None: every item), so each item of a batch can patch a
    different (layer, head)."""

    layer: int
    heads: Sequence[int]
    positions: Sequence[int] | torch.Tensor
    value: torch.Tensor
    batch: int | None = None


SUBLAYERS = ("attn", "mlp")


@dataclass
class SublayerPatch:
    """Set what the attention (`"attn"`) or MLP (`"mlp"`) sublayer of `layer` adds to the residual stream (TL's
    `hook_attn_out` / `hook_mlp_out`: after Gemma-2/3's sandwich norms, before Granite's residual multiplier) to
    `value` at absolute `positions`. `value` is `[positions, d_model]` or `[batch, positions, d_model]`; `batch` as
    in `HeadPatch`."""

    layer: int
    sublayer: str
    positions: Sequence[int] | torch.Tensor
    value: torch.Tensor
    batch: int | None = None


@dataclass
class CompiledPatch:
    """One layer's patches of one site as flat tensors: per written row its batch item (`b`, -1: every item), its
    absolute position (`p`), its head (`h`, None for a sublayer) and the row written (`value` `[n, d]`)."""

    b: torch.Tensor
    p: torch.Tensor
    h: torch.Tensor | None
    value: torch.Tensor


def _patch_rows(
    patch: HeadPatch | SublayerPatch, n_heads: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(batch, position, head, value rows) of one patch, flattened in that order."""
    pos = torch.as_tensor(patch.positions, dtype=torch.long).reshape(-1)
    if (pos < 0).any():
        raise PlipyError(f"layer {patch.layer}: patch positions must be ≥ 0")
    heads = None
    v = patch.value
    if isinstance(patch, HeadPatch):
        heads = torch.as_tensor(list(patch.heads), dtype=torch.long).reshape(-1)
        if n_heads is not None and ((heads < 0) | (heads >= n_heads)).any():
            raise PlipyError(f"layer {patch.layer}: head out of range (the model has {n_heads} query heads)")
        per_item = v.ndim == 4
        want: tuple[int, ...] = (len(pos), len(heads))
    else:
        per_item = v.ndim == 3
        want = (len(pos),)
    got = tuple(v.shape[1 : 1 + len(want)] if per_item else v.shape[: len(want)])
    if got != want:
        raise PlipyError(f"layer {patch.layer}: patch value of shape {tuple(v.shape)} for {want} (positions, heads)")
    if per_item and patch.batch is not None:
        raise PlipyError(f"layer {patch.layer}: a per-item patch value needs batch=None")
    n_items = v.shape[0] if per_item else 1
    grid = [torch.arange(n_items) if per_item else torch.tensor([-1 if patch.batch is None else patch.batch])]
    grid += [pos] + ([heads] if heads is not None else [])
    mesh = torch.cartesian_prod(*grid) if len(grid) > 1 else grid[0][:, None]
    mesh = mesh.reshape(-1, len(grid))
    rows = v.reshape(-1, v.shape[-1])
    return mesh[:, 0], mesh[:, 1], None if heads is None else mesh[:, 2], rows


def compile_patches(
    patches: Iterable[HeadPatch | SublayerPatch], n_layers: int, n_heads: int
) -> dict[tuple[int, str], list[CompiledPatch]]:
    """Validate patches once and group them per (layer, site), site `"z"`, `"attn"` or `"mlp"`."""
    out: dict[tuple[int, str], list[CompiledPatch]] = {}
    for patch in patches:
        if not 0 <= patch.layer < n_layers:
            raise PlipyError(f"layer {patch.layer} does not exist (the model has {n_layers} layers)")
        if isinstance(patch, SublayerPatch) and patch.sublayer not in SUBLAYERS:
            raise PlipyError(f"sublayer must be one of {', '.join(SUBLAYERS)}, got {patch.sublayer!r}")
        site = "z" if isinstance(patch, HeadPatch) else patch.sublayer
        b, p, h, value = _patch_rows(patch, n_heads)
        if len(p):
            out.setdefault((int(patch.layer), site), []).append(CompiledPatch(b, p, h, value.detach()))
    return out
