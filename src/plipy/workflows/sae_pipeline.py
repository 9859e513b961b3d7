"""The "Do I know this entity?" analysis end to end, from raw data to plots, for one model in one folder:

    labels.json            known / unknown / dropped per entity, 50/10/40 split (plipy.entities)
    sae/                   an SAE on resid_post of one layer (SAELens format + training.json)
    latents.json (+ -scores-min-{known,unknown}.json)   latent scores and choices
    attention-{known,unknown}.json (+ .parquet, plots, .html)   steering with the opposite label's top latent
    summary.json, summary.md

Every stage writes its output into the folder and is skipped on a rerun when the output exists with the same
configuration, so an interrupted run resumes (labelling and the attention stage also resume inside a run, from the
runtime's checkpoint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from plipy.errors import PlipyError
from plipy.io import write_json
from plipy.models import LoadedModel
from plipy.runtime.checkpoint import fingerprint
from plipy.runtime.driver import RunOptions
from plipy.workflows.sae_train import DEFAULT_LAYER, TrainConfig

Progress = Callable[[str, int], Callable[..., None]]
Log = Callable[[str], None]


@dataclass
class PipelineConfig:
    """All stages' settings. `default` is sized for ≤ 60 minutes on 2 CPU cores with SmolLM2-135M."""

    label_limit: int | None = 24  # entities per type to label (entities.PROFILES["pipeline"])
    label_k: int = 10
    label_max_new_tokens: int = 32
    layer: int = DEFAULT_LAYER
    entity_text_limit: int = 500  # entities per type whose attribute sentences join the SAE's training text
    sae: TrainConfig = field(default_factory=TrainConfig)
    latent_split: str | None = "train"
    general_filter: bool = True
    general_tokens: int = 4096
    coeff: str = "norm"  # the residual's own norm: scale-free across models (upstream: 100 Gemma, 20 Llama)
    pos_type: str = "entity_last"
    measures: tuple[str, ...] = ("attn_weights", "value_weighted", "output_value_weighted", "distance_based")
    n_random: int = 10
    attention_limit: int | None = 100  # prompts per (type, label), upstream N = 100
    min_entities: int = 5  # fewer test entities per label than this: "too few samples", no p-value
    batch_size: int = 16
    seed: int = 42


def profile(name: str) -> PipelineConfig:
    """`default` (≤ 60 min on 2 CPU cores) or `quick` (tests: two entities per type, a tiny SAE)."""
    if name == "default":
        return PipelineConfig()
    if name == "quick":
        return PipelineConfig(
            label_limit=2,
            label_k=2,
            label_max_new_tokens=8,
            entity_text_limit=10,
            sae=TrainConfig(
                width=256,
                k=8,
                n_tokens=1024,
                epochs=2,
                batch_size=128,
                seq_len=32,
                model_batch=8,
                eval_seqs=2,
                dead_window=512,
            ),
            general_tokens=256,
            measures=("attn_weights",),
            n_random=2,
            attention_limit=4,
            min_entities=5,
        )
    raise PlipyError(f"unknown profile {name!r} (default, quick)")


def _stage_done(path: Path, fp: str) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("pipeline_fingerprint") == fp
    except (OSError, ValueError):
        return False


