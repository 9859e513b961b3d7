"""One sparse autoencoder on the residual stream (SAELens semantics) and the hook names it reads.

Hook names follow TransformerLens: `blocks.L.hook_resid_pre` is the input of decoder layer L,
`blocks.L.hook_resid_post` its output. Both are the same point of the residual stream as `resid_pre` of L+1, which
is where the "Do I know this entity?" pipeline adds a latent "at layer L+1" (see docs/sae.md).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from plipy.errors import ParameterError, PlipyError

ARCHITECTURES = ("standard", "jumprelu", "topk")
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


@dataclass
class SAE:
    """One SAE: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]` (+ JumpReLU threshold).

    `architecture` is `standard` (ReLU), `jumprelu` or `topk` (with `k`). `hook_name` is a TransformerLens hook
    name or None when the file does not say. `source` says where it came from (for errors and provenance).
    """

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    architecture: str = "standard"
    threshold: torch.Tensor | None = None
    k: int | None = None
    hook_name: str | None = None
    apply_b_dec_to_input: bool = True
    source: str = "<memory>"
    cfg: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise PlipyError(
                f"SAE {self.source}: architecture {self.architecture!r} is not supported ({', '.join(ARCHITECTURES)})"
            )
        d_in, d_sae = self.W_enc.shape
        shapes = {
            "W_dec": (self.W_dec.shape, (d_sae, d_in)),
            "b_enc": (self.b_enc.shape, (d_sae,)),
            "b_dec": (self.b_dec.shape, (d_in,)),
        }
        if self.threshold is not None and self.threshold.numel() == 1:
            self.threshold = self.threshold.reshape(1).expand(d_sae).clone()  # Llama Scope: one scalar threshold
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold.shape, (d_sae,))
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise PlipyError(
                    f"SAE {self.source}: {name} has shape {tuple(got)}, expected {want} (W_enc {d_in}×{d_sae})"
                )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise PlipyError(f"SAE {self.source}: a JumpReLU SAE needs a `threshold` tensor")
        if self.architecture == "topk" and not self.k:
            raise PlipyError(f"SAE {self.source}: a TopK SAE needs `k` in its config")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations `[..., d_sae]` of residual vectors `[..., d_in]` (SAELens semantics)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            assert self.threshold is not None  # __post_init__ refuses a JumpReLU SAE without one
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            assert self.k is not None  # __post_init__ refuses a TopK SAE without k
            top = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction `acts @ W_dec + b_dec`."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def check_latent(self, idx: int) -> int:
        """`idx` if it names a latent of this SAE, else a PlipyError naming the SAE and its size."""
        if not 0 <= int(idx) < self.d_sae:
            raise PlipyError(
                f"latent {idx} is out of range: SAE {self.source} has {self.d_sae} latents (0-{self.d_sae - 1})"
            )
        return int(idx)

    def direction(self, idx: int, kind: str = "decoder") -> torch.Tensor:
        """The steering direction of a latent: decoder row `W_dec[idx]` (upstream) or encoder column `W_enc[:, idx]`."""
        idx = self.check_latent(idx)
        if kind == "decoder":
            return self.W_dec[idx]
        if kind == "encoder":
            return self.W_enc[:, idx]
        raise PlipyError(f"direction must be 'decoder' or 'encoder', got {kind!r}")

    def decoder_norms(self) -> torch.Tensor:
        """‖W_dec[i]‖₂ per latent (Gemma Scope rows are unit norm; Llama Scope rows are rescaled at load)."""
        return self.W_dec.float().norm(dim=1)

    def norm_summary(self) -> dict[str, float | bool]:
        """Min/mean/max decoder row norm and whether all rows are unit norm (±1e-3): steering scales with them."""
        n = self.decoder_norms()
        return {
            "min": float(n.min()),
            "mean": float(n.mean()),
            "max": float(n.max()),
            "unit_norm": bool(((n - 1).abs() < 1e-3).all()),
        }

    def hook_point(self) -> tuple[int, str] | None:
        """(layer, "pre"|"post") of the hook name, or None when the SAE names no hook."""
        return None if self.hook_name is None else parse_hook(self.hook_name, self.source)

    def weights_sha256(self) -> str:
        """A hash of the tensors themselves (names, dtypes, shapes, bytes): two SAEs with equal weights share it,
        wherever they came from (a file, a release, `random_sae`), so a run's checkpoint knows its SAE."""
        h = hashlib.sha256()
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is None:
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Identity of the SAE for provenance."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "hook_name": self.hook_name,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.cfg.get("normalize_activations"),
            "decoder_norms": self.norm_summary(),
        }


def parse_hook(name: str, source: str = "SAE") -> tuple[int, str]:
    """`blocks.L.hook_resid_pre` → (L, "pre"), `blocks.L.hook_resid_post` → (L, "post"); other hooks are refused."""
    m = _HOOK.match(name.strip())
    if not m:
        raise PlipyError(
            f"{source}: hook {name!r} is not a residual-stream hook (blocks.L.hook_resid_pre / hook_resid_post)"
        )
    return int(m.group(1)), m.group(2)


def steer_layer(point: tuple[int, str]) -> int:
    """The decoder layer whose input (resid_pre) is the SAE's point: resid_post of L−1 is resid_pre of L."""
    layer, where = point
    return layer if where == "pre" else layer + 1


def resolve_layer(sae: SAE, layer: int | None, n_layers: int | None = None) -> int:
    """The decoder layer at whose input the latent is added (upstream "latent layer"): `layer`, else the one the
    SAE's hook names (the two must agree). With `n_layers` the layer must also exist in the model."""
    point = sae.hook_point()
    from_hook = None if point is None else steer_layer(point)
    if layer is not None and from_hook is not None and layer != from_hook:
        raise ParameterError(
            "layer", f"{layer} contradicts SAE {sae.source} (hook {sae.hook_name} is the input of layer {from_hook})"
        )
    out = from_hook if layer is None else layer
    if out is None:
        raise ParameterError("layer", f"SAE {sae.source} names no hook: give the steering layer")
    if out < 0:
        raise ParameterError("layer", f"layers start at 0, got {out}")
    if n_layers is not None and out >= n_layers:
        raise ParameterError(
            "layer",
            f"SAE {sae.source}: steering at the input of layer {out}, but the model has layers 0-{n_layers - 1}"
            " (an SAE on the last layer's output has no attention after it)",
        )
    return out


def hook_name_for_layer(layer: int) -> str:
    """The hook an SAE must be trained on to steer "at layer L" (upstream): resid_post of L−1 (= resid_pre of L)."""
    return f"blocks.{layer - 1}.hook_resid_post" if layer > 0 else "blocks.0.hook_resid_pre"


def check_model(sae: SAE, hidden_size: int, n_layers: int | None = None) -> None:
    """Refuse an SAE whose width or hook does not fit the model, naming the SAE."""
    if sae.d_in != hidden_size:
        raise PlipyError(f"SAE {sae.source} has d_in={sae.d_in}, but the model's residual stream has {hidden_size}")
    point = sae.hook_point()
    if point is not None and n_layers is not None and not 0 <= point[0] < n_layers:
        raise PlipyError(f"SAE {sae.source} hooks {sae.hook_name}, but the model has {n_layers} layers")
