"""VectorRecord, the one type of `config.ffv_vector`: every committed results file's record reads
and writes back as the same JSON (keys in the same order), the harness's three shapes are
today's dicts, and each task reads the vector it got. No model, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffv_eval import PROJECT_ROOT, VECTORS_DIR
from ffv_eval.vectors.library import composite_files, vector_pattern
from ffv_eval.vectors.record import VectorInfo, VectorRecord

RESULTS = sorted((PROJECT_ROOT / "leaderboards" / "results").rglob("results_*.json"))
PATCHED = [p for p in RESULTS if json.loads(p.read_text())["config"].get("ffv_vector") is not None]
SIDECAR = VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.json"
BASIS = VECTORS_DIR / "gemma-3-270m" / "basis"


def test_there_are_committed_results_of_every_shape():
    records = [json.loads(p.read_text())["config"].get("ffv_vector") for p in RESULTS]
    assert len(PATCHED) == len([r for r in records if r is not None]) >= 10
    kinds = {r["kind"] for r in records if r}
    assert {"auto", "cfv", "fv", "ffv"} <= kinds and None in records
    tasks = [t for r in records if r and r.get("per_task") for t in r["per_task"].values()]
    # per-task records of a stored vector and of a CFV (the first shape, path and layer only,
    # went with the relation runs of 2026-11-24, superseded by runs with samples)
    assert {t.get("kind") for t in tasks} >= {"cfv", "ffv"} and all("path" in t and "patch_layer" in t for t in tasks)


@pytest.mark.parametrize("path", PATCHED, ids=lambda p: str(p.relative_to(PROJECT_ROOT / "leaderboards" / "results")))
def test_every_committed_record_round_trips_to_the_same_json(path):
    recorded = json.loads(path.read_text())["config"]["ffv_vector"]
    again = VectorRecord.from_json(recorded).to_json()
    assert again == recorded
    assert json.dumps(again) == json.dumps(recorded)  # the same keys in the same order, nested too


def _stored_metadata() -> dict:
    return json.loads(SIDECAR.read_text())


def test_a_stored_vectors_record_is_what_results_hold():
    meta = _stored_metadata()
    record = VectorRecord.stored(SIDECAR.with_suffix(".safetensors"), "ab" * 32, 7, 2.0, meta)
    keys = ("kind", "relation", "model", "model_fingerprint", "layer", "scale", "heads", "data", "seed", "metrics")
    expected = {"path": str(SIDECAR.with_suffix(".safetensors")), "sha256": "ab" * 32, "patch_layer": 7, "patch_scale": 2.0,
                **{k: meta[k] for k in keys if k in meta}}
    assert json.dumps(record.to_json()) == json.dumps(expected)
    assert json.dumps(VectorRecord.from_json(expected).to_json()) == json.dumps(expected)
    bare = {k: v for k, v in meta.items() if k not in ("model", "scale", "heads", "data", "seed", "metrics")}
    written = VectorRecord.stored("v.safetensors", "cd" * 32, 1, 1.0, bare).to_json()
    assert list(written) == ["path", "sha256", "patch_layer", "patch_scale", "kind", "relation", "model_fingerprint", "layer"]


def test_a_composite_runs_record_is_what_results_hold():
    meta = json.loads(composite_files(BASIS)[1].read_text())
    record = VectorRecord.composite(BASIS, "ef" * 32, meta["layer"], 1.0, len(meta["basis"]), meta["posterior"], meta)
    expected = {"kind": "cfv", "path": str(BASIS), "sha256": "ef" * 32, "relation": None,
                "composition": "per question, from its source pair", "patch_layer": meta["layer"], "patch_scale": 1.0,
                "layer": meta["layer"], "n_basis": len(meta["basis"]), "posterior": meta["posterior"],
                **{k: meta[k] for k in ("model", "model_fingerprint", "temperature", "settings", "metrics") if k in meta}}
    assert json.dumps(record.to_json()) == json.dumps(expected)


def test_a_per_task_runs_record_holds_each_tasks_record():
    stored = VectorRecord.stored("a.safetensors", "ab" * 32, 6, 1.0, _stored_metadata())
    composite = VectorRecord.composite(BASIS, "ef" * 32, 6, 1.0, 3, "softmax", {"model": "m"})
    run = VectorRecord.per_task_run("auto", {"relation_antonym": stored, "u2_analogy": composite}, "per task", 1.0)
    written = run.to_json()
    assert list(written) == ["kind", "relation", "per_task", "path", "patch_scale"]
    assert written["relation"] is None and written["per_task"] == {"relation_antonym": stored.to_json(),
                                                                   "u2_analogy": composite.to_json()}
    assert VectorRecord.from_json(written) == run
    each = VectorRecord.per_task_run("fv", {}, vector_pattern("fv"), 1.0).to_json()
    assert each == {"kind": "fv", "relation": None, "per_task": {}, "path": "vectors/<model>/fv/<relation>.safetensors",
                    "patch_scale": 1.0}


def test_each_task_reads_the_vector_it_got():
    composite = {"kind": "cfv", "path": "/b", "sha256": "s1", "relation": None, "composition": "c", "patch_layer": 6,
                 "patch_scale": 1.0, "layer": 6, "n_basis": 3, "posterior": "softmax"}
    ffv = {"path": "/v/ffv/antonym.safetensors", "sha256": "s2", "patch_layer": 5, "patch_scale": 1.0, "kind": "ffv",
           "relation": "antonym", "layer": 5, "scale": 1.0}
    auto = VectorRecord.from_json({"kind": "auto", "relation": None, "per_task": {"u2_analogy": composite, "relation_antonym": ffv,
                                                                                 "bad": "not an object"},
                                   "path": "per task", "patch_scale": 2.0})
    assert auto.used_by("u2_analogy") == VectorInfo("auto", None, "/b", 6, 6, None, 2.0, "s1", "cfv")
    assert auto.used_by("relation_antonym") == VectorInfo("auto", "antonym", "/v/ffv/antonym.safetensors", 5, 5, None, 2.0, "s2",
                                                          "ffv")
    assert auto.used_by("bad") == auto.used_by("other") == VectorInfo("auto", None, "per task", None, None, None, 2.0)
    old = VectorRecord.from_json({"kind": "fv", "relation": None, "per_task": {"relation_antonym": {"path": "/v/a", "layer": 8}},
                                  "path": "vectors/<model>/fv/<relation>.safetensors", "patch_scale": 1.0})
    assert old.used_by("relation_antonym") == VectorInfo("fv", "antonym", "/v/a", 8, 8, None, 1.0)  # older runs: no kind
    fixed = VectorRecord.from_json({**ffv, "sha256": 12})
    assert fixed.used_by("relation_synonym") == VectorInfo("ffv", "antonym", "/v/ffv/antonym.safetensors", 5, 5, 1.0, 1.0)


def test_unknown_keys_are_kept_after_the_known_ones():
    recorded = {"path": "/v.safetensors", "sha256": "s", "patch_layer": 1, "patch_scale": 1.0, "kind": "fv", "relation": "r",
                "layer": 1, "from_the_future": [1]}
    assert json.dumps(VectorRecord.from_json(recorded).to_json()) == json.dumps(recorded)


def test_the_leaderboard_reads_the_records_of_the_committed_results():
    from ffv_eval.reports.leaderboard_results import read_entries

    entries, _ = read_entries([PROJECT_ROOT / "leaderboards" / "results" / "analogies"])
    auto = [e for e in entries if e.condition == "auto"]
    assert auto and all(e.vector.task_kind == "cfv" and Path(e.vector.path).name == "basis" for e in auto)
