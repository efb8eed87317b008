"""Composite function vectors: batched basis training, the composite map's algebra, and the
`ffv-patched` placement of a vector where D is predicted. The Gemma 3 270M tests build a small
basis from the project's relations in a temporary directory."""

import json
from types import SimpleNamespace

import pytest
import torch

from ffv_eval import VECTORS_DIR
from ffv_eval.data.relations import WordPair
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tiny import tiny_llama
from ffv_eval.vectors.basis import BasisError
from tests.conftest import CharTokenizer


# -- Gemma 3 270M: a small basis of project relations ------------------------------------------
@pytest.fixture(scope="module")
def small_basis(gemma, tmp_path_factory):
    from ffv_eval.data.basis_sources import basis_relations
    from ffv_eval.models.loading import model_fingerprint
    from ffv_eval.vectors.basis import BasisSettings, build_basis
    from ffv_eval.vectors.composite import save_composite_map
    from ffv_eval.vectors.composite_fit import MapSettings, fit_composite_map, training_analogies

    model, tok = gemma
    patcher = Patcher(model)
    names = ["project/antonym", "project/country-capital", "project/singular-plural", "project/present-past"]
    relations = [r for r in basis_relations(None, sources=("project",)) if r.name in names]
    directory = tmp_path_factory.mktemp("basis")
    messages = []
    settings = BasisSettings(steps=15, relations_per_pass=4, init_prompts=4)
    basis = build_basis(patcher, tok, "gemma-3-270m", model_fingerprint(model), relations, directory, settings, progress=messages.append)
    analogies = training_analogies(relations, settings.n_pairs, 4, 2, 0)
    cmap = fit_composite_map(patcher, tok, basis, analogies, MapSettings(steps=12, batch_size=8, posterior="softmax", map="fitted"),
                             progress=messages.append)
    save_composite_map(cmap, "gemma-3-270m")
    return SimpleNamespace(patcher=patcher, tok=tok, relations=relations, directory=directory, basis=basis,
                           cmap=cmap, messages=messages, settings=settings, fingerprint=model_fingerprint(model))


@pytest.mark.slow
def test_basis_vectors_are_trained_stored_and_reused(small_basis, tmp_path):
    from ffv_eval.vectors.basis import BasisError, build_basis
    from ffv_eval.vectors.store import load_vector

    b = small_basis
    assert b.basis.vectors.shape == (4, 640)
    for relation in b.relations:
        meta = load_vector(b.directory / f"{relation.name}.safetensors").metadata
        assert meta["kind"] == "basis" and meta["layer"] == b.basis.layer and meta["model_fingerprint"] == b.fingerprint
        assert meta["metrics"]["training_first_token_accuracy"] >= meta["metrics"]["training_first_token_accuracy_at_init"]
    # the basis vectors are saved as trained, whatever the relation FFVs' scale: the map scales them
    from ffv_eval.vectors.basis import function_heads, starting_vector
    from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vectors

    s = b.settings
    heads = function_heads("gemma-3-270m")
    initials = torch.stack([starting_vector(b.patcher, b.tok, r, heads, s) for r in b.relations])
    trained = train_function_vectors(b.patcher, b.tok, [r.pairs[: s.n_pairs] for r in b.relations], heads.layer, initials,
                                     TrainingSettings(n_pairs=s.n_pairs, steps=s.steps, batch_size=s.batch_size, seed=s.seed,
                                                      loss=s.loss, scale=1.0))
    assert TrainingSettings().scale != 1.0  # so that a basis saved at the default scale would differ by 15%
    torch.testing.assert_close(b.basis.vectors, torch.stack([t.vector for t in trained]), rtol=1e-3, atol=1e-2)
    again = []
    build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, b.relations, b.directory, b.settings, progress=again.append)
    assert "4 cached, 0 to train" in again[0]
    changed = [dataclasses_replace(b.relations[0], pairs=b.relations[0].pairs[1:])] + list(b.relations[1:])
    with pytest.raises(BasisError, match="other pairs"):
        build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, changed, b.directory, b.settings)
    with pytest.raises(BasisError, match="fingerprint"):
        build_basis(b.patcher, b.tok, "gemma-3-270m", "0000000000000000", b.relations, b.directory, b.settings)
    # another layer: its own directory (a cached vector at another block is refused), within the model's blocks
    elsewhere = dataclasses_replace(b.settings, layer=b.basis.layer + 2, steps=2)
    with pytest.raises(BasisError, match=f"added after block {b.basis.layer}, this basis is at block {b.basis.layer + 2}"):
        build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, b.relations, b.directory, elsewhere)
    with pytest.raises(BasisError, match=r"basis layer 18: gemma-3-270m has blocks 0\.\.17"):
        build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, b.relations, tmp_path / "far", dataclasses_replace(elsewhere, layer=18))
    moved = build_basis(b.patcher, b.tok, "gemma-3-270m", b.fingerprint, b.relations[:1], tmp_path / "moved", elsewhere)
    assert moved.layer == b.basis.layer + 2
    assert load_vector(tmp_path / "moved" / f"{b.relations[0].name}.safetensors").metadata["layer"] == moved.layer


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.slow
def test_posterior_picks_the_relation_of_a_source_pair(small_basis):
    from ffv_eval.data.relations import load_relation
    from ffv_eval.vectors.composite import relation_posterior

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
    from ffv_eval.vectors.scoring import answer_scores

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


