"""The evidence page docs/models.md: the PLIP layer scan, the knockout layer scan and the entity pipeline on both
real models, side by side. Every number in the page comes from the JSON files the plipy commands below write.

    python benchmarks/models_evidence.py --run                  # run the commands that have no result yet
    python benchmarks/models_evidence.py                        # print the page's tables (markdown)
    python benchmarks/models_evidence.py --write docs/models.md # put them into the page, between its markers

Not a benchmark and not run by the tests: the entity labelling takes tens of minutes per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import scipy.optimize
import scipy.stats

MODELS = ("smollm2-135m", "gemma3-270m")
# resid_post layer of the pipeline's SAE: about the first third of the model, like upstream's Gemma-2-2B latents
SAE_LAYER = {"smollm2-135m": 9, "gemma3-270m": 5}
LABELS = ("--limit", "12", "--k", "10", "--max-new-tokens", "16")
BEGIN, END = "<!-- models_evidence:begin -->", "<!-- models_evidence:end -->"


def commands(model: str, out: Path) -> dict[str, list[str]]:
    """The plipy commands whose results the page shows, per model."""
    return {
        "scan": ["plipy", "scan", "--model", model, "--out", f"{out}/scan-{model}.json"],
        "scan --bos": ["plipy", "scan", "--model", model, "--bos", "--out", f"{out}/scan-{model}-bos.json"],
        "knockout": ["plipy", "knockout", "--model", model, "--scan-layers", "--out", f"{out}/knockout-{model}.json"],
        "labels": ["plipy", "entities", "label", "--model", model, *LABELS, "--out", f"{out}/labels-{model}.json"],
        "pipeline": [
            "plipy",
            "sae",
            "pipeline",
            "--model",
            model,
            "--quick",
            "--limit",
            "12",
            "--layer",
            str(SAE_LAYER[model]),
            "--out",
            f"{out}/pipeline-{model}",
        ],
    }


def result_file(kind: str, cmd: list[str]) -> Path:
    path = Path(cmd[cmd.index("--out") + 1])
    return path / "summary.json" if kind == "pipeline" else path


def run(out: Path, models: list[str]) -> None:
    """Run every command whose result file is missing (each plipy command resumes an interrupted run itself)."""
    for model in models:
        for kind, cmd in commands(model, out).items():
            if result_file(kind, cmd).is_file():
                continue
            print("$", shlex.join(cmd), flush=True)
            subprocess.run([sys.executable, "-m", "plipy", *cmd[1:]], check=True)


# ---------------------------------------------------------------------------------------------- statistics


def detectable_g(n1: int, n2: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest standardised difference |g| a two-sided t-test on groups of n1 and n2 detects with `power`
    at level `alpha` (noncentral t, equal variances); None when a group has fewer than 2."""
    if n1 < 2 or n2 < 2:
        return None
    df = n1 + n2 - 2
    t = scipy.stats.t.ppf(1 - alpha / 2, df)
    scale = math.sqrt(n1 * n2 / (n1 + n2))

    def miss(d: float) -> float:
        nc = d * scale
        got = scipy.stats.nct.sf(t, df, nc) + scipy.stats.nct.cdf(-t, df, nc)
        return 1 - power if math.isnan(got) else got - power  # scipy's NaN: far in the tail, power ≈ 1

    return float(scipy.optimize.brentq(miss, 1e-6, 100.0))


# ---------------------------------------------------------------------------------------------- rendering


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _ratio(groups: dict[str, dict], ga: str, gb: str) -> float | None:
    """Plain mean(A) ÷ mean(B) (the scan's `ratio` keeps PLIP's rule: 0 whenever mean(B) ≤ 0.001)."""
    mb = groups[gb]["mean"]
    return groups[ga]["mean"] / mb if mb else None


