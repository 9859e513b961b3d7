"""Patched runs of one sequence from its cached unpatched run: activation patching, path patching, attribution.

    runner = PatchRunner(lm.model)
    clean, corrupt = runner.baselines([clean_ids, corrupt_ids])     # one forward: logits, K/V, per-layer activations
    site = Site("head", 5, 2)
    logits = runner.run(corrupt, [[SitePatch(site, positions, clean.value(site)[positions])]])   # denoising

What a patched run reuses (the knockout runner's idea, `plipy.engine.runner`): a patch that writes at positions
≥ q0 into layer L cannot change any position before q0 (causality) nor any layer below L. The fast path runs only
the suffix q0… with a fresh KV cache sliced from the target run's, and replaces each decoder layer below an item's
first patched layer by a stub returning the target run's output of that layer ("staircase": conditions sorted by
first layer share one batched forward; at layer l only the items already patched are computed). Rows whose value
equals the target run's own are dropped before anything runs: writing a value over itself is the identity, so a
condition with nothing left returns the target's logits exactly, and q0 is the first position where a patch really
writes something new (before the first token in which a counterfactual differs, its activations equal the
original's). Memory: a run keeps its layer inputs, per-head outputs, sublayer outputs and K/V at every position —
O(layers · T · d_model) per sequence, never T² — and a patched batch holds one suffix per condition.

Path patching (`run_paths`) adds the twin: at a receiver layer the batch is doubled, the twins' input is the target
run's input of that layer plus the sender's direct effect (`sender_delta`: what replacing the sender head's output
changes in its layer's contribution to the residual stream, every other component frozen), and the receivers' query,
key or value are taken from the twin (`plipy.engine.attention.QKVMix`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from plipy.engine import Engine, HeadPatch, QKVMix, SublayerPatch
from plipy.engine.arch import adapter
from plipy.engine.batch import pad_left
from plipy.engine.runner import cache_argument, fast_path_blockers, full_cache, last_logits_only, output_cache
from plipy.errors import PlipyError

SITE_KINDS = ("head", "attn", "mlp")


@dataclass(frozen=True, order=True)
class Site:
    """A place a patch writes: one head's output (`head`, before the output projection) or what a layer's attention
    block (`attn`) or MLP (`mlp`) adds to the residual stream."""

    kind: str
    layer: int
    head: int | None = None

    @property
    def label(self) -> str:
        """`L5.H2`, `L5.attn`, `L5.mlp`."""
        return f"L{self.layer}.H{self.head}" if self.kind == "head" else f"L{self.layer}.{self.kind}"


@dataclass
class SitePatch:
    """Write `value` (`[positions, d]`: d_head for a head, d_model otherwise) at a site's absolute `positions`."""

    site: Site
    positions: torch.Tensor
    value: torch.Tensor


@dataclass
class Run:
    """One sequence's unpatched forward: last-position logits, each layer's input (`resid[l]`; `resid[L]` is the last
    layer's output), per-head outputs `z[l]` `[T, heads, d_head]`, sublayer outputs `attn[l]`/`mlp[l]` `[T, d]`
    (what the modules output, before Granite's multiplier), and the K/V cache per layer."""

    input_ids: torch.Tensor  # [1, T]
    logits: torch.Tensor  # [V]
    resid: list[torch.Tensor]
    z: list[torch.Tensor]
    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def value(self, site: Site) -> torch.Tensor:
        """The site's activation at every position, `[T, d]`."""
        if site.kind == "head":
            return self.z[site.layer][:, site.head]
        return (self.attn if site.kind == "attn" else self.mlp)[site.layer]


@dataclass
class _Item:
    """One condition in a batched forward: its engine patches (batch item set when batched) and, for path patching,
    the sender's layer and direct effect `[T, d_model]`."""

    index: int
    first_layer: int
    first_pos: int
    patches: list[SitePatch] = field(default_factory=list)
    sender_layer: int | None = None
    delta: torch.Tensor | None = None


@dataclass
class PatchStats:
    """Work counters (for provenance and the benchmark)."""

    baselines: int = 0
    calls: int = 0
    conditions: int = 0
    identities: int = 0
    layer_tokens: int = 0  # Σ over calls of computed (layer, batch item, position) triples