# -- the posterior and the map on a tiny model ---------------------------------------------------
def _tiny_basis(n=5, seed=7):
    from pathlib import Path

    from ffv_eval.vectors.basis import Basis

    vectors = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)) * 3
    return Basis([f"r{i}" for i in range(n)], vectors, 1, "x", Path("."))


def test_batched_posterior_equals_one_source_pair_per_pass_and_its_baseline_is_unpatched(monkeypatch):
    from ffv_eval.models.tokens import encode_continuation
    from ffv_eval.vectors import composite, scoring

    patcher, tok, basis = Patcher(tiny_llama()), CharTokenizer(), _tiny_basis()
    stems = [("ab", "ba"), ("abc", "cd"), ("x", "yy"), ("cd", "dc"), ("efg", "h")]  # three prompt lengths
    batched = composite.basis_logprobs(patcher, tok, basis, stems, with_baseline=True)
    monkeypatch.setattr(scoring, "ROWS_PER_PASS", len(basis.names) + 1)  # one source pair per pass
    alone = composite.basis_logprobs(patcher, tok, basis, stems, with_baseline=True)
    assert batched.shape == (5, 6) and torch.allclose(batched, alone, atol=1e-5)
    for i, (a, b) in enumerate(stems):  # the last column: a plain forward, no vector
        context, answer = encode_continuation(tok, f"Q: {a}\nA:", f" {b}")
        logits = patcher.model(torch.tensor([context])).logits[0, -1].float()
        assert float(batched[i, -1]) == pytest.approx(float(logits.log_softmax(-1)[answer[0]]), abs=1e-5)
    assert torch.equal(composite.basis_logprobs(patcher, tok, basis, stems), batched[:, :-1])


@pytest.mark.parametrize("kind, k, no_relation", [("softmax", 1, None), ("softmax", 2, None), ("calibrated", 1, None),
                                                  ("softmax", 1, 0.5), ("calibrated", 2, 0.0)])