def _largest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the largest |Hedges g| (the layer of largest effect, either direction)."""
    return max(rows, key=lambda r: abs(r["hedges_g"]) if r["hedges_g"] is not None else -1)


def scan_tables(scans: dict[str, dict]) -> list[str]:
    out = [
        "### Layer scan: marker → target attention",
        "",
        "| model | layers | n (A / B) | uniform null A / B | null ratio | largest-effect layer | mean A / B there | "
        "A ÷ B | g | p (Holm) | layers p_holm < 0.05 |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for model, r in scans.items():
        ga, gb = r["groups_compared"]
        best = _largest(r["layers"])
        n = f"{best['groups'][ga]['n']} / {best['groups'][gb]['n']}"
        sig = sum(1 for x in r["layers"] if x["p_holm"] is not None and x["p_holm"] < 0.05)
        out.append(
            f"| {model} | {len(r['layers'])} | {n} | {pct(r['uniform_null'][ga]['mean'])} / "
            f"{pct(r['uniform_null'][gb]['mean'])} | {fmt(r['null_ratio'])} | {best['layer']} | "
            f"{pct(best['groups'][ga]['mean'])} / {pct(best['groups'][gb]['mean'])} | "
            f"{fmt(_ratio(best['groups'], ga, gb))} | "
            f"{fmt(best['hedges_g'])} | {fmt(best['p_holm'])} | {sig} of {len(r['layers'])} |"
        )
    out += [
        "",
        "Position-controlled: `excess` = attention ÷ uniform null 1/(m+1), per sample.",
        "",
        "| model | largest-effect layer (excess) | excess A / B there | A ÷ B | g | p (Holm) | layers p_holm < 0.05 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for model, r in scans.items():
        ga, gb = r["groups_compared"]
        exc = [x["excess"] | {"layer": x["layer"]} for x in r["layers"]]
        best = _largest(exc)
        sig = sum(1 for x in exc if x["p_holm"] is not None and x["p_holm"] < 0.05)
        out.append(
            f"| {model} | {best['layer']} | {fmt(best['groups'][ga]['mean'])} / "
            f"{fmt(best['groups'][gb]['mean'])} | {fmt(_ratio(best['groups'], ga, gb))} | "
            f"{fmt(best['hedges_g'])} | "
            f"{fmt(best['p_holm'])} | {sig} of {len(exc)} |"
        )
    out += [
        "",
        "The attention sink: samples whose targets include token 0 (without BOS the first code token), and the "
        "head-mean share of the marker's attention on token 0, averaged over the layers.",
        "",
        "| model | token 0 is a target: A / B | token-0 share A / B |",
        "|---|---|---|",
    ]
    for model, r in scans.items():
        ga, gb = r["groups_compared"]
        zero = {
            g: sum(1 for x in r["samples"] if x["group"] == g and 0 in (x.get("measured_targets") or []))
            for g in (ga, gb)
        }
        n = {g: sum(1 for x in r["samples"] if x["group"] == g and "attention" in x) for g in (ga, gb)}
        share = {g: sum(x["first_token_share"][g] for x in r["layers"]) / len(r["layers"]) for g in (ga, gb)}
        out.append(f"| {model} | {zero[ga]} of {n[ga]} / {zero[gb]} of {n[gb]} | {pct(share[ga])} / {pct(share[gb])} |")
    for model, r in scans.items():
        ga, gb = r["groups_compared"]
        out += [
            "",
            f"<details><summary>{model}: every layer</summary>",
            "",
            f"| layer | {ga} | {gb} | A ÷ B | g | p (Holm) | excess {ga} | excess {gb} | excess p (Holm) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["layers"]:
            e = x["excess"]
            out.append(
                f"| {x['layer']} | {pct(x['groups'][ga]['mean'])} | {pct(x['groups'][gb]['mean'])} | "
                f"{fmt(_ratio(x['groups'], ga, gb))} | {fmt(x['hedges_g'])} | {fmt(x['p_holm'])} | "
                f"{fmt(e['groups'][ga]['mean'])} | {fmt(e['groups'][gb]['mean'])} | {fmt(e['p_holm'])} |"
            )
        out += ["", "</details>"]
    return out


def knockout_tables(kos: dict[str, dict]) -> list[str]:
    out = [
        "### Knockout layer scan: KL(base ‖ marker → targets removed), nats",
        "",
        "| model | conditions | n (A / B) | largest mean KL: layer | mean KL A / B there | largest-effect layer "
        "| mean KL A / B there | A ÷ B | g | p (Holm) | layers p_holm < 0.05 | runner |",
        "|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for model, r in kos.items():
        ga, gb = r["groups_compared"]
        runs = r["runs"]
        top = max(runs, key=lambda x: max(x["groups"][ga]["mean"], x["groups"][gb]["mean"]))
        best = _largest([x | {"layer": x["label"]} for x in runs])
        sig = sum(1 for x in runs if x["p_holm"] is not None and x["p_holm"] < 0.05)
        runner = r["provenance"]["config"]["runner"]
        out.append(
            f"| {model} | {len(runs)} | {best['groups'][ga]['n']} / {best['groups'][gb]['n']} | "
            f"{top['label']} | {fmt(top['groups'][ga]['mean'])} / {fmt(top['groups'][gb]['mean'])} | "
            f"{best['layer']} | {fmt(best['groups'][ga]['mean'])} / {fmt(best['groups'][gb]['mean'])} | "
            f"{fmt(best['ratio'])} | {fmt(best['hedges_g'])} | {fmt(best['p_holm'])} | {sig} of {len(runs)} "
            f"| {runner['path']} |"
        )
    for model, r in kos.items():
        ga, gb = r["groups_compared"]
        out += [
            "",
            f"<details><summary>{model}: every layer</summary>",
            "",
            f"| layer | mean KL {ga} | mean KL {gb} | A ÷ B | g | p (Holm) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["runs"]:
            out.append(
                f"| {x['label']} | {fmt(x['groups'][ga]['mean'])} | {fmt(x['groups'][gb]['mean'])} | "
                f"{fmt(x['ratio'])} | {fmt(x['hedges_g'])} | {fmt(x['p_holm'])} |"
            )
        out += ["", "</details>"]
    return out


def label_tables(labels: dict[str, dict]) -> list[str]:
    types = list(next(iter(labels.values()))["summary"])
    out = [
        "### Which entities each model knows",
        "",
        "Known / unknown / dropped of the entities labelled per type, and the balanced test group (per label).",
        "",
        "| model | " + " | ".join(types) + " | all | attributes known | balanced test, per label |",
        "|---|" + "---|" * len(types) + "---|---|---|",
    ]
    for model, doc in labels.items():
        s = doc["summary"]
        cells = [f"{s[t]['known']} / {s[t]['unknown']} / {s[t]['dropped']}" for t in types]
        known = sum(s[t]["known"] for t in types)
        total = sum(s[t]["n"] for t in types)
        test = sum(s[t]["test_balanced_per_label"] for t in types)
        attrs = [v["known"] for e in doc["entities"] for v in e["attributes"].values()]
        out.append(
            f"| {model} | " + " | ".join(cells) + f" | {known} of {total} known | {sum(attrs)} of "
            f"{len(attrs)} | {test} |"
        )
    out.append("")
    for model, doc in labels.items():
        names = [
            f"{e['entity']} ({e['entity_type']}: {', '.join(a for a, v in e['attributes'].items() if v['known'])})"
            for e in doc["entities"]
            if e["label"] == "known"
        ]
        out.append(f"- {model} knows: {'; '.join(names) or 'none'}")
    cfg = next(iter(labels.values()))["config"]
    out += [
        "",
        f"Labelled with K = {cfg['k']} samples per attribute query and {cfg['max_new_tokens']} new tokens "
        f"(upstream used 32): the first {cfg['limit']} shipped entities of each type, seed {cfg['seed']}.",
    ]
    return out


def pipeline_tables(pipes: dict[str, dict]) -> list[str]:
    out = [
        "### The entity pipeline (`--quick --limit 12`): labels → SAE → latents → attention",
        "",
        "`plipy sae pipeline --quick --limit 12`: the same 12 entities per type, labelled with the quick profile "
        "(K = 2, 8 new tokens: an attribute is known with 1 of 2 samples correct, a laxer rule than above, but 8 "
        "tokens can cut an answer short, so the counts may differ from above either way), "
        "a 256-latent TopK SAE on 1,024 tokens, latents scored on the train split, 4 prompts per "
        "label (docs/sae-pipeline.md).",
        "",
        "| model | known / labelled | SAE: hook, explained variance | top known / unknown latent | known prompts | "
        "unknown prompts |",
        "|---|---|---|---|---|---|",
    ]
    for model, s in pipes.items():
        ents = s["entities"].values()
        sae = s["sae"]
        ev = (sae.get("metrics") or {}).get("explained_variance")
        out.append(
            f"| {model} | {sum(e['known'] for e in ents)} / {sum(e['n'] for e in ents)} | "
            f"`{sae.get('hook_name')}`, {fmt(ev)} | {_latent_cell(s)} | {_attention_cell(s, 'known')} | "
            f"{_attention_cell(s, 'unknown')} |"
        )
    return out


def _latent_cell(s: dict) -> str:
    if s.get("latents") is None:
        return f"not scored ({s.get('latents_error')})"
    top = s["latents"]["top"]
    return " / ".join(str(top[lab][0]["latent_idx"]) if top[lab] else "none" for lab in ("known", "unknown"))


def _attention_cell(s: dict, label: str) -> str:
    a = (s.get("attention") or {}).get(label)
    if not a:
        return "not run"
    diff = a.get("mean_difference")
    more = f"; mean {a.get('measure')} difference {diff:+.4f}" if diff is not None else ""
    return f"{a['n_entities']} entities: {a['status']}{more}"


def power_table(scans: dict[str, dict], labels: dict[str, dict]) -> list[str]:
    out = [
        "### What the group sizes allow",
        "",
        "The smallest standardised difference |g| a two-sided t-test detects with 80 % power at α = 0.05, and at "
        "α = 0.05 / L (Holm's first step over L layers), for the groups these runs have "
        "(`detectable_g` in `benchmarks/models_evidence.py`: noncentral t).",
        "",
        "| model | comparison | n per group | detectable g (α = 0.05) | detectable g (α = 0.05 / L) |",
        "|---|---|---|---:|---:|",
    ]
    for model, r in scans.items():
        ga, gb = r["groups_compared"]
        na, nb = r["layers"][0]["groups"][ga]["n"], r["layers"][0]["groups"][gb]["n"]
        n_layers = len(r["layers"])
        out.append(
            f"| {model} | scan / knockout, {ga} vs {gb} | {na} / {nb} | {fmt(detectable_g(na, nb))} | "
            f"{fmt(detectable_g(na, nb, 0.05 / n_layers))} (L = {n_layers}) |"
        )
        doc = labels.get(model)
        if doc is not None:
            per_label = sum(v["test_balanced_per_label"] for v in doc["summary"].values())
            g = detectable_g(per_label, per_label)
            out.append(
                f"| {model} | entities, known vs unknown (balanced test) | {per_label} / {per_label} | "
                f"{fmt(g) if g is not None else 'no test (< 2 per group)'} | — |"
            )
    need = next(n for n in range(2, 1000) if detectable_g(n, n) <= 1.0)
    out += [
        "",
        f"A known-vs-unknown comparison that detects |g| = 1 (80 % power, α = 0.05) needs {need} entities per "
        "group in the test split (40 % of each label, upstream's split). At the rate each model knows the "
        "labelled entities, that takes about:",
        "",
    ]
    for model, doc in labels.items():
        known = sum(v["known"] for v in doc["summary"].values())
        total = sum(v["n"] for v in doc["summary"].values())
        size = f"{math.ceil(need / (0.4 * known / total)):,} labelled entities" if known else "more than any run"
        out.append(f"- {model}: {known} of {total} known → {size}")
    return out


def render(out: Path, models: list[str]) -> str:
    found: dict[str, dict[str, dict]] = {"scan": {}, "scan --bos": {}, "knockout": {}, "labels": {}, "pipeline": {}}
    lines = [
        "Produced by `python benchmarks/models_evidence.py --run` (the commands below, skipping those whose "
        "result exists) and rendered by `python benchmarks/models_evidence.py --write docs/models.md`.",
        "",
        "```bash",
    ]
    for model in models:
        for kind, cmd in commands(model, out).items():
            lines.append(shlex.join(cmd))
            path = result_file(kind, cmd)
            if path.is_file():
                found[kind][model] = load(path)
    lines += ["```", ""]
    for model in models:
        prov = (found["scan"].get(model) or {}).get("provenance", {})
        if prov:
            m, libs = prov.get("model", {}), prov.get("libraries", {})
            lines.append(
                f"- {model}: {m.get('model_class')}, weights sha256 {str(m.get('weights_sha256'))[:12]}…, "
                f"{m.get('dtype')} on {m.get('device')}, plipy {prov.get('plipy_version')}, "
                f"torch {libs.get('torch')}, transformers {libs.get('transformers')}"
            )
    lines.append("")
    if found["scan"]:
        scans = {**found["scan"], **{f"{m} --bos": r for m, r in found["scan --bos"].items()}}
        lines += scan_tables(scans) + [""]
    if found["knockout"]:
        lines += knockout_tables(found["knockout"]) + [""]
    if found["labels"]:
        lines += label_tables(found["labels"]) + [""]
    if found["pipeline"]:
        lines += pipeline_tables(found["pipeline"]) + [""]
    if found["scan"]:
        lines += power_table(found["scan"], found["labels"]) + [""]
    missing = [f"{k}:{m}" for k, per in found.items() for m in models if m not in per]
    if missing:
        lines.append(f"(not yet run: {', '.join(missing)})")
    return "\n".join(lines).rstrip() + "\n"


def write(page: Path, text: str) -> None:
    """Replace the block between the page's markers (atomically)."""
    doc = page.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"error: {page} has no {BEGIN} … {END} block")
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = page.with_suffix(".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    tmp.replace(page)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=Path("results/models"), help="where the commands write")
    ap.add_argument("--run", action="store_true", help="run the commands whose result is missing, then render")
    ap.add_argument("--write", type=Path, default=None, help="put the tables into this page (between its markers)")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.run:
        run(args.out, models)
    text = render(args.out, models)
    if args.write:
        write(args.write, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
