"""Train a sparse autoencoder on one layer's residual stream, offline, on CPU, and save it in SAELens format.

    acts = collect_activations(lm, layer=9, chunks=text_chunks(lm.tokenizer, 128), n_tokens=100_000)
    sae, metrics = train_sae(acts, TrainConfig(arch="topk", width=4096, k=32), hook_name="blocks.9.hook_resid_post")

The SAE reads `resid_post` of decoder layer L (TransformerLens `blocks.L.hook_resid_post`, the output of layer L =
the input of layer L+1), so `plipy sae attention` steers with its latents "at layer L+1" (docs/sae.md).

Training follows the usual recipes: TopK (Gao et al. 2024, with AuxK for dead latents) or JumpReLU (Rajamanoharan
et al. 2024, straight-through estimators with a rectangle kernel, L0 penalty); Adam; decoder rows kept at unit norm
(the gradient along each row is removed before the step, rows renormalised after); `b_dec` initialised at the
geometric median of a sample. Inputs are scaled to E‖x‖ = √d during training and the scale is folded back into
the biases (and threshold), so the saved SAE reads raw residual vectors and keeps unit-norm decoder rows.
"""

from __future__ import annotations

import math
import random
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from plipy.engine import decoder_layers
from plipy.errors import ParameterError, PlipyError
from plipy.models import LoadedModel
from plipy.sae.model import SAE

ARCHS = ("topk", "jumprelu")
# `progress(description, total)` returns `step(advance=1, **metrics)` (the CLI shows the metrics beside the bar).
Progress = Callable[[str, int], Callable[..., None]]

# SmolLM2-135M has 30 layers; upstream's known/unknown latents for Gemma-2-2B (26 layers) sit around its first third
# (latent layer ≈ 9), where the last entity token has gathered the entity's attributes. resid_post of 9 is the
# input of layer 10 (a third of the depth), and training there needs only 10 of 30 layers per forward.
DEFAULT_LAYER = 9


@dataclass
class TrainConfig:
    """Hyper-parameters of one SAE run (defaults: ≤ 10 minutes on 2 CPU cores for SmolLM2-135M)."""

    arch: str = "topk"
    width: int = 4096
    k: int = 32  # TopK: active latents per token
    lr: float = 2e-3
    n_tokens: int = 50_000  # training activations (BOS positions excluded)
    epochs: int = 3  # passes over the collected activations (cheaper than collecting more)
    batch_size: int = 512  # activations per optimiser step
    seq_len: int = 128
    model_batch: int = 16  # sequences per model forward
    seed: int = 0
    auxk: bool = True  # TopK: auxiliary loss that revives dead latents
    auxk_coeff: float = 1 / 32
    dead_window: int = 20_000  # tokens without firing before a latent counts as dead for AuxK
    l0_coeff: float = 2.0  # JumpReLU: weight of the L0 penalty (in the scaled space where E‖x‖ = √d)
    threshold_init: float = 0.5  # JumpReLU, scaled space
    bandwidth: float = 0.05  # JumpReLU: width of the rectangle kernel of the straight-through estimator
    eval_seqs: int = 16  # held-out sequences for the reconstruction and next-token loss metrics
    b_dec_init: str = "geometric_median"  # or "mean"

    def check(self) -> None:
        """Refuse settings that cannot train (errors name the field)."""
        from plipy.options import check_choice, check_positive

        check_choice(self.arch, ARCHS, param="arch")
        for name in ("width", "n_tokens", "batch_size", "epochs", "model_batch"):
            check_positive(getattr(self, name), param=name)
        check_positive(self.seq_len, param="seq_len", minimum=2)
        if self.n_tokens < self.batch_size:  # said now, not after collecting them
            raise ParameterError("n_tokens", f"{self.n_tokens} tokens are fewer than one batch ({self.batch_size})")
        if self.arch == "topk" and not 0 < self.k <= self.width:
            raise ParameterError("k", f"must be in 1..width ({self.width}), got {self.k}")
        check_choice(self.b_dec_init, ("geometric_median", "mean"), param="b_dec_init")


# ---------------------------------------------------------------------------------------------- text


