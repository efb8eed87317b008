"""Where vectors are looked up and written (ffv_eval.vectors.locations): names resolve in
./vectors of the working directory first, and default outputs go there, existing ones refused
before any model work."""

import shutil
from pathlib import Path

import pytest

import ffv_eval

MODEL = "gemma-3-270m"


def _copy_vector(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    shutil.copy(source.with_suffix(".json"), target.with_suffix(".json"))


def test_names_resolve_in_the_working_directory_first(tmp_path, monkeypatch):
    from ffv_eval.evaluation.quality_gate import default_baseline_path, shipped_vector_paths
    from ffv_eval.vectors.jobs import extract_and_save, train_and_save
    from ffv_eval.vectors.library import shipped_path
    from ffv_eval.vectors.store import find_vectors

    monkeypatch.chdir(tmp_path)
    shipped_fv = ffv_eval.VECTORS_DIR / MODEL / "fv" / "antonym.safetensors"
    assert shipped_path(MODEL, "fv", "antonym") == shipped_fv
    assert default_baseline_path(MODEL) == ffv_eval.VECTORS_DIR / MODEL / "quality-baseline.json"

    local_fv = tmp_path / "vectors" / MODEL / "fv" / "antonym.safetensors"
    _copy_vector(shipped_fv, local_fv)  # a bare name prefers ffv, but ./vectors wins first
    local_baseline = tmp_path / "vectors" / MODEL / "quality-baseline.json"
    local_baseline.write_text("{}")
    assert shipped_path(MODEL, "fv", "antonym") == local_fv
    assert shipped_path(MODEL, "ffv", "antonym") == ffv_eval.VECTORS_DIR / MODEL / "ffv" / "antonym.safetensors"
    by_model = {v.path.parent.parent.name: v.path for v in find_vectors("antonym")}
    assert by_model[MODEL] == local_fv
    assert by_model["smollm2-135m"] == ffv_eval.VECTORS_DIR / "smollm2-135m" / "ffv" / "antonym.safetensors"
    assert default_baseline_path(MODEL) == local_baseline
    checked = shipped_vector_paths(MODEL, ("fv",))
    assert local_fv in checked and shipped_fv not in checked
    assert len(checked) == len(list((ffv_eval.VECTORS_DIR / MODEL / "fv").glob("*.safetensors")))

    # default outputs are ./vectors/<model>/<kind>/<relation>: existing ones are refused there,
    # before any model work
    with pytest.raises(ValueError, match=f"{local_fv} exists; pass --force"):
        extract_and_save(MODEL, "antonym")
    _copy_vector(shipped_fv, tmp_path / "vectors" / MODEL / "ffv" / "antonym.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'vectors' / MODEL / 'ffv' / 'antonym.safetensors'} exists"):
        train_and_save(MODEL, "antonym")
