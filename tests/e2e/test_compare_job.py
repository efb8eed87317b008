"""The `ffv compare` job (ffv_eval.evaluation.compare) end to end on the real Gemma 3 270M: zero-shot,
patched and few-shot runs through lm-eval, each zero-shot condition against plain transformers."""

import json

import pytest

from ffv_eval.data.relations import load_relation
from ffv_eval.vectors.store import load_vector
from tests.conftest import first_words_match, reference_generations


@pytest.mark.slow
def test_main_job_compares_zero_shot_patched_and_few_shot(tmp_path, gemma):
    from scipy.stats import sem

    from ffv_eval.evaluation.compare import compare_conditions, format_table

    out = tmp_path / "comparison.json"
    report = compare_conditions("gemma-3-270m", ["antonym"], limit=6, batch_size=8, num_fewshot=3, output=str(out))
    row = report["relations"]["antonym"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # each zero-shot condition against plain transformers on the same 6 test pairs (lm-eval's --limit)
    pairs = [(p.input, p.output) for p in load_relation("antonym").test[:6]]
    hits = {}
    for condition in ("zero_shot", "fv", "ffv", "ffv-random"):
        stored = load_vector(row["vectors"][condition]["path"]) if condition != "zero_shot" else None
        layer, vector = (stored.metadata["layer"], stored.vector) if stored else (None, None)
        generations = reference_generations(gemma, [a for a, _ in pairs], layer, vector)
        hits[condition] = [float(first_words_match(g, b)) for g, (_, b) in zip(generations, pairs)]
        assert row[condition]["exact_match"] == pytest.approx(sum(hits[condition]) / 6), condition
        assert row[condition]["stderr"] == pytest.approx(sem(hits[condition])), condition
    assert sum(hits["ffv"]) > sum(hits["zero_shot"])  # the shipped FFV does what the unpatched model does not
    p = row["3_shot"]["exact_match"]
    assert p * 6 == pytest.approx(round(p * 6)) and row["3_shot"]["stderr"] == pytest.approx((p * (1 - p) / 5) ** 0.5)
    assert row["vectors"]["fv"]["path"].endswith("fv/antonym.safetensors")
    assert "| antonym |" in format_table(report)
