"""`plipy sweep`: one experiment over several models, a result per model plus the comparison table."""

from __future__ import annotations

from pathlib import Path

import typer

from plipy.cli import common as c

SET_PER_MODEL = ("-m", "--model", "-o", "--out")


def sweep(
    ctx: typer.Context,
    experiment: str = typer.Argument(
        ..., help="scan | knockout, followed by its own options (--ray included).", show_default=False
    ),
    models: str = typer.Option(
        ...,
        "--models",
        help="Model specs, comma-separated (aliases, local dirs, .gguf files, hub ids).",
        show_default=False,
    ),
    out_dir: Path = typer.Option(
        Path("results/sweep"),
        "--out-dir",
        "-d",
        help="Where each model's result and the comparison (sweep-<experiment>.json and its table) are written.",
    ),
) -> None:
    """Run one experiment on each model in turn (each on its own Ray actor pool with --ray) and compare them."""
    from plipy.cli import app
    from plipy.errors import PlipyError
    from plipy.experiments import sweep as sw
    from plipy.models import check_spec
    from plipy.options import check_choice, parse_groups
    from plipy.results import load_result

    check_choice(experiment, sw.EXPERIMENTS, param="experiment")
    specs = parse_groups(models, param="models") or []
    if not specs:
        raise PlipyError("--models: give at least one model")
    rest = list(ctx.args)
    if clash := [a for a in rest if a.split("=")[0] in SET_PER_MODEL]:
        raise PlipyError(f"{clash[0]}: the sweep sets the model and output of each run (--models, --out-dir)")
    for spec in specs:  # a typo in the last model fails now, not after the first ones ran
        check_spec(spec)
    c.check_out(out_dir / f"sweep-{experiment}.json", flag="--out-dir")
    names = sw.file_names(specs)
    files = []
    for spec, name in zip(specs, names, strict=True):
        c.err_console.print(f"sweep: {experiment} on {spec}", highlight=False)
        path = out_dir / f"{experiment}-{name}.json"
        rv = app(args=[experiment, *rest, "--model", spec, "--out", str(path)], standalone_mode=False)
        if isinstance(rv, int) and rv:
            raise typer.Exit(rv)
        files.append(path)
    docs = [load_result(p).to_dict() for p in files]
    result = sw.build(
        experiment, [{"spec": s, "file": str(p)} for s, p in zip(specs, files, strict=True)], docs, {"options": rest}
    )
    table_format = rest[rest.index("--table-format") + 1] if "--table-format" in rest[:-1] else "parquet"
    c.save_and_report(
        result,
        out_dir / f"sweep-{experiment}.json",
        plot="--plot" in rest,
        html="--html" in rest,
        table_format=table_format,
    )
