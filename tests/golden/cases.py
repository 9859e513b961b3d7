"""The golden-file runner shared by `tests/golden/make.py` (which writes the goldens) and `tests/test_golden.py`
(which compares with them): the pinned numeric environment, the inputs (tiny models, corpus, SAE, prompt files),
running one case through the real entry point (`python -m plipy`) and listing its outputs.

Layout of a run under `root`:
    root/inputs/           built once (tiny Llamas, corpus, SAE, prompt files), read by every case
    root/cases/<name>/     the case's working directory: its outputs land here (argv uses paths relative to it)
    root/state/<name>/     its own PLIPY_RUNS and PLIPY_CACHE, so no resume unit or cache entry leaks between cases

Every case runs in its own process (`Runner`: a worker started under the pinned environment imports torch and
transformers once, then forks a fresh child per case, which runs `python -m plipy <argv>` through runpy), so no
in-process state (RNG, caches, loaded models) leaks between cases either; the results equal those of a plain
`python -m plipy` subprocess (checked when this was written). argv names inputs relative to the working directory
(`../../inputs/…`), so paths recorded in results are the same wherever `root` is.

Also runnable: `python tests/golden/cases.py build-inputs ROOT` (what `build_inputs` starts under the pinned
environment) and `python tests/golden/cases.py fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent  # holds commands.json and files/ (make.py --dir / $PLIPY_GOLDEN_DIR: another)
INPUTS = "../../inputs"  # the inputs folder as a case's argv names it (relative to root/cases/<name>)

# ---------------------------------------------------------------------------------------------- environment

# The numeric environment every case (and the input builder) runs under. torch 2.13's CPU wheel here reports
# (`torch.__config__.show()`): BLAS_INFO=mkl (MKL 2024.2 does fp32 matmuls), oneDNN 3.12 (bf16/fp16 matmuls, convs),
# ATen kernels dispatched by CPU capability (AVX512 on this machine), OpenMP threads, NNPACK (convolutions only:
# nothing here uses it, so no variable for it). numpy 2.4 and scipy 1.17 each bring their own OpenBLAS (DYNAMIC_ARCH:
# the kernel is chosen per CPU) and numpy dispatches its ufunc loops by CPU feature (baseline X86_V2; X86_V3,
# X86_V4, AVX512_ICL found here). Each variable below pins one of those choices so that another x86-64 CPU takes
# the same code paths and rounds the same way:
OLDER_NUMPY_SIMD = "AVX F16C FMA3 AVX2 AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL"
PINNED: dict[str, str] = {
    # one thread everywhere: fp32 sums split over another number of threads round differently (torch reads
    # OMP_NUM_THREADS for its intra-op pool, so torch.get_num_threads() == 1 without a call to set_num_threads)
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    # ATen's vectorised kernels (softmax, reductions, elementwise, normal_ of the tiny model's init) at the scalar
    # "default" capability instead of AVX2/AVX512, whose wider vectors sum in another order
    "ATEN_CPU_CAPABILITY": "default",
    # MKL's conditional numerical reproducibility: the same sgemm code path on every x86 CPU (Intel or AMD)
    "MKL_CBWR": "COMPATIBLE",
    # oneDNN's kernels capped at SSE4.1 (it serves bf16/fp16 matmuls; the cases run fp32, so this is a guard)
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    # numpy's dispatched ufunc loops (float64 exp/log/sum of the statistics) at its X86_V2 baseline: AVX2/AVX512
    # variants reassociate sums and use other exp/log approximations. numpy 2.4 dispatches X86_V3, X86_V4,
    # AVX512_ICL, AVX512_SPR; the older names (numpy < 2.4) are there for another numpy (an unknown or
    # non-dispatched name is only an ImportWarning)
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR " + OLDER_NUMPY_SIMD,
    # numpy's and scipy's OpenBLAS (sklearn's logistic regression in `probe`) on one fixed kernel set
    "OPENBLAS_CORETYPE": "Nehalem",
    # not numeric, but result-shaping: no GPU (--device auto must pick the CPU), fixed str hashing (set order),
    # offline, headless matplotlib, no tokenizer thread pool
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONHASHSEED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "TOKENIZERS_PARALLELISM": "false",
}


def plipy_src() -> Path:
    """The folder holding the `plipy` package this process imports (the checkout under test): the subprocesses
    import the same one."""
    import plipy

    return Path(plipy.__file__).resolve().parents[1]


# Variables of this process not passed on: other settings of the numeric libraries (e.g. MKL_ENABLE_INSTRUCTIONS,
# DNNL_MAX_CPU_ISA, KMP_*), plipy's own settings but where the models and caches are, and Ray's address.
UNSET_PREFIXES = (
    "MKL_",
    "KMP_",
    "OMP_",
    "GOMP_",
    "OPENBLAS_",
    "GOTO_",
    "DNNL_",
    "ONEDNN_",
    "NPY_",
    "ATEN_",
    "TORCH_",
    "PYTORCH_",
    "PLIPY_",
    "RAY_",
)
KEPT = ("PLIPY_MODELS", "PLIPY_CACHE", "PLIPY_PIP_ARGS")  # the input builder loads SmolLM2's tokenizer through them


def pinned_env(**extra: str) -> dict[str, str]:
    """This process's environment less UNSET_PREFIXES, plus PINNED, PYTHONPATH leading to this plipy, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k in KEPT or not k.startswith(UNSET_PREFIXES)}
    env.update(PINNED)
    env["PYTHONPATH"] = os.pathsep.join([str(plipy_src()), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _python(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, **kw)


def _check(done: subprocess.CompletedProcess, what: str) -> str:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def _fingerprint_here() -> dict[str, Any]:
    import numpy as np
    import pyarrow
    import scipy
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, so threadpool_info lists it)
    import sklearn
    import tokenizers
    import torch
    import transformers

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    umath = getattr(np, "_core", None) or np.core  # numpy ≥ 2 | 1.x
    umath = umath._multiarray_umath
    features = getattr(umath, "__cpu_features__", {})
    simd = [k for k in getattr(umath, "__cpu_dispatch__", []) if features.get(k)]  # dispatched targets in use
    from threadpoolctl import threadpool_info

    blas = sorted(
        {
            f"{i['internal_api']} {i.get('version')} {i.get('architecture')}"
            for i in threadpool_info()
            if i["user_api"] == "blas"
        }
    )
    return {
        "compared": {  # equal to the recorded ones: results must be identical; else compared within tolerance
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "pyarrow": pyarrow.__version__,
            "scikit-learn": sklearn.__version__,
            "tokenizers": tokenizers.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "informative": {  # recorded to explain a difference, not compared
            "cpu_model": model,
            "numpy_dispatch_in_use": simd,
            "blas": blas,
            "torch_config": torch.__config__.show().strip().splitlines()[:8],
        },
    }


def fingerprint() -> dict[str, Any]:
    """This machine's environment fingerprint, taken under the pinned environment (a subprocess)."""
    return json.loads(_check(_python([__file__, "fingerprint"], env=pinned_env()), "fingerprint"))


# ---------------------------------------------------------------------------------------------- inputs

CORPUS_PICK = {"python_doctest": 3, "rust_test": 3, "python_baseline": 2, "rust_baseline": 2}

# the two models: A as tests/conftest.py's tiny_llama_dir (4 layers, seed 0); B 3 layers, seed 1 (for sweep)
MODELS = {"tiny-llama-a": {"layers": 4, "seed": 0}, "tiny-llama-b": {"layers": 3, "seed": 1}}

SAE_PROMPTS = [
    ("The city Paris is located in", "Paris", "city", "known"),
    ("The player Lionel Messi has played for", "Lionel Messi", "player", "known"),
    ("The city Velmorath is located in", "Velmorath", "city", "unknown"),
    ("The player Zorvak Plinth has played for", "Zorvak Plinth", "player", "unknown"),
]

EMERGENCE_PROMPTS = [
    {"id": "rust_attr", "prompt": "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[", "expect": ["test", "cfg"]},
    {"id": "py_doctest", "prompt": 'def add(a, b):\n    """Add two numbers.\n\n    >>>', "expect": [" add", "("]},
]

# a labels file for `sae latents` (the tiny random model knows no entity, so its own labels are all unknown)
LABELLED = {
    "city": (["Paris", "London", "Tokyo"], ["Velmorath", "Quarnby", "Ostrevik"]),
    "player": (["Lionel Messi", "Roger Federer"], ["Zorvak Plinth", "Dobrin Kessel"]),
}


def _labels() -> dict[str, Any]:
    entities = [
        {"entity": n, "entity_type": t, "label": lab, "split": "train", "known_attributes": [], "attributes": {}}
        for t, (known, unknown) in LABELLED.items()
        for lab, group in (("known", known), ("unknown", unknown))
        for n in group
    ]
    summary = {
        t: {"n": len(k) + len(u), "known": len(k), "unknown": len(u), "dropped": 0} for t, (k, u) in LABELLED.items()
    }
    return {
        "format": "plipy-entity-labels/1",
        "provenance": {},
        "config": {},
        "summary": summary,
        "entities": entities,
        "test_balanced": {t: [] for t in LABELLED},
    }


CONVERT_PY = '''def add(a, b):
    """Add two numbers.

    >>> add(2, 3)
    5
    """
    return a + b


def scale(x, factor=2):
    """Scale a value.

    >>> scale(3)
    6
    """
    return x * factor
'''

CONVERT_RS = """/// Adds two numbers.
fn add(a: i32, b: i32) -> i32 {
    a + b
}

#[test]
fn test_add() {
    assert_eq!(add(2, 3), 5);
}

#[test]
fn test_add_negative() {
    assert_eq!(add(-2, 3), 1);
}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stdlib_sha256() -> str:
    """A digest of the Python standard library sources, selected as plipy.sae.train.stdlib_documents selects them
    (names and contents): `sae train`, `sae latents` (general-text filter) and `sae pipeline` read their text from
    the running Python's standard library, so another Python gives them other input text."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


STDLIB = "python-stdlib (text of sae train / latents / pipeline)"


def _tiny_llama(directory: Path, tokenizer: Any, layers: int, seed: int) -> None:
    """tests/conftest.py's `tiny_llama_dir` (a copy: the goldens must not move when that helper does) with the
    number of layers and the seed as parameters."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 2:
                p.normal_(0, 0.15)  # non-trivial attention
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _corpus(path: Path) -> None:
    """tests/conftest.py's `corpus_subset`: the first samples of each bundled group, as a corpus file."""
    from plipy.corpus import load_corpus

    full = load_corpus()
    data: dict[str, Any] = {"_format_version": "2.0"}
    for g, n in CORPUS_PICK.items():
        data[g] = [
            {
                "id": s.id,
                "code": s.code,
                "marker_char_pos": s.marker_char_pos,
                "marker_pattern": s.marker_pattern,
                "target_char_positions": list(s.target_char_positions),
            }
            for s in full.groups[g][:n]
        ]
    path.write_text(json.dumps(data))


def _build_inputs_here(root: Path) -> dict[str, str]:
    """Write every input under `root` (run under the pinned environment); the sha256 of each file whose bytes the
    results depend on and that this machine computes (weights drawn from torch's RNG)."""
    import torch

    from plipy import sae as saes
    from plipy.models import load_model

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu").tokenizer
    digests: dict[str, str] = {}
    for name, spec in MODELS.items():
        _tiny_llama(root / name, tokenizer, spec["layers"], spec["seed"])
        for f in ("model.safetensors", "tokenizer.json"):
            digests[f"{name}/{f}"] = sha256(root / name / f)
    sae = saes.random_sae(64, 32, hook_name="blocks.1.hook_resid_post", seed=3)
    saes.save_saelens(sae, root / "sae", model_name="tiny-llama-a")
    digests["sae/sae_weights.safetensors"] = sha256(root / "sae" / "sae_weights.safetensors")
    _corpus(root / "corpus.json")
    rows = [{"prompt": p, "entity": e, "entity_type": t, "label": lab} for p, e, t, lab in SAE_PROMPTS]
    (root / "sae-prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lens.txt").write_text(CONVERT_RS)
    (root / "emergence.jsonl").write_text("".join(json.dumps(p) + "\n" for p in EMERGENCE_PROMPTS))
    (root / "labels.json").write_text(json.dumps(_labels(), indent=1))
    (root / "code").mkdir(exist_ok=True)
    (root / "code" / "lib.py").write_text(CONVERT_PY)
    (root / "code" / "lib.rs").write_text(CONVERT_RS)
    digests[STDLIB] = stdlib_sha256()
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    return digests


def build_inputs(root: Path) -> dict[str, str]:
    """Build the inputs in `root/inputs` in a subprocess under the pinned environment (the tiny models' weights
    come from torch's RNG through ATen kernels: they must be drawn on the same code paths as the goldens')."""
    out = _check(_python([__file__, "build-inputs", str(root / "inputs")], env=pinned_env()), "building the inputs")
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- running a case

# Not compared: HTML reports and PNG plots (drawn from the compared JSON), the pipeline's Markdown summary (from its
# summary.json, with timings) and caches (`cache/`: the pipeline keeps its generations there; labels.json holds them).
NOT_COMPARED_SUFFIXES = (".html", ".png", ".md")
NOT_COMPARED_DIRS = ("cache",)

# Fields dropped from every JSON result (wherever the path exists) before it is stored or compared, each with its
# reason: what legitimately differs between two runs of the same command. The goldens are stored without them, so
# rerunning make.py on the same machine rewrites the same bytes.
DROPPED: dict[tuple[str, ...], str] = {
    ("provenance",): "timestamps, command line, absolute paths, library versions, timing",
    # `entities label` (labels.json; also the pipeline's labels.json)
    ("cache", "path"): "the path of the cache entry: under $PLIPY_CACHE, a temporary folder",
    ("cache", "generation_seconds"): "wall-clock time",
    # `sae train` (training.json; also the pipeline's sae/training.json)
    ("timings_s",): "wall-clock times (also in the pipeline's summary.json)",
    ("training", "seconds"): "wall-clock time",
    ("text", "stdlib"): "the Python installation's standard library folder (its content is an input: stdlib_sha256)",
    # `sae pipeline` (summary.json)
    ("sae", "seconds"): "wall-clock time",
}


def load_json(path: Path) -> Any:
    """A JSON result without the DROPPED fields."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(doc, dict):
        for keys in DROPPED:
            parent = doc
            for k in keys[:-1]:
                parent = parent.get(k) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(keys[-1], None)
    return doc


def store(src: Path, dst: Path) -> None:
    """Copy one compared output into the goldens: JSON without the DROPPED fields, anything else as written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".json":
        dst.write_text(json.dumps(load_json(src), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        dst.write_bytes(src.read_bytes())


# Pre-imported by the worker before it forks a case: the heavy third-party imports (~2 s a case otherwise). plipy
# itself is imported in each case's own process, after its environment is set, as `python -m plipy` would.
PRELOAD = (
    "numpy",
    "scipy.stats",
    "sklearn.linear_model",
    "pyarrow.parquet",
    "pyarrow.csv",
    "tokenizers",
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "safetensors.torch",
    "matplotlib.pyplot",
)


def _serve() -> None:
    """The worker: one JSON job a line on stdin → fork → the child runs `python -m plipy <argv>` (runpy) in the
    job's folder with its environment added, stdout/stderr to files → one JSON reply a line on stdout."""
    import importlib
    import runpy
    import signal
    import time

    for name in PRELOAD:
        importlib.import_module(name)
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the case's own process
            code = 1
            try:
                os.chdir(job["cwd"])
                os.environ.update(job["env"])
                for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdin = open(os.devnull)  # noqa: SIM115
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                sys.path[0] = job["cwd"]  # as `python -m` puts the working directory first
                sys.argv = ["plipy", *job["argv"]]
                try:
                    runpy.run_module("plipy", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = t0 + job["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        result = {"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "seconds": time.perf_counter() - t0}
        print(json.dumps(result), file=reply, flush=True)


class Runner:
    """Runs cases one at a time in a worker started under the pinned environment: it imports the heavy libraries
    once and forks a fresh process per case, which then runs `python -m plipy <argv>` (see `_serve`). Each case
    gets its own folder, PLIPY_RUNS and PLIPY_CACHE; nothing but the pre-imported libraries is shared."""

    def __init__(self) -> None:
        import tempfile

        self.log = tempfile.TemporaryFile("w+")  # the worker's own stderr (the cases write theirs to files)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=pinned_env(),
        )
        if not self.proc.stdout.readline():
            raise RuntimeError(f"the golden worker did not start:\n{self._log()}")

    def _log(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def run(self, case: dict[str, Any], root: Path, timeout: float = 600) -> Path:
        """Run `plipy <case argv>` in root/cases/<name> (which must not exist yet); exit 0 required. Returns that
        folder."""
        name = case["name"]
        cwd = root / "cases" / name
        state = root / "state" / name
        for d in (cwd, state / "runs", state / "cache"):
            d.mkdir(parents=True, exist_ok=False)
        job = {
            "argv": case["argv"],
            "cwd": str(cwd),
            "timeout": timeout,
            "stdout": str(state / "stdout.txt"),
            "stderr": str(state / "stderr.txt"),
            "env": {"PLIPY_RUNS": str(state / "runs"), "PLIPY_CACHE": str(state / "cache")},
        }
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the golden worker died:\n{self._log()}")
        res = json.loads(line)
        if res["rc"] != 0:
            err = (state / "stderr.txt").read_text(errors="replace")[-4000:]
            why = f"timed out after {timeout:.0f} s" if res["timed_out"] else f"exited {res['rc']}"
            raise RuntimeError(f"plipy {' '.join(case['argv'])} {why}:\n{err}")
        return cwd

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def outputs(folder: Path) -> list[str]:
    """The files a case wrote that are compared (relative paths, sorted)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix not in NOT_COMPARED_SUFFIXES
        and not set(p.relative_to(folder).parts[:-1]) & set(NOT_COMPARED_DIRS)
    )


if __name__ == "__main__":
    if sys.argv[1] == "fingerprint":
        print(json.dumps(_fingerprint_here()))
    elif sys.argv[1] == "build-inputs":
        print(json.dumps(_build_inputs_here(Path(sys.argv[2]))))
    elif sys.argv[1] == "serve":
        _serve()
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
