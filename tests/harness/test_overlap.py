"""ffv-patched checks every test document it patches against the training pairs of its vector:
the record in lm-eval's results, the report line, and overlap=error refusing before any forward
pass. A tiny random checkpoint and a vector file made for it; a test set written here."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from ffv_eval.data.overlap import pair_key
from ffv_eval.harness.model import FFVPatchedLM, OverlapError
from ffv_eval.models.loading import model_fingerprint
from ffv_eval.vectors.store import save_vector
from tests.conftest import tiny_checkpoint

TRAINING = [("grandsons", "granddaughters"), ("keys", "car"), ("hot", "cold"), ("New_York", "usa"), ("lamb", "sheep")]
# (stem, choices): overlapping pairs inflected, reversed, underscored and in mixed case
QUESTIONS = [
    (("grandson", "granddaughter"), [("up", "down"), ("sun", "moon")]),  # inflected stem
    (("tall", "short"), [("cold", "HOT"), ("left", "right")]),  # a reversed choice, mixed case
    (("new york", "USA"), [("paris", "france"), ("rome", "italy")]),  # underscore vs space
    (("big", "small"), [("wet", "dry"), ("key", "car")]),  # singular vs plural
    (("dog", "puppy"), [("cat", "kitten"), ("cow", "calf")]),  # clean
    (("fast", "slow"), [("early", "late"), ("day", "night")]),  # clean
]


def _own_count():
    """The test's own count: a document overlaps when one of its pairs equals a training pair
    after lower-casing, '_' -> ' ', and the plural/inflection twins listed here, in either order."""
    twins = {"grandsons": "grandson", "granddaughters": "granddaughter", "keys": "key", "new_york": "new york"}

    def norm(word):
        word = word.lower().strip()
        return twins.get(word, word).replace("_", " ")

    trained = {frozenset((norm(a), norm(b))) for a, b in TRAINING}
    hits = [i for i, (stem, choices) in enumerate(QUESTIONS) if any(frozenset((norm(a), norm(b))) in trained for a, b in [stem, *choices])]
    return len(hits), len(QUESTIONS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    model, path = tiny_checkpoint(tmp, dtype=torch.float32)
    meta = {"kind": "ffv", "relation": "toy", "model": "tiny", "model_fingerprint": model_fingerprint(model), "layer": 1,
            "training_pairs": [list(p) for p in TRAINING]}
    vector = save_vector(tmp / "toy.safetensors", torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)), meta)
    return path, vector


def _requests(task="u2_analogy"):
    out = []
    for doc_id, ((a, b), choices) in enumerate(QUESTIONS):
        doc = {"a": a, "b": b, "choices": [list(c) for c in choices], "answer": 0}
        for idx, (c, d) in enumerate(choices):
            out.append(Instance("loglikelihood", doc, (f"Q: {a}\nA: {b}\n\nQ: {c}\nA:", f" {d}"), idx, metadata=(task, doc_id, 1)))
    return out


def test_overlap_is_recorded_per_task_as_counted_independently(setup):
    path, vector = setup
    lm = FFVPatchedLM(pretrained=path, vector=str(vector), batch_size=4, device="cpu")
    lm.loglikelihood(_requests())
    recorded = lm.get_model_info()["ffv_vector"]["overlap"]["u2_analogy"]
    documents, of = _own_count()
    assert (recorded["documents"], recorded["of"]) == (documents, of) == (4, 6)
    assert {pair_key(*p) for p in recorded["pairs"]} == {pair_key(*p) for p in TRAINING[:4]}
    assert all(tuple(p) in {pair for stem, choices in QUESTIONS for pair in [stem, *choices]} for p in recorded["pairs"])


def test_overlap_error_refuses_before_any_forward_pass(setup):
    path, vector = setup
    lm = FFVPatchedLM(pretrained=path, vector=str(vector), batch_size=4, device="cpu", overlap="error")
    calls = []
    lm.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(OverlapError, match=r"u2_analogy: 4 of 6 documents .*grandson:granddaughter"):
        lm.loglikelihood(_requests())
    assert calls == []


def test_a_vector_without_recorded_pairs_is_reported_unchecked_and_refused_under_error(setup, tmp_path):
    path, vector = setup
    meta = json.loads(vector.with_suffix(".json").read_text())
    del meta["training_pairs"]
    old = tmp_path / "old.safetensors"
    old.write_bytes(vector.read_bytes())
    old.with_suffix(".json").write_text(json.dumps(meta))
    lm = FFVPatchedLM(pretrained=path, vector=str(old), batch_size=4, device="cpu")
    lm.loglikelihood(_requests())
    recorded = lm.get_model_info()["ffv_vector"]["overlap"]["u2_analogy"]
    assert recorded["documents"] is None and recorded["of"] == 6 and "records no training pairs" in recorded["unchecked"]
    strict = FFVPatchedLM(pretrained=path, vector=str(old), batch_size=4, device="cpu", overlap="error")
    with pytest.raises(OverlapError, match="not checked"):
        strict.loglikelihood(_requests())


def test_an_unknown_overlap_mode_is_refused_before_the_model_loads():
    from ffv_eval.errors import SettingError

    with pytest.raises(SettingError, match="overlap=maybe: expected warn or error"):
        FFVPatchedLM(pretrained="/nonexistent/model", vector="none", overlap="maybe")


@pytest.mark.slow
def test_lm_eval_run_on_a_test_set_in_a_data_directory_records_the_overlap(setup, tmp_path):
    """Through lm-eval: u2_analogy read from a temporary data directory holding QUESTIONS."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR

    path, vector = setup
    folder = tmp_path / "analogy_questions" / "u2"
    folder.mkdir(parents=True)
    lines = [json.dumps({"stem": list(stem), "choice": [list(c) for c in choices], "answer": 0, "prefix": ""})
             for stem, choices in QUESTIONS]
    for split in ("test", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(tmp_path)})
    lm = FFVPatchedLM(pretrained=path, vector=str(vector), batch_size=4, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["u2_analogy"], task_manager=manager, num_fewshot=0)
    recorded = out["config"]["ffv_vector"]["overlap"]["u2_analogy"]
    assert (recorded["documents"], recorded["of"]) == _own_count()
    strict = FFVPatchedLM(pretrained=path, vector=str(vector), batch_size=4, device="cpu", overlap="error")
    with pytest.raises(OverlapError, match="u2_analogy: 4 of 6 documents"):
        lm_eval.simple_evaluate(model=strict, tasks=["u2_analogy"], task_manager=manager, num_fewshot=0)
