"""Run many attention interventions on one input: the baseline once, then only what each intervention can change.

    runner = ConditionRunner(lm.model)
    base = runner.baseline(input_ids)                       # one full forward: logits, K/V cache, resid_post
    outcomes = runner.run(base, [[EdgeEdit(layers=[5], edges=[(m, t)], scale=0.0)], ...])
    outcomes[0].logits                                      # last-position logits under that intervention

Optionally a `Capture` of some query rows (passed to `baseline()` and `run()` alike) records each condition's
post-edit attention rows (`Outcome.attn`, `Baseline.attn`); steering measures the attention it achieved this way.

An intervention whose earliest edited query is position q0 and whose first edited layer is L0 cannot change any
position before q0 (causality) nor any layer below L0. The fast path therefore runs only the suffix q0.. with a
fresh cache built from the baseline's keys/values of positions < q0, and replaces the decoder layers below L0 by
a stub returning the baseline's resid_post. Conditions are batched: batch item j carries its own edits as
`(j, query, key)` edges, items are sorted by first edited layer, and at layer l only the items already edited
(a prefix of the batch) are computed — the others keep the baseline's residual ("staircase"), so no layer is
ever recomputed for an item that cannot have changed yet. Sliding-window layers keep every position in the
baseline's cache (the mask, built from the config, applies the window), so the suffix finds the prefix keys it
needs. Models whose cache holds other state (chunked attention, shared KV, linear attention) or whose decoder
layers do not return a tensor use the naive path (one full forward per condition); `runner.reasons` says why.
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from plipy.engine import Capture, EdgeEdit, Engine
from plipy.engine.arch import adapter
from plipy.engine.batch import pad_left
from plipy.engine.spec import LayerEdit, compile_edits, edge_tensor
from plipy.errors import CausalEdgeError, MaskedRowError, NonFiniteError, PlipyError
from plipy.finite import require_finite

ConditionEdits = Sequence[EdgeEdit]  # one condition: the edits applied together
# Bumped when the runner changes which conditions it answers without a forward (their KLs change), so that a
# run's checkpoints from before do not resume into a run made with the new rules.
RULES_VERSION = 2  # 2: last-layer edits that spare the last row are identities


@dataclass
class Baseline:
    """One input's unintervened forward: last-position logits and, for the fast path, what conditions reuse."""

    input_ids: torch.Tensor  # [1, S]
    logits: torch.Tensor  # [V], model dtype
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, kv_heads, S, d]
    resid: list[torch.Tensor] | None = None  # per layer resid_post [1, S, d]
    attn: dict[int, torch.Tensor] | None = None  # captured rows per layer [heads, rows, keys] (if asked)


@dataclass
class Outcome:
    """One condition's result: `logits` [V] (None when it could not run) and a status.

    Statuses: `ok`; `identity` (nothing to edit, or edits the last position's logits cannot see: the baseline
    logits, KL exactly 0); `row-fully-masked` (the edits remove every key of some query row); `edge-masked` (an
    edge the model's own mask already removes)."""

    logits: torch.Tensor | None
    status: str
    note: str | None = None
    first_layer: int | None = None
    first_query: int | None = None
    attn: dict[int, torch.Tensor] | None = None  # captured post-edit rows per layer [heads, rows, keys] (if asked)


@dataclass
class _Plan:
    index: int
    edits: list[EdgeEdit]
    first_layer: int
    first_query: int


@dataclass
class RunnerStats:
    """Work counters (for provenance and the benchmark): forwards and layer×item×position units computed."""

    baselines: int = 0
    calls: int = 0
    conditions: int = 0
    layer_tokens: int = 0  # Σ over calls of computed (layer, batch item, position) triples
    fallbacks: int = 0  # chunks re-run item by item after an error inside the batch
    extra: dict = field(default_factory=dict)