def test_cfvs_of_a_top_k_map_equal_those_of_the_full_posterior(monkeypatch, kind, k, no_relation):
    """With top_k, CompositeVectors unembeds in full only the relations that can be among a stem's
    k best (scoring.TopRows); the CFVs are those of every relation scored in full."""
    from functools import partial

    from ffv_eval.vectors import composite, scoring

    patcher, tok, basis = Patcher(tiny_llama()), CharTokenizer(), _tiny_basis(10)
    with torch.no_grad():  # sharper next-token distributions than random weights give, as a trained model's
        patcher.adapter.unembedding().weight.mul_(20)
    g = torch.Generator().manual_seed(3)
    cmap = composite.CompositeMap(basis, 0.5 * torch.eye(10) + 0.05 * torch.randn(10, 10, generator=g), 0.01 * torch.randn(10, generator=g),
                                  0.7, kind, torch.randn(10, generator=g) if kind == "calibrated" else None, top_k=k,
                                  no_relation=no_relation)
    stems = [("ab", "ba"), ("abc", "cd"), ("x", "yy"), ("cd", "dc"), ("efg", "h"), ("kl", "lk")]
    monkeypatch.setattr(composite, "TopRows", partial(scoring.TopRows, candidates=10))  # the tiny vocabulary has 120 tokens
    full = composite.basis_logprobs(patcher, tok, basis, stems, with_baseline=True)
    bounded = composite.basis_logprobs(patcher, tok, basis, stems, with_baseline=True, top=cmap.top_rows())
    assert (bounded > full + 1e-3).any()  # some relations were only bounded
    cfvs = composite.CompositeVectors(patcher, tok, cmap)
    cfvs.prepare(stems)
    for stem, posterior, vector in zip(stems, cmap.posterior(full), cmap.vectors(cmap.posterior(full))):
        assert torch.allclose(cfvs._cache[stem][0], posterior, atol=1e-6) and torch.allclose(cfvs.vector(*stem), vector, atol=1e-5)
    if no_relation is not None:  # explained as one more row, at the mass the relations leave
        for stem, mass in zip(stems, cmap.full_posterior(full)[:, -1].tolist()):
            rows = dict((name, p) for name, p, _ in cfvs.explain(*stem, top=11))
            assert rows[composite.NO_RELATION] == pytest.approx(mass, abs=1e-6)


def test_calibrated_posterior_discounts_a_relation_that_raises_every_answer():
    from ffv_eval.vectors.composite import posterior_scores, relation_gains

    # relation 0 raises every answer by 3 nats; relation 1 raises B only for stems 0, 1; relation 2 for stem 2
    unpatched = torch.tensor([[-6.0], [-5.0], [-7.0], [-6.0]])
    gains = torch.tensor([[3.0, 2.5, 0.0], [3.0, 2.8, 0.1], [3.0, 0.0, 2.6], [3.0, 0.2, 0.0]])
    log_probs = torch.cat([unpatched + gains, unpatched], dim=1)
    assert torch.allclose(relation_gains(log_probs), gains)
    baseline = gains.mean(0)
    paper = posterior_scores(log_probs, "softmax").argmax(-1).tolist()
    calibrated = posterior_scores(log_probs, "calibrated", baseline).argmax(-1).tolist()
    assert paper == [0, 0, 0, 0] and calibrated[:3] == [1, 1, 2]


def test_fitted_temperature_is_the_likelihood_optimum():
    from ffv_eval.vectors.composite_fit import fit_temperature

    scores = torch.randn(60, 7, generator=torch.Generator().manual_seed(3)) * 4
    truth = [int(i) for i in (scores + torch.randn(60, 7, generator=torch.Generator().manual_seed(4)) * 3).argmax(-1)]
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(scores.double() / t, torch.tensor(truth)) for t in grid])
    best = float(grid[nll.argmin()])
    assert fit_temperature(scores, truth) == pytest.approx(best, rel=0.01)
    assert fit_temperature(scores * 10, truth) == pytest.approx(best * 10, rel=0.01)


