"""`ffv check`'s baselines (ffv_eval.reports.quality_baseline): the comparison logic on synthetic
figures and atomic baseline files. (The gate on the real Gemma 3 270M:
tests/evaluation/test_quality_gate.py.)"""

import json
import os

import pytest

from ffv_eval import VECTORS_DIR
from ffv_eval.reports.quality_baseline import (
    BASELINE_FORMAT,
    Baseline,
    BaselineError,
    Tolerances,
    baseline_document,
    baseline_from_document,
    compare_with_baseline,
    load_baseline,
    merged_baseline,
    movement,
    write_baseline,
)
from ffv_eval.vectors.codec import decode_vector_text, encode_vector

FINGERPRINT = json.loads((VECTORS_DIR / "gemma-3-270m" / "quality-baseline.json").read_text())["model_fingerprint"]
SPLIT = "project word pairs: test split"


def figures(accuracy=0.8, zero_shot=0.0, hits=5, vector=(3.0, 4.0, 0.0, 0.0), file="vectors/m/ffv/antonym.safetensors"):
    norm = sum(v * v for v in vector) ** 0.5
    return {"file": file, "layer": 6, "accuracy": accuracy, "zero_shot_accuracy": zero_shot,
            "gain": round(accuracy - zero_shot, 6), "decoding_hits": hits, "norm": norm, "vector": encode_vector(vector)}


def measured(vectors: dict, fingerprint=FINGERPRINT) -> dict:
    return {"model": "gemma-3-270m", "model_fingerprint": fingerprint, "test_split": SPLIT, "vectors": vectors}


def baseline(vectors: dict, fingerprint=FINGERPRINT, path="vectors/gemma-3-270m/quality-baseline.json") -> Baseline:
    return baseline_from_document(baseline_document(measured(vectors, fingerprint)), path)


def compare(measured_figures: dict, baseline_figures: dict, tolerances=Tolerances(), key="ffv/antonym"):
    return compare_with_baseline(measured({key: measured_figures}), baseline({key: baseline_figures}), tolerances)


# -- the comparison ------------------------------------------------------------------------
def test_identical_figures_pass():
    report = compare(figures(), figures())
    assert report.passed and not report.improvements and not report.notes
    assert report.movements["ffv/antonym"] == (0.0, pytest.approx(1.0))
    assert "PASS" in report.text()


@pytest.mark.parametrize("changed, failed, values", [
    (figures(accuracy=0.70), ["accuracy", "gain"], ("0.800", "0.700", "0.040")),
    (figures(accuracy=0.8, zero_shot=0.1), ["gain"], ("0.800", "0.700", "0.040")),  # zero-shot rose, the gain fell
    (figures(hits=2), ["decoding_hits"], ("5", "2", "2")),
    (figures(vector=(3.0, 4.0, 1.0, 0.0)), ["movement"], ("0.2000", "0.05")),
])
def test_a_regression_in_each_figure_names_vector_figure_values_and_tolerance(changed, failed, values):
    report = compare(changed, figures())
    assert not report.passed
    assert [(f.vector, f.figure) for f in report.regressions] == [("ffv/antonym", name) for name in failed]
    figure = failed[0]
    line = report.text().splitlines()[2]
    assert line.strip().startswith(f"ffv/antonym: {figure}") and "vectors/m/ffv/antonym.safetensors" in line
    for value in values:
        assert value in line


def test_tolerance_edges_pass_and_one_step_beyond_fails():
    assert compare(figures(accuracy=0.66), figures(accuracy=0.70)).passed  # exactly 0.04 (2 of 50 pairs)
    assert not compare(figures(accuracy=0.64), figures(accuracy=0.70)).passed
    assert compare(figures(hits=3), figures(hits=5)).passed
    assert not compare(figures(hits=2), figures(hits=5)).passed
    wide = Tolerances(max_accuracy_drop=0.3, max_gain_drop=0.3, max_decoding_hit_drop=0, max_relative_movement=0.25)
    assert compare(figures(accuracy=0.5), figures(accuracy=0.8), wide).passed
    assert not compare(figures(hits=4), figures(hits=5), wide).passed
    assert compare(figures(vector=(3.0, 4.0, 1.25, 0.0)), figures(), wide).passed  # moved exactly 0.25
    assert not compare(figures(vector=(3.0, 4.0, 1.5, 0.0)), figures(), wide).passed


