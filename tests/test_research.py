"""research/ffv_training_variants.py's derived record: the relation-level scale calibration."""

from research.ffv_training_variants import PER_RELATION_SCALE, per_relation_scale


def _record(correct):
    return {"relations": {"r": {"correct": correct, "n_train": 30}}}


def test_each_half_is_scored_with_the_scale_chosen_on_the_other_half():
    # scale 0.5 answers the even questions, scale 2 the odd ones: each half gets the scale that
    # won the other half, so the calibration scores nothing, where either scale alone scores half
    variants = {"scale-0.5": _record([1.0, 0.0, 1.0, 0.0, 1.0]), "scale-2": _record([0.0, 1.0, 0.0, 1.0, 0.0]),
                "shipped": _record([1.0] * 5)}
    record = per_relation_scale(variants)
    assert record["relations"]["r"] == {"correct": [0.0] * 5, "n_train": 30}
    assert "from 2 scales" in record["settings"]["scale"]


def test_ties_go_to_the_scale_nearest_the_default():
    # every scale answers the odd questions; only 0.9 (nearest the default 0.85) the even ones
    variants = {"scale-0.5": _record([0.0, 1.0, 0.0, 1.0]), "scale-0.9": _record([1.0, 1.0, 1.0, 1.0]),
                "scale-2": _record([0.0, 1.0, 0.0, 1.0])}
    assert per_relation_scale(variants)["relations"]["r"]["correct"] == [1.0, 1.0, 1.0, 1.0]
    assert PER_RELATION_SCALE not in variants


# research/cfv_layer_search.py: each layer's basis, the settings its fit chose, the layer chosen,
# and the results page's check that the shipped basis is the chosen one
def _composite(layer, acc_d, unpatched=0.5, margin=None):
    candidates = [{"posterior": "softmax", "map": "identity", "top_k": 1, "scale": s, "no_relation": margin,
                   "acc_d": {"u2": a, "u4": a, "mean": a}} for s, a in ((0.5, acc_d), (1.0, acc_d - 0.1))]
    return {"format": "ffv-eval/composite/1", "model": "m", "model_fingerprint": "f" * 16, "layer": layer, "basis": ["r0", "r1"],
            "posterior": "softmax", "temperature": 1.0, "top_k": 1,
            "posterior_choice": {"posterior": "softmax", "map": "identity", "top_k": 1, "scale": 0.5, "no_relation": margin, "by": "x"},
            "validation_questions": {"sets": ["u2", "u4"], "questions": {"u2": 3, "u4": 4}, "split": "valid", "metric": "acc_d",
                                     "unpatched": {"u2": unpatched, "u4": unpatched, "mean": unpatched}, "candidates": candidates},
            "validation": {"choosing": {"analogies": 9, "unpatched": {"accuracy": 0.1},
                                        "candidates": [{**{k: c[k] for k in ("posterior", "map", "top_k", "scale", "no_relation")},
                                                        "accuracy": c["acc_d"]["mean"] / 2} for c in candidates]}}}


def test_the_layer_search_keeps_each_layers_choice_and_picks_the_best_on_validation(tmp_path, monkeypatch):
    import json

    import pytest

    from ffv_eval.reports import results_page
    from research import cfv_layer_search

    monkeypatch.setattr(cfv_layer_search, "read_composite_metadata", lambda d: json.loads((d / "composite.json").read_text()))
    monkeypatch.setattr(cfv_layer_search, "function_heads", lambda model: type("H", (), {"layer": 6})())
    for layer, acc in ((4, 0.6), (6, 0.7), (9, 0.7)):
        (tmp_path / f"L{layer}").mkdir()
        (tmp_path / f"L{layer}" / "composite.json").write_text(json.dumps(_composite(layer, acc, margin=2.0 if layer == 9 else None)))
    out = tmp_path / "research" / "cfv-layers-m.json"
    assert cfv_layer_search.main(["--model", "m", *(str(tmp_path / f"L{n}") for n in (9, 4, 6)), "--out", str(out)]) == 0
    search = json.loads(out.read_text())
    assert search["chosen_layer"] == 6 and search["ffv_layer"] == 6  # 6 and 9 tie at 0.7: the FFVs' layer
    assert list(search["layers"]) == ["4", "6", "9"] and search["layers"]["9"]["chosen"]["no_relation"] == 2.0
    assert [t["acc_d"]["mean"] for t in search["layers"]["4"]["tried"]] == [0.6, 0.5]
    assert search["layers"]["4"]["acc_d"]["mean"] == 0.6 and search["layers"]["4"]["held_out"] == {"analogies": 9, "unpatched": 0.1, "chosen": 0.3}

    vectors = tmp_path / "vectors"
    (vectors / "m" / "basis").mkdir(parents=True)
    (vectors / "m" / "basis" / "composite.json").write_text((tmp_path / "L6" / "composite.json").read_text())
    block = results_page.cfv_layers_block(("m",), out.parent, vectors)
    assert "| layer 6 (chosen) | 2 | softmax, identity, top_k 1, scale 0.5, no-relation none (of 2) | 0.700 |" in block
    assert "| layer 9 | 2 | softmax, identity, top_k 1, scale 0.5, no-relation 2 (of 2) | 0.700 |" in block
    assert "The shipped basis is that layer's" in block
    (vectors / "m" / "basis" / "composite.json").write_text((tmp_path / "L4" / "composite.json").read_text())
    block = results_page.cfv_layers_block(("m",), out.parent, vectors)
    assert "**Not shipped yet:** the shipped basis and map (layer 4, softmax" in block
    assert "| shipped (layer 4) | 2 | softmax, identity, top_k 1, scale 0.5, no-relation none | 0.600 |" in block
    (tmp_path / "L4" / "composite.json").write_text(json.dumps(_composite(6, 0.1)))  # a second basis at layer 6
    with pytest.raises(SystemExit, match="a second basis at layer 6"):
        cfv_layer_search.main(["--model", "m", str(tmp_path / "L6"), str(tmp_path / "L4"), "--out", str(out)])
