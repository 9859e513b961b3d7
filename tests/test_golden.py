"""Golden results: every result-writing command, run on small inputs, writes what the reference commit wrote.

tests/golden/make.py ran each case of tests/golden/commands.json on the commit before the refactor of the code above
the engine and saved what it wrote in tests/golden/files/<case>/. This test runs the same cases with the same runner
(tests/golden/cases.py: tiny random Llamas built in a temporary folder, `python -m plipy <argv>` in a fresh process
per case under a pinned numeric environment) and compares, one test per case:

- JSON: parsed, the fields of cases.DROPPED removed (provenance, wall-clock times, temporary paths), then
  `json.dumps(sort_keys=True)` of both must be equal;
- CSV tables: the exact text; Parquet tables: `Table.equals` and the schema (the file bytes embed the pyarrow
  version, so contents are compared, not bytes); `-rows.npz` and `.safetensors`: every array, exactly.

On a machine whose environment fingerprint (library versions, torch's CPU capability under the pinned environment,
see commands.json) differs from the one that made the goldens, the structure is still compared exactly (keys,
strings, ints, bools, list lengths, None where None, schemas, shapes, dtypes) and floats within a tolerance (TOL).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

import cases  # noqa: E402  (tests/golden/cases.py: the runner make.py used)

GOLDEN = Path(os.environ.get("PLIPY_GOLDEN_DIR") or cases.GOLDEN)  # another machine's own goldens: make.py --dir
SPEC = json.loads((GOLDEN / "commands.json").read_text())
CASES = {c["name"]: c for c in SPEC["cases"]}

# Cross-machine tolerance. The floats come from fp32 forwards of a 4-layer, 64-wide model, then float64 statistics.
# Other kernels (another torch, MKL or numpy; another thread count) sum in another order: each fp32 dot product of
# length K then differs by at most ~K·u·Σ|aᵢbᵢ| (u = 2⁻²⁴ ≈ 6e-8; K ≤ 96 here: head dim 16, hidden 64, MLP 96,
# softmax over ≤ ~120 positions). Over 4 layers (each adding its own rounding, with gains of order one) that is a
# relative error of at most a few hundred ulps, 4 × ~300 × 6e-8 ≈ 7e-5 < 1e-4 (typical differences are far smaller,
# ~√K·u a step). Float64 statistics of those values add ~1e-16 and carry their relative error through: means,
# attention shares, ratios of well-separated values, t statistics and parametric p-values stay within rel 1e-4.
# The absolute floor 1e-7 ≈ one fp32 ulp of 1.0 is for values near zero that come from O(1) quantities (a KL of
# 1e-9 nats between two nearly equal distributions, a probability near 0): below ~1e-7 they are not checked.
# Beyond this bound, so that a difference there on another machine says the machine differs, not that the code
# changed: (1) a difference of two large values keeps the absolute error of its operands (entropy_change = H₁ − H₀
# with H ≈ 10 nats: ~1e-7…1e-6 on values of ~1e-5; the *_difference columns of `sae attention`); (2) ratios of
# means near the floor (the KL ratio of two groups whose KLs are ~1e-8) and their bootstrap CIs; (3) discrete
# outcomes decided by a float near a tie: a permutation p-value or a bootstrap CI bound (order statistics of
# resampled means swap only when they were that close), a lens rank among 49k tokens, the order of top-changed
# tokens, an argmax layer, a greedy or sampled token, a known/unknown grade.
# Measured by running the goldens with the pins relaxed (ATen at AVX512, MKL without CBWR, numpy's SIMD, OpenBLAS's
# own kernels, 2 threads): 18 of 36 cases within this tolerance; the others differed only in entropy_change, KL
# ratios and their CIs, a bootstrap CI bound of a scan's group difference (3 cases), lens ranks off by one, one
# top-changed token near a tie and four `sae attention` difference values. On such a machine, make its own goldens
# (tests/golden/make.py).
TOL = {"rel": 1e-4, "abs": 1e-7}

MAX_SHOWN = 12  # differences listed in a failure message


# ---------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Inputs built once on this machine (under the pinned environment), this machine's fingerprint, one worker."""
    root = tmp_path_factory.mktemp("golden")
    digests = cases.build_inputs(root)
    here = cases.fingerprint()
    recorded = SPEC["fingerprint"]["compared"]
    differs = {
        k: (recorded.get(k), here["compared"].get(k))
        for k in {*recorded, *here["compared"]}
        if recorded.get(k) != here["compared"].get(k)
    }
    with cases.Runner() as runner:
        yield SimpleNamespace(root=root, digests=digests, here=here, differs=differs, runner=runner)