def run_pipeline(
    lm: LoadedModel, out: str | Path, cfg: PipelineConfig, progress: Progress | None = None, log: Log = print
) -> dict[str, Any]:
    """Run (or resume) every stage into `out`; returns the summary document (also written as JSON + markdown)."""
    from plipy import entities
    from plipy import sae as saes
    from plipy.experiments.entity_labels import EntityLabels, label_entities
    from plipy.workflows import sae_latents as sl
    from plipy.workflows.sae_train import entity_sentences, train_on_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    model_key = {"spec": lm.spec, "weights": (lm.provenance or {}).get("weights_sha256")}

    # 1. labels ------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    label_cfg = {
        "limit": cfg.label_limit,
        "k": cfg.label_k,
        "max_new_tokens": cfg.label_max_new_tokens,
        "seed": cfg.seed,
        "model": model_key,
    }
    fp_labels = fingerprint(label_cfg)
    labels_path = out / "labels.json"
    if _stage_done(labels_path, fp_labels):
        labels = entities.read_labels(labels_path)
        log(f"labels: reusing {labels_path}")
    else:
        experiment = EntityLabels(
            entities.ENTITY_TYPES, cfg.label_limit, cfg.label_k, cfg.seed, cfg.label_max_new_tokens
        )
        options = RunOptions(batch_size=cfg.batch_size * 2, progress=progress)
        result = label_entities(lm, experiment, cache_dir=out / "cache", options=options)
        labels = {**result.to_dict(), "pipeline_fingerprint": fp_labels}
        write_json(labels_path, labels)
    timings["labels"] = time.perf_counter() - t0

    # 2. SAE ---------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    sae_dir = out / "sae"
    sae_cfg = {"layer": cfg.layer, "train": asdict(cfg.sae), "model": model_key, "text": cfg.entity_text_limit}
    fp_sae = fingerprint(sae_cfg)
    if _stage_done(sae_dir / "training.json", fp_sae) and (sae_dir / "cfg.json").is_file():
        training = json.loads((sae_dir / "training.json").read_text())
        log(f"SAE: reusing {sae_dir}")
    else:
        # entity sentences from every loaded entity make the SAE see names in context, not only code
        docs = entity_sentences(entities.load_entities(limit=cfg.entity_text_limit), seed=cfg.sae.seed)
        _, training = train_on_model(lm, cfg.layer, cfg.sae, sae_dir, extra_documents=docs, progress=progress)
        training["pipeline_fingerprint"] = fp_sae
        write_json(sae_dir / "training.json", training)
    sae = saes.load_sae(sae_dir)
    timings["sae"] = time.perf_counter() - t0

    # 3. latents -----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    latents_path = out / "latents.json"
    lat_cfg = {
        "split": cfg.latent_split,
        "general_filter": cfg.general_filter,
        "general_tokens": cfg.general_tokens,
        "sae": fp_sae,
        "labels": fp_labels,
    }
    fp_lat = fingerprint(lat_cfg)
    latents_error = None
    if _stage_done(latents_path, fp_lat):
        latents = json.loads(latents_path.read_text())
        log(f"latents: reusing {latents_path}")
    else:
        latents = None
        # a small model knows few entities, and a type with one known entity has none in the train split (50 %):
        # then score on every split as upstream did, and say so
        for split in dict.fromkeys([cfg.latent_split, None]):
            try:
                latents = sl.run_latents(
                    lm,
                    sae,
                    labels,
                    split=split,
                    general_filter=cfg.general_filter,
                    general_tokens=cfg.general_tokens,
                    batch_size=cfg.batch_size * 2,
                    progress=progress,
                )
            except PlipyError as e:
                latents_error = f"split {split or 'all'}: {e}"
                log(f"latents: {latents_error}")
                continue
            if split != cfg.latent_split:
                latents["split_note"] = (
                    f"scored on every split (upstream's choice): {latents_error}; test "
                    "entities then also took part in choosing the latents"
                )
            latents_error = None
            latents["pipeline_fingerprint"] = fp_lat
            sl.write_latents(latents, latents_path)
            break
    timings["latents"] = time.perf_counter() - t0

    # 4. attention ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    attention: dict[str, Any] = {}
    if latents is not None:
        for label in ("known", "unknown"):
            attention[label] = _attention_stage(
                lm, sae, labels, latents, latents_path, label, cfg, out, fp_lat, progress, log
            )
    timings["attention"] = time.perf_counter() - t0

    summary = _summary(lm, cfg, labels, training, latents, latents_error, attention, timings, out)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def _test_prompts(labels: dict[str, Any], label: str, limit: int | None) -> tuple[list[Any], dict[str, int]]:
    """Template prompts of the balanced test entities with `label`, and the entity count per type."""
    from plipy.sae.inputs import template_prompts

    lab = {(e["entity_type"], e["entity"]): e["label"] for e in labels["entities"]}
    rows = [
        {"entity": n, "entity_type": t, "label": label}
        for t, names in labels["test_balanced"].items()
        for n in names
        if lab.get((t, n)) == label
    ]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["entity_type"]] = counts.get(r["entity_type"], 0) + 1
    prompts = template_prompts(rows)
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.entity_type] = seen.get(p.entity_type, 0) + 1
            if seen[p.entity_type] <= limit:
                kept.append(p)
        prompts = kept
    return prompts, counts


