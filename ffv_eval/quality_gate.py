"""`ffv check`: a CI gate on vector quality. Each vector's quality figures are measured on the
model and compared with a baseline file of the same figures:

- `accuracy`: zero-shot first-token accuracy on the relation's test split with the vector added
  at its layer; `zero_shot_accuracy` without a vector; `gain` = accuracy - zero_shot_accuracy;
- `decoding_hits`: how many of the top 20 tokens the vector promotes through the final norm and
  unembedding are the first token of one of the relation's answers;
- movement: the baseline keeps the vector itself (base64 of float32 little-endian bytes), and
  the check measures ||v - v_baseline|| / ||v_baseline|| (and the cosine, for the report).

Measuring needs the model (torch is imported inside `measure_quality` only); comparing is pure
Python. Baseline files are written atomically and only by an explicit `--update-baseline`."""

from __future__ import annotations

import base64
import json
import math
import sys
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ffv_eval import PROJECT_ROOT
from ffv_eval.atomic_files import atomic_write, check_writable
from ffv_eval.json_lines import json_document
from ffv_eval.locations import local_vectors_dir, vector_roots

BASELINE_FORMAT = "ffv-quality-baseline/1"
BASELINE_NAME = "quality-baseline.json"
DEFAULT_KINDS = ("fv", "ffv")
DECODING_TOP_K = 20
DIGITS = 6  # figures are rounded so that baselines are stable text
FLOAT_SLACK = 1e-9  # a drop equal to the tolerance passes despite float rounding
FIGURE_FIELDS = {"accuracy": (int, float), "zero_shot_accuracy": (int, float), "gain": (int, float),
                 "decoding_hits": int, "norm": (int, float), "vector": str}


class BaselineError(ValueError):
    pass


@dataclass(frozen=True)
class Tolerances:
    max_accuracy_drop: float = 0.04  # absolute, share of test pairs
    max_gain_drop: float = 0.04
    max_decoding_hit_drop: int = 2
    max_relative_movement: float = 0.05  # ||v - v_base|| / ||v_base||


@dataclass(frozen=True)
class Baseline:
    path: Path
    model: str
    model_fingerprint: str
    test_split: str
    vectors: dict[str, dict]  # "<kind>/<relation>" -> figures


@dataclass(frozen=True)
class Finding:
    vector: str  # "<kind>/<relation>"
    figure: str  # accuracy, gain, decoding_hits, movement or missing
    baseline: float | None
    measured: float | None
    tolerance: float | None
    file: str = ""

    def line(self) -> str:
        where = f" [{self.file}]" if self.file else ""
        if self.figure == "missing":
            return f"{self.vector}: in the baseline but not checked (vector file missing?){where}"
        if self.figure == "movement":
            return (f"{self.vector}: movement: the vector moved {self.measured:.4f} (relative L2) from the baseline "
                    f"vector, tolerance {self.tolerance:g}{where}")
        change = self.measured - self.baseline
        word = "fell" if change < 0 else "rose"
        return (f"{self.vector}: {self.figure}: baseline {_fmt(self.baseline)}, measured {_fmt(self.measured)} "
                f"({word} by {_fmt(abs(change))}, tolerance {_fmt(self.tolerance)}){where}")


@dataclass
class Report:
    model: str
    baseline_path: Path
    n_checked: int
    regressions: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    movements: dict[str, tuple[float, float]] = field(default_factory=dict)  # vector -> (relative L2, cosine)

    @property
    def passed(self) -> bool:
        return not self.regressions

    def text(self, accept_command: str = "ffv check --update-baseline") -> str:
        lines = [f"ffv check: {self.n_checked} vectors of {self.model} against {self.baseline_path}"]
        if self.regressions:
            lines.append(f"FAIL: {len(self.regressions)} regression(s) beyond tolerance:")
            lines += [f"  {f.line()}" for f in self.regressions]
        if self.improvements:
            lines.append(f"{len(self.improvements)} improvement(s) beyond tolerance:")
            lines += [f"  {f.line()}" for f in self.improvements]
        if self.notes:
            lines.append("notes:")
            lines += [f"  {n}" for n in self.notes]
        if self.improvements or any(f.figure == "movement" for f in self.regressions):
            intended = " (only if the regressions above are intended)" if self.regressions else ""
            lines.append(f"to accept{intended}: {accept_command}")
        if self.passed:
            lines.append("PASS: every checked vector is within tolerance of the baseline")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# -- vectors as text ---------------------------------------------------------------------