class ConditionRunner:
    """Evaluates interventions against a cached baseline; `path` is "auto" (fast when safe), "fast" or "naive"."""

    def __init__(self, model: torch.nn.Module, engine: Engine | None = None, path: str = "auto", max_batch: int = 32):
        if path not in ("auto", "fast", "naive"):
            raise PlipyError(f"runner path must be auto, fast or naive, got {path!r}")
        if max_batch < 1:
            raise PlipyError(f"max_batch must be ≥ 1, got {max_batch}")
        self.model = model
        self.engine = engine if engine is not None else Engine(model)
        self.layers = self.engine.layers
        self.n_layers, self.n_heads = self.engine.n_layers, self.engine.n_heads
        self.max_batch = max_batch
        self.reasons: list[str] = ["naive path requested"] if path == "naive" else fast_path_blockers(model)
        if path == "fast" and self.reasons:
            raise PlipyError("the fast path is unsafe for this model: " + "; ".join(self.reasons))
        self.path = "naive" if self.reasons else "fast"
        self._keep = last_logits_only(model)
        self._cache_arg = cache_argument(model) or "past_key_values"
        self.stats = RunnerStats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """What the runner did, for provenance."""
        return {
            "path": self.path,
            "fallback_reasons": list(self.reasons),
            "max_batch": self.max_batch,
            "last_logits_only": bool(self._keep),
            "baselines": self.stats.baselines,
            "forward_calls": self.stats.calls,
            "conditions": self.stats.conditions,
            "layer_token_units": self.stats.layer_tokens,
            "batch_fallbacks": self.stats.fallbacks,
        }

    # -- baseline ------------------------------------------------------------------------------------------------

    def baseline(self, input_ids: Sequence[int] | torch.Tensor, capture: Capture | None = None) -> Baseline:
        """The unintervened forward of one sequence; on the fast path also its K/V cache and every resid_post.

        `capture`: also record these query rows (the layer outputs still come from SDPA: nothing changes)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).tolist()
        rows = None if capture is None else [torch.as_tensor(capture.rows).reshape(-1).tolist()]
        return self.baselines([ids], rows=rows, layers=None if capture is None else capture.layers)[0]

    def baselines(
        self,
        seqs: Sequence[Sequence[int]],
        rows: Sequence[Sequence[int]] | None = None,
        layers: Any = None,
        pad_token: int = 0,
    ) -> list[Baseline]:
        """Baselines of several sequences from one left-padded forward (`plipy.engine.batch`): each equals its own
        `baseline()` within fp32 rounding (matmuls of another shape may round differently) and is what conditions
        on that sequence reuse. `rows`: per sequence, query rows to capture (at `layers`; None = all)."""
        if not seqs:
            return []
        padded = pad_left(seqs, pad_token, self.device)
        width = padded.ids.shape[1]
        self.stats.baselines += len(seqs)
        self.stats.calls += 1
        self.stats.layer_tokens += self.n_layers * width * len(seqs)
        capture = None
        if rows is not None:
            n = max(len(r) for r in rows)  # equal row counts per item: repeat an item's last row, dropped later
            capture = Capture(rows=padded.shift([list(r) + [r[-1]] * (n - len(r)) for r in rows]), layers=layers)
        ctx = self.engine.run(capture=capture) if capture is not None else nullcontext(None)
        kwargs = {**padded.forward_kwargs(), **self._keep}
        if self.path == "naive":
            with torch.inference_mode(), ctx as rec:
                out = self.model(padded.ids, **kwargs)
            require_finite(out.logits[:, -1], "the next-token logits")
            return [self._item(padded, i, out, rec, rows) for i in range(len(seqs))]
        outputs: list[Any] = [None] * self.n_layers

        def recorder(i: int):
            def hook(module, args, output):
                outputs[i] = output

            return hook

        handles = [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(self.layers)]
        try:
            with torch.inference_mode(), ctx as rec:
                out = self.model(padded.ids, use_cache=True, **{self._cache_arg: full_cache()}, **kwargs)
        finally:
            for h in handles:
                h.remove()
        require_finite(out.logits[:, -1], "the next-token logits")
        cache = output_cache(out)
        problem = _baseline_problem(outputs, cache, tuple(padded.ids.shape), self.n_layers)
        if problem:
            # Discovered only now (e.g. an architecture whose layers return tuples): switch for good.
            self.reasons.append(problem)
            self.path = "naive"
            return [self._item(padded, i, out, rec, rows) for i in range(len(seqs))]
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        resid = [o.detach() for o in outputs]
        return [self._item(padded, i, out, rec, rows, kv, resid) for i in range(len(seqs))]

    def _item(
        self,
        padded: Any,
        i: int,
        out: Any,
        rec: Any,
        rows: Sequence[Sequence[int]] | None,
        kv: list | None = None,
        resid: list | None = None,
    ) -> Baseline:
        """Item i of a batched baseline, its padding cut off: what a forward of the sequence alone gives."""
        pad = padded.pads[i]
        ids = padded.ids[i : i + 1, pad:]
        attn = None
        if rec is not None and rows is not None:
            attn = {layer: a[i, :, : len(rows[i]), pad:] for layer, a in rec.attn.items()}
        base = Baseline(ids, out.logits[i, -1].detach(), attn=attn)
        if kv is not None and resid is not None:
            base.kv = [(k[i : i + 1, :, pad:], v[i : i + 1, :, pad:]) for k, v in kv]
            base.resid = [r[i : i + 1, pad:] for r in resid]
        return base

    def _last(self, out: Any) -> torch.Tensor:
        return out.logits[0, -1].detach()

    # -- conditions ----------------------------------------------------------------------------------------------

    def run(
        self, base: Baseline, conditions: Sequence[ConditionEdits], capture: Capture | None = None
    ) -> list[Outcome]:
        """One Outcome per condition (a list of EdgeEdits with `(query, key)` edges on this one sequence).

        `capture` (the same one given to `baseline()`): each Outcome's `attn` holds its post-edit rows; rows a
        condition cannot change (layers below its first edit, identity conditions) are the baseline's."""
        outcomes: list[Outcome | None] = [None] * len(conditions)
        plans: list[_Plan] = []
        for i, edits in enumerate(conditions):
            planned = self._plan_condition(base, i, edits, capture)
            if isinstance(planned, _Plan):
                plans.append(planned)
            else:
                outcomes[i] = planned
        self.stats.conditions += len(conditions)
        self._run_plans(base, plans, capture, outcomes)
        return outcomes  # type: ignore[return-value]

    def _plan_condition(
        self, base: Baseline, i: int, edits: ConditionEdits, capture: Capture | None
    ) -> _Plan | Outcome:
        """Condition i as a plan to run, or its Outcome already when it needs no forward (identity, masked)."""
        # materialise iterables: the edits are read again when batched
        edits = [
            replace(
                e, layers=list(e.layers), edges=edge_tensor(e.edges), heads=None if e.heads is None else list(e.heads)
            )
            for e in edits
        ]
        try:
            compiled = compile_edits(edits, self.n_layers, self.n_heads)
        except CausalEdgeError as e:
            return Outcome(None, "edge-masked", str(e))
        if not compiled:
            return Outcome(
                base.logits,
                "identity",
                "no edit left (no edges, no heads or scale 1)",
                attn=base.attn if capture is not None else None,
            )
        first_layer = min(compiled)
        first_query = min(int(le.q.min()) for les in compiled.values() for le in les)
        _check_single_sequence(i, compiled, base.input_ids.shape[1])
        dead = dead_row(compiled)
        if dead is not None:
            return Outcome(None, "row-fully-masked", dead, first_layer, first_query)
        last = base.input_ids.shape[1] - 1
        if (
            capture is None
            and first_layer == self.n_layers - 1
            and not any(bool((le.q == last).any()) for le in compiled[first_layer])
        ):
            # In the last layer a row feeds only its own position's output, so the last position's logits are the
            # baseline's exactly; a forward would only add rounding noise (~1e-13 nats) as a spurious "effect".
            return Outcome(
                base.logits,
                "identity",
                "edits only in the last layer and not on the last position's row: the next-token logits cannot change",
                first_layer,
                first_query,
            )
        return _Plan(i, edits, first_layer, first_query)

    def _run_plans(
        self, base: Baseline, plans: list[_Plan], capture: Capture | None, outcomes: list[Outcome | None]
    ) -> None:
        """Run the plans, fast (batched by earliest query) where possible, filling in their outcomes."""
        # captured rows before q0 are outside the suffix call: such conditions run in full
        min_row = int(capture_rows(capture).min()) if capture is not None else None
        if self.path == "naive" or base.kv is None:
            for p in plans:
                outcomes[p.index] = self._naive(base, p, capture)
            return
        by_query: dict[int, list[_Plan]] = {}
        for p in plans:
            by_query.setdefault(p.first_query, []).append(p)
        for q0, group in sorted(by_query.items()):
            if min_row is not None and min_row < q0:
                for p in group:
                    outcomes[p.index] = self._naive(base, p, capture)
                continue
            group.sort(key=lambda p: p.first_layer)
            for start in range(0, len(group), self.max_batch):
                chunk = group[start : start + self.max_batch]
                for p, o in zip(chunk, self._fast_safe(base, chunk, q0, capture), strict=True):
                    outcomes[p.index] = o

    def _naive(self, base: Baseline, p: _Plan, capture: Capture | None = None) -> Outcome:
        """A full forward of the whole sequence with the edits (the reference the fast path must equal)."""
        try:
            with torch.inference_mode(), self.engine.run(capture=capture, edits=p.edits) as rec:
                out = self.model(base.input_ids, **self._keep)
        except MaskedRowError as e:
            return Outcome(None, "row-fully-masked", str(e), p.first_layer, p.first_query)
        except CausalEdgeError as e:
            return Outcome(None, "edge-masked", str(e), p.first_layer, p.first_query)
        self.stats.calls += 1
        self.stats.layer_tokens += self.n_layers * base.input_ids.shape[1]
        attn = _item_attn(rec, 0) if capture is not None else None
        _require_finite_logits(out.logits[:, -1], [p])
        return Outcome(self._last(out), "ok", None, p.first_layer, p.first_query, attn)

    def _fast_safe(self, base: Baseline, chunk: list[_Plan], q0: int, capture: Capture | None = None) -> list[Outcome]:
        try:
            logits, attn = self._fast(base, chunk, q0, capture)
        except (MaskedRowError, CausalEdgeError) as e:
            if len(chunk) == 1:
                status = "row-fully-masked" if isinstance(e, MaskedRowError) else "edge-masked"
                p = chunk[0]
                return [Outcome(None, status, str(e), p.first_layer, p.first_query)]
            # one item's problem must not sink the batch: run each alone
            self.stats.fallbacks += 1
            return [o for p in chunk for o in self._fast_safe(base, [p], q0, capture)]
        return [
            Outcome(lg, "ok", None, p.first_layer, p.first_query, at)
            for p, lg, at in zip(chunk, logits, attn, strict=True)
        ]

    def _fast(
        self, base: Baseline, chunk: list[_Plan], q0: int, capture: Capture | None = None
    ) -> tuple[list[torch.Tensor], list[dict[int, torch.Tensor] | None]]:
        """One batched suffix forward for conditions sharing their earliest query q0 (sorted by first layer)."""
        from transformers import DynamicCache

        assert base.kv is not None, "the fast path runs on a baseline that kept its KV cache"

        n_items = len(chunk)
        starts = [p.first_layer for p in chunk]
        active = [bisect.bisect_right(starts, layer) for layer in range(self.n_layers)]  # items computed per layer
        edits = [replace(e, edges=_on_item(j, e.edges)) for j, p in enumerate(chunk) for e in p.edits]
        suffix = base.input_ids[:, q0:].expand(n_items, -1)
        cache = None
        if q0 > 0:
            # A fresh cache per call, sliced from the baseline's (never mutated): only the layers that run read
            # it, but every layer needs the prefix length, which sets the mask's key length and the positions.
            cache = DynamicCache(
                ddp_cache_data=[
                    (k[:, :, :q0].expand(max(n, 1), -1, -1, -1), v[:, :, :q0].expand(max(n, 1), -1, -1, -1))
                    for (k, v), n in zip(base.kv, active, strict=True)
                ]
            )
        with (
            torch.inference_mode(),
            self._staircase(base, q0, active, n_items),
            self.engine.run(capture=capture, edits=edits) as rec,
        ):
            out = self.model(suffix, **{self._cache_arg: cache}, use_cache=cache is not None, **self._keep)
        self.stats.calls += 1
        self.stats.layer_tokens += sum(active) * suffix.shape[1]
        attn: list[dict[int, torch.Tensor] | None] = [None] * n_items
        if capture is not None:
            # Layer l computed only its first active[l] items; the others are unedited there: the baseline's rows.
            known = base.attn or {}
            for j in range(n_items):
                item: dict[int, torch.Tensor] = {}
                for layer in sorted(set(rec.attn) | set(known)):
                    if layer in rec.attn and j < rec.attn[layer].shape[0]:
                        item[layer] = rec.attn[layer][j]
                    elif layer in known:
                        item[layer] = known[layer]
                attn[j] = item
        _require_finite_logits(out.logits[:, -1], chunk)
        return list(out.logits[:, -1].detach().unbind(0)), attn

    @contextmanager
    def _staircase(self, base: Baseline, q0: int, active: list[int], n_items: int) -> Iterator[None]:
        """Within the block, decoder layer l computes only its first `active[l]` batch items; the rest (and every
        item at layers below its first edit) get the baseline's resid_post for positions q0.."""
        assert base.resid is not None, "the fast path runs on a baseline that kept its residuals"
        saved = []
        try:
            for i, layer in enumerate(self.layers):
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = _stub(layer.forward, base.resid[i][:, q0:], active[i], n_items)
            yield
        finally:
            for layer, own in saved:
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own