def _attention_stage(
    lm: LoadedModel,
    sae: Any,
    labels: dict[str, Any],
    latents: dict[str, Any],
    latents_path: Path,
    label: str,
    cfg: PipelineConfig,
    out: Path,
    fp_lat: str,
    progress: Progress | None,
    log: Log,
) -> dict[str, Any]:
    """Steer `label` prompts with the opposite label's top latent (upstream); the test only with enough entities."""
    from plipy.experiments.sae_attention import SaeAttention
    from plipy.runtime.driver import execute
    from plipy.sae import inputs as si
    from plipy.sae.steering import parse_coeff
    from plipy.workflows.sae_latents import candidate_paths

    other = "unknown" if label == "known" else "known"
    tops = latents.get("top", {}).get(other) or []
    prompts, counts = _test_prompts(labels, label, cfg.attention_limit)
    n_entities = sum(counts.values())
    base = {
        "prompts_label": label,
        "latent_label": other,
        "n_entities": n_entities,
        "entities_per_type": counts,
        "n_prompts": len(prompts),
    }
    if not tops:
        return {**base, "status": f"no {other} latent with a positive score: nothing to steer with"}
    if not prompts:
        return {**base, "status": f"no balanced test entities labelled {label}: too few samples"}
    latent = int(tops[0])
    steer_at = int(latents["layer"])
    enough = n_entities >= cfg.min_entities
    cands = si.read_candidates(candidate_paths(latents_path)[other], layer=steer_at)
    n_random = min(cfg.n_random, max(0, len(set(cands) - {latent}))) if enough else 0
    means = si.read_latent_means(latents_path, layer=steer_at) if cfg.coeff == "mean" else {}
    experiment = SaeAttention(
        sae,
        prompts,
        latent,
        steer_at,
        coeff=parse_coeff(cfg.coeff),
        pos_type=cfg.pos_type,
        measures=tuple(cfg.measures),
        n_random=n_random,
        random_candidates=cands,
        seed=cfg.seed,
        latent_means=means,
    )
    stem = out / f"attention-{label}"
    json_path = stem.with_suffix(".json")
    fp = fingerprint({"attention": experiment.config(cfg.batch_size), "latents": fp_lat, "n": len(prompts)})
    if _stage_done(json_path, fp):
        log(f"attention ({label}): reusing {json_path}")
        result = json.loads(json_path.read_text())
    else:
        r = execute(experiment, lm, RunOptions(batch_size=cfg.batch_size, progress=progress))
        r.annotate(pipeline_fingerprint=fp)
        r.save(json_path, plots=True, html=True)
        result = r.to_dict()
    m0 = cfg.measures[0]
    g = result["measures"][m0]["by_label"].get(label, {})
    if not enough:
        status = (
            f"too few samples: {n_entities} test entities labelled {label} (need ≥ {cfg.min_entities}); "
            "differences reported, no p-value"
        )
    else:
        status = "tested" if n_random else "no random-latent candidates (score exactly 0): no test"
    return {
        **base,
        "status": status,
        "latent": latent,
        "layer": steer_at,
        "coeff": cfg.coeff,
        "mean_difference": g.get("mean_difference"),
        "expected": g.get("expected"),
        "k_significant": g.get("k_significant") if n_random else None,
        "K": g.get("K") if n_random else None,
        "test_summary": g.get("summary") if n_random else None,
        "measure": m0,
        "file": str(json_path),
        # the files block lives in provenance (older documents: top level)
        "plots": (result.get("provenance", {}).get("files") or result.get("files") or {}).get("plots", []),
    }