def test_map_fit_holds_relations_out_and_keeps_what_validation_supports(tmp_path):
    from ffv_eval.vectors.basis import Basis
    from ffv_eval.vectors.composite import load_composite_map, save_composite_map
    from ffv_eval.vectors.composite_fit import Analogy, MapSettings, fit_composite_map
    from ffv_eval.vectors.store import save_vector

    patcher, tok = Patcher(tiny_llama()), CharTokenizer()
    basis = _tiny_basis(4)
    basis = Basis(basis.names, basis.vectors, 1, "f" * 16, tmp_path)
    words = ["ab", "cd", "ef", "gh", "ij", "kl"]
    analogies = [Analogy(a, b, c, d, f"r{k}") for k in range(4)
                 for (a, b), (c, d) in zip(zip(words, words[k + 1:] + words), zip(words[1:], words[k + 2:] + words))]
    messages = []
    settings = MapSettings(steps=4, batch_size=4, held_out_relations=0.5, top_k=(0, 1), scales=(1.0, 2.0), no_relation=(None, 0.5))
    cmap = fit_composite_map(patcher, tok, basis, analogies, settings, messages.append)
    meta = cmap.metadata
    held = meta["held_out_relations"]
    (choosing,), (reporting,) = held["choosing"], held["reporting"]
    assert choosing != reporting and {choosing, reporting} < set(basis.names)
    assert meta["analogies"] == {"fitting": sum(x.relation not in (choosing, reporting) for x in analogies),
                                 "choosing": sum(x.relation == choosing for x in analogies),
                                 "reporting": sum(x.relation == reporting for x in analogies),
                                 "final_fit": len(analogies), "source_pairs": len({(x.a, x.b) for x in analogies})}
    validation = meta["validation"]
    assert validation["basis_relations"] == 2  # the held-out relations are absent from the basis while choosing
    tried = validation["choosing"]["candidates"]
    # 2 posteriors x (the fitted map, and W = s I for 2 top_k x 2 scales x 2 no-relation margins)
    assert len(tried) == 2 * (1 + 2 * 2 * 2) and {t["posterior"] for t in tried} == {"softmax", "calibrated"}
    assert {t["no_relation"] for t in tried if t["map"] == "identity"} == {None, 0.5}
    assert {t["no_relation"] for t in tried if t["map"] == "fitted"} == {None}
    best = max(t["accuracy"] for t in tried)
    choice = meta["posterior_choice"]
    winner = [t for t in tried if all(t[k] == choice[k] for k in ("posterior", "map", "top_k", "scale", "no_relation"))]
    assert winner and winner[0]["accuracy"] == best and cmap.posterior_kind == choice["posterior"] and cmap.top_k == choice["top_k"]
    assert cmap.no_relation == choice["no_relation"]
    assert set(validation["reporting"]) >= {"relations", "unpatched", "chosen", "paper"}
    assert len(cmap.basis.names) == 4  # the shipped map uses the whole basis again
    if choice["map"] == "identity":
        assert torch.equal(cmap.weight, torch.eye(4) * choice["scale"]) and torch.equal(cmap.bias, torch.zeros(4))
    # a calibrated map round-trips with its relation baseline; without it, loading names the tensor
    for name, vector in zip(basis.names, basis.vectors):
        save_vector(tmp_path / f"{name}.safetensors", vector, {"kind": "basis", "relation": name, "model_fingerprint": "f" * 16, "layer": 1})
    forced = fit_composite_map(patcher, tok, basis, analogies, MapSettings(steps=2, batch_size=4, posterior="calibrated", map="fitted"))
    save_composite_map(forced, "tiny")
    loaded = load_composite_map(tmp_path, "f" * 16)
    assert loaded.posterior_kind == "calibrated" and torch.equal(loaded.relation_baseline, forced.relation_baseline)
    log_probs = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loaded.posterior(log_probs), forced.posterior(log_probs))
    from safetensors.torch import save_file

    save_file({"weight": forced.weight, "bias": forced.bias}, str(tmp_path / "composite.safetensors"))
    with pytest.raises(BasisError, match="relation_baseline"):
        load_composite_map(tmp_path, "f" * 16)