def _require_finite_logits(logits: torch.Tensor, plans: list[_Plan]) -> None:
    """NonFiniteError naming the condition whose next-token logits (`[items, V]`, one row per plan) hold NaN/inf."""
    bad = ~torch.isfinite(logits).all(-1)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise NonFiniteError(f"the next-token logits under condition {plans[j].index}")


def capture_rows(capture: Capture) -> torch.Tensor:
    """The capture's rows as a tensor (for checks before running)."""
    return torch.as_tensor(capture.rows, dtype=torch.long)


def _check_single_sequence(i: int, compiled: dict[int, list[LayerEdit]], seq: int) -> None:
    """PlipyError unless condition i's edges all lie on the runner's one sequence (batch item 0, query < seq)."""
    for les in compiled.values():
        for le in les:
            bad = le.b > 0
            if bad.any():
                j = int(bad.nonzero()[0, 0])
                b, q, k = int(le.b[j]), int(le.q[j]), int(le.k[j])
                raise PlipyError(
                    f"condition {i}: edge ({b}, {q}, {k}) names batch item {b}; "
                    "the runner runs one sequence, give (query, key) edges"
                )
            if int(le.q.max()) >= seq:
                raise PlipyError(f"condition {i}: edge query {int(le.q.max())} is past the sequence ({seq} tokens)")


