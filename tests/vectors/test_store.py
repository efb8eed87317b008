"""Vector files (ffv_eval.vectors.store): round trip, no overwrite, every bad file refused, shipped names."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ffv_eval.vectors.store import VectorFileError, VectorNameError, find_vectors, load_vector, save_vector, sidecar_path


def _meta(**over):
    return {"kind": "fv", "relation": "antonym", "model_fingerprint": "abc", "layer": 3, **over}


def test_vector_round_trip_and_no_overwrite(tmp_path):
    path = tmp_path / "v.safetensors"
    vector = torch.randn(16)
    save_vector(path, vector, _meta())
    stored = load_vector(path)
    assert torch.equal(stored.vector, vector) and stored.metadata["hidden_size"] == 16
    with pytest.raises(VectorFileError, match="exists; pass --force"):
        save_vector(path, vector * 2, _meta())
    assert torch.equal(load_vector(path).vector, vector)
    save_vector(path, vector * 2, _meta(), force=True)
    assert torch.equal(load_vector(path).vector, vector * 2)


def test_bad_vectors_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(VectorFileError, match="non-finite"):
        save_vector(path, torch.tensor([1.0, float("nan")]), _meta())
    with pytest.raises(VectorFileError, match="field 'layer'"):
        save_vector(path, torch.ones(4), _meta(layer="three"))
    assert list(tmp_path.iterdir()) == []

    save_file({"vector": torch.tensor([1.0, float("inf")])}, str(path))
    sidecar_path(path).write_text(json.dumps({"format": "ffv-eval/vector/1", "hidden_size": 2, **_meta()}))
    with pytest.raises(VectorFileError, match="non-finite"):
        load_vector(path)
    sidecar_path(path).write_text('{"format": "ffv-eval/vector/1",\n "kind": }')
    with pytest.raises(VectorFileError, match=r"bad.json: line 2: malformed JSON"):
        load_vector(path)
    sidecar_path(path).write_text(json.dumps({"format": "ffv-eval/vector/1", "hidden_size": 3, **_meta()}))
    with pytest.raises(VectorFileError, match="does not match field 'hidden_size'"):
        load_vector(path)
    sidecar_path(path).unlink()
    with pytest.raises(VectorFileError, match="sidecar .* is missing"):
        load_vector(path)


def test_shipped_names(tmp_path):
    with pytest.raises(VectorNameError, match="unknown vector name 'no-such-relation'"):
        find_vectors("no-such-relation")
    with pytest.raises(VectorNameError, match="unknown kind 'cfx'"):
        find_vectors("cfx:antonym")
    for model, kind in (("m1", "fv"), ("m1", "ffv"), ("m2", "fv")):
        save_vector(tmp_path / model / kind / "antonym.safetensors", torch.ones(4), _meta(kind=kind, model_fingerprint=model))
    found = find_vectors("antonym", root=tmp_path)
    assert sorted((v.metadata["model_fingerprint"], v.metadata["kind"]) for v in found) == [("m1", "ffv"), ("m2", "fv")]
    assert [v.metadata["kind"] for v in find_vectors("fv:antonym", root=tmp_path)] == ["fv", "fv"]