def _check_inputs(case: dict[str, Any], run: SimpleNamespace) -> None:
    """The inputs this case reads, built here, must be the goldens' (else it cannot be compared); the standard
    library's text matters only to the cases that read it."""
    if SPEC["pinned_env"] != cases.PINNED:
        pytest.fail(
            "cases.PINNED is not the environment the goldens were made under (commands.json: pinned_env): "
            "remake the goldens from the reference commit, or restore it",
            pytrace=False,
        )
    want = SPEC["inputs_sha256"]
    argv = " ".join(case["argv"])
    # the weights gate; tokenizer.json is recorded to explain a difference only (its bytes follow the transformers
    # version that saved it, a changed tokenization shows in the results themselves)
    bad = [
        k
        for k in want
        if k.endswith(".safetensors") and f"{cases.INPUTS}/{k.split('/')[0]}" in argv and run.digests.get(k) != want[k]
    ]
    if bad:
        pytest.fail(
            f"the inputs built on this machine differ from those the goldens were made with ({bad[0]}: "
            f"sha256 {run.digests.get(bad[0])} ≠ {want[bad[0]]}): the goldens cannot be compared here "
            f"(another torch draws other random weights). This machine: {run.here}",
            pytrace=False,
        )
    if case.get("uses_stdlib") and run.digests.get(cases.STDLIB) != want.get(cases.STDLIB):
        pytest.skip(
            f"{case['name']} reads its text from the Python standard library, which differs from the one "
            f"the goldens were made with (Python {SPEC['fingerprint']['compared']['python']})"
        )


# The numeric libraries: constraints.txt pins them, so `make test` and CI run the goldens' versions. Another version
# computes other bits (kernels, summation orders) beyond what TOL can tell from a changed result: the comparison is
# then meaningless, and skipped with the reason (make that environment's goldens with tests/golden/make.py).
LIBRARIES = ("torch", "transformers", "numpy", "scipy", "pyarrow", "scikit-learn", "tokenizers")


# Outputs added on purpose after the goldens were made (nothing the goldens hold changed): `entities label` writes
# its long table beside the labels JSON, like every other result.
ADDED_SINCE = {"labels.parquet", "labels.csv"}


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name, run):
    case = CASES[name]
    libs = {k: v for k, v in run.differs.items() if k in LIBRARIES}
    if libs:
        pytest.skip(
            f"the goldens were made with other library versions ({_show(libs)}): `make setup` installs "
            "the pinned ones (constraints.txt)"
        )
    _check_inputs(case, run)
    folder = run.runner.run(case, run.root)
    extra = sorted(set(cases.outputs(folder)) - set(case["compare"]) - ADDED_SINCE)
    missing = sorted(set(case["compare"]) - set(cases.outputs(folder)))
    assert not extra and not missing, f"plipy {' '.join(case['argv'])}: files written {extra}, missing {missing}"
    exact = not run.differs
    problems = []
    for rel in case["compare"]:
        diffs = compare(GOLDEN / "files" / name / rel, folder / rel, exact)
        if diffs:
            problems.append(
                f"{rel}:\n"
                + "\n".join(f"    {d}" for d in diffs[:MAX_SHOWN])
                + (f"\n    … {len(diffs) - MAX_SHOWN} more" if len(diffs) > MAX_SHOWN else "")
            )
    if problems:
        how = (
            "exact comparison (this machine's fingerprint is the goldens')"
            if exact
            else f"THIS MACHINE DIFFERS from the one that made the goldens ({_show(run.differs)}): structure compared "
            f"exactly, floats within rel {TOL['rel']:g}, abs {TOL['abs']:g}; differences of large values, ratios "
            f"of near-zero means and near-ties can exceed that (see TOL). For an exact comparison here, make this "
            f"machine's goldens from the reference commit (tests/golden/make.py), set PLIPY_GOLDEN_DIR"
        )
        pytest.fail(f"plipy {' '.join(case['argv'])}\n{how}; golden ≠ now:\n" + "\n".join(problems), pytrace=False)


def _show(differs: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a} → {b}" for k, (a, b) in sorted(differs.items()))


# ---------------------------------------------------------------------------------------------- comparing


