"""Composite vectors out of the box: the shipped basis and map (and what they were trained on),
`vector=auto` as ffv-patched's default, and the analogy tasks' score of D given C."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ffv_eval import TASKS_DIR, VECTORS_DIR

MODELS = ("gemma-3-270m", "smollm2-135m")


# -- the shipped basis and map -----------------------------------------------------------------
def _test_set_pairs(root: Path) -> set[tuple[str, str]]:
    """Every word pair of the analogy test sets, read straight from the files (both orders,
    lower-cased): an independent reference for basis_sources.analogy_test_pairs."""
    pairs = set()

    def add(a, b):
        a, b = a.strip().lower(), b.strip().lower()
        pairs.update({(a, b), (b, a)})

    for path in (root / "analogy_questions").glob("*/test.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                q = json.loads(line)
                add(*q["stem"])
                for c, d in q["choice"]:
                    add(c, d)
    with (root / "ucla_vat" / "UCLA_VAT.csv").open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if row["A"].strip():
                add(row["A"], row["B"])
                add(row["C"], row["D"])
                add(row["C"], row["D'"])
    for path in (root / "analogy_completion").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                p = json.loads(line)
                add(p["a"], p["b"])
                for answer in p["responses"]:
                    add(p["c"], answer)
    return pairs


@pytest.mark.parametrize("model", MODELS)
def test_no_pair_the_shipped_basis_or_map_trained_on_is_in_a_test_set(model, shared_data):
    """The shipped basis vectors record the hash of their relation's pairs (the first 20 trained
    the vector, the rest made the map's training analogies); the relations rebuilt from the data
    directory hash the same, and none of their pairs is in a test set."""
    from ffv_eval.data.basis_sources import analogy_test_pairs, basis_relations
    from ffv_eval.files.hashes import pairs_sha256

    directory = VECTORS_DIR / model / "basis"
    meta = json.loads((directory / "composite.json").read_text())
    relations = {r.name: r for r in basis_relations(shared_data, exclude=analogy_test_pairs(shared_data))}
    assert set(meta["basis"]) <= set(relations)
    test_pairs = _test_set_pairs(shared_data)
    assert len(test_pairs) > 20000
    for name in meta["basis"]:
        side = json.loads((directory / f"{name}.json").read_text())
        relation = relations[name]
        assert side["data"]["pairs_sha256"] == pairs_sha256(relation.pairs), name
        leaked = {(p.input.lower(), p.output.lower()) for p in relation.pairs} & test_pairs
        assert not leaked, (name, sorted(leaked)[:5])


@pytest.mark.parametrize("model", MODELS)
def test_shipped_map_fitted_on_2000_analogies_and_validated_on_held_out_relations(model):
    from ffv_eval.vectors.composite import load_composite_map

    cmap = load_composite_map(VECTORS_DIR / model / "basis")
    meta = cmap.metadata
    assert meta["analogies"]["fitting"] >= 2000
    held_out = set(meta["held_out_relations"])
    assert held_out and held_out <= set(cmap.basis.names) and meta["analogies"]["validation"] > 0
    assert meta["posterior"] == cmap.posterior_kind and cmap.posterior_kind in meta["metrics"]
    for kind, metrics in meta["metrics"].items():  # what validation measured, for each posterior tried
        for key in ("validation_unpatched", "validation_fitted_map"):
            assert set(metrics[key]) == {"accuracy", "repeats_abc"}, (kind, key)


# -- vector=auto ---------------------------------------------------------------------------------
def _instance(task, doc, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc=doc, arguments=("Q: x\nA:", " y"), idx=idx,
                    metadata=(task, 0, 1))


@pytest.fixture(scope="module")
def auto_lm():
    from ffv_eval.harness.model import FFVPatchedLM

    return FFVPatchedLM(pretrained="gemma-3-270m", batch_size=8)  # no vector=: the default, auto


@pytest.mark.slow
def test_auto_refuses_a_task_without_a_vector_of_its_own(auto_lm):
    from ffv_eval.harness.model import VectorTaskMismatch

    with pytest.raises(VectorTaskMismatch, match=r"vector=auto: task hellaswag .*vector=none"):
        auto_lm.loglikelihood([_instance("hellaswag", {"ctx": "x"})])


@pytest.mark.slow
def test_lm_eval_without_model_args_patches_each_task_with_its_own_vector(auto_lm, shared_data):
    """`lm_eval --model ffv-patched --tasks u2_analogy` with no model_args: a CFV per question
    (recorded per task in the results), log-likelihoods unlike vector=none's; relation_<name>
    gets that relation's shipped FFV."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(shared_data)})

    def run(model, model_args=None):
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["u2_analogy", "relation_antonym"], limit=3,
                                       task_manager=tm, log_samples=True, bootstrap_iters=0)

    auto = run("ffv-patched")  # through lm-eval's registry, as the command line does: no model_args at all
    per_task = auto["config"]["ffv_vector"]["per_task"]
    assert auto["config"]["ffv_vector"]["kind"] == "auto"
    assert per_task["u2_analogy"]["kind"] == "cfv" and Path(per_task["u2_analogy"]["path"]) == VECTORS_DIR / "gemma-3-270m" / "basis"
    assert Path(per_task["relation_antonym"]["path"]) == VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.safetensors"
    plain = run("ffv-patched", "vector=none")
    assert plain["config"]["ffv_vector"] is None

    def lls(out, task):
        return [r[0][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]

    n = 5  # U2: five choices, then each choice's C part (unpatched: the vector would come after it)
    auto_u2, plain_u2 = lls(auto, "u2_analogy"), lls(plain, "u2_analogy")
    for q in range(3):
        whole = slice(2 * n * q, 2 * n * q + n)
        c_part = slice(2 * n * q + n, 2 * n * (q + 1))
        assert max(abs(x - y) for x, y in zip(auto_u2[whole], plain_u2[whole])) > 0.05, q
        assert auto_u2[c_part] == pytest.approx(plain_u2[c_part], abs=1e-4), q  # float32 rounding of other batch shapes
    def generations(out):
        return [s["resps"][0][0] for s in sorted(out["samples"]["relation_antonym"], key=lambda s: s["doc_id"])]

    assert generations(auto) != generations(plain)
    assert auto["results"]["relation_antonym"]["exact_match,none"] > plain["results"]["relation_antonym"]["exact_match,none"]


# -- the score of D given C ------------------------------------------------------------------------
@pytest.mark.slow
def test_acc_d_scores_d_given_c_and_acc_equals_lm_eval_multiple_choice(gemma, shared_data, tmp_path):
    """acc and acc_norm equal lm-eval's own multiple-choice metrics on a copy of the task that
    scores only the whole continuations; acc_d's per-choice score equals log P(D's tokens |
    prompt through C) computed with a plain forward of the model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ffv_eval.harness.model import FFVPatchedLM

    template = (TASKS_DIR / "analogies" / "_analogy_one_shot_template_yaml").read_text()
    (tmp_path / "utils.py").write_text((TASKS_DIR / "analogies" / "utils.py").read_text()
                                       + "\n\ndef whole_choices(doc):\n    return one_shot_choices(doc)[: len(doc['choices'])]\n")
    text = template.replace("doc_to_choice: !function utils.one_shot_choices", "doc_to_choice: !function utils.whole_choices")
    text = text.replace("process_results: !function utils.process_choice_results\n", "")
    text = text.replace("  - metric: acc_d\n    aggregation: mean\n    higher_is_better: true\n", "")
    (tmp_path / "_whole_yaml").write_text(text)
    (tmp_path / "u2_whole.yaml").write_text("include: _whole_yaml\ntask: u2_whole\ndataset_kwargs:\n  analogy_set: u2\n")
    assert text != template
    tm = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], metadata={"data_dir": str(shared_data)})
    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["u2_analogy", "u2_whole"], limit=12, task_manager=tm, log_samples=True,
                                  bootstrap_iters=0)
    ours = {s["doc_id"]: s for s in out["samples"]["u2_analogy"]}
    theirs = {s["doc_id"]: s for s in out["samples"]["u2_whole"]}
    assert len(ours) == len(theirs) == 12
    for doc_id, s in ours.items():
        assert (s["acc"], s["acc_norm"]) == (theirs[doc_id]["acc"], theirs[doc_id]["acc_norm"]), doc_id
    flips = sum(s["acc_d"] != s["acc"] for s in ours.values())
    # acc_d against a plain forward: log P(D | "Q: a\nA: b\n\nQ: c\nA:") for every choice of one question
    model, tok = gemma
    s = ours[0]
    doc, n = s["doc"], len(s["doc"]["choices"])
    lls = [r[0][0] for r in s["resps"]]
    for k, (c, d) in enumerate(doc["choices"]):
        prompt = tok(f"Q: {doc['a']}\nA: {doc['b']}\n\nQ: {c}\nA:").input_ids
        whole = tok(f"Q: {doc['a']}\nA: {doc['b']}\n\nQ: {c}\nA: {d}").input_ids
        assert whole[: len(prompt)] == prompt
        logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        expected = sum(float(logits[i - 1, whole[i]]) for i in range(len(prompt), len(whole)))
        assert lls[k] - lls[n + k] == pytest.approx(expected, abs=2e-3), (k, c, d)
    assert out["results"]["u2_analogy"]["acc_d,none"] == pytest.approx(sum(s["acc_d"] for s in ours.values()) / 12)
    print(f"acc_d differs from acc on {flips} of 12 questions")


def test_repeats_of_a_b_or_c_are_counted_unless_people_gave_them():
    from ffv_eval.data.analogies import completion_scores

    answers, counts = ["bird", "animal"], [5, 2]
    assert completion_scores(" canary", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 1.0
    assert completion_scores(" Cat.", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 1.0
    assert completion_scores(" animal", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 0.0  # someone said it
    assert completion_scores(" bird", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 0.0
    assert completion_scores(" canaries", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 0.0