def _on_item(j: int, edges: Any) -> torch.Tensor:
    """A condition's edges as `(j, query, key)` rows: batch item j of a batched run carries them."""
    t = edge_tensor(edges).clone()  # never write into the condition's own tensor
    t[:, 0] = j
    return t


def _item_attn(rec: Any, j: int) -> dict[int, torch.Tensor] | None:
    """Batch item j's captured rows per layer `[heads, rows, keys]`, or None without a capture."""
    if rec is None:
        return None
    return {layer: a[j] for layer, a in rec.attn.items()}


def _stub(forward: Any, resid: torch.Tensor, n: int, n_items: int):
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if n == 0:
            return resid.expand(n_items, -1, -1)
        if n < n_items:
            args = tuple(_take(a, n, n_items) for a in args)
            kwargs = {k: _take(v, n, n_items) for k, v in kwargs.items()}
        out = forward(*args, **kwargs)
        if n < n_items:
            out = torch.cat([out, resid.expand(n_items - n, -1, -1).to(out.dtype)], 0)
        return out

    return run


def _take(x: Any, n: int, n_items: int) -> Any:
    """The first n batch items of a layer argument (hidden states, masks); anything without that batch is kept."""
    if isinstance(x, torch.Tensor):
        # ndim ≥ 2: a 1-D tensor (cache positions) could have n_items entries by coincidence
        return x[:n] if x.ndim >= 2 and x.shape[0] == n_items else x
    if isinstance(x, tuple):
        return tuple(_take(v, n, n_items) for v in x)
    if isinstance(x, list):
        return [_take(v, n, n_items) for v in x]
    if isinstance(x, dict):
        return {k: _take(v, n, n_items) for k, v in x.items()}
    return x


