"""The vector library (vectors.library): the roots (./vectors before the shipped library), the
path of a vector, a model's vectors of a kind, names across models, bases and the composite
map's files. Tiny files in temporary folders; the shipped library is only read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ffv_eval
from ffv_eval.vectors import library
from ffv_eval.vectors.library import BasisError

MODEL = "gemma-3-270m"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the checkout: ./vectors is a root of its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "vectors"


def test_in_the_checkout_there_is_one_root(monkeypatch):
    monkeypatch.chdir(ffv_eval.VECTORS_DIR.parent)
    assert library.vector_roots() == [ffv_eval.VECTORS_DIR]


def test_the_working_directorys_vectors_come_first(elsewhere):
    assert library.vector_roots() == [elsewhere, ffv_eval.VECTORS_DIR]
    assert library.local_vectors_dir() == elsewhere


def test_the_path_of_a_vector(elsewhere, tmp_path):
    shipped = ffv_eval.VECTORS_DIR / MODEL / "fv" / "antonym.safetensors"
    assert library.shipped_path(MODEL, "fv", "antonym") == shipped
    assert library.output_path(MODEL, "fv", "antonym") == elsewhere / MODEL / "fv" / "antonym.safetensors"
    assert library.shipped_path(MODEL, "fv", "no-such") == ffv_eval.VECTORS_DIR / MODEL / "fv" / "no-such.safetensors"
    local = _touch(elsewhere / MODEL / "fv" / "antonym.safetensors")
    assert library.shipped_path(MODEL, "fv", "antonym") == local  # ./vectors wins
    assert library.shipped_path(MODEL, "ffv", "antonym") == ffv_eval.VECTORS_DIR / MODEL / "ffv" / "antonym.safetensors"
    assert library.shipped_path(MODEL, "fv", "antonym", root=tmp_path / "other") == tmp_path / "other" / MODEL / "fv" / "antonym.safetensors"
    assert library.vector_pattern("ffv") == "vectors/<model>/ffv/<relation>.safetensors"


def test_a_models_other_files(elsewhere):
    shipped = ffv_eval.VECTORS_DIR / MODEL / "quality-baseline.json"
    assert library.read_path(MODEL, "quality-baseline.json") == shipped
    assert library.write_path(MODEL, "quality-baseline.json") == elsewhere / MODEL / "quality-baseline.json"
    local = _touch(elsewhere / MODEL / "quality-baseline.json")
    assert library.read_path(MODEL, "quality-baseline.json") == local


def test_a_models_vectors_of_a_kind_prefer_the_working_directory(elsewhere):
    shipped = sorted((ffv_eval.VECTORS_DIR / MODEL / "fv").glob("*.safetensors"))
    assert library.model_vectors(MODEL, "fv") == shipped
    local = _touch(elsewhere / MODEL / "fv" / "antonym.safetensors")
    extra = _touch(elsewhere / MODEL / "fv" / "zz-mine.safetensors")
    found = library.model_vectors(MODEL, "fv")
    assert local in found and extra == found[-1] and ffv_eval.VECTORS_DIR / MODEL / "fv" / "antonym.safetensors" not in found
    assert len(found) == len(shipped) + 1
    assert library.model_vectors(MODEL, "fv", root=elsewhere) == [local, extra]
    assert library.kind_dirs(MODEL, "fv") == [elsewhere / MODEL / "fv", ffv_eval.VECTORS_DIR / MODEL / "fv"]
    assert library.model_dirs(MODEL) == [elsewhere / MODEL, ffv_eval.VECTORS_DIR / MODEL]


def test_a_name_across_models(tmp_path):
    for model, kind in (("m1", "fv"), ("m1", "ffv"), ("m2", "fv"), ("m3", "ffv-random")):
        _touch(tmp_path / model / kind / "antonym.safetensors")
    found = library.named_vector_paths("antonym", library.BARE_NAME_KINDS, root=tmp_path)
    assert found == [tmp_path / "m1" / "ffv" / "antonym.safetensors", tmp_path / "m2" / "fv" / "antonym.safetensors"]
    assert library.named_vector_paths("antonym", ("fv",), root=tmp_path) == [tmp_path / "m1" / "fv" / "antonym.safetensors",
                                                                             tmp_path / "m2" / "fv" / "antonym.safetensors"]
    assert library.named_vector_paths("synonym", ("fv",), root=tmp_path) == []
    assert library.known_names(root=tmp_path) == ["ffv-random:antonym", "ffv:antonym", "fv:antonym"]


def test_a_name_in_the_working_directory_wins_for_its_model(elsewhere):
    local = _touch(elsewhere / MODEL / "fv" / "antonym.safetensors")
    found = {p.parent.parent.name: p for p in library.named_vector_paths("antonym", library.BARE_NAME_KINDS)}
    assert found[MODEL] == local  # a bare name prefers ffv, but ./vectors comes first
    assert found["smollm2-135m"] == ffv_eval.VECTORS_DIR / "smollm2-135m" / "ffv" / "antonym.safetensors"


def test_basis_directories(elsewhere):
    assert library.basis_output_dir(MODEL) == elsewhere / MODEL / "basis"
    assert library.basis_vector_file(Path("/b"), "todd/antonym") == Path("/b/todd/antonym.safetensors")
    assert library.find_basis_dir(MODEL) == ffv_eval.VECTORS_DIR / MODEL / "basis"
    assert library.find_basis_dir("no-such-model") is None
    fingerprint = json.loads((ffv_eval.VECTORS_DIR / MODEL / "basis" / "composite.json").read_text())["model_fingerprint"]
    assert library.find_basis_dir("a/hub/id", fingerprint) == ffv_eval.VECTORS_DIR / MODEL / "basis"  # by the map's model
    local = elsewhere / MODEL / "basis"
    _touch(local / "composite.safetensors")
    assert library.find_basis_dir(MODEL) == local


def test_the_composite_maps_files_and_their_errors(tmp_path):
    shipped = ffv_eval.VECTORS_DIR / MODEL / "basis"
    assert library.composite_files(shipped) == (shipped / "composite.safetensors", shipped / "composite.json")
    meta = library.read_composite_metadata(shipped)
    assert meta["format"] == library.COMPOSITE_FORMAT and meta["basis"]
    tensors = library.read_composite_tensors(shipped, len(meta["basis"]))
    assert {"weight", "bias"} <= set(tensors)
    with pytest.raises(BasisError, match="fingerprint"):
        library.read_composite_metadata(shipped, "0000000000000000")
    with pytest.raises(BasisError, match="do not match the 2 basis relations"):
        library.read_composite_tensors(shipped, 2)
    with pytest.raises(BasisError, match="no composite map in .* run: ffv basis build"):
        library.read_composite_metadata(tmp_path)
    copy = tmp_path / "basis"
    copy.mkdir()
    shutil.copy(shipped / "composite.safetensors", copy)
    for edit, message in ((lambda m: m.pop("layer"), "field 'layer' is missing"),
                          (lambda m: m.update(format="x/1"), "field 'format' is 'x/1'"),
                          (lambda m: m.update(basis=[]), "field 'basis' is empty")):
        changed = dict(meta)
        edit(changed)
        (copy / "composite.json").write_text(json.dumps(changed))
        with pytest.raises(BasisError, match=message):
            library.read_composite_metadata(copy)


def test_a_written_map_reads_back(tmp_path):
    import torch

    tensors = {"weight": torch.eye(3), "bias": torch.zeros(3), "relation_baseline": torch.ones(3)}
    meta = {"model": "tiny", "model_fingerprint": "f" * 16, "layer": 1, "posterior": "calibrated", "temperature": 2.0,
            "basis": ["a", "b", "c"]}
    path = library.write_composite_map(tmp_path, meta, tensors)
    assert path == tmp_path / "composite.safetensors"
    written = json.loads((tmp_path / "composite.json").read_text())
    assert list(written) == ["format", *meta] and written["format"] == library.COMPOSITE_FORMAT
    assert library.read_composite_metadata(tmp_path, "f" * 16) == written
    back = library.read_composite_tensors(tmp_path, 3)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_the_library_module_spells_the_layout_alone():
    """No other module spells <root>/<model>/<kind>/<relation>.safetensors or the map's files."""
    package = Path(ffv_eval.__file__).resolve().parent
    spelled = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "library.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("composite.safetensors", 'glob(f"*/', "/ kind /", "/ model_alias /", "vector_roots()"):
            if needle in text and not (needle == "composite.safetensors" and path.name == "composite.py"):
                spelled.append(f"{path.relative_to(package)}: {needle}")
    assert spelled == []