def test_an_improvement_passes_and_says_how_to_accept_it():
    report = compare(figures(accuracy=0.9, hits=9), figures(accuracy=0.8, hits=5))
    assert report.passed
    assert {(f.figure, f.baseline, f.measured) for f in report.improvements} == {
        ("accuracy", 0.8, 0.9), ("gain", 0.8, 0.9), ("decoding_hits", 5, 9)}
    text = report.text("ffv check --update-baseline --model gemma-3-270m --kinds fv ffv")
    assert "rose by" in text and "to accept: ffv check --update-baseline --model gemma-3-270m --kinds fv ffv" in text


def test_missing_vectors_fail_and_new_vectors_are_noted():
    base = baseline({"fv/antonym": figures(), "ffv/antonym": figures()})
    now = measured({"fv/antonym": figures(), "ffv/synonym": figures(file="x/synonym.safetensors")})
    report = compare_with_baseline(now, base)
    assert [(f.vector, f.figure) for f in report.regressions] == [("ffv/antonym", "missing")]
    assert any(n.startswith("ffv/synonym: new") for n in report.notes)
    assert "ffv/antonym: in the baseline but not checked" in report.text()
    # explicit files are compared with their own entries only
    assert compare_with_baseline(now, base, required={"fv/antonym", "ffv/synonym"}).passed


def test_a_baseline_for_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "quality-baseline.json"
    write_baseline(path, baseline_document(measured({"ffv/antonym": figures()}, fingerprint="0123456789abcdef")))
    with pytest.raises(BaselineError, match=f"{path}.*fingerprint 0123456789abcdef.*loaded model has fingerprint {FINGERPRINT}"):
        compare_with_baseline(measured({"ffv/antonym": figures()}), load_baseline(path))
    other_split = {**measured({"ffv/antonym": figures()}), "test_split": "Todd et al. files"}
    with pytest.raises(BaselineError, match="field 'test_split'"):
        compare_with_baseline(other_split, baseline({"ffv/antonym": figures()}))


def test_bad_baseline_files_name_the_file_and_field(tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(BaselineError, match=f"baseline file {path} does not exist; create it with: ffv check --update-baseline"):
        load_baseline(path)
    document = baseline_document(measured({"ffv/antonym": figures()}))
    for edit, message in (
        (lambda d: d.update(format="other/1"), "field 'format' is 'other/1'"),
        (lambda d: d.pop("model_fingerprint"), "field 'model_fingerprint' should be a string"),
        (lambda d: d["vectors"]["ffv/antonym"].pop("accuracy"), r"vectors\['ffv/antonym'\]: field 'accuracy' is missing"),
        (lambda d: d["vectors"]["ffv/antonym"].update(vector="not base64!"), "field 'vector' is not base64"),
    ):
        broken = json.loads(json.dumps(document))
        edit(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(BaselineError, match=message):
            load_baseline(path)
    path.write_text("{\n  \"format\": ")
    with pytest.raises(BaselineError, match=f"{path}: line 2: malformed JSON"):
        load_baseline(path)


def test_vectors_round_trip_as_float32_text_and_movement_is_relative_l2():
    values = [0.1, -2.5, 3e5, 0.0]
    assert decode_vector_text(encode_vector(values), "here") == pytest.approx(values, rel=1e-7)
    relative, cosine = movement([3.0, 4.0, 0.0], [3.0, 4.0, 5.0])
    assert relative == pytest.approx(5 / 50 ** 0.5) and cosine == pytest.approx(25 / (5 * 50 ** 0.5))
    assert movement([0.0, 0.0], [0.0, 0.0]) == (0.0, 0.0)


def test_updating_replaces_measured_entries_and_keeps_the_rest():
    existing = baseline({"fv/antonym": figures(accuracy=0.5), "ffv/antonym": figures(), "fv/gone": figures()})
    document = merged_baseline(existing, measured({"fv/antonym": figures(accuracy=0.6)}), {"fv/antonym", "fv/gone"})
    assert document["format"] == BASELINE_FORMAT and list(document["vectors"]) == ["ffv/antonym", "fv/antonym"]
    assert document["vectors"]["fv/antonym"]["accuracy"] == 0.6


def test_writing_a_baseline_is_atomic(tmp_path):
    path = tmp_path / "quality-baseline.json"
    good = baseline_document(measured({"ffv/antonym": figures()}))
    write_baseline(path, good)
    before = path.read_bytes()
    bad = baseline_document(measured({"ffv/antonym": figures(), "fv/z": {**figures(), "vector": object()}}))
    with pytest.raises(TypeError):  # fails after part of the JSON was streamed out
        write_baseline(path, bad)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    with pytest.raises(TypeError):
        write_baseline(tmp_path / "new.json", bad)
    assert os.listdir(tmp_path) == [path.name]
    assert load_baseline(path).vectors == good["vectors"]