def test_validation_questions_choose_the_settings_by_acc_d(tmp_path):
    """With validation questions, every candidate (fitted on all analogies, the full basis) is
    scored by acc_d on them; the best mean over the question sets is the map returned, and its
    recorded figure is what the returned map scores."""
    from ffv_eval.vectors.basis import Basis
    from ffv_eval.vectors.composite import basis_logprobs
    from ffv_eval.vectors.composite_fit import Analogy, MapSettings, fit_composite_map
    from ffv_eval.vectors.composite_questions import ChoiceQuestion, QuestionScorer

    patcher, tok = Patcher(tiny_llama()), CharTokenizer()
    basis = _tiny_basis(4)
    basis = Basis(basis.names, basis.vectors * 4, 1, "f" * 16, tmp_path)
    words = ["ab", "cd", "ef", "gh", "ij", "kl"]
    analogies = [Analogy(a, b, c, d, f"r{k}") for k in range(4)
                 for (a, b), (c, d) in zip(zip(words, words[k + 1:] + words), zip(words[1:], words[k + 2:] + words))]
    questions = [ChoiceQuestion("u2", "ab", "ba", (("cd", "dc"), ("ef", "gh"), ("ij", "x")), 0),
                 ChoiceQuestion("u2", "kl", "lk", (("mn", "op"), ("qr", "rq")), 1),
                 ChoiceQuestion("google", "ab", "cd", (("ef", "gh"), ("ij", "ji"), ("kl", "k")), 0)]
    messages = []
    settings = MapSettings(steps=3, batch_size=4, held_out_relations=0.5, top_k=(0, 1), scales=(0.5, 4.0))
    cmap = fit_composite_map(patcher, tok, basis, analogies, settings, messages.append, questions)
    meta = cmap.metadata
    on = meta["validation_questions"]
    assert on["sets"] == ["u2", "google"] and on["questions"] == {"u2": 2, "google": 1} and on["split"] == "valid"
    tried = on["candidates"]
    assert len(tried) == 2 * (1 + 2 * 2) and all(set(t["acc_d"]) == {"u2", "google", "mean"} for t in tried)
    choice = meta["posterior_choice"]
    assert choice["by"].startswith("acc_d on the valid splits of u2, google")
    key = ("posterior", "map", "top_k", "scale")
    chosen = [t for t in tried if all(t[k] == choice[k] for k in key)][0]
    assert chosen["acc_d"]["mean"] == max(t["acc_d"]["mean"] for t in tried)
    # ties on the questions go to the held-out relations' accuracy
    relation = {tuple(t[k] for k in key): t["accuracy"] for t in meta["validation"]["choosing"]["candidates"]}
    tied = [tuple(t[k] for k in key) for t in tried if t["acc_d"]["mean"] == chosen["acc_d"]["mean"]]
    assert relation[tuple(choice[k] for k in key)] == max(relation[t] for t in tied)
    rows = basis_logprobs(patcher, tok, cmap.basis, [(q.a, q.b) for q in questions], with_baseline=True)
    again = QuestionScorer(patcher, tok, questions, cmap.basis.layer).acc_d([None, cmap.vectors(cmap.posterior(rows))])
    assert again[1] == chosen["acc_d"] and again[0] == on["unpatched"]


# -- the shipped map --------------------------------------------------------------------------------
MODELS = ("gemma-3-270m", "smollm2-135m")


@pytest.mark.parametrize("model", MODELS)
def test_shipped_map_fitted_on_2000_analogies_and_chosen_on_relations_absent_from_the_basis(model):
    from ffv_eval.reports.results_page import candidate_setting, find_candidate
    from ffv_eval.vectors.composite import load_composite_map

    cmap = load_composite_map(VECTORS_DIR / model / "basis")
    meta = cmap.metadata
    assert meta["analogies"]["final_fit"] >= 2000
    held = meta["held_out_relations"]
    choosing, reporting = set(held["choosing"]), set(held["reporting"])
    assert choosing and reporting and not choosing & reporting and choosing | reporting <= set(cmap.basis.names)
    validation = meta["validation"]
    assert validation["basis_relations"] == len(cmap.basis.names) - len(choosing | reporting)
    choice = meta["posterior_choice"]
    assert (cmap.posterior_kind, cmap.top_k, cmap.no_relation) == (choice["posterior"], choice["top_k"], choice.get("no_relation"))
    tried = validation["choosing"]["candidates"]
    chosen = find_candidate(tried, candidate_setting(choice))
    on_questions = meta.get("validation_questions")
    if on_questions:  # chosen by acc_d on the valid splits of the question sets
        assert set(on_questions["sets"]) == {"u2", "u4", "bats", "google"} and on_questions["split"] == "valid"
        by_questions = find_candidate(on_questions["candidates"], candidate_setting(choice))
        assert by_questions["acc_d"]["mean"] == max(t["acc_d"]["mean"] for t in on_questions["candidates"])
    else:
        assert chosen and chosen["accuracy"] == max(t["accuracy"] for t in tried)
    for key in ("unpatched", "chosen"):  # what the held-out reporting relations measured
        assert set(validation["reporting"][key]) == {"accuracy", "repeats_abc"}, key