def compare(golden: Path, now: Path, exact: bool) -> list[str]:
    """The differences between a golden file and the one written now (empty: equal)."""
    kind = golden.suffix
    if kind == ".json":
        return compare_json(cases.load_json(golden), cases.load_json(now), exact)
    if kind == ".csv":
        return compare_csv(golden.read_text(), now.read_text(), exact)
    if kind == ".parquet":
        return compare_parquet(golden, now, exact)
    if kind in (".npz", ".safetensors"):
        return compare_arrays(_arrays(golden), _arrays(now), exact)
    raise AssertionError(f"no comparison for {golden.name}: add one (make.py stores only what is compared)")


def compare_json(a: Any, b: Any, exact: bool) -> list[str]:
    if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
        return []
    if not exact:
        return list(_walk(a, b, "", TOL))
    return list(_walk(a, b, "", None)) or ["the documents differ (json.dumps)"]


def _walk(a: Any, b: Any, path: str, tol: dict[str, float] | None):
    """Yield 'path: golden ≠ now' for each difference; with `tol`, floats may differ within it."""
    if type(a) is not type(b):
        yield f"{path or '.'}: {_short(a)} ≠ {_short(b)} (type {type(a).__name__} ≠ {type(b).__name__})"
    elif isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                yield f"{path}.{k}: {'missing now' if k in a else 'new'}"
            else:
                yield from _walk(a[k], b[k], f"{path}.{k}", tol)
    elif isinstance(a, list):
        if len(a) != len(b):
            yield f"{path}: length {len(a)} ≠ {len(b)}"
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                yield from _walk(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float):
        if not _close(a, b, tol):
            yield f"{path}: {a!r} ≠ {b!r}"
    elif a != b:
        yield f"{path}: {_short(a)} ≠ {_short(b)}"


def _close(a: float, b: float, tol: dict[str, float] | None) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if tol is None or math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=tol["rel"], abs_tol=tol["abs"])


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "…"


def compare_csv(a: str, b: str, exact: bool) -> list[str]:
    if a == b:
        return []
    ra, rb = list(csv.reader(io.StringIO(a))), list(csv.reader(io.StringIO(b)))
    if len(ra) != len(rb) or not ra or ra[0] != rb[0]:
        return [f"{len(ra)} ≠ {len(rb)} lines, header {ra[:1]} ≠ {rb[:1]}"]
    out = []
    for i, (x, y) in enumerate(zip(ra[1:], rb[1:], strict=True), start=2):
        if len(x) != len(y):
            out.append(f"line {i}: {len(x)} ≠ {len(y)} cells")
            continue
        for col, u, v in zip(ra[0], x, y, strict=True):
            if u != v and (exact or not _cells_close(u, v)):
                out.append(f"line {i} {col}: {_short(u)} ≠ {_short(v)}")
    return out or ["the text differs, not the cells (line endings or quoting)"]


def _cells_close(u: str, v: str) -> bool:
    """Two CSV cells that differ as text: equal within the tolerance when both hold the same structure of numbers
    (a float, or a JSON list such as a per-head column), ints and strings equal."""
    try:
        a, b = json.loads(u), json.loads(v)
    except ValueError:
        return False
    return not any(_walk(a, b, "", TOL))


def compare_parquet(golden: Path, now: Path, exact: bool) -> list[str]:
    import pyarrow.parquet as pq

    a, b = pq.read_table(golden), pq.read_table(now)
    if not a.schema.equals(b.schema, check_metadata=exact):
        return [f"schema {a.schema} ≠ {b.schema}"]
    if exact:
        if a.equals(b):
            return []
        return list(_walk(a.to_pylist(), b.to_pylist(), "", None)) or ["the tables differ (Table.equals)"]
    return list(_walk(a.to_pylist(), b.to_pylist(), "", TOL))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from safetensors.numpy import load_file

    return load_file(path)


def compare_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray], exact: bool) -> list[str]:
    if sorted(a) != sorted(b):
        return [f"arrays {sorted(a)} ≠ {sorted(b)}"]
    out = []
    for k in sorted(a):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{k}: {x.dtype}{list(x.shape)} ≠ {y.dtype}{list(y.shape)}")
        elif exact or not np.issubdtype(x.dtype, np.floating):
            floats = np.issubdtype(x.dtype, np.floating)
            if not np.array_equal(x, y, equal_nan=floats):
                same = (x == y) | (np.isnan(x) & np.isnan(y)) if floats else x == y
                out.append(f"{k}: {int(np.sum(~same))} of {x.size} values differ")
        elif not np.allclose(x, y, rtol=TOL["rel"], atol=TOL["abs"], equal_nan=True):
            worst = float(np.nanmax(np.abs(x.astype(np.float64) - y)))
            out.append(f"{k}: beyond the tolerance (largest difference {worst:.3g})")
    return out
