"""Reading and writing SAEs: SAELens folders, Gemma Scope `params.npz`, SAELens releases."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plipy.errors import PlipyError
from plipy.io import atomic_write_bytes, safetensors_whole, sha256_file, write_json
from plipy.sae.model import SAE, parse_hook

# The cfg.json layout save_saelens writes is SAELens 6.54's (`SAE.save_model`); SAELens reads a config as ≥6 when
# `metadata.sae_lens_version` (or a top-level `sae_lens_version`) is at least 6.0.
SAELENS_LAYOUT_VERSION = "6.54.12"
_RUNTIME_NORMS = ("constant_norm_rescale", "layer_norm")

# ---------------------------------------------------------------------------------------------- loading


def load_sae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hook_name: str | None = None,
) -> SAE:
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
    if not safetensors_whole(wfile):
        raise PlipyError(f"SAE {p}: sae_weights.safetensors is truncated or corrupt (shorter than its header says)")
    try:
        state = load_file(str(wfile))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: one line, whatever is wrong with the file
        raise PlipyError(f"SAE {p}: cannot read sae_weights.safetensors ({type(e).__name__}: {e})") from None
    sae = _from_state(state, _normalise_cfg(cfg), str(p), sha256_file(wfile))
    _check_cfg_shapes(sae, cfg)
    return sae


def _check_cfg_shapes(sae: SAE, cfg: dict[str, Any]) -> None:
    """Refuse a cfg.json whose sizes contradict the weights: one of the two is from another SAE."""
    for key, got in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        said = cfg.get(key)
        if said is not None and said != got:
            raise PlipyError(
                f"SAE {sae.source}: cfg.json says {key}={said}, but the weights have {key}={got} (W_enc "
                f"{sae.d_in}×{sae.d_sae}): the config and the weights are from different SAEs"
            )


def _normalise_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens ≥6 keeps the hook in `metadata` and names `architecture` (TopK: `k` at the top level); pre-6 configs
    use flat keys (`hook_point`, `activation_fn_str` + `activation_fn_kwargs.k`). plipy's own files before it wrote
    `sae_lens_version` are 6-style without the version and read the same way."""
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    arch = cfg.get("architecture")
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch in (None, "standard"):
        arch = "topk" if act == "topk" else "jumprelu" if act == "jumprelu" else arch or "standard"
    return {
        **cfg,
        "architecture": arch,
        "hook_name": hook,
        "k": k,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
    }


def _from_state(state: dict[str, Any], cfg: dict[str, Any], source: str, sha: str | None) -> SAE:
    _check_normalisation(cfg, source)

    def get(name: str, required: bool = True):
        for key in (name, name.lower()):
            if key in state:
                t = state[key]
                return torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
        if required:
            raise PlipyError(f"SAE {source}: no tensor {name!r} (has: {', '.join(sorted(state))})")
        return None

    sae = SAE(
        W_enc=get("W_enc").float(),
        W_dec=get("W_dec").float(),
        b_enc=get("b_enc").float(),
        b_dec=get("b_dec").float(),
        threshold=_threshold(get),
        architecture=cfg["architecture"],
        k=None if cfg.get("k") is None else int(cfg["k"]),
        hook_name=cfg.get("hook_name"),
        apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
        source=source,
        cfg=cfg,
        sha256=sha,
    )
    if sae.architecture != "jumprelu":
        sae.threshold = None
    if sae.architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        _fold_topk_decoder_norm(sae)
    return sae


def _check_normalisation(cfg: dict[str, Any], source: str) -> None:
    """SAELens applies `constant_norm_rescale` / `layer_norm` to every input at run time; plipy does not, so such an
    SAE would encode wrongly. (`expected_average_only_in` and `covariance_whitening` are no-ops in SAELens'
    inference SAE: their factors are folded into the weights, or by `from_pretrained`.)"""
    norm = cfg.get("normalize_activations")
    if norm in _RUNTIME_NORMS:
        raise PlipyError(f"SAE {source}: normalize_activations={norm!r} (a per-input normalisation) is not supported")