class PatchRunner:
    """Patched forwards against cached runs; `path` "auto" (fast when safe), "fast" or "naive" (one full forward
    per condition, batch 1: the reference and the benchmark's baseline)."""

    def __init__(self, model: torch.nn.Module, engine: Engine | None = None, path: str = "auto", max_batch: int = 32):
        if path not in ("auto", "fast", "naive"):
            raise PlipyError(f"runner path must be auto, fast or naive, got {path!r}")
        if max_batch < 1:
            raise PlipyError(f"max_batch must be ≥ 1, got {max_batch}")
        self.model = model
        self.engine = engine if engine is not None else Engine(model)
        self.arch = adapter(model)
        self.arch.output_projection(0)  # an unknown family is refused now, naming it
        self.layers = self.engine.layers
        self.n_layers, self.n_heads = self.engine.n_layers, self.engine.n_heads
        self.max_batch = max_batch
        self.reasons = ["naive path requested"] if path == "naive" else fast_path_blockers(model)
        if path == "fast" and self.reasons:
            raise PlipyError("the fast path is unsafe for this model: " + "; ".join(self.reasons))
        self.path = "naive" if self.reasons else "fast"
        self._keep = last_logits_only(model)
        self._cache_arg = cache_argument(model) or "past_key_values"
        self.stats = PatchStats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """What the runner did, for provenance."""
        return {
            "path": self.path,
            "fallback_reasons": list(self.reasons),
            "max_batch": self.max_batch,
            "baselines": self.stats.baselines,
            "forward_calls": self.stats.calls,
            "conditions": self.stats.conditions,
            "identities": self.stats.identities,
            "layer_token_units": self.stats.layer_tokens,
        }

    # -- unpatched runs ------------------------------------------------------------------------------------------

    def baselines(self, seqs: Sequence[Sequence[int]], pad_token: int = 0) -> list[Run]:
        """The unpatched runs of several sequences from one left-padded forward, padding cut off: each equals its
        own forward within fp32 rounding and holds every position's activations (`Run`)."""
        padded = pad_left(seqs, pad_token, self.device)
        got = _Grab(self.arch, self.n_layers, self.n_heads)
        fast = self.path == "fast"
        extra = {"use_cache": True, self._cache_arg: full_cache()} if fast else {}
        with got.hooked(self.model), torch.inference_mode(), self.engine.run():
            out = self.model(padded.ids, **padded.forward_kwargs(), **extra, **self._keep)
        self.stats.baselines += len(seqs)
        self.stats.calls += 1
        self.stats.layer_tokens += self.n_layers * padded.ids.shape[1] * len(seqs)
        kv = None
        if fast:
            cache = output_cache(out)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            if len(kv) != self.n_layers or any(k.shape[-2] != padded.ids.shape[1] for k, _ in kv):
                raise PlipyError("the model's KV cache does not hold every position of the input: use path='naive'")
        runs = []
        for i, pad in enumerate(padded.pads):
            runs.append(
                Run(
                    padded.ids[i : i + 1, pad:],
                    out.logits[i, -1].detach(),
                    [r[i, pad:] for r in got.resid],
                    [z[i, pad:] for z in got.z],
                    [a[i, pad:] for a in got.attn],
                    [m[i, pad:] for m in got.mlp],
                    None if kv is None else [(k[i : i + 1, :, pad:], v[i : i + 1, :, pad:]) for k, v in kv],
                )
            )
        return runs

    # -- activation patching --------------------------------------------------------------------------------------

    def run(self, target: Run, conditions: Sequence[Sequence[SitePatch]]) -> list[torch.Tensor]:
        """The last-position logits `[V]` of the target run under each condition (a list of patches applied
        together); a condition whose every row equals the target's own value returns the target's logits."""
        out: list[torch.Tensor | None] = [None] * len(conditions)
        items = []
        for i, patches in enumerate(conditions):
            kept = [p for p in (self._changed(target, p) for p in patches) if p is not None]
            if not kept:
                out[i] = target.logits
                self.stats.identities += 1
                continue
            first_pos = min(int(p.positions.min()) for p in kept)
            items.append(_Item(i, min(p.site.layer for p in kept), first_pos, kept))
        self.stats.conditions += len(conditions)
        self._run_items(target, items, out, None)
        return out  # type: ignore[return-value]

    def _changed(self, target: Run, patch: SitePatch) -> SitePatch | None:
        """The patch without the rows that equal the target's own value (None: nothing left to write)."""
        pos = torch.as_tensor(patch.positions, dtype=torch.long).reshape(-1)
        if len(pos) and int(pos.max()) >= target.n_tokens:
            raise PlipyError(f"{patch.site.label}: position {int(pos.max())} is past the sequence")
        own = target.value(patch.site)[pos.to(self.device)]
        value = patch.value.to(own.device, own.dtype)
        new = (value != own).any(-1).cpu()
        if not new.any():
            return None
        return SitePatch(patch.site, pos[new], value[new.to(value.device)])

    def _run_items(
        self, target: Run, items: list[_Item], out: list[torch.Tensor | None], mix: dict[int, QKVMix] | None
    ) -> None:
        """Fill `out` for the items: fast (batched by first position, staircase by first layer) or naive."""
        if self.path == "naive" or target.kv is None:
            for it in items:
                it.first_layer, it.first_pos = 0, 0
                out[it.index] = self._forward(target, [it], 0, mix)[0]
            return
        by_pos: dict[int, list[_Item]] = {}
        for it in items:
            by_pos.setdefault(it.first_pos, []).append(it)
        for q0, group in sorted(by_pos.items()):
            group.sort(key=lambda it: it.first_layer)
            for start in range(0, len(group), self.max_batch):
                chunk = group[start : start + self.max_batch]
                for it, lg in zip(chunk, self._forward(target, chunk, q0, mix), strict=True):
                    out[it.index] = lg

    def _forward(self, target: Run, chunk: list[_Item], q0: int, mix: dict[int, QKVMix] | None) -> list[torch.Tensor]:
        """One batched suffix forward (q0 = 0 and every layer: a full forward) of the chunk's conditions."""
        from transformers import DynamicCache

        n_items = len(chunk)
        starts = [it.first_layer for it in chunk]
        active = [bisect.bisect_right(starts, layer) for layer in range(self.n_layers)]
        twins = set(mix or ())
        patches = [_engine_patch(p, j) for j, it in enumerate(chunk) for p in it.patches]
        cache = None
        if q0 > 0:
            assert target.kv is not None
            cache = DynamicCache(
                ddp_cache_data=[
                    (k[:, :, :q0].expand(rows, -1, -1, -1), v[:, :, :q0].expand(rows, -1, -1, -1))
                    for layer, ((k, v), n) in enumerate(zip(target.kv, active, strict=True))
                    for rows in [max(n, 1) * (2 if layer in twins else 1)]
                ]
            )
        suffix = target.input_ids[:, q0:].expand(n_items, -1)
        with (
            torch.inference_mode(),
            self._staircase(target, chunk, q0, active, twins),
            self.engine.run(patches=patches, mix=mix),
        ):
            out = self.model(suffix, **{self._cache_arg: cache}, use_cache=cache is not None, **self._keep)
        self.stats.calls += 1
        self.stats.layer_tokens += sum(n * (2 if i in twins else 1) for i, n in enumerate(active)) * suffix.shape[1]
        return list(out.logits[:, -1].detach().unbind(0))

    @contextmanager
    def _staircase(
        self, target: Run, chunk: list[_Item], q0: int, active: list[int], twins: set[int]
    ) -> Iterator[None]:
        """Within the block, decoder layer l computes only its first `active[l]` items (the rest get the target
        run's output of that layer), and a twin layer runs each item beside its twin."""
        saved = []
        try:
            for i, layer in enumerate(self.layers):
                twin = _twin_inputs(target, chunk, i, q0) if i in twins else None
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = _stub(layer.forward, target.resid[i + 1][None, q0:], active[i], len(chunk), twin)
            yield
        finally:
            for layer, own in saved:
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own

    # -- path patching --------------------------------------------------------------------------------------------

    def sender_delta(self, target: Run, source: Run, senders: Sequence[Site], positions: torch.Tensor) -> torch.Tensor:
        """Per sender head, what writing the source run's output of that head (at `positions`) into the target run
        changes in its layer's attention contribution to the residual stream, every other component held at the
        target's value: `[senders, T, d_model]` (zero wherever the two runs' head outputs are equal)."""
        out = torch.zeros(len(senders), target.n_tokens, self.arch.hidden_size, dtype=target.z[0].dtype)
        out = out.to(self.device)
        pos = torch.as_tensor(positions, dtype=torch.long).to(self.device)
        by_layer: dict[int, list[int]] = {}
        for j, s in enumerate(senders):
            if s.kind != "head":
                raise PlipyError(f"path patching senders are heads, got {s.label}")
            by_layer.setdefault(s.layer, []).append(j)
        with torch.inference_mode():
            for layer, js in by_layer.items():
                base = target.z[layer]
                z = base[None].repeat(len(js), 1, 1, 1)
                for row, j in enumerate(js):
                    h = senders[j].head
                    z[row, pos, h] = source.z[layer][pos, h]
                out[js] = self._contribution(layer, z) - self._contribution(layer, base[None])
        return out

    def _contribution(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """What the attention sublayer of `layer` adds to the residual stream for per-head outputs `z`
        `[n, T, heads, d_head]`: the output projection, a sandwich norm, Granite's multiplier."""
        proj = self.arch.output_projection(layer)
        module, scale = self.arch.contribution(layer, "attn")
        x = proj(z.reshape(*z.shape[:2], -1))
        if module is not self.arch.attention(layer):
            x = module(x)
        return x if scale is None else x * scale

    def run_paths(
        self,
        target: Run,
        receivers: Mapping[int, Sequence[int]],
        inputs: Sequence[str],
        senders: Sequence[Site],
        deltas: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Per sender, the target run's last-position logits when the receiver heads (`{layer: heads}`) read their
        `inputs` ("q", "k", "v") from the target's input of their layer plus the sender's direct effect
        (`deltas[j]` `[T, d_model]`, from `sender_delta`), everything else computed as usual."""
        if not set(inputs) <= {"q", "k", "v"} or not inputs:
            raise PlipyError(f"receiver inputs are q, k and v, got {list(inputs)}")
        mix = {
            int(layer): QKVMix(tuple(sorted(int(h) for h in hs)), frozenset(inputs)) for layer, hs in receivers.items()
        }
        out: list[torch.Tensor | None] = [None] * len(senders)
        items = []
        for j, s in enumerate(senders):
            later = [layer for layer in sorted(mix) if layer > s.layer]
            nonzero = (deltas[j] != 0).any(-1).nonzero()
            if not later or not len(nonzero):
                out[j] = target.logits  # the sender reaches no receiver, or changes nothing
                self.stats.identities += 1
                continue
            items.append(_Item(j, later[0], int(nonzero[0, 0]), sender_layer=s.layer, delta=deltas[j]))
        self.stats.conditions += len(senders)
        self._run_items(target, items, out, mix)
        return out  # type: ignore[return-value]

    # -- attribution ----------------------------------------------------------------------------------------------

    def traced(self, input_ids: Sequence[int] | torch.Tensor, prefix: Run | None = None) -> Traced:
        """One forward in grad mode (weights frozen: the graph starts at the embedding output, so a backward
        computes activation gradients only): the last-position logits with their graph, and the run.

        `prefix`: a run (with its K/V) of a sequence that shares this one's first tokens: only the positions from
        the first differing token on are computed, and only they get gradients (`Traced.start`)."""
        return self._forward_from(input_ids, prefix, grad=True)

    def suffix_run(self, input_ids: Sequence[int] | torch.Tensor, prefix: Run) -> Run:
        """The unpatched run of a sequence that shares its first tokens with `prefix`'s: the positions before the
        first differing token are `prefix`'s own (causality: their activations are the same), the rest computed
        from its K/V cache (a full forward where there is no cache or no shared token)."""
        return self._forward_from(input_ids, prefix, grad=False).run

    def _forward_from(self, input_ids: Sequence[int] | torch.Tensor, prefix: Run | None, grad: bool) -> Traced:
        """A forward of the positions from q0 on (q0: the tokens shared with `prefix`, 0 without it), the rest
        taken from `prefix`; K/V kept for every position on the fast path."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(self.device)
        q0 = _shared(ids, prefix) if self.path == "fast" and prefix is not None and prefix.kv is not None else 0
        got = _Grab(self.arch, self.n_layers, self.n_heads, keep_graph=grad)
        extra: dict[str, Any] = {}
        if self.path == "fast":
            extra = {"use_cache": True, self._cache_arg: full_cache() if q0 == 0 else _prefix_cache(prefix, q0)}
        embed = self.model.get_input_embeddings()  # type: ignore[operator]
        handle = embed.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)) if grad else None
        try:
            with got.hooked(self.model), torch.enable_grad() if grad else torch.inference_mode(), self.engine.run():
                out = self.model(ids[:, q0:], **extra, **self._keep)
        finally:
            if handle is not None:
                handle.remove()
        self.stats.calls += 1
        self.stats.layer_tokens += self.n_layers * (ids.shape[1] - q0)
        kv = None
        if self.path == "fast":
            kv = [(layer.keys.detach(), layer.values.detach()) for layer in output_cache(out).layers]

        def whole(part: list[torch.Tensor], before: list[torch.Tensor] | None) -> list[torch.Tensor]:
            own = [x[0].detach() for x in part]
            if before is None or q0 == 0:
                return own
            return [torch.cat([b[:q0], x]) for b, x in zip(before, own, strict=True)]

        t = ids.shape[1]
        flat = [x.reshape(1, x.shape[1], -1) for x in got.z]  # with the graph, z is the projection's flat input
        z = whole(flat, None if prefix is None else [x.reshape(x.shape[0], -1) for x in prefix.z])
        run = Run(
            ids,
            out.logits[0, -1].detach(),
            whole(got.resid, None if prefix is None else prefix.resid),
            [x.reshape(t, self.n_heads, -1) for x in z],
            whole(got.attn, None if prefix is None else prefix.attn),
            whole(got.mlp, None if prefix is None else prefix.mlp),
            kv,
        )
        return Traced(out.logits[0, -1], run, [*got.z, *got.attn, *got.mlp] if grad else [], q0)

    def gradients(self, traced: Traced, value: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The gradient of `value` (a scalar computed from `traced.logits`) with respect to every layer's per-head
        outputs `z` `[T − start, heads, d_head]` and sublayer outputs `attn`, `mlp` `[T − start, d]` at the
        positions the traced forward computed (from `traced.start` on): one backward."""
        grads = torch.autograd.grad(value, traced.inputs)
        n, t = self.n_layers, traced.run.n_tokens - traced.start
        return {
            "z": [g[0].reshape(t, self.n_heads, -1) for g in grads[:n]],
            "attn": [g[0] for g in grads[n : 2 * n]],
            "mlp": [g[0] for g in grads[2 * n :]],
        }


def _shared(ids: torch.Tensor, prefix: Run) -> int:
    """How many leading tokens `ids` shares with `prefix`'s input, at most all but its last (which gives the logits)."""
    other = prefix.input_ids.to(ids.device)
    n = min(ids.shape[1] - 1, other.shape[1])
    differ = (ids[0, :n] != other[0, :n]).nonzero()
    return int(differ[0, 0]) if len(differ) else max(n, 0)


def _prefix_cache(prefix: Run | None, q0: int) -> Any:
    """A fresh KV cache holding `prefix`'s first q0 positions (never mutating the prefix run's tensors)."""
    from transformers import DynamicCache

    assert prefix is not None and prefix.kv is not None
    return DynamicCache(ddp_cache_data=[(k[:, :, :q0], v[:, :, :q0]) for k, v in prefix.kv])


@dataclass
class Traced:
    """A forward kept for a backward: the last-position logits (with their graph), the run's activations, and
    the graph tensors gradients are taken with respect to (per layer: z, then attn, then mlp)."""

    logits: torch.Tensor
    run: Run
    inputs: list[torch.Tensor]
    start: int = 0  # the first position computed (and with gradients); earlier ones are a prefix run's

    def gradient(self, grads: dict[str, list[torch.Tensor]], site: Site) -> torch.Tensor:
        """A site's gradient at the positions from `start` on, `[T − start, d]`."""
        if site.kind == "head":
            return grads["z"][site.layer][:, site.head]
        return grads[site.kind][site.layer]


def _engine_patch(p: SitePatch, item: int) -> HeadPatch | SublayerPatch:
    """A runner patch as the engine's intervention on batch item `item`."""
    if p.site.kind == "head":
        assert p.site.head is not None
        return HeadPatch(p.site.layer, [p.site.head], p.positions, p.value[:, None], batch=item)
    return SublayerPatch(p.site.layer, p.site.kind, p.positions, p.value, batch=item)


def _twin_inputs(target: Run, chunk: list[_Item], layer: int, q0: int) -> torch.Tensor:
    """Per item, the receiver layer's twin input: the target run's input of that layer plus the item's sender
    effect when the sender comes before the layer (`[items, T − q0, d]`)."""
    base = target.resid[layer][q0:]
    rows = []
    for it in chunk:
        reach = it.delta is not None and it.sender_layer is not None and it.sender_layer < layer
        rows.append(base + it.delta[q0:].to(base.dtype) if reach else base)  # type: ignore[index]
    return torch.stack(rows)


def _stub(forward: Any, resid: torch.Tensor, n: int, n_items: int, twin: torch.Tensor | None) -> Any:
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if n == 0:
            return resid.expand(n_items, -1, -1)
        if n < n_items:
            args = tuple(_take(a, n, n_items) for a in args)
            kwargs = {k: _take(v, n, n_items) for k, v in kwargs.items()}
        if twin is not None:
            args, kwargs = _with_twin(args, kwargs, twin[:n], n)
        out = forward(*args, **kwargs)
        out = out[:n] if twin is not None else out
        if n < n_items:
            out = torch.cat([out, resid.expand(n_items - n, -1, -1).to(out.dtype)], 0)
        return out

    return run


def _with_twin(args: tuple, kwargs: dict, twin: torch.Tensor, n: int) -> tuple[tuple, dict]:
    """The layer's arguments for a batch of the n items followed by their twins (hidden states: the twins')."""
    if args:
        hidden = args[0]
        args = (torch.cat([hidden, twin.to(hidden.dtype)]), *(_double(a, n) for a in args[1:]))
        return args, {k: _double(v, n) for k, v in kwargs.items()}
    hidden = kwargs["hidden_states"]
    kwargs = {k: _double(v, n) for k, v in kwargs.items() if k != "hidden_states"}
    return args, {**kwargs, "hidden_states": torch.cat([hidden, twin.to(hidden.dtype)])}


def _double(x: Any, n: int) -> Any:
    """A layer argument with its batch of n items repeated (masks, positions); anything else as it is."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x]) if x.ndim >= 2 and x.shape[0] == n else x
    if isinstance(x, tuple):
        return tuple(_double(v, n) for v in x)
    if isinstance(x, list):
        return [_double(v, n) for v in x]
    if isinstance(x, dict):
        return {k: _double(v, n) for k, v in x.items()}
    return x


def _take(x: Any, n: int, n_items: int) -> Any:
    """The first n batch items of a layer argument (hidden states, masks); anything without that batch is kept."""
    if isinstance(x, torch.Tensor):
        return x[:n] if x.ndim >= 2 and x.shape[0] == n_items else x
    if isinstance(x, tuple):
        return tuple(_take(v, n, n_items) for v in x)
    if isinstance(x, list):
        return [_take(v, n, n_items) for v in x]
    if isinstance(x, dict):
        return {k: _take(v, n, n_items) for k, v in x.items()}
    return x


class _Grab:
    """Hooks that keep, for every layer and every position, its input, per-head outputs and sublayer outputs
    (`keep_graph`: the tensors themselves, for gradients; else detached)."""

    def __init__(self, arch: Any, n_layers: int, n_heads: int, keep_graph: bool = False):
        self.arch, self.n_layers, self.n_heads, self.keep_graph = arch, n_layers, n_heads, keep_graph
        self.resid: list[Any] = [None] * (n_layers + 1)
        self.z: list[Any] = [None] * n_layers
        self.attn: list[Any] = [None] * n_layers
        self.mlp: list[Any] = [None] * n_layers

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.keep_graph else t.detach()

    @contextmanager
    def hooked(self, model: torch.nn.Module) -> Iterator[None]:
        handles = []
        arch = self.arch
        try:
            for i, layer in enumerate(arch.layers()):
                handles.append(layer.register_forward_pre_hook(self._input(i), with_kwargs=True))
                if i == self.n_layers - 1:
                    handles.append(layer.register_forward_hook(self._last))
                handles.append(arch.output_projection(i).register_forward_pre_hook(self._z(i)))
                for sub, store in (("attn", self.attn), ("mlp", self.mlp)):
                    module, _ = arch.contribution(i, sub)
                    handles.append(module.register_forward_hook(self._out(i, store)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _input(self, i: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self.resid[i] = self._keep(args[0] if args else kwargs["hidden_states"])

        return hook

    def _last(self, module: Any, args: tuple, output: Any) -> None:
        self.resid[self.n_layers] = self._keep(output[0] if isinstance(output, tuple) else output)

    def _z(self, i: int) -> Any:
        def hook(module: Any, args: tuple) -> None:
            x = args[0]
            z = x.reshape(*x.shape[:-1], self.n_heads, x.shape[-1] // self.n_heads)
            self.z[i] = x if self.keep_graph else z.detach()

        return hook

    def _out(self, i: int, store: list) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            store[i] = self._keep(output[0] if isinstance(output, tuple) else output)

        return hook
