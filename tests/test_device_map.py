"""Models spread over several devices (`device_map`): the engine and the fast runner work through accelerate's
hooks. Without GPUs the map puts some layers on "disk" (weights loaded from the offload folder at every call by an
accelerate hook, parameters on the meta device), which exercises the same hook machinery as a multi-GPU map."""

from __future__ import annotations

import numpy as np
import pytest

import plipy
from conftest import tiny_llama_dir
from plipy.models import load_model

MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def models(smollm, tmp_path_factory):
    """(plain, mapped): a tiny random Llama with SmolLM2's tokenizer, loaded whole and over cpu + disk."""
    d = tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), smollm.tokenizer)
    mapped = load_model(str(d), device_map=MAP, offload_folder=tmp_path_factory.mktemp("offload"))
    return load_model(str(d)), mapped


def test_the_map_is_real(models):
    _, mapped = models
    layers = mapped.model.model.layers
    assert all(hasattr(layer, "_hf_hook") for layer in layers)  # accelerate dispatched it
    assert next(layers[1].parameters()).device.type == "meta"  # offloaded: loaded per call
    assert mapped.provenance["device_map"]["model.layers.1"] == "disk"


def _kls(result) -> np.ndarray:
    return np.array([[np.nan if s["kl"] is None else s["kl"] for s in r["samples"]] for r in result["runs"]])


def test_knockout_and_scan_through_the_hooks(models):
    """The same computation on the same CPU: the mapped model gives the plain model's numbers (to the last few
    ulps: accelerate only moves the weights in), on the fast path."""
    plain, mapped = models
    kw = dict(scan_layers=True, resamples=100, resume=False, batch_size=8)
    k_map, k_plain = plipy.knockout(mapped, **kw), plipy.knockout(plain, **kw)
    assert k_map.provenance["config"]["runner"]["path"] == "fast"
    a, b = _kls(k_map), _kls(k_plain)
    assert np.nanmax(a) > 1e-6  # the knockouts do something
    assert np.nanmax(np.abs(a - b)) <= 16 * np.finfo(np.float32).eps * np.nanmax(a)
    s_map, s_plain = plipy.scan(mapped, resamples=100, resume=False), plipy.scan(plain, resamples=100, resume=False)
    for x, y in zip(s_map["samples"], s_plain["samples"], strict=True):
        if "attention" in x:
            assert np.abs(np.array(x["attention_per_head"]) - y["attention_per_head"]).max() <= 1e-6
    d_map = plipy.steer.dose(mapped, layer=2, doses=[0.5, 2.0], resume=False)
    d_plain = plipy.steer.dose(plain, layer=2, doses=[0.5, 2.0], resume=False)
    for r1, r2 in zip(d_map["doses"], d_plain["doses"], strict=True):
        for x, y in zip(r1["samples"], r2["samples"], strict=True):
            assert abs(x["kl"] - y["kl"]) <= 16 * np.finfo(np.float32).eps * max(x["kl"], 1e-12)


def test_max_memory_needs_a_map():
    from plipy.errors import PlipyError

    with pytest.raises(PlipyError, match="need a device_map"):
        load_model("smollm2-135m", max_memory={"cpu": "1GiB"})