def encode_vector(values: Sequence[float]) -> str:
    data = array("f", values)
    if sys.byteorder == "big":
        data.byteswap()
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_vector_text(text: str, where: str) -> list[float]:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise BaselineError(f"{where}: field 'vector' is not base64 ({err})") from err
    if len(raw) % 4:
        raise BaselineError(f"{where}: field 'vector' holds {len(raw)} bytes, not a whole number of float32 values")
    data = array("f")
    data.frombytes(raw)
    if sys.byteorder == "big":
        data.byteswap()
    return data.tolist()


def movement(measured: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(||v - v_base|| / ||v_base||, cosine(v, v_base)); a zero baseline vector counts any
    non-zero vector as moved infinitely far."""
    base_norm = math.sqrt(sum(b * b for b in baseline))
    norm = math.sqrt(sum(m * m for m in measured))
    distance = math.sqrt(sum((m - b) ** 2 for m, b in zip(measured, baseline)))
    relative = distance / base_norm if base_norm > 0 else (0.0 if distance == 0 else math.inf)
    cosine = sum(m * b for m, b in zip(measured, baseline)) / (norm * base_norm) if norm > 0 and base_norm > 0 else 0.0
    return relative, cosine


# -- baseline files ----------------------------------------------------------------------
def default_baseline_path(model_alias: str) -> Path:
    """The baseline read by default: ./vectors/<model>/quality-baseline.json where it exists,
    else the shipped one."""
    paths = [root / model_alias / BASELINE_NAME for root in vector_roots()]
    return next((p for p in paths if p.exists()), paths[-1])


def baseline_to_update(model_alias: str, given: str | Path | None) -> Path:
    """The baseline file `--update-baseline` writes: the one given, else an existing
    ./vectors/<model>/quality-baseline.json (the checkout's, run there); never the shipped
    file of an installed package. Checked before any model work."""
    path = Path(given) if given else local_vectors_dir() / model_alias / BASELINE_NAME
    if not given and not path.exists():
        raise BaselineError(f"--update-baseline: no baseline file given and {path} does not exist; "
                            f"pass --baseline FILE (it is created if missing)")
    check_writable(path, "--baseline")
    return path


def baseline_from_document(document, path: Path) -> Baseline:
    """Validate a parsed baseline file; errors name the file and the field."""
    if not isinstance(document, dict):
        raise BaselineError(f"{path}: expected a JSON object")
    if document.get("format") != BASELINE_FORMAT:
        raise BaselineError(f"{path}: field 'format' is {document.get('format')!r}, expected {BASELINE_FORMAT!r}")
    for name in ("model", "model_fingerprint", "test_split"):
        if not isinstance(document.get(name), str):
            raise BaselineError(f"{path}: field '{name}' should be a string, got {document.get(name)!r}")
    vectors = document.get("vectors")
    if not isinstance(vectors, dict):
        raise BaselineError(f"{path}: field 'vectors' should be an object of '<kind>/<relation>' entries")
    for key, figures in vectors.items():
        where = f"{path}: vectors['{key}']"
        if not isinstance(figures, dict):
            raise BaselineError(f"{where}: expected an object of figures")
        for name, kinds in FIGURE_FIELDS.items():
            value = figures.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise BaselineError(f"{where}: field '{name}' is missing or not a {_type_names(kinds)}: {value!r}")
        decode_vector_text(figures["vector"], where)
    return Baseline(Path(path), document["model"], document["model_fingerprint"], document["test_split"], vectors)


def _type_names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return "number" if float in kinds else " or ".join(k.__name__ for k in kinds)


def load_baseline(path: str | Path) -> Baseline:
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"baseline file {path} does not exist; create it with: ffv check --update-baseline --baseline {path}")
    return baseline_from_document(json_document(path, BaselineError), path)


def baseline_document(measured: dict) -> dict:
    """The baseline file's content for measured figures (the same layout)."""
    return {"format": BASELINE_FORMAT, "model": measured["model"], "model_fingerprint": measured["model_fingerprint"],
            "test_split": measured["test_split"], "vectors": dict(sorted(measured["vectors"].items()))}


def write_baseline(path: str | Path, document: dict) -> Path:
    """Write atomically: the JSON is streamed into a temporary file beside `path`, then renamed,
    so a failure part-way leaves the previous baseline (or nothing) in place."""
    path = Path(path)

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, sort_keys=True)
            out.write("\n")

    atomic_write(path, dump)
    return path


def check_same_model(baseline: Baseline, fingerprint: str, test_split: str | None = None) -> None:
    if baseline.model_fingerprint != fingerprint:
        raise BaselineError(
            f"{baseline.path}: baseline is for model fingerprint {baseline.model_fingerprint} ({baseline.model}), "
            f"the loaded model has fingerprint {fingerprint}; use a baseline made for this model "
            f"(ffv check --update-baseline --baseline OTHER_FILE)"
        )
    if test_split is not None and baseline.test_split != test_split:
        raise BaselineError(
            f"{baseline.path}: field 'test_split' is {baseline.test_split!r}, this run measured on {test_split!r} "
            f"(the project's pairs changed? accept it with ffv check --update-baseline)"
        )


def merged_baseline(existing: Baseline | None, measured: dict, replaced: Collection[str]) -> dict:
    """A baseline document: the existing entries except those in `replaced`, plus every
    measured entry."""
    vectors = {k: v for k, v in (existing.vectors if existing else {}).items() if k not in replaced}
    return baseline_document({**measured, "vectors": {**vectors, **measured["vectors"]}})


# -- comparison (pure) -------------------------------------------------------------------
def compare_with_baseline(
    measured: dict, baseline: Baseline, tolerances: Tolerances = Tolerances(), required: Collection[str] | None = None
) -> Report:
    """Compare measured figures with a baseline. `required`: the baseline vectors that must be
    among the measured ones (default: all of them); a missing one is a regression, a measured
    vector absent from the baseline a note. Raises BaselineError for another model's baseline."""
    check_same_model(baseline, measured["model_fingerprint"], measured["test_split"])
    report = Report(measured["model"], baseline.path, len(measured["vectors"]))
    required = baseline.vectors.keys() if required is None else required
    for key in sorted(k for k in required if k in baseline.vectors and k not in measured["vectors"]):
        report.regressions.append(Finding(key, "missing", None, None, None, baseline.vectors[key].get("file", "")))
    for key, figures in sorted(measured["vectors"].items()):
        if key not in baseline.vectors:
            report.notes.append(f"{key}: new, not in the baseline (add it with --update-baseline) [{figures.get('file', '')}]")
            continue
        _compare_vector(key, figures, baseline.vectors[key], tolerances, report, f"{baseline.path}: vectors['{key}']")
    return report


def _compare_vector(key: str, figures: dict, base: dict, tolerances: Tolerances, report: Report, where: str) -> None:
    file = figures.get("file", "")
    for name, tolerance in (("accuracy", tolerances.max_accuracy_drop), ("gain", tolerances.max_gain_drop),
                            ("decoding_hits", tolerances.max_decoding_hit_drop)):
        change = figures[name] - base[name]
        finding = Finding(key, name, base[name], figures[name], tolerance, file)
        if change < -tolerance - FLOAT_SLACK:
            report.regressions.append(finding)
        elif change > tolerance + FLOAT_SLACK:
            report.improvements.append(finding)
    if figures.get("layer") is not None and base.get("layer") is not None and figures["layer"] != base["layer"]:
        report.notes.append(f"{key}: layer {figures['layer']}, baseline layer {base['layer']}")
    measured_vector = decode_vector_text(figures["vector"], f"measured {key}")
    base_vector = decode_vector_text(base["vector"], where)
    if len(measured_vector) != len(base_vector):
        report.regressions.append(Finding(key, "movement", None, math.inf, tolerances.max_relative_movement, file))
        report.notes.append(f"{key}: the vector has {len(measured_vector)} values, the baseline's {len(base_vector)}")
        return
    relative, cosine = movement(measured_vector, base_vector)
    report.movements[key] = (relative, cosine)
    if relative > tolerances.max_relative_movement + FLOAT_SLACK:
        report.regressions.append(Finding(key, "movement", 0.0, relative, tolerances.max_relative_movement, file))
        report.notes.append(f"{key}: cosine with the baseline vector {cosine:.4f}, norm {figures['norm']:.3f} "
                            f"(baseline {base['norm']:.3f})")


# -- measuring (needs the model) ---------------------------------------------------------
def shipped_vector_paths(model_alias: str, kinds: Sequence[str] = DEFAULT_KINDS, root: Path | None = None) -> list[Path]:
    """The model's vectors of `kinds` under `root`, else under ./vectors and the shipped library
    (a vector in ./vectors wins over the shipped one of the same kind and relation)."""
    roots = [root] if root is not None else vector_roots()
    paths = []
    for kind in kinds:
        found: dict[str, Path] = {}
        for r in roots:
            for p in sorted((r / model_alias / kind).glob("*.safetensors")):
                found.setdefault(p.stem, p)
        paths += [found[name] for name in sorted(found)]
    if not paths:
        raise BaselineError(f"no shipped vectors of kinds {', '.join(kinds)} under {' or '.join(str(r / model_alias) for r in roots)}")
    return paths


def vector_key(metadata: dict) -> str:
    return f"{metadata['kind']}/{metadata['relation']}"


def split_description(source: str) -> str:
    from ffv_eval.relations import MIN_TEST, SPLIT_SEED

    data = "project word pairs (tasks/relations/pairs)" if source == "project" else \
        "Todd et al. files (function_vectors/abstractive)"
    return (f"{data}: test split of each relation (30%, at least {MIN_TEST} pairs, split seed {SPLIT_SEED}); "
            f"zero-shot 'Q: x\\nA:' prompts, first-token accuracy; decoding hits in the top {DECODING_TOP_K} tokens")


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def load_gate_model(model_alias: str, placement=None):
    """(model, tokenizer, fingerprint); placement: a model_loading.Placement (default: the
    default device, the checkpoint's dtype)."""
    from ffv_eval.model_loading import Placement, load_model_and_tokenizer, model_fingerprint

    model, tokenizer = load_model_and_tokenizer(model_alias, **vars(placement or Placement()))
    return model, tokenizer, model_fingerprint(model)


def measure_quality(model_alias: str, vector_paths: Sequence[str | Path], loaded=None,
                    progress: Callable[[str], None] = lambda message: None, placement=None) -> dict:
    """Quality figures of each vector file on the model, in the baseline layout. `loaded`:
    (model, tokenizer[, fingerprint]) already in memory, else the model is loaded here."""
    import torch

    from ffv_eval.decoding import decode_vector
    from ffv_eval.function_vectors import first_token_accuracy
    from ffv_eval.model_loading import model_fingerprint
    from ffv_eval.patching import Patcher
    from ffv_eval.relations import load_project_relation
    from ffv_eval.vector_store import check_compatible, load_vector

    stored = [load_vector(p) for p in vector_paths]  # file and data errors before any model work
    by_key = {}
    for s in stored:
        key = vector_key(s.metadata)
        if key in by_key:
            raise BaselineError(f"{s.path}: a second vector for '{key}' (the first is {by_key[key].path})")
        by_key[key] = s
    relations = {name: load_project_relation(name) for name in sorted({s.metadata["relation"] for s in stored})}
    sources = {r.source for r in relations.values()}
    model, tokenizer = (loaded[0], loaded[1]) if loaded else load_gate_model(model_alias, placement)[:2]
    fingerprint = loaded[2] if loaded and len(loaded) > 2 else model_fingerprint(model)
    patcher = Patcher(model)
    figures: dict[str, dict] = {}
    with torch.no_grad():
        zero_shot = {}
        for key, s in sorted(by_key.items()):
            layer = check_compatible(s, patcher.adapter.hidden_size, patcher.adapter.n_layers, fingerprint, None)
            relation = relations[s.metadata["relation"]]
            if relation.name not in zero_shot:
                zero_shot[relation.name] = first_token_accuracy(patcher, tokenizer, relation.test)
            accuracy = first_token_accuracy(patcher, tokenizer, relation.test, layer, s.vector)
            all_pairs = relation.train + relation.validation + relation.test
            hits = decode_vector(patcher.adapter, tokenizer, s.vector, all_pairs, DECODING_TOP_K).n_hits
            figures[key] = {
                "file": _display_path(s.path),
                "kind": s.metadata["kind"],
                "relation": relation.name,
                "layer": layer,
                "n_test": len(relation.test),
                "data_sha256": relation.sha256,
                "accuracy": round(accuracy, DIGITS),
                "zero_shot_accuracy": round(zero_shot[relation.name], DIGITS),
                "gain": round(accuracy - zero_shot[relation.name], DIGITS),
                "decoding_hits": hits,
                "norm": round(float(s.vector.norm()), DIGITS),
                "vector": encode_vector(s.vector.float().tolist()),
            }
            progress(f"[ffv] {key}: accuracy {accuracy:.3f} (zero-shot {zero_shot[relation.name]:.3f}), "
                     f"decoding hits {hits}/{DECODING_TOP_K}")
    return {"model": model_alias, "model_fingerprint": fingerprint,
            "test_split": split_description(sources.pop() if len(sources) == 1 else "project"),
            "vectors": figures}


# -- the command -------------------------------------------------------------------------
def accept_command(model_alias: str, baseline_path: Path, vector_files: Sequence[str], kinds: Sequence[str]) -> str:
    parts = ["ffv check --update-baseline", f"--model {model_alias}", f"--baseline {baseline_path}"]
    parts += [str(f) for f in vector_files] if vector_files else ["--kinds " + " ".join(kinds)]
    return " ".join(parts)


def run_check(model_alias: str, vector_files: Sequence[str], baseline_path: str | Path | None = None,
              kinds: Sequence[str] = DEFAULT_KINDS, tolerances: Tolerances = Tolerances(), update: bool = False,
              print_: Callable[[str], None] = print, placement=None) -> int:
    """`ffv check`: 0 when every vector is within tolerance (or the baseline was written), 1 on
    a regression. Explicit files are compared with their own baseline entries only; the
    default set (the model's shipped vectors of `kinds`) must cover every baseline entry of
    those kinds."""
    if update:
        baseline_path = baseline_to_update(model_alias, baseline_path)
    else:
        baseline_path = Path(baseline_path) if baseline_path else default_baseline_path(model_alias)
    paths = [Path(f) for f in vector_files] or shipped_vector_paths(model_alias, kinds)
    baseline = load_baseline(baseline_path) if baseline_path.exists() or not update else None
    model, tokenizer, fingerprint = load_gate_model(model_alias, placement)
    if baseline is not None:
        check_same_model(baseline, fingerprint)  # before minutes of measuring
    measured = measure_quality(model_alias, paths, loaded=(model, tokenizer, fingerprint), progress=print_)
    if vector_files:
        required = set(measured["vectors"])
    else:
        required = {k for k in (baseline.vectors if baseline else {}) if k.split("/", 1)[0] in kinds}
    if update:
        if baseline is not None:
            check_same_model(baseline, fingerprint, measured["test_split"])
        document = merged_baseline(baseline, measured, required)
        write_baseline(baseline_path, document)
        print_(f"ffv check: wrote {baseline_path}: {len(document['vectors'])} vectors "
               f"({len(measured['vectors'])} measured now)")
        return 0
    report = compare_with_baseline(measured, baseline, tolerances, required)
    print_(report.text(accept_command(model_alias, baseline_path, vector_files, kinds)))
    return 0 if report.passed else 1
