"""`plipy.sweep`: one experiment over several models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import check_cluster
from plipy.api.knockout import knockout
from plipy.api.scan import scan
from plipy.errors import ParameterError
from plipy.models import check_spec
from plipy.results import Result, SweepResult


def sweep(models: Any, experiment: str = "scan", *, out_dir: str | Path | None = None, **options: Any) -> SweepResult:
    """One experiment (`scan` or `knockout`, with its own keyword options, `ray=`/`workers=` included) on each of
    `models` in turn, and the comparison table (`plipy sweep`): a `SweepResult`. With `out_dir` each model's result
    and the sweep are saved there (`<experiment>-<model>.json`, `sweep-<experiment>.json`)."""
    import inspect

    from plipy.experiments import sweep as sw

    opt.check_choice(experiment, sw.EXPERIMENTS, param="experiment")
    specs = [str(m) for m in models] if isinstance(models, (list, tuple)) else opt.parse_groups(models, param="models")
    if not specs:
        raise ParameterError("models", "give at least one model")
    runners: dict[str, Callable[..., Result]] = {"scan": scan, "knockout": knockout}
    run = runners[experiment]
    try:
        inspect.signature(run).bind("model", **options)  # an unknown option fails before any model loads
    except TypeError as e:
        raise ParameterError("options", f"{experiment}: {e}") from None
    check_cluster(options.get("ray"), options.get("workers"))
    for spec in specs:  # a typo in the last model fails now, not after the first runs
        check_spec(spec)
    entries, docs = [], []
    for spec, name in zip(specs, sw.file_names(specs), strict=True):
        r = run(spec, **options)
        entry = {"spec": spec}
        if out_dir is not None:
            entry["file"] = r.save(Path(out_dir) / f"{experiment}-{name}.json")["json"]
        entries.append(entry)
        docs.append(r.to_dict())
    plain = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    result = sw.build(experiment, entries, docs, {"options": plain})
    if out_dir is not None:
        result.save(Path(out_dir) / f"sweep-{experiment}.json")
    return result
