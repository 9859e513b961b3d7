"""`plipy.label_entities`: which entities the model knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front
from plipy.results import EntityLabelsResult
from plipy.runtime.experiment import Progress


def label_entities(
    model: Any = DEFAULT_MODEL,
    *,
    types: Any = None,
    limit: int | None = None,
    k: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 42,
    batch_size: int | None = None,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    resume: bool = True,
    fresh: bool = False,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> EntityLabelsResult:
    """Ask the model each entity's attribute queries (greedy + `k` samples at T=1), grade the answers, label the
    entities known/unknown/dropped and split them as upstream (`plipy entities label`).

    `limit`/`k`/`max_new_tokens` None: the profile's (`quick`: 2 entities per type, K=2, 8 tokens; else 36, 10,
    32); `limit=0`: every entity. `batch_size`: queries per `generate` call (None: 32), each × (1+K) rows.
    `cache`: a finished document of the same run comes back from `cache_dir` (default $PLIPY_CACHE/entities) at
    once, and every query's answers are kept there for later runs (False: neither read nor written).
    `resume`/`fresh`/`ray`/`workers` as in `scan`."""
    from plipy.entities.build import check_types
    from plipy.entities.label import PROFILES
    from plipy.experiments.entity_labels import EntityLabels
    from plipy.experiments.entity_labels import label_entities as run

    front = Front.check(
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
        ray=ray,
        workers=workers,
        progress=progress,
    )
    chosen = check_types(opt.parse_groups(types, param="types"))
    prof = PROFILES["quick" if quick else "pipeline"]
    lim = prof["limit"] if limit is None else opt.check_positive(limit, param="limit", minimum=0) or None
    experiment = EntityLabels(
        chosen,
        lim,
        k=opt.check_positive(prof["k"] if k is None else k, param="k"),
        seed=opt.check_seed(seed),
        max_new_tokens=opt.check_positive(
            prof["max_new_tokens"] if max_new_tokens is None else max_new_tokens, param="max_new_tokens"
        ),
    )
    lm = front.model(model)
    return run(lm, experiment, cache_dir=cache_dir, use_cache=cache, options=front.run)
