"""The baseline file of `ffv check` and the comparison of measured figures with it. Pure Python
(no torch, no model): the figures come from `quality_gate.measure_quality`.

A baseline (`ffv-quality-baseline/1`, JSON) names the model (alias, fingerprint) and the test
split, and holds per vector `<kind>/<relation>` its figures: `accuracy`, `zero_shot_accuracy`,
`gain`, `decoding_hits`, `norm`, and the vector itself as text (`ffv_eval.vectors.codec`). A
measured vector regresses when a figure falls by more than its tolerance, or when it moved
(||v - v_baseline|| / ||v_baseline||) by more than its tolerance. Baseline files are written
atomically and only by an explicit `--update-baseline`."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ffv_eval.errors import FFVError
from ffv_eval.files.atomic import atomic_write, check_writable
from ffv_eval.files.json_lines import json_document
from ffv_eval.vectors.codec import decode_vector_text
from ffv_eval.vectors.library import read_path, write_path

BASELINE_FORMAT = "ffv-quality-baseline/1"
BASELINE_NAME = "quality-baseline.json"
FLOAT_SLACK = 1e-9  # a drop equal to the tolerance passes despite float rounding
FIGURE_FIELDS = {"accuracy": (int, float), "zero_shot_accuracy": (int, float), "gain": (int, float),
                 "decoding_hits": int, "norm": (int, float), "vector": str}


class BaselineError(FFVError, ValueError):
    """A quality baseline file that is missing, malformed, for another model, or not to be written."""


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


# -- baseline files -----------------------------------------------------------------------
def default_baseline_path(model_alias: str) -> Path:
    """The baseline read by default: ./vectors/<model>/quality-baseline.json where it exists,
    else the shipped one."""
    return read_path(model_alias, BASELINE_NAME)


def baseline_to_update(model_alias: str, given: str | Path | None) -> Path:
    """The baseline file `--update-baseline` writes: the one given, else an existing
    ./vectors/<model>/quality-baseline.json (the checkout's, run there); never the shipped
    file of an installed package. Checked before any model work."""
    path = Path(given) if given else write_path(model_alias, BASELINE_NAME)
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
        decode_vector_text(figures["vector"], f"{where}: field 'vector'", BaselineError)
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


# -- the comparison -----------------------------------------------------------------------
def movement(measured: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(||v - v_base|| / ||v_base||, cosine(v, v_base)) of two vectors of one length; a zero
    baseline vector counts any non-zero vector as moved infinitely far."""
    base_norm, norm, distance = math.hypot(*baseline), math.hypot(*measured), math.dist(measured, baseline)
    relative = distance / base_norm if base_norm > 0 else (0.0 if distance == 0 else math.inf)
    cosine = sum(m * b for m, b in zip(measured, baseline)) / (norm * base_norm) if norm > 0 and base_norm > 0 else 0.0
    return relative, cosine


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
    measured_vector = decode_vector_text(figures["vector"], f"measured {key}: field 'vector'", BaselineError)
    base_vector = decode_vector_text(base["vector"], f"{where}: field 'vector'", BaselineError)
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