def _summary(
    lm: LoadedModel,
    cfg: PipelineConfig,
    labels: dict[str, Any],
    training: dict[str, Any],
    latents: dict[str, Any] | None,
    latents_error: str | None,
    attention: dict[str, Any],
    timings: dict[str, float],
    out: Path,
) -> dict[str, Any]:
    from plipy.runtime import provenance

    known = {
        t: {k: s.get(k) for k in ("n", "known", "unknown", "dropped", "test_balanced_per_label")}
        for t, s in labels["summary"].items()
    }
    lat = None
    if latents is not None:

        def entry(label: str, i: int) -> dict[str, Any]:
            e = next(v for v in latents[label].values() if v["latent_idx"] == i)
            return {
                k: e.get(k)
                for k in (
                    "latent_idx",
                    "score",
                    "scores_by_type",
                    "freq_acts_known",
                    "freq_acts_unknown",
                    "freq_general",
                )
            }

        lat = {
            "layer": latents["layer"],
            "hook_name": latents["hook_name"],
            "counts": latents["counts"],
            "scored_types": latents["scored_types"],
            "skipped_types": latents["skipped_types"],
            "split": f"the {latents['config']['split']} split" if latents["config"]["split"] else "every split",
            "split_note": latents.get("split_note"),
            "top": {lab: [entry(lab, i) for i in latents["top"][lab][:3]] for lab in ("known", "unknown")},
        }
    return {
        "model": lm.name,
        "folder": str(out),
        "config": asdict(cfg),
        "entities": known,
        "label_notes": labels.get("notes", []),
        "sae": {
            "hook_name": training.get("hook_name"),
            "steer_layer": training.get("steer_layer"),
            "architecture": training.get("architecture"),
            "d_sae": training.get("d_sae"),
            "k": training.get("k"),
            "metrics": training.get("metrics"),
            "dead_latents": training.get("training", {}).get("dead_latents"),
            "seconds": training.get("timings_s", {}).get("total"),
        },
        "latents": lat,
        "latents_error": latents_error,
        "attention": attention,
        "timings_s": timings,
        "provenance": provenance.build(model=lm, seed=cfg.seed, config=asdict(cfg)),
    }


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def summary_markdown(s: dict[str, Any]) -> str:
    """The summary as a short report a reader can trust: counts first, tests only where the groups allow."""
    lines = [
        f"# Do I know this entity? — {s['model']}",
        "",
        "## What the model knows",
        "",
        "| type | labelled | known | unknown | dropped | balanced test per label |",
        "|---|---|---|---|---|---|",
    ]
    for t, c in s["entities"].items():
        lines.append(
            f"| {t} | {c['n']} | {c['known']} | {c['unknown']} | {c['dropped']} | {c.get('test_balanced_per_label')} |"
        )
    lines += ["", *[f"- {n}" for n in s.get("label_notes", [])], "", "## SAE", ""]
    m = s["sae"].get("metrics") or {}
    lines.append(
        f"{s['sae']['architecture']} SAE, {s['sae']['d_sae']} latents (k={s['sae']['k']}) on "
        f"`{s['sae']['hook_name']}` (steers at the input of layer {s['sae']['steer_layer']}); held-out "
        f"explained variance {_fmt(m.get('explained_variance'), '.3f')}, L0 {_fmt(m.get('l0'), '.1f')}, "
        f"dead latents {s['sae'].get('dead_latents')}, next-token loss {_fmt(m.get('ce_clean'), '.3f')} → "
        f"{_fmt(m.get('ce_spliced'), '.3f')} with the SAE spliced in (+{_fmt(m.get('ce_increase'), '.3f')} "
        "nats)."
    )
    lines += ["", "## Latents", ""]
    if s["latents"] is None:
        lines.append(f"Not scored: {s.get('latents_error')}")
    else:
        la = s["latents"]
        lines.append(
            f"Scored on {la['split']}: {json.dumps(la['counts'])}; types without both labels "
            f"(left out of the minimum): {', '.join(la['skipped_types']) or 'none'}."
        )
        if la.get("split_note"):
            lines.append(f"Note: {la['split_note']}.")
        scored = [la["counts"][t] for t in la["scored_types"]]
        n_k, n_u = sum(c["known"] for c in scored), sum(c["unknown"] for c in scored)
        if min(n_k, n_u) < s["config"]["min_entities"]:
            lines.append(
                f"Caution: the scores rest on {n_k} known and {n_u} unknown entities; with so few, a "
                "frequency difference of 1.0 can be chance, so the chosen latents are not evidence."
            )
        for lab in ("known", "unknown"):
            tops = la["top"][lab]
            lines.append(
                f"- top {lab} latents: "
                + (
                    ", ".join(f"{e['latent_idx']} (min score {e['score']:+.2f})" for e in tops)
                    or "none with a positive score"
                )
            )
    lines += ["", "## Attention to the entity after steering", ""]
    for lab, a in s["attention"].items():
        lines.append(
            f"- {lab} prompts ({a['n_entities']} entities, {a['n_prompts']} prompts) steered with the "
            f"{a['latent_label']} latent {a.get('latent', '—')}: {a['status']}"
        )
        if a.get("mean_difference") is not None:
            lines.append(
                f"  mean {a['measure']} difference (steered − original) {a['mean_difference']:+.4f}"
                + (f"; {a['test_summary']}" if a.get("test_summary") else "")
            )
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings_s"].items()), ""]
    return "\n".join(lines)


def quick_config(**overrides: Any) -> PipelineConfig:
    """The quick profile with fields replaced (tests)."""
    return replace(profile("quick"), **overrides)
