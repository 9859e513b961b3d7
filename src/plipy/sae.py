"""Sparse autoencoders on the residual stream: load (SAELens folders, Gemma Scope `params.npz`, SAELens releases),
encode/decode, and map their hook names onto plipy's residual points.

Hook names follow TransformerLens: `blocks.L.hook_resid_pre` is the input of decoder layer L,
`blocks.L.hook_resid_post` its output. Both are the same point of the residual stream as `resid_pre` of L+1, which
is where the "Do I know this entity?" pipeline adds a latent "at layer L+1" (see docs/sae.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plipy.errors import PlipyError
from plipy.io import atomic_write_bytes, sha256_file, write_json

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
        shapes = {"W_dec": (self.W_dec.shape, (d_sae, d_in)), "b_enc": (self.b_enc.shape, (d_sae,)),
                  "b_dec": (self.b_dec.shape, (d_in,))}  # fmt: skip
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
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
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
        return {"min": float(n.min()), "mean": float(n.mean()), "max": float(n.max()),
                "unit_norm": bool(((n - 1).abs() < 1e-3).all())}  # fmt: skip

    def hook_point(self) -> tuple[int, str] | None:
        """(layer, "pre"|"post") of the hook name, or None when the SAE names no hook."""
        return None if self.hook_name is None else parse_hook(self.hook_name, self.source)

    def describe(self) -> dict[str, Any]:
        """Identity of the SAE for provenance."""
        return {"source": self.source, "sha256": self.sha256, "architecture": self.architecture, "d_in": self.d_in,
                "d_sae": self.d_sae, "k": self.k, "hook_name": self.hook_name,
                "apply_b_dec_to_input": self.apply_b_dec_to_input,
                "normalize_activations": self.cfg.get("normalize_activations"),
                "decoder_norms": self.norm_summary()}  # fmt: skip


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


# ---------------------------------------------------------------------------------------------- loading


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             hook_name: str | None = None) -> SAE:  # fmt: skip
    """Load an SAE from a SAELens folder (`cfg.json` + `sae_weights.safetensors`) or a Gemma Scope `params.npz`
    (a file, or a folder holding one). `hook_name` overrides/sets the hook (npz files carry none; a Gemma Scope
    path `layer_{i}/…` implies `blocks.{i}.hook_resid_post`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PlipyError(f"SAE {p}: no such file or folder")
    if p.is_dir() and (p / "cfg.json").is_file():
        sae = _load_saelens_dir(p)
    elif p.suffix == ".npz" or (p.is_dir() and (p / "params.npz").is_file()):
        sae = _load_npz(p if p.suffix == ".npz" else p / "params.npz")
    else:
        raise PlipyError(f"SAE {p}: expected a SAELens folder (cfg.json + sae_weights.safetensors) or a params.npz")
    if hook_name is not None:
        parse_hook(hook_name, str(p))
        sae.hook_name = hook_name
    return _to(sae, device, dtype)


def _to(sae: SAE, device: str | torch.device, dtype: torch.dtype) -> SAE:
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        t = getattr(sae, name)
        if t is not None:
            setattr(sae, name, t.to(device=device, dtype=dtype))
    return sae


def _load_saelens_dir(p: Path) -> SAE:
    from safetensors.torch import load_file

    try:
        cfg = json.loads((p / "cfg.json").read_text())
    except (OSError, ValueError) as e:
        raise PlipyError(f"SAE {p}: cannot read cfg.json: {e}") from e
    wfile = p / "sae_weights.safetensors"
    if not wfile.is_file():
        raise PlipyError(f"SAE {p}: cfg.json but no sae_weights.safetensors")
    state = load_file(str(wfile))
    return _from_state(state, _normalise_cfg(cfg), str(p), sha256_file(wfile))


def _normalise_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens ≥6 keeps the hook in `metadata` and names `architecture`; pre-6 configs use flat keys."""
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    arch = cfg.get("architecture")
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch in (None, "standard"):
        arch = "topk" if act == "topk" else "jumprelu" if act == "jumprelu" else arch or "standard"
    return {**cfg, "architecture": arch, "hook_name": hook, "k": k,
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}  # fmt: skip


def _from_state(state: dict[str, Any], cfg: dict[str, Any], source: str, sha: str | None) -> SAE:
    def get(name: str, required: bool = True):
        for key in (name, name.lower()):
            if key in state:
                t = state[key]
                return torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
        if required:
            raise PlipyError(f"SAE {source}: no tensor {name!r} (has: {', '.join(sorted(state))})")
        return None

    sae = SAE(
        W_enc=get("W_enc").float(), W_dec=get("W_dec").float(), b_enc=get("b_enc").float(), b_dec=get("b_dec").float(),
        threshold=_threshold(get),
        architecture=cfg["architecture"], k=None if cfg.get("k") is None else int(cfg["k"]),
        hook_name=cfg.get("hook_name"), apply_b_dec_to_input=cfg["apply_b_dec_to_input"], source=source, cfg=cfg,
        sha256=sha,
    )
    if sae.architecture != "jumprelu":
        sae.threshold = None
    return sae


def _threshold(get) -> torch.Tensor | None:
    t = get("threshold", False)
    if t is None and (lt := get("log_threshold", False)) is not None:  # older SAELens JumpReLU checkpoints
        t = lt.float().exp()
    return None if t is None else t.float()


def _load_npz(p: Path) -> SAE:
    """Gemma Scope: W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU, no b_dec subtraction on the input."""
    try:
        with np.load(p) as z:
            state = {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise PlipyError(f"SAE {p}: cannot read npz: {e}") from e
    arch = "jumprelu" if ("threshold" in state or "THRESHOLD" in state) else "standard"
    m = re.search(r"layer_(\d+)", str(p))
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else None
    cfg = {"architecture": arch, "hook_name": hook, "apply_b_dec_to_input": False, "format": "gemma-scope-npz"}
    return _from_state(state, cfg, str(p), sha256_file(p))


def load_saelens_release(release: str, sae_id: str, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> SAE:  # fmt: skip
    """Load a pretrained SAE by SAELens release name (needs `pip install 'plipy[saelens]'` and network access)."""
    try:
        from sae_lens import SAE as SaeLensSAE
    except ImportError as e:
        raise PlipyError(
            f"loading SAELens release {release!r} needs the sae-lens package: pip install 'plipy[saelens]' "
            "(or pass a local SAE folder / params.npz)"
        ) from e
    try:
        loaded = SaeLensSAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # network, unknown id, …: one line for the user
        raise PlipyError(f"SAELens could not load {release}/{sae_id}: {e}") from e
    sae_obj = loaded[0] if isinstance(loaded, tuple) else loaded
    cfg = sae_obj.cfg.to_dict() if hasattr(sae_obj.cfg, "to_dict") else dict(vars(sae_obj.cfg))
    cfg = _normalise_cfg({**cfg, "architecture": _saelens_arch(sae_obj)})
    state = {k: v.detach().cpu() for k, v in sae_obj.state_dict().items()}
    return _to(_from_state(state, cfg, f"saelens:{release}/{sae_id}", None), device, dtype)


def _saelens_arch(sae_obj: Any) -> str:
    cfg = sae_obj.cfg
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else getattr(cfg, "architecture", None)
    return str(arch or "standard")


# ---------------------------------------------------------------------------------------------- saving


def save_saelens(sae: SAE, folder: str | Path, model_name: str | None = None) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` in SAELens 6.x layout (loadable by `SAE.load_from_disk`)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.architecture == "jumprelu":
        state["threshold"] = sae.threshold
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    cfg: dict[str, Any] = {
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none", "architecture": sae.architecture,
        "metadata": {"model_name": model_name, "hook_name": sae.hook_name, "hook_head_index": None,
                     "prepend_bos": True, "written_by": "plipy"},
    }  # fmt: skip
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    atomic_write_bytes(folder / "sae_weights.safetensors", save(state))
    write_json(folder / "cfg.json", cfg)
    return folder


def save_npz(sae: SAE, path: str | Path) -> Path:
    """Write a Gemma-Scope-style `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold)."""
    import io

    arrays = {k: getattr(sae, k).detach().float().cpu().numpy() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae.threshold is not None:
        arrays["threshold"] = sae.threshold.detach().float().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def random_sae(d_in: int, d_sae: int, hook_name: str | None = None, architecture: str = "jumprelu",
               seed: int = 0, k: int | None = None) -> SAE:  # fmt: skip
    """A random SAE with unit-norm decoder rows (tests, demos)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    thr = torch.rand(d_sae, generator=g) * 0.1 if architecture == "jumprelu" else None
    return SAE(W_enc=W_dec.T.clone(), W_dec=W_dec, b_enc=torch.zeros(d_sae), b_dec=torch.zeros(d_in),
               architecture=architecture, threshold=thr, k=k, hook_name=hook_name)  # fmt: skip
