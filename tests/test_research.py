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
