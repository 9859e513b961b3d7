"""docs/tutorial.md runs as written: its Python blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(encoding="utf-8"), flags=re.S)


def test_tutorial_has_the_four_steps():
    code = "\n".join(_blocks())
    for call in ("plipy.scan(", "plipy.knockout(", "plipy.steer.dose(", "plipy.sae_attention("):
        assert call in code


@pytest.mark.slow
def test_tutorial_code_runs(smollm, monkeypatch, tmp_path, capsys):
    import plipy

    monkeypatch.chdir(tmp_path)  # the SAE training writes nothing unless asked; keep any stray file here
    monkeypatch.setattr(plipy, "load_model", lambda *a, **k: smollm, raising=False)  # the session's model
    ns: dict = {}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"{TUTORIAL.name} block {i + 1}", "exec"), ns)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"tutorial block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    out = capsys.readouterr().out
    assert "Layer scan" in out and "Knockout" in out and "Steering layers" in out
    assert ns["again"] == ns["scan"]