def stdlib_root() -> Path:
    """The running Python's standard library (always present, so training text never needs a download)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(seed: int = 0) -> Iterator[str]:
    """Python standard library sources in a seeded order; `pydoc_data/topics.py` (English prose) comes first."""
    root = stdlib_root()
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    prose = root / "pydoc_data" / "topics.py"
    random.Random(seed).shuffle(files)
    for p in [prose, *[f for f in files if f != prose]]:
        try:
            yield p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue


def entity_sentences(entities: dict[str, list[dict[str, Any]]], seed: int = 0) -> list[str]:
    """Natural sentences about the entities (`The movie 'X' is directed by Y.`), a few per document."""
    rel = {
        "city_country": "is located in",
        "city_elevation": "is at an elevation of",
        "city_population": "has a population of",
        "movie_cast": "has starring",
        "movie_directors": "is directed by",
        "movie_durations": "has a duration of",
        "movie_genres": "has the genre",
        "movie_release_year": "was released in",
        "movie_screenwriters": "is written by",
        "player_place_birth": "was born in the city of",
        "player_date_birth": "was born in the year",
        "player_teams_list": "has played for",
        "song_album": "appears in the album",
        "song_genres": "has the genre",
        "song_performers": "is sung by",
        "song_publication_year": "was released in",
    }
    lines = []
    for etype, rows in entities.items():
        for e in rows:
            parts = [f"The {etype} '{e['entity']}'"]
            attrs = e.get("attributes") or {}
            if isinstance(attrs, list):  # upstream layout: [{"attribute_type", "attribute_value"}]
                attrs = {a.get("attribute_type"): a.get("attribute_value") for a in attrs}
            for name, value in attrs.items():
                r = rel.get(f"{etype}_{name}")
                if r and value:
                    parts.append(f"{r} {str(value).split(',')[0].strip()}")
            lines.append(parts[0] + (" " + ", and ".join(parts[1:]) if len(parts) > 1 else "") + ".")
    random.Random(seed).shuffle(lines)
    return ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]


def text_chunks(
    tokenizer: Any, seq_len: int, extra_documents: Sequence[str] = (), seed: int = 0, stdlib: bool = True
) -> Iterator[list[int]]:
    """Endless-as-available sequences of `seq_len` token ids: BOS + `seq_len − 1` tokens of one document, taken
    round-robin from the extra documents (e.g. entity sentences) and the standard library."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sources: list[Iterator[str]] = []
    if extra_documents:
        sources.append(iter(list(extra_documents)))
    if stdlib:
        sources.append(stdlib_documents(seed))
    streams = [_chunks(src, tokenizer, seq_len - 1) for src in sources]
    while streams:
        for s in list(streams):
            chunk = next(s, None)
            if chunk is None:
                streams.remove(s)
                continue
            yield ([bos] if bos is not None else []) + chunk


def _chunks(docs: Iterator[str], tokenizer: Any, n: int) -> Iterator[list[int]]:
    buf: list[int] = []
    for doc in docs:
        buf += tokenizer(doc, add_special_tokens=False)["input_ids"]
        while len(buf) >= n:
            yield buf[:n]
            buf = buf[n:]
        buf = []  # a sequence never spans two documents (short tails are dropped)


# ---------------------------------------------------------------------------------------------- activations


class _Stop(Exception):
    """Raised by the capture hook: nothing after the SAE's layer is needed."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def resid_post(
    model: torch.nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Output of decoder layer `layer` (`blocks.L.hook_resid_post`) `[batch, seq, d]`; later layers never run."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise PlipyError(f"layer {layer} does not exist (the model has {len(layers)} layers)")
    got: dict[str, torch.Tensor] = {}

    def hook(_m: Any, _a: Any, out: Any) -> None:
        got["h"] = _hidden(out).detach().float().clone()
        raise _Stop

    h = layers[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return got["h"]


def collect_activations(
    lm: LoadedModel,
    layer: int,
    chunks: Iterable[list[int]],
    n_tokens: int,
    batch: int = 16,
    progress: Progress | None = None,
    skip_first: bool = True,
) -> torch.Tensor:
    """`[≥ n_tokens, d]` float32 residual vectors (resid_post of `layer`) from equal-length token sequences;
    position 0 (BOS, an outlier the SAE is never asked about) is left out when `skip_first`."""
    it = iter(chunks)
    out: list[torch.Tensor] = []
    got = 0
    step = progress("activations", n_tokens) if progress else None
    while got < n_tokens:
        seqs = [c for _, c in zip(range(batch), it, strict=False)]
        if not seqs:
            break
        ids = torch.tensor(seqs, device=lm.device)
        h = resid_post(lm.model, layer, ids)
        h = h[:, 1:] if skip_first else h
        flat = h.reshape(-1, h.shape[-1]).cpu()
        out.append(flat)
        if step:
            step(min(flat.shape[0], n_tokens - got))
        got += flat.shape[0]
    if not out:
        raise PlipyError("no training text: every source was empty")
    acts = torch.cat(out)
    if acts.shape[0] < n_tokens:
        raise PlipyError(f"only {acts.shape[0]} activation tokens available, {n_tokens} asked for")
    return acts[:n_tokens]


# ---------------------------------------------------------------------------------------------- the model


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of `x`."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * (1 + y.norm()):
            return y_new
        y = y_new
    return y


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ); gradient to θ by the rectangle-kernel straight-through estimator, to z as for ReLU above θ."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((z - theta).abs() < eps / 2).to(g.dtype) / eps
        return g * (z > theta), (-theta * kernel * g).sum(0), None


class _Step(torch.autograd.Function):
    """H(z − θ) with the straight-through gradient −K((z − θ)/ε)/ε to θ (none to z)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((z - theta).abs() < eps / 2).to(g.dtype) / eps
        return None, (-kernel * g).sum(0), None


