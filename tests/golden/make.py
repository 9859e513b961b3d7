"""Write the golden files: run every result-writing `plipy` command on small inputs and keep what it wrote.

    python tests/golden/make.py [--dir tests/golden] [--keep]

Each case of CASES below runs as `python -m plipy <argv>` in a fresh folder and a fresh process under the pinned
numeric environment (tests/golden/cases.py: `Runner`). What it wrote is stored in <dir>/files/<case>/: JSON without the
fields of cases.DROPPED (provenance, wall-clock times, temporary paths), tables and arrays as written; HTML reports
and PNG plots are not stored (they are drawn from the stored files). <dir>/commands.json gets the cases (name,
argv, files compared), the sha256 of the inputs built on this machine, the pinned environment and this machine's
fingerprint. tests/test_golden.py runs the same cases with the same runner and compares.

Another machine (other torch, numpy, … versions) gets other roundings. To compare exactly there, make its own
goldens from the reference commit and point the test at them:

    git worktree add /tmp/golden-ref <the commit that added tests/golden/commands.json>
    cd /tmp/golden-ref && python tests/golden/make.py --dir /tmp/golden-here
    cd - && PLIPY_GOLDEN_DIR=/tmp/golden-here python -m pytest tests/test_golden.py

Run it only from a commit whose results are the reference (the goldens were made before the refactor of the code
above the engine); afterwards a change of any result is a test failure, on purpose.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the plipy of this checkout (not an editable install of another one): the goldens are this commit's results
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "src")]

import cases  # noqa: E402  (the shared runner, beside this file)

M = f"{cases.INPUTS}/tiny-llama-a"  # 4 layers, 4 heads (2 kv heads)
M2 = f"{cases.INPUTS}/tiny-llama-b"  # 3 layers, another seed: the second model of the sweeps
CORPUS = ["--corpus", f"{cases.INPUTS}/corpus.json"]
R = ["--resamples", "200"]  # bootstrap / permutation resamples: small, still exercised
CSV = ["--table-format", "csv"]

# name → argv (paths relative to the case's folder, where its outputs land)
# fmt: off
CASES: dict[str, list[str]] = {
    # scan
    "scan": ["scan", "-m", M, *CORPUS, *R, "--out", "scan.json"],
    "scan-bos-heads-layers": ["scan", "-m", M, *CORPUS, *R, "--bos", "--heads", "0,1", "--layers", "1-3", *CSV,
                              "--html", "--out", "scan.json"],
    "scan-groups-plip-batch": ["scan", "-m", M, *CORPUS, *R, "--groups", "rust_test,python_doctest,rust_baseline",
                               "--layers", "plip", "--seed", "7", "-b", "2", "--out", "scan.json"],
    # knockout: every mode, every edge set, both runners
    "knockout-layer": ["knockout", "-m", M, *CORPUS, *R, "--layer", "2", "--out", "knockout.json"],
    "knockout-layers": ["knockout", "-m", M, *CORPUS, *R, "--layers", "1-2", *CSV, "--out", "knockout.json"],
    "knockout-scan-layers": ["knockout", "-m", M, *CORPUS, *R, "--scan-layers", *CSV, "--out", "knockout.json"],
    "knockout-scan-windows": ["knockout", "-m", M, *CORPUS, *R, "--scan-windows", "--center", "2", "--max-radius",
                              "2", "--out", "knockout.json"],
    "knockout-slide-window": ["knockout", "-m", M, *CORPUS, *R, "--slide-window", "2", *CSV, "--out",
                              "knockout.json"],
    "knockout-to-marker": ["knockout", "-m", M, *CORPUS, *R, "--edges", "to-marker", "--heads", "1", "--out",
                           "knockout.json"],
    "knockout-from-marker-baselines": ["knockout", "-m", M, *CORPUS, *R, "--edges", "from-marker",
                                       "--include-baselines", *CSV, "--html", "--out", "knockout.json"],
    "knockout-naive": ["knockout", "-m", M, *CORPUS, *R, "--layer", "2", "--runner", "naive", *CSV, "--out",
                       "knockout.json"],
    "knockout-bos-groups-plip": ["knockout", "-m", M, *CORPUS, *R, "--bos", "--groups", "rust_test,python_doctest",
                                 "--layers", "plip", "--seed", "3", "-b", "3", "--out", "knockout.json"],
    # steer
    "steer-calibrate": ["steer", "calibrate", "-m", M, *CORPUS, "--layer", "2", "--out", "calibrate.json"],
    "steer-dose-target": ["steer", "dose", "-m", M, *CORPUS, "--layer", "2", "--target-attention", "0.1", "--out",
                          "dose.json"],
    "steer-dose-layers": ["steer", "dose", "-m", M, *CORPUS, "--layers", "1,2", "--doses", "0.5,2", *CSV, "--out",
                          "dose.json"],
    "steer-dose-naive-heads": ["steer", "dose", "-m", M, *CORPUS, "--layer", "1", "--heads", "0-1", "--doses",
                               "0,1,4", "--groups", "python_doctest,rust_test", "--skip-invalid", "--runner", "naive",
                               "--plot", "--out", "dose.json"],
    "steer-generate-sampled-chat": ["steer", "generate", "-m", M, "--layers", "1-2", "--scale", "6", "--temperature",
                                    "0.8", "--seed", "5", "--chat", "--detect", "assert", "--limit", "2",
                                    "--max-tokens", "6", *CSV, "--out", "generate.json"],
    "steer-generate": ["steer", "generate", "-m", M, "--layer", "2", "--limit", "2", "--max-tokens", "6", "--out",
                       "generate.json"],
    # logit lens
    "lens-text": ["lens", "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[", "-m", M, "--positions", "all",
                  "--top-k", "5", "--token", " test", "--out", "lens.json"],
    "lens-sample": ["lens", "--sample", "py_simple_add", "-m", M, *CORPUS, "--positions", "marker", *CSV, "--out",
                    "lens.json"],
    "lens-file-token-id": ["lens", "--file", f"{cases.INPUTS}/lens.txt", "-m", M, "--positions", "0,5,-1",
                           "--token-id", "1028", "--token", " assert", "--layers", "1-3", "--bos", *CSV, "--out",
                           "lens.json"],
    "lens-emergence": ["lens", "emergence", "-m", M, "--top-k", "20", "--out", "emergence.json"],
    "lens-emergence-prompts": ["lens", "emergence", "-m", M, "--prompts", f"{cases.INPUTS}/emergence.jsonl",
                               "--top-k", "20", "--layers", "1-3", *CSV, "--out", "emergence.json"],
    # linear probes
    "probe": ["probe", "-m", M, *CORPUS, "--permutations", "3", "--folds", "2", "--out", "probe.json"],
    "probe-prefix-marker": ["probe", "-m", M, *CORPUS, "--label", "prefix", "--feature", "marker", "--groups",
                            "python_doctest,python_baseline,rust_test,rust_baseline", "--folds", "2",
                            "--permutations", "3", "--C", "0.5", "--layers", "1-3", "--seed", "2", *CSV, "--out",
                            "probe.json"],
    # SAE steering with a random SAE on the residual after layer 1 (steers at the input of layer 2)
    "sae-attention": ["sae", "attention", "-m", M, "--sae", f"{cases.INPUTS}/sae", "--latent", "5", "--prompts",
                      f"{cases.INPUTS}/sae-prompts.jsonl", "--random", "2", "--out", "sae-attention.json"],
    "sae-attention-options": ["sae", "attention", "-m", M, "--sae", f"{cases.INPUTS}/sae", "--latent", "7",
                              "--prompts", f"{cases.INPUTS}/sae-prompts.jsonl", "--coeff", "norm", "--pos", "entity",
                              "--measures", "attn_weights,value_weighted", "--heads", "2-3", "--ablate", "9",
                              "--expect", "two-sided", "--direction", "encoder", "--random", "2", "--seed", "1",
                              "--no-bos", "-b", "3", *CSV, "--html", "--out", "sae-attention.json"],
    "sae-latents": ["sae", "latents", "-m", M, "--sae", f"{cases.INPUTS}/sae", "--labels",
                    f"{cases.INPUTS}/labels.json", "--general-tokens", "256", "--max-general-freq", "0.5", "--top",
                    "5", "--out", "latents.json"],
    "sae-train": ["sae", "train", "-m", M, "--layer", "1", "--width", "32", "--k", "4", "--tokens", "512", "--epochs",
                  "2", "--train-batch", "128", "--seq-len", "32", "--entity-text", "2", "--out", "sae"],
    "sae-pipeline": ["sae", "pipeline", "-m", M, "--quick", "--layer", "1", "--out", "pipeline"],
    # entity labels (greedy + sampled completions, graded)
    "entities-label": ["entities", "label", "-m", M, "--quick", "--limit", "1", "--out", "labels.json"],
    "entities-label-types": ["entities", "label", "-m", M, "--types", "city,player", "--limit", "1", "--k", "3",
                             "--max-new-tokens", "4", "--seed", "7", "-b", "2", "--out", "labels.json"],
    # one experiment over two models, and the comparison
    "sweep-scan": ["sweep", "--models", f"{M},{M2}", "-d", "sweep", "scan", *CORPUS, *R, *CSV],
    "sweep-knockout": ["sweep", "--models", f"{M},{M2}", "-d", "sweep", "knockout", "--layer", "1", *CORPUS, *R],
    # corpus conversion (no model)
    "corpus-convert": ["corpus", "convert", f"{cases.INPUTS}/code", "--out", "corpus.json"],
    "corpus-convert-rule": ["corpus", "convert", f"{cases.INPUTS}/code/lib.rs", "--rule", "rust-universal", "--into",
                            "rust_custom", "--out", "corpus.json"],
}
# fmt: on

# cases whose input text comes from the running Python's standard library (see cases.stdlib_sha256)
USES_STDLIB = {"sae-latents", "sae-train", "sae-pipeline"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dir", type=Path, default=cases.GOLDEN, help="Where commands.json and files/ go (default: %(default)s)"
    )
    keep = "Keep the temporary working folder (inputs; each case's folder with its HTML and PNG files) and say where"
    ap.add_argument("--keep", action="store_true", help=keep)
    args = ap.parse_args()

    t0 = time.perf_counter()
    print(f"plipy from {cases.plipy_src()}", flush=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    fingerprint = cases.fingerprint()
    root = Path(tempfile.mkdtemp(prefix="plipy-golden-make-"))
    try:
        digests = cases.build_inputs(root)
        print(f"inputs built in {time.perf_counter() - t0:.1f} s", flush=True)
        files = args.dir / "files"
        if files.exists():
            shutil.rmtree(files)
        listed = []
        with cases.Runner() as runner:
            for name, argv in CASES.items():
                t = time.perf_counter()
                folder = runner.run({"name": name, "argv": argv}, root)
                compared = cases.outputs(folder)
                for rel in compared:
                    cases.store(folder / rel, files / name / rel)
                listed.append({"name": name, "argv": argv, "compare": compared, "uses_stdlib": name in USES_STDLIB})
                print(f"{name}: {time.perf_counter() - t:.1f} s, {len(compared)} files", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    doc = {
        "_about": "Golden results of the plipy CLI (tests/golden/make.py writes this, tests/test_golden.py reads it)",
        "fingerprint": fingerprint,
        "pinned_env": cases.PINNED,
        "inputs_sha256": digests,
        "cases": listed,
    }
    (args.dir / "commands.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(listed)} cases in {time.perf_counter() - t0:.1f} s → {args.dir}/commands.json, {files}")


if __name__ == "__main__":
    main()