def dead_row(compiled: dict[int, list[LayerEdit]]) -> str | None:
    """Why the knockout edits leave some query row with no key at all (under the plain causal mask), or None.

    Edges are validated key ≤ query, so a row q is dead in a head when its removed keys number q + 1."""
    for layer in sorted(compiled):
        removed: dict[tuple[int | None, int], dict[int | None, set[int]]] = {}
        for le in compiled[layer]:
            if le.bias != -math.inf:
                continue
            for b, q, k in le.edges:
                for h in le.heads if le.heads is not None else [None]:
                    removed.setdefault((b, q), {}).setdefault(h, set()).add(k)
        for (_b, q), per_head in sorted(removed.items(), key=lambda kv: kv[0][1]):
            common = per_head.get(None, set())
            heads: list[int | None] = [h for h in per_head if h is not None]
            for h in heads or [None]:
                if len(common | per_head.get(h, set())) >= q + 1:
                    head = "every head" if h is None else f"head {h}"
                    return (
                        f"layer {layer}: the knockout removes every key of query row {q} ({head}): "
                        "softmax over no keys is undefined"
                    )
    return None


def last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """The forward argument that computes logits at the last position only (`logits_to_keep=1`), if it has one."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers ≥ 5.24 names it `cache`; earlier 5.x `past_key_values`


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which this model's forward takes a KV cache, or None (the fast path needs one)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in params), None)


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name (`cache` from transformers 5.24, else `past_key_values`)."""
    for name in CACHE_ARGUMENTS:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def fast_path_blockers(model: torch.nn.Module) -> list[str]:
    """Why reusing the baseline's cache and residuals could be wrong for this model (empty list: safe)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    reasons = []
    if cache_argument(model) is None:
        reasons.append(f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`)")
        return reasons
    try:
        # a transformers model: torch's Module.__getattr__ stub types `.config` as a tensor or module
        cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 — any failure here just means "do not take the shortcut"
        return [f"cannot build a DynamicCache for this config ({type(e).__name__}: {e})"]
    # A sliding-window layer is run with a full cache instead (`full_cache`): the window is the mask's job (built
    # from the config), so keeping every position changes nothing but memory. Chunked, shared-KV, linear-attention
    # or quantized layers keep state a full cache cannot stand in for.
    odd = sorted(
        {type(layer).__name__ for layer in cache.layers if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)}
    )
    if odd:
        reasons.append(
            f"cache layers of type {', '.join(odd)} (chunked / shared KV / linear attention) cannot be "
            "sliced to a prefix safely"
        )
    return reasons


def full_cache() -> Any:
    """A DynamicCache whose every layer keeps all positions, sliding-window layers included.

    Given to the baseline forward so its keys/values cover the whole input: a suffix rerun from position q0 needs
    the last W keys before q0 of a W-window layer, which a sliding cache has already dropped."""
    from transformers import DynamicCache

    return DynamicCache()


def _baseline_problem(outputs: list[Any], cache: Any, shape: tuple[int, ...], n_layers: int) -> str | None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    batch, seq = shape
    for i, o in enumerate(outputs):
        if not isinstance(o, torch.Tensor) or o.ndim != 3 or tuple(o.shape[:2]) != (batch, seq):
            return f"decoder layer {i} returned {type(o).__name__}, not a [batch, seq, d] tensor"
    if not isinstance(cache, DynamicCache) or len(cache.layers) != n_layers:
        return f"the model returned a {type(cache).__name__} cache, not a DynamicCache with {n_layers} layers"
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.shape[-2] != seq:
            return f"cache layer {i} ({type(layer).__name__}) does not hold the {seq} positions of the input"
    return None


def layer_windows(model: torch.nn.Module, n_layers: int | None = None) -> list[int | None]:
    """Per decoder layer, the sliding-window size (a key k is visible from query q when q − k < window), or None."""
    return adapter(model).windows()
