"""`plipy.label_entities`: which entities the model knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, as_model, check_cluster, ray_load
from plipy.runtime.experiment import Progress


def label_entities(
    model: Any = DEFAULT_MODEL,
    *,
    types: Any = None,
    limit: int | None = None,
    k: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 42,
    batch_size: int = 32,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Ask the model each entity's attribute queries, grade the answers, label entities known/unknown
    (`plipy entities label`); returns the labels document. `ray`/`workers`: the query shards on Ray workers."""
    from plipy.entities.build import check_types
    from plipy.entities.label import PROFILES
    from plipy.entities.label import label_entities as run

    chosen = check_types(opt.parse_groups(types, param="types"))
    prof = PROFILES["quick" if quick else "pipeline"]
    lim = prof["limit"] if limit is None else (limit or None)
    opt.check_positive(batch_size, param="batch_size")
    cluster = check_cluster(ray, workers)
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer, cluster=cluster)
    return run(
        lm,
        types=chosen,
        limit=lim,
        k=prof["k"] if k is None else k,
        seed=seed,
        max_new_tokens=prof["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
        use_cache=cache,
        cluster=cluster,
        load=ray_load(device, None, None),
    )