class _Trainable(torch.nn.Module):
    """The parameters being trained (scaled space); `export()` folds the scale and returns a plipy SAE."""

    def __init__(self, d_in: int, cfg: TrainConfig, b_dec: torch.Tensor, gen: torch.Generator):
        super().__init__()
        w = torch.randn(cfg.width, d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        self.cfg = cfg
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())  # tied init (Gao et al.; Conerly et al.)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        if cfg.arch == "jumprelu":
            self.log_threshold = torch.nn.Parameter(torch.full((cfg.width,), math.log(cfg.threshold_init)))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def acts(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.arch == "topk":
            top = torch.topk(pre, self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.bandwidth)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each decoder row (it would only change the row's norm)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def export(self, scale: float, hook_name: str | None) -> SAE:
        """The SAE on raw residual vectors: biases (and threshold) divided by the input scale."""
        thr = self.log_threshold.exp() / scale if self.cfg.arch == "jumprelu" else None
        return SAE(
            W_enc=self.W_enc.detach().clone(),
            W_dec=self.W_dec.detach().clone(),
            b_enc=self.b_enc.detach() / scale,
            b_dec=self.b_dec.detach() / scale,
            architecture=self.cfg.arch,
            threshold=thr,
            k=self.cfg.k if self.cfg.arch == "topk" else None,
            hook_name=hook_name,
            apply_b_dec_to_input=True,
            source="<trained>",
        )


def train_sae(
    acts: torch.Tensor, cfg: TrainConfig, hook_name: str | None = None, progress: Progress | None = None
) -> tuple[SAE, dict[str, Any]]:
    """Train on `acts` `[N, d]` (rows shuffled each epoch); returns the SAE (raw units) and training statistics."""
    cfg.check()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, d = acts.shape
    if n < cfg.batch_size:
        raise PlipyError(f"{n} activation tokens are fewer than one batch ({cfg.batch_size})")
    scale = math.sqrt(d) / float(acts[: min(n, 8192)].norm(dim=1).mean())
    sample = acts[torch.randperm(n, generator=gen)[: min(n, 4096)]] * scale
    b_dec = geometric_median(sample) if cfg.b_dec_init == "geometric_median" else sample.mean(0)
    model = _Trainable(d, cfg, b_dec, gen)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    since_fired = torch.zeros(cfg.width, dtype=torch.long)
    fired_last_epoch = torch.zeros(cfg.width, dtype=torch.bool)
    step = progress("training SAE", total) if progress else None
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    ema: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        fired_epoch = torch.zeros(cfg.width, dtype=torch.bool)
        for i in range(steps_per_epoch):
            s = i + epoch * steps_per_epoch
            x = acts[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]] * scale
            lr = cfg.lr * min(1.0, 5 * (total - s) / total)  # linear decay over the last 20 %
            for g in opt.param_groups:
                g["lr"] = lr
            pre = model.pre(x)
            if cfg.arch == "topk":  # decode from the k indices (embedding_bag), not a dense [B, width] @ W_dec
                top = torch.topk(pre, cfg.k, dim=-1)
                vals = torch.relu(top.values)
                recon = (
                    torch.nn.functional.embedding_bag(top.indices, model.W_dec, per_sample_weights=vals, mode="sum")
                    + model.b_dec
                )
                active = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, top.indices, vals.detach() > 0)
            else:
                a = model.acts(pre)
                recon = a @ model.W_dec + model.b_dec
                active = (a > 0).detach()
            err = x - recon
            mse = err.pow(2).sum(-1).mean()
            loss = mse
            fired = active.any(0)
            fired_epoch |= fired
            since_fired += x.shape[0]
            since_fired[fired] = 0
            aux = torch.zeros(())
            if cfg.arch == "topk" and cfg.auxk:
                dead = since_fired > cfg.dead_window
                n_dead = int(dead.sum())
                if n_dead:
                    k_aux = min(d // 2, n_dead)
                    masked = pre.masked_fill(~dead, float("-inf"))
                    top = torch.topk(masked, k_aux, dim=-1)
                    aux_a = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
                    aux_recon = aux_a @ model.W_dec
                    aux = (err.detach() - aux_recon).pow(2).sum(-1).mean() / err.detach().pow(2).sum(-1).mean()
                    loss = loss + cfg.auxk_coeff * aux * mse.detach()
            l0_loss = torch.zeros(())
            if cfg.arch == "jumprelu":
                l0_loss = _Step.apply(pre, model.log_threshold.exp(), cfg.bandwidth).sum(-1).mean()
                warm = min(1.0, s / max(1, total // 10))  # ramp the sparsity penalty in over the first 10 %
                loss = loss + cfg.l0_coeff * warm * l0_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.project_decoder_grad()
            opt.step()
            model.normalise_decoder()
            var = (x - x.mean(0)).pow(2).sum(-1).mean()
            cur = {
                "fvu": float(mse.detach() / var),
                "l0": float(active.sum(-1).float().mean()),
                "dead": int((since_fired > cfg.dead_window).sum()),
            }
            ema = cur if not ema else {k: 0.9 * ema[k] + 0.1 * v for k, v in cur.items()}
            if s % max(1, total // 50) == 0 or s == total - 1:
                history.append({"step": s, "tokens": (s + 1) * cfg.batch_size, **cur, "aux": float(aux.detach())})
            if step:
                step(1, fvu=ema["fvu"], l0=ema["l0"], dead=int(ema["dead"]))
        fired_last_epoch = fired_epoch
    sae = model.export(scale, hook_name)
    stats = {
        "train_tokens": n,
        "steps": total,
        "seconds": time.perf_counter() - t0,
        "input_scale": scale,
        "dead_latents": int((~fired_last_epoch).sum()),  # never active during the whole last epoch
        "dead_latents_window": int((since_fired > cfg.dead_window).sum()),
        "history": history,
    }
    return sae, stats


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """Explained variance, MSE (per element), relative MSE and mean L0 of `sae` on `acts` `[N, d]`."""
    se = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, acts.shape[0], batch):
        x = acts[i : i + batch]
        a = sae.encode(x)
        se += float((sae.decode(a) - x).pow(2).sum())
        l0 += float((a > 0).sum())
        fired |= (a > 0).any(0)
    n, d = acts.shape
    total_var = float((acts - acts.mean(0)).pow(2).sum())
    return {
        "explained_variance": 1 - se / total_var,
        "mse": se / (n * d),
        "fvu": se / total_var,
        "l0": l0 / n,
        "active_latents_eval": int(fired.sum()),
        "eval_tokens": n,
    }


@torch.no_grad()
def spliced_loss(
    lm: LoadedModel, sae: SAE, layer: int, seqs: Sequence[list[int]], mean: torch.Tensor | None = None, batch: int = 8
) -> dict[str, float | None]:
    """Next-token cross-entropy with the clean model, with resid_post of `layer` replaced by the SAE reconstruction
    (every position but BOS, which the SAE never saw), and with it replaced by `mean` (mean ablation, a floor)."""
    layers = decoder_layers(lm.model)
    mode: dict[str, str] = {"m": "clean"}

    def hook(_m: Any, _a: Any, out: Any) -> Any:
        if mode["m"] == "clean":
            return None
        h = _hidden(out)
        new = h.clone()
        if mode["m"] == "sae":
            new[:, 1:] = sae.decode(sae.encode(h[:, 1:].float())).to(h.dtype)
        else:
            assert mean is not None  # the "mean" mode runs only with a mean
            new[:, 1:] = mean.to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    totals = {"clean": 0.0, "sae": 0.0, "mean": 0.0}
    modes = ["clean", "sae"] + (["mean"] if mean is not None else [])
    count = 0
    h = layers[layer].register_forward_hook(hook)
    try:
        for i in range(0, len(seqs), batch):
            ids = torch.tensor(list(seqs[i : i + batch]), device=lm.device)
            tgt = ids[:, 1:]
            for m in modes:
                mode["m"] = m
                logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                totals[m] += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"
                    )
                )
            count += tgt.numel()
    finally:
        h.remove()
    clean, spliced = totals["clean"] / count, totals["sae"] / count
    out: dict[str, float | None] = {"ce_clean": clean, "ce_spliced": spliced, "ce_tokens": count}
    out["ce_increase"] = increase = spliced - clean
    if mean is not None:
        out["ce_mean_ablated"] = ablated = totals["mean"] / count
        gap = ablated - clean
        out["ce_loss_recovered"] = 1 - increase / gap if gap > 0 else None
    return out


# ---------------------------------------------------------------------------------------------- one call


def train_on_model(
    lm: LoadedModel,
    layer: int,
    cfg: TrainConfig,
    out: str | Path | None = None,
    extra_documents: Sequence[str] = (),
    progress: Progress | None = None,
    stdlib: bool = True,
) -> tuple[SAE, dict[str, Any]]:
    """Collect activations of `layer`'s resid_post, train, evaluate on held-out text, and (if `out`) save the SAE
    in SAELens format with `training.json` (config, metrics, provenance) and `sparsity.safetensors` beside it."""
    from plipy.runtime import provenance
    from plipy.sae.io import save_saelens

    cfg.check()
    if not 0 <= layer < lm.n_layers - 1:
        raise ParameterError(
            "layer",
            f"must be in 0..{lm.n_layers - 2}: the SAE reads resid_post of that layer and "
            "its latents steer at the input of the next one",
        )
    hook_name = f"blocks.{layer}.hook_resid_post"
    t0 = time.perf_counter()
    chunks = text_chunks(lm.tokenizer, cfg.seq_len, extra_documents, seed=cfg.seed, stdlib=stdlib)
    eval_seqs = [c for _, c in zip(range(cfg.eval_seqs), chunks, strict=False)]  # held out: the first sequences
    if len(eval_seqs) < 1:
        raise PlipyError("no text for the held-out evaluation")
    acts = collect_activations(lm, layer, chunks, cfg.n_tokens, cfg.model_batch, progress)
    t_collect = time.perf_counter() - t0
    sae, stats = train_sae(acts, cfg, hook_name, progress)
    eval_acts = collect_activations(lm, layer, eval_seqs, len(eval_seqs) * (cfg.seq_len - 1), cfg.model_batch)
    t1 = time.perf_counter()
    metrics = {
        **reconstruction_metrics(sae, eval_acts),
        **spliced_loss(lm, sae, layer, eval_seqs, mean=acts.mean(0), batch=cfg.model_batch),
    }
    t_eval = time.perf_counter() - t1
    sae.source = str(out) if out is not None else "<trained>"
    result = {
        "hook_name": hook_name,
        "layer": layer,
        "steer_layer": layer + 1,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "architecture": sae.architecture,
        "k": sae.k,
        "config": asdict(cfg),
        "metrics": metrics,
        "training": {k: v for k, v in stats.items() if k != "history"},
        "history": stats["history"],
        "timings_s": {
            "collect": t_collect,
            "train": stats["seconds"],
            "eval": t_eval,
            "total": time.perf_counter() - t0,
        },
        "decoder_norms": sae.norm_summary(),
        "text": {
            "sources": (["extra documents"] if extra_documents else []) + (["python stdlib"] if stdlib else []),
            "stdlib": str(stdlib_root()),
            "seq_len": cfg.seq_len,
            "eval_sequences": len(eval_seqs),
            "bos_excluded": True,
        },
    }
    result["provenance"] = provenance.build(model=lm, seed=cfg.seed, config=asdict(cfg))
    if out is not None:
        save_saelens(sae, out, model_name=lm.name)
        _save_sparsity(sae, acts, Path(out))
        from plipy.io import write_json

        write_json(Path(out) / "training.json", result)
    return sae, result


def _save_sparsity(sae: SAE, acts: torch.Tensor, folder: Path) -> None:
    """SAELens' optional `sparsity.safetensors`: log10 of each latent's firing frequency on the training tokens."""
    from safetensors.torch import save

    from plipy.io import atomic_write_bytes

    fired = torch.zeros(sae.d_sae)
    with torch.no_grad():
        for i in range(0, acts.shape[0], 4096):
            fired += (sae.encode(acts[i : i + 4096]) > 0).float().sum(0)
    log_freq = torch.log10(fired / acts.shape[0] + 1e-10)
    atomic_write_bytes(folder / "sparsity.safetensors", save({"sparsity": log_freq.contiguous()}))