def _fold_topk_decoder_norm(sae: SAE) -> None:
    """SAELens' `rescale_acts_by_decoder_norm`: TopK ranks `pre · ‖W_dec[i]‖` and decodes `acts / ‖W_dec[i]‖`. Folding
    the norms into W_enc, b_enc and W_dec (as SAELens does when it saves an inference TopK SAE) gives the same
    latents up to fp32 rounding."""
    n = sae.W_dec.norm(dim=-1)
    sae.W_enc, sae.b_enc, sae.W_dec = sae.W_enc * n, sae.b_enc * n, sae.W_dec / n[:, None]
    sae.cfg = {**sae.cfg, "rescale_acts_by_decoder_norm": False, "folded_decoder_norm": True}


def _threshold(get) -> torch.Tensor | None:
    t = get("threshold", False)
    if t is None and (lt := get("log_threshold", False)) is not None:  # older SAELens JumpReLU checkpoints
        t = lt.float().exp()
    return None if t is None else t.float()


def _load_npz(p: Path) -> SAE:
    """Gemma Scope: W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU, no b_dec subtraction on the input."""
    try:
        with np.load(p, allow_pickle=False) as z:
            state = {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated file is a BadZipFile
        raise PlipyError(f"SAE {p}: cannot read npz ({type(e).__name__}: {e}); is the file complete?") from None
    arch = "jumprelu" if ("threshold" in state or "THRESHOLD" in state) else "standard"
    m = re.search(r"layer_(\d+)", str(p))
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else None
    cfg = {"architecture": arch, "hook_name": hook, "apply_b_dec_to_input": False, "format": "gemma-scope-npz"}
    return _from_state(state, cfg, str(p), sha256_file(p))


def load_saelens_release(
    release: str, sae_id: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SAE:
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
    """Write `cfg.json` + `sae_weights.safetensors` exactly as SAELens 6.x `SAE.save_model` does, so that
    `sae_lens.SAE.load_from_disk(folder)` gives the same SAE with `cfg.metadata.hook_name` / `model_name` set.

    `metadata.sae_lens_version` is what makes SAELens read the file as a ≥6 config: without it SAELens takes it for
    a pre-6 config, rebuilds `metadata` from flat keys and loses the hook and model. Metadata the SAE was loaded with
    (dataset, context size, …) is kept; `model_name=None` keeps the loaded one."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.threshold is not None and sae.architecture == "jumprelu":  # a JumpReLU SAE always has one
        state["threshold"] = sae.threshold
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    given = sae.cfg.get("metadata")
    old: dict[str, Any] = given if isinstance(given, dict) else {}
    metadata = {
        **old,
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": old.get("sae_lens_training_version"),  # None: not trained by SAELens
        "hook_name": sae.hook_name,
        "model_name": model_name or old.get("model_name"),
        "hook_head_index": old.get("hook_head_index"),
        "prepend_bos": old.get("prepend_bos", True),
        "written_by": "plipy",
    }
    cfg: dict[str, Any] = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if sae.k is not None and sae.architecture == "topk":  # TopKSAEConfig fields; plipy's TopK ranks raw pre-acts
        cfg |= {"k": int(sae.k), "rescale_acts_by_decoder_norm": False}
    cfg["architecture"] = sae.architecture
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


def random_sae(
    d_in: int,
    d_sae: int,
    hook_name: str | None = None,
    architecture: str = "jumprelu",
    seed: int = 0,
    k: int | None = None,
) -> SAE:
    """A random SAE with unit-norm decoder rows (tests, demos)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    thr = torch.rand(d_sae, generator=g) * 0.1 if architecture == "jumprelu" else None
    return SAE(
        W_enc=W_dec.T.clone(),
        W_dec=W_dec,
        b_enc=torch.zeros(d_sae),
        b_dec=torch.zeros(d_in),
        architecture=architecture,
        threshold=thr,
        k=k,
        hook_name=hook_name,
    )