def test_keep_top_keeps_each_rows_k_largest_renormalised():
    from ffv_eval.vectors.composite import keep_top

    posterior = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.45, 0.0, 0.2, 0.35]])
    assert torch.allclose(keep_top(posterior, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(keep_top(posterior, 2), torch.tensor([[0.0, 0.5 / 0.8, 0.3 / 0.8, 0.0], [0.45 / 0.8, 0.0, 0.0, 0.35 / 0.8]]))
    assert torch.equal(keep_top(posterior, 0), posterior) and torch.equal(keep_top(posterior, 4), posterior)


def test_a_map_keeps_its_top_k_through_the_file_and_a_bad_one_is_named(tmp_path):
    from ffv_eval.vectors.basis import Basis
    from ffv_eval.vectors.composite import CompositeMap, load_composite_map, save_composite_map
    from ffv_eval.vectors.store import save_vector

    basis = _tiny_basis(3)
    basis = Basis(basis.names, basis.vectors, 1, "f" * 16, tmp_path)
    for name, vector in zip(basis.names, basis.vectors):
        save_vector(tmp_path / f"{name}.safetensors", vector, {"kind": "basis", "relation": name, "model_fingerprint": "f" * 16, "layer": 1})
    save_composite_map(CompositeMap(basis, torch.eye(3) * 2, torch.zeros(3), 1.0, top_k=1), "tiny")
    loaded = load_composite_map(tmp_path, "f" * 16)
    assert loaded.top_k == 1
    log_probs = torch.tensor([[-1.0, -3.0, -2.0, -5.0]])  # three relations and the no-vector column
    assert torch.equal(loaded.posterior(log_probs), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(loaded.vectors(loaded.posterior(log_probs)), 2 * basis.vectors[0][None])
    side = tmp_path / "composite.json"
    side.write_text(side.read_text().replace('"top_k": 1', '"top_k": -2'))
    with pytest.raises(BasisError, match=r"composite.json: field 'top_k' is -2, expected a whole number >= 0"):
        load_composite_map(tmp_path, "f" * 16)


def test_the_no_relation_option_takes_the_pairs_no_relation_maps_better_than_the_bare_prompt(tmp_path):
    """With a no-relation margin m, the option scores the bare prompt's log P(B) + m (softmax) or
    a gain of m (calibrated); the mass it takes adds no vector; it survives the file, and a bad
    margin is named."""
    from ffv_eval.vectors.basis import Basis
    from ffv_eval.vectors.composite import CompositeMap, load_composite_map, save_composite_map
    from ffv_eval.vectors.store import save_vector

    basis = _tiny_basis(3)
    basis = Basis(basis.names, basis.vectors, 1, "f" * 16, tmp_path)
    for name, vector in zip(basis.names, basis.vectors):
        save_vector(tmp_path / f"{name}.safetensors", vector, {"kind": "basis", "relation": name, "model_fingerprint": "f" * 16, "layer": 1})
    # stem 0: relation 0 raises B by 2 nats over the bare prompt; stem 1: no relation raises it
    log_probs = torch.tensor([[-1.0, -3.0, -2.0, -3.0], [-4.0, -3.5, -5.0, -3.0]])
    gated = CompositeMap(basis, torch.eye(3), torch.zeros(3), 1.0, top_k=1, no_relation=1.0)
    assert torch.equal(gated.posterior(log_probs), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(gated.vectors(gated.posterior(log_probs))[1], torch.zeros(basis.vectors.shape[1]))
    strict = CompositeMap(basis, torch.eye(3), torch.zeros(3), 1.0, top_k=1, no_relation=2.5)  # 2 nats is not enough
    assert not strict.posterior(log_probs).any()
    soft = CompositeMap(basis, torch.eye(3), torch.zeros(3), 1.0, no_relation=0.0)  # every relation and the option share
    expected = torch.softmax(log_probs, -1)
    assert torch.allclose(soft.posterior(log_probs), expected[:, :3]) and torch.allclose(soft.full_posterior(log_probs), expected)
    calibrated = CompositeMap(basis, torch.eye(3), torch.zeros(3), 1.0, "calibrated", torch.tensor([1.5, 0.0, 1.5]), top_k=1,
                              no_relation=0.0)  # relation 0's gain of 2 less its baseline 1.5 still beats a gain of 0
    assert torch.equal(calibrated.posterior(log_probs), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert CompositeMap(basis, torch.eye(3), torch.zeros(3), 1.0).posterior(log_probs).sum(-1).allclose(torch.ones(2))

    save_composite_map(gated, "tiny")
    loaded = load_composite_map(tmp_path, "f" * 16)
    assert loaded.no_relation == 1.0 and torch.equal(loaded.posterior(log_probs), gated.posterior(log_probs))
    side = tmp_path / "composite.json"
    side.write_text(side.read_text().replace('"no_relation": 1.0', '"no_relation": "high"'))
    with pytest.raises(BasisError, match=r"composite.json: field 'no_relation' is 'high', expected a number"):
        load_composite_map(tmp_path, "f" * 16)


@pytest.mark.parametrize(("settings", "message"), [({"top_k": (-1,)}, r"top_k \[-1\]: expected whole numbers >= 0"),
                                                  ({"top_k": ()}, "top_k"), ({"scales": (1.0, 0.0)}, r"scales \[1.0, 0.0\]"),
                                                  ({"no_relation": (None, "high")}, r"no_relation \[None, 'high'\]: expected margins"),
                                                  ({"no_relation": ()}, "no_relation"),
                                                  ({"posterior": "sharp"}, "posterior='sharp'"), ({"map": "linear"}, "map='linear'"),
                                                  ({"question_sets": ("sat",)}, r"question sets \['sat'\]: expected some of u2"),
                                                  ({"questions_per_set": -1}, "questions_per_set -1")])
def test_bad_map_settings_fail_when_made_before_any_model_work(settings, message):
    from ffv_eval.vectors.composite_fit import MapSettings

    with pytest.raises(BasisError, match=message):
        MapSettings(**settings)


def test_question_scores_equal_a_plain_forward_with_the_vector_where_d_starts(monkeypatch):
    """QuestionScorer's cached, batched scores of every choice under several settings equal one
    plain forward per choice (prompt + D, the vector added by a hook at the prompt's last token),
    and acc_d is the argmax per question, per set."""
    from ffv_eval.models.tokens import encode_continuation
    from ffv_eval.vectors import scoring
    from ffv_eval.vectors.composite_questions import ChoiceQuestion, QuestionScorer

    model, tok = tiny_llama(), CharTokenizer()
    patcher, layer = Patcher(model), 1
    questions = [ChoiceQuestion("u2", "ab", "ba", (("cd", "dc"), ("efg", "gf"), ("x", "yyy")), 0),
                 ChoiceQuestion("bats", "hot", "cold", (("up", "down"), ("in", "o")), 1)]
    settings = [None, torch.randn(2, 32) * 3, torch.randn(2, 32) * 3]
    scorer = QuestionScorer(patcher, tok, questions, layer)
    got = scorer.choice_scores(settings)
    assert got.shape == (3, 5)
    monkeypatch.setattr(scoring, "ROWS_PER_PASS", 1)  # one (choice, setting) row per pass: the same scores
    assert torch.allclose(scorer.choice_scores(settings), got, atol=1e-5)
    column = 0
    for qi, q in enumerate(questions):
        for c, d in q.choices:
            context, answer = encode_continuation(tok, f"Q: {q.a}\nA: {q.b}\n\nQ: {c}\nA:", f" {d}")
            for si, s in enumerate(settings):
                def add(module, args, output, v=None if s is None else s[qi], at=len(context) - 1):
                    hidden = output[0] if isinstance(output, tuple) else output
                    if v is not None:
                        hidden[0, at] += v
                handle = model.model.layers[layer].register_forward_hook(add)
                try:
                    logits = model(torch.tensor([context + answer[:-1]])).logits[0].detach().float().log_softmax(-1)
                finally:
                    handle.remove()
                expected = sum(float(logits[len(context) - 1 + t, token]) for t, token in enumerate(answer))
                assert float(got[si, column]) == pytest.approx(expected, abs=1e-4)
            column += 1
    for si, row in enumerate(scorer.acc_d(settings)):
        u2 = float(int(got[si, :3].argmax()) == 0)
        bats = float(int(got[si, 3:].argmax()) == 1)
        assert row == {"u2": u2, "bats": bats, "mean": (u2 + bats) / 2}


def test_validation_questions_skip_sets_without_a_valid_split(tmp_path):
    """Only the sets whose valid.jsonl is in the data directory, each cut to its first per_set."""
    from ffv_eval.vectors.composite_questions import ChoiceQuestion, validation_questions

    folder = tmp_path / "analogy_questions" / "u2"
    folder.mkdir(parents=True)
    rows = [{"stem": ["hot", "cold"], "answer": 1, "choice": [["up", "up"], ["big", "small"]]},
            {"stem": ["cat", "kitten"], "answer": 0, "choice": [["dog", "puppy"], ["cow", "milk"]]}]
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validation_questions(tmp_path, ("u2", "u4", "bats", "google"), per_set=1) == [
        ChoiceQuestion("u2", "hot", "cold", (("up", "up"), ("big", "small")), 1)]
    assert len(validation_questions(tmp_path, ("u2", "google"))) == 2


@pytest.mark.slow
def test_shipped_gemma_map_gets_the_same_cfvs_from_its_top_relations_alone(gemma):
    """gemma-3-270m's shipped map keeps one relation per source pair (top_k 1): the posterior
    unembeds in full only the relations whose bound can reach the best (scoring.TopRows), and
    the CFVs are those of all 78 relations scored in full."""
    from ffv_eval.vectors import composite

    model, tok = gemma
    patcher = Patcher(model)
    cmap = composite.load_composite_map(VECTORS_DIR / "gemma-3-270m" / "basis")
    assert cmap.top_k == 1 and cmap.top_rows() is not None
    stems = [("hot", "cold"), ("France", "Paris"), ("mouse", "mice"), ("walk", "walked"), ("dog", "puppy"), ("big", "bigger"),
             ("Japan", "yen"), ("cat", "kitten"), ("good", "best"), ("happy", "sad"), ("sing", "sang"), ("car", "cars"),
             ("Italy", "Italian"), ("doctor", "hospital"), ("bread", "pain"), ("red", "rouge")]
    full = composite.basis_logprobs(patcher, tok, cmap.basis, stems, with_baseline=True)
    bounded = composite.basis_logprobs(patcher, tok, cmap.basis, stems, with_baseline=True, top=cmap.top_rows())
    assert (bounded >= full - 1e-4).all() and (bounded > full + 1e-3).sum() > len(stems) * 60  # most relations only bounded
    assert torch.equal(bounded.argmax(-1), full.argmax(-1)) and torch.equal(cmap.posterior(bounded), cmap.posterior(full))
    cfvs = composite.CompositeVectors(patcher, tok, cmap)
    cfvs.prepare(stems)
    assert all(torch.equal(cfvs.vector(*stem), v) for stem, v in zip(stems, cmap.vectors(cmap.posterior(full))))


@pytest.mark.parametrize("layer", [-1, 2.5, True])
def test_a_bad_basis_layer_fails_when_the_settings_are_made(layer):
    from ffv_eval.vectors.basis import BasisSettings

    with pytest.raises(BasisError, match=f"basis layer {layer!r}: expected a block index >= 0"):
        BasisSettings(layer=layer)
