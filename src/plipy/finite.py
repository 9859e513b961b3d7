"""Refusing non-finite numbers: a cheap check on tensors already in hand, and naming the sample or prompt a batch
item stands for, so the one error line says where the NaN came from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from plipy.errors import NonFiniteError


def require_finite(t: Any, what: str, layer: int | None = None) -> None:
    """NonFiniteError unless every value of tensor `t` is finite; the first bad batch item (dim 0) is named."""
    import torch

    ok = torch.isfinite(t)
    if bool(ok.all()):
        return
    item = int((~ok).reshape(ok.shape[0], -1).any(-1).nonzero()[0, 0]) if t.ndim >= 2 else None
    raise NonFiniteError(what, layer=layer, item=item)


@contextmanager
def naming(labels: Sequence[str] | str) -> Iterator[None]:
    """Within the block a NonFiniteError gets its place: `labels[item]` for batch item `item` (e.g. "sample 'x'"),
    or `labels` itself for every item when one string is given."""
    try:
        yield
    except NonFiniteError as e:
        if e.where is not None:
            raise
        if isinstance(labels, str):
            where = labels
        elif e.item is not None and 0 <= e.item < len(labels):
            where = labels[e.item]
        else:
            where = ", ".join(labels[:3]) + (" …" if len(labels) > 3 else "")
        raise e.naming(where) from None
