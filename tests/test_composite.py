"""Composite function vectors: batched basis training, the composite map's algebra, and the
`ffv-patched` placement of a vector where D is predicted. The Gemma 3 270M tests build a small
basis from the project's relations in a temporary directory."""

import json
from types import SimpleNamespace

import pytest
import torch

from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vector, train_function_vectors
from ffv_eval.models.patching import Patcher
from ffv_eval.data.relations import WordPair
from tests.conftest import tiny_llama


class CharTokenizer:
    """Characters to ids 3..102 (ids fit a tiny model's vocabulary); BOS = 1, pad = 0."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [3 + ord(ch) % 100 for ch in text]
        return SimpleNamespace(input_ids=ids)


def _relation(offset: int) -> list[WordPair]:
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]
    return [WordPair(w, words[(i + offset) % len(words)]) for i, w in enumerate(words)]


def test_batched_training_of_several_relations_equals_training_each_alone():
    torch.manual_seed(0)
    patcher = Patcher(tiny_llama())
    tokenizer = CharTokenizer()
    settings = TrainingSettings(steps=8, batch_size=3, seed=3)
    initials = torch.randn(3, 32)
    together = train_function_vectors(patcher, tokenizer, [_relation(k) for k in (1, 2, 3)], 1, initials, settings)
    for k, result in zip((1, 2, 3), together):
        alone = train_function_vector(patcher, tokenizer, _relation(k), 1, initials[k - 1], settings)
        assert torch.allclose(result.vector, alone.vector, atol=1e-5), k
        assert result.losses == pytest.approx(alone.losses, abs=1e-5)
        assert not torch.allclose(result.vector, result.initial_vector)  # it trained


# -- Gemma 3 270M: a small basis of project relations ------------------------------------------
@pytest.fixture(scope="module")
def small_basis(gemma, tmp_path_factory):
    from ffv_eval.vectors.basis import BasisSettings, build_basis
    from ffv_eval.data.basis_sources import basis_relations
    from ffv_eval.vectors.composite import MapSettings, fit_composite_map, save_composite_map, training_analogies
    from ffv_eval.models.loading import model_fingerprint

    model, tok = gemma
    patcher = Patcher(model)
    names = ["project/antonym", "project/country-capital", "project/singular-plural", "project/present-past"]
    relations = [r for r in basis_relations(None, sources=("project",)) if r.name in names]
    directory = tmp_path_factory.mktemp("basis")
    messages = []
    settings = BasisSettings(steps=15, relations_per_pass=4, init_prompts=4)
    basis = build_basis(patcher, tok, "gemma-3-270m", model_fingerprint(model), relations, directory, settings, progress=messages.append)
    analogies = training_analogies(relations, settings.n_pairs, 4, 0)
    cmap = fit_composite_map(patcher, tok, basis, analogies, MapSettings(steps=12, batch_size=8), progress=messages.append)
    save_composite_map(cmap, "gemma-3-270m")
    return SimpleNamespace(patcher=patcher, tok=tok, relations=relations, directory=directory, basis=basis,
                           cmap=cmap, messages=messages, settings=settings, fingerprint=model_fingerprint(model))


@pytest.mark.slow
def test_basis_vectors_are_trained_stored_and_reused(small_basis):
    from ffv_eval.vectors.basis import BasisError, build_basis
    from ffv_eval.vectors.store import load_vector

    b = small_basis
    assert b.basis.vectors.shape == (4, 640)
    for relation in b.relations:
        meta = load_vector(b.directory / f"{relation.name}.safetensors").metadata
        assert meta["kind"] == "basis" and meta["layer"] == b.basis.layer and meta["model_fingerprint"] == b.fingerprint
        assert meta["metrics"]["training_first_token_accuracy"] >= meta["metrics"]["training_first_token_accuracy_at_init"]
    again = []
    build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, b.relations, b.directory, b.settings, progress=again.append)
    assert "4 cached, 0 to train" in again[0]
    changed = [dataclasses_replace(b.relations[0], pairs=b.relations[0].pairs[1:])] + list(b.relations[1:])
    with pytest.raises(BasisError, match="other pairs"):
        build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, changed, b.directory, b.settings)
    with pytest.raises(BasisError, match="fingerprint"):
        build_basis(b.patcher, b.tok, "gemma-3-270m", "0000000000000000", b.relations, b.directory, b.settings)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.slow
def test_posterior_picks_the_relation_of_a_source_pair(small_basis):
    from ffv_eval.vectors.composite import relation_posterior

    from ffv_eval.data.relations import load_relation

    b = small_basis
    # held out: each relation's test pairs, which the basis vectors were not trained on
    held_out = [load_relation(r.name.removeprefix("project/")).test[:5] for r in b.relations]
    for r, pairs in zip(b.relations, held_out):
        assert not {p.input for p in pairs} & {p.input for p in r.pairs}, r.name
    stems = [(p.input, p.output) for pairs in held_out for p in pairs]
    truth = [i for i in range(len(b.relations)) for _ in range(5)]
    posterior = relation_posterior(b.patcher, b.tok, b.basis, stems)
    assert torch.allclose(posterior.sum(-1), torch.ones(len(stems)), atol=1e-5)
    right = sum(int(posterior[k].argmax()) == t for k, t in enumerate(truth))
    assert right >= 0.8 * len(stems), (right, len(stems))


@pytest.mark.slow
def test_composite_map_round_trip_and_bad_input(small_basis, tmp_path):
    from ffv_eval.vectors.basis import BasisError, load_basis
    from ffv_eval.vectors.composite import CompositeVectors, load_composite_map

    b = small_basis
    cmap = load_composite_map(b.directory, b.fingerprint)
    assert cmap.basis.names == b.basis.names and torch.equal(cmap.weight, b.cmap.weight)
    composite = CompositeVectors(b.patcher, b.tok, cmap)
    top = composite.explain("hot", "cold", top=2)
    assert top[0][0] == "project/antonym" and top[0][1] > 0.5
    posterior = composite._cache[("hot", "cold")][0]
    assert torch.allclose(composite.vector("hot", "cold"), (posterior @ cmap.weight.T + cmap.bias) @ cmap.basis.vectors, atol=1e-4)
    with pytest.raises(BasisError, match="fingerprint"):
        load_composite_map(b.directory, "0000000000000000")
    with pytest.raises(BasisError, match="empty basis"):
        load_basis(tmp_path)
    with pytest.raises(BasisError, match="no composite map"):
        load_composite_map(tmp_path)
    with pytest.raises(BasisError, match="cannot encode"):
        composite.prepare([("", "cold")], {("", "cold"): "u2 test.jsonl line 3"})
    meta = json.loads((b.directory / "composite.json").read_text())
    assert meta["basis"] == b.basis.names and meta["layer"] == b.basis.layer


@pytest.mark.slow
def test_cfv_is_patched_where_d_is_predicted_in_lm_eval(small_basis, shared_data):
    import lm_eval

    from ffv_eval.harness.model import FFVPatchedLM

    b = small_basis
    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="cfv", basis=str(b.directory), batch_size=8)
    # the position that predicts D's first token, inside the continuation "Q: C\nA: D"
    context, continuation = "Q: hot\nA: cold\n\n", "Q: tall\nA: short"
    ctx_enc, cont_enc = lm._encode_pair(context, continuation)
    offset = lm._answer_offset((context, continuation), ctx_enc, cont_enc, "short")
    assert cont_enc[offset] == lm.tokenizer(" short", add_special_tokens=False).input_ids[0]
    assert lm.tok_decode(cont_enc[:offset]).rstrip().endswith("A:")

    def run(model):
        return lm_eval.simple_evaluate(model=model, tasks=["u2_analogy"], limit=6, metadata={"data_dir": str(shared_data)},
                                       log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)

    patched = run(lm)
    assert patched["config"]["ffv_vector"]["kind"] == "cfv" and patched["config"]["ffv_vector"]["n_basis"] == 4
    lm.set_vector(None)
    plain = run(lm)
    lp_patched = [r[0][0] for s in patched["samples"]["u2_analogy"] for r in s["resps"]]
    lp_plain = [r[0][0] for s in plain["samples"]["u2_analogy"] for r in s["resps"]]
    assert len(lp_patched) == len(lp_plain) > 6
    assert max(abs(x - y) for x, y in zip(lp_patched, lp_plain)) > 0.05  # the CFV changes D's log-likelihood


@pytest.mark.slow
def test_cached_basis_scores_equal_full_forward_scores(small_basis):
    from ffv_eval.vectors.composite import basis_logprobs
    from ffv_eval.vectors.function_vectors import answer_scores

    b = small_basis
    stems = [("hot", "cold"), ("France", "Paris"), ("mouse", "mice"), ("walk", "walked")]
    cached = basis_logprobs(b.patcher, b.tok, b.basis, stems)
    _, full = answer_scores(b.patcher, b.tok, [WordPair(a, c) for a, c in stems], b.basis.layer, b.basis.vectors)
    assert torch.allclose(cached, full.T, atol=1e-4), (cached - full.T).abs().max()


@pytest.mark.slow
def test_ffv_compose_shows_top_relations_and_weights(small_basis, capsys):
    from ffv_eval.cli import main

    assert main(["compose", "--basis", str(small_basis.directory), "--pair", "France:Paris", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("France:Paris  (CFV norm") and "layer 6" in lines[0]
    name, posterior, weight = lines[2].split()
    assert name == "project/country-capital" and float(posterior) > 0.5
    assert main(["compose", "--basis", str(small_basis.directory), "--pair", "France-Paris"]) == 2
    assert "expected a:b" in capsys.readouterr().err
    assert main(["compose", "--basis", str(small_basis.directory / "nothing"), "--pair", "a:b"]) == 2
    assert "no composite map" in capsys.readouterr().err
