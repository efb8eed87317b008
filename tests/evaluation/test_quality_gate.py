"""`ffv check`, the CI gate on vector quality (ffv_eval.evaluation.quality_gate), on the real
Gemma 3 270M: the shipped vectors pass, a deliberately damaged one fails, in float32 and in
bfloat16 against the float32 baseline. (The comparison logic and baseline files:
tests/reports/test_quality_baseline.py.)"""

import json

import pytest

from ffv_eval import VECTORS_DIR
from ffv_eval.models.loading import Placement
from ffv_eval.reports.quality_baseline import compare_with_baseline, load_baseline

FINGERPRINT = json.loads((VECTORS_DIR / "gemma-3-270m" / "quality-baseline.json").read_text())["model_fingerprint"]

SHIPPED_FFV = VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.safetensors"


def damaged_copy(tmp_path):
    """The shipped FFV for antonym replaced by noise of the same norm, same metadata."""
    import torch

    from ffv_eval.vectors.store import load_vector, save_vector

    stored = load_vector(SHIPPED_FFV)
    noise = torch.randn(stored.vector.shape, generator=torch.Generator().manual_seed(0))
    return save_vector(tmp_path / "antonym.safetensors", noise * stored.vector.norm() / noise.norm(), stored.metadata)


@pytest.mark.slow
def test_the_gate_on_gemma_passes_shipped_vectors_and_fails_a_damaged_one(gemma, tmp_path, capsys):
    from ffv_eval.cli import main
    from ffv_eval.evaluation.quality_gate import default_baseline_path, measure_quality

    shipped_baseline = load_baseline(default_baseline_path("gemma-3-270m"))
    shipped_fv = VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors"
    good = measure_quality("gemma-3-270m", [SHIPPED_FFV, shipped_fv], loaded=gemma)
    assert set(good["vectors"]) == {"ffv/antonym", "fv/antonym"}
    report = compare_with_baseline(good, shipped_baseline, required=set(good["vectors"]))
    assert report.passed, report.text()
    assert report.movements["ffv/antonym"][0] == 0.0 and report.movements["fv/antonym"][1] == pytest.approx(1.0)
    figures_now = good["vectors"]["ffv/antonym"]
    assert figures_now["gain"] == pytest.approx(figures_now["accuracy"] - figures_now["zero_shot_accuracy"])
    assert figures_now["accuracy"] > figures_now["zero_shot_accuracy"] + 0.3

    damaged = damaged_copy(tmp_path)
    bad = measure_quality("gemma-3-270m", [damaged], loaded=gemma)
    report = compare_with_baseline(bad, shipped_baseline, required={"ffv/antonym"})
    assert not report.passed
    assert ("ffv/antonym", "accuracy") in {(f.vector, f.figure) for f in report.regressions}
    assert f"ffv/antonym: accuracy: baseline {shipped_baseline.vectors['ffv/antonym']['accuracy']:.3f}" in report.text()
    assert str(damaged) in report.text()

    # the command line: write a baseline, pass, fail, refuse another model's baseline
    path = tmp_path / "gate" / "quality-baseline.json"
    capsys.readouterr()
    assert main(["check", str(SHIPPED_FFV), "--baseline", str(path), "--update-baseline"]) == 0
    assert list(load_baseline(path).vectors) == ["ffv/antonym"]
    assert main(["check", str(SHIPPED_FFV), "--baseline", str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["check", str(damaged), "--baseline", str(path), "--max-accuracy-drop", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "ffv/antonym: accuracy" in out and "tolerance 0.100" in out
    document = json.loads(path.read_text())
    document["model_fingerprint"] = "0123456789abcdef"
    path.write_text(json.dumps(document))
    assert main(["check", str(SHIPPED_FFV), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "0123456789abcdef" in err and FINGERPRINT in err


@pytest.mark.slow
def test_gemma_quality_gate_passes_in_bfloat16_against_the_float32_baseline():
    from ffv_eval.evaluation.quality_gate import measure_quality
    from ffv_eval.reports.quality_baseline import compare_with_baseline, load_baseline

    baseline = load_baseline(VECTORS_DIR / "gemma-3-270m" / "quality-baseline.json")
    measured = measure_quality("gemma-3-270m", [VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.safetensors"],
                               placement=Placement("cpu", "bfloat16"))
    report = compare_with_baseline(measured, baseline, required={"ffv/antonym"})
    assert report.passed, report.text()
    assert report.movements["ffv/antonym"][0] == 0.0
