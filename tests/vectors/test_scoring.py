"""Logits bounded to LOGIT_ROWS rows at a time (ffv_eval.vectors.scoring): answer scores, mediation,
the basis posterior, training and the composite map's fit unembed at most that many rows per
call and give the unbounded results."""

import random
from pathlib import Path

import pytest
import torch

from ffv_eval.models import tokens
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tiny import tiny_llama
from ffv_eval.vectors import function_vectors as fv
from ffv_eval.vectors import scoring
from ffv_eval.vectors.basis import Basis
from ffv_eval.vectors.composite import basis_logprobs
from ffv_eval.vectors.composite_fit import Analogy, MapSettings, fit_composite_map
from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vectors
from tests.conftest import PAIRS, CharTokenizer, same_values


class RowCounter:
    """Wraps an adapter's unembedding and records the rows of every call."""

    def __init__(self, adapter):
        self.inner, self.rows, self.subsets = adapter.unembed, [], []
        adapter.unembed = self

    def __call__(self, hidden, token_ids=None):
        self.rows.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        self.subsets.append(token_ids)
        return self.inner(hidden, token_ids)


def _bounded_and_unbounded(monkeypatch, run, rows=3):
    """run(patcher) with LOGIT_ROWS = rows (and the unembedding's row counts), then unbounded."""
    patcher = Patcher(tiny_llama())
    counter = RowCounter(patcher.adapter)
    monkeypatch.setattr(scoring, "LOGIT_ROWS", rows)
    bounded = run(patcher)
    seen = list(counter.rows)
    monkeypatch.setattr(scoring, "LOGIT_ROWS", 10**9)
    return bounded, run(patcher), seen


def test_answer_scores_unembed_at_most_logit_rows_and_equal_the_unchunked_scores(monkeypatch):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    bounded, full, rows = _bounded_and_unbounded(monkeypatch, lambda p: scoring.answer_scores(p, CharTokenizer(), PAIRS, 1, vectors))
    assert max(rows) == 3 and sum(rows) == 3 * len(PAIRS)
    assert same_values(bounded, full) and bounded[0].shape == (3, len(PAIRS))


def test_mediation_batches_hold_at_most_logit_rows(monkeypatch):
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(2)], answer_ids=[5, 17])
    heads = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    bounded, full, rows = _bounded_and_unbounded(monkeypatch, lambda p: fv.indirect_effects(p, prompts, heads, head_batch=128))
    assert max(rows) == 3 and bounded.abs().max() > 1e-4 and same_values(bounded, full)


def test_basis_posterior_unembeds_at_most_logit_rows(monkeypatch):
    basis = Basis([f"r{i}" for i in range(7)], torch.randn(7, 32, generator=torch.Generator().manual_seed(2)), 1, "x", Path("."))
    stems = [("ab", "ba"), ("cd", "dc")]
    bounded, full, rows = _bounded_and_unbounded(monkeypatch, lambda p: basis_logprobs(p, CharTokenizer(), basis, stems))
    assert max(rows) == 3 and bounded.shape == (2, 7) and same_values(bounded, full)


def test_top_rows_unembed_at_most_logit_rows_in_full_and_wait_in_bounded_groups(monkeypatch):
    """TopRows: every full-vocabulary unembedding (the reference's, the best vectors') holds at
    most LOGIT_ROWS rows, and prompts wait for their bounds at most BOUNDED_PROMPTS at a time,
    with the same scores."""
    basis = Basis([f"r{i}" for i in range(7)], torch.randn(7, 32, generator=torch.Generator().manual_seed(2)) * 3, 1, "x", Path("."))
    stems = [("ab", "ba"), ("cd", "dc"), ("efg", "gf"), ("h", "ij")]
    top = scoring.TopRows(k=2, reference=7, candidates=5)
    full_counts = []

    def run(p):
        counter = RowCounter(p.adapter)
        out = basis_logprobs(p, CharTokenizer(), basis, stems, with_baseline=True, top=top)
        full_counts.append([r for r, subset in zip(counter.rows, counter.subsets) if subset is None])
        p.adapter.unembed = counter.inner
        return out

    monkeypatch.setattr(scoring, "BOUNDED_PROMPTS", 3)
    bounded, full, _ = _bounded_and_unbounded(monkeypatch, run)
    assert max(full_counts[0]) <= 3 and same_values(bounded, full)
    monkeypatch.setattr(scoring, "BOUNDED_PROMPTS", 1)
    assert same_values(run(Patcher(tiny_llama())), full)  # one prompt's bounds at a time


def test_training_with_bounded_logits_equals_unbounded_training(monkeypatch):
    initials = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    settings = TrainingSettings(n_pairs=5, steps=4, batch_size=4)
    bounded, full, rows = _bounded_and_unbounded(
        monkeypatch, lambda p: train_function_vectors(p, CharTokenizer(), [PAIRS[:5], PAIRS[2:]], 1, initials, settings))
    assert max(rows) == 3  # 8 rows per step, forward and recomputed in backward
    for b, f in zip(bounded, full):
        assert same_values(b.vector, f.vector) and b.losses == pytest.approx(f.losses, abs=1e-6)
        assert not torch.equal(b.vector, b.initial_vector)


def test_composite_map_fit_with_bounded_logits_equals_unbounded(monkeypatch):
    basis = Basis(["a", "b", "c"], torch.randn(3, 32, generator=torch.Generator().manual_seed(4)), 1, "x", Path("."))
    analogies = [Analogy(p.input, p.output, q.input, q.output, "a") for p, q in zip(PAIRS, PAIRS[1:])]

    def fit(patcher):
        return fit_composite_map(patcher, CharTokenizer(), basis, analogies, MapSettings(steps=3, batch_size=5)).weight

    bounded, full, rows = _bounded_and_unbounded(monkeypatch, fit)
    assert max(rows) == 3 and same_values(bounded, full) and not torch.equal(bounded, torch.eye(3))


# -- only the best vectors exact (TopRows) -----------------------------------------------------------
def _tail_inputs(n=12, seed=4):
    from ffv_eval.models.tokens import encode_continuation

    tok = CharTokenizer()
    vectors = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)) * 3
    vectors[-1] = 0  # the reference column: no vector
    stems = [("ab", "ba"), ("abc", "cde"), ("x", "yy"), ("cd", "dc"), ("efg", "h")]  # several prompt and answer lengths
    encoded = [encode_continuation(tok, f"Q: {a}\nA:", f" {b}") for a, b in stems]
    return vectors, [c for c, _ in encoded], [a for _, a in encoded]


@pytest.mark.parametrize("k", [1, 3])
def test_top_rows_are_exact_for_the_best_vectors_and_an_upper_bound_for_the_rest(k):
    vectors, contexts, answers = _tail_inputs()
    n = vectors.shape[0]
    patcher = Patcher(tiny_llama())
    with torch.no_grad():  # sharper next-token distributions than random weights give, as a trained model's
        patcher.adapter.unembedding().weight.mul_(20)
    offsets = torch.randn(n, generator=torch.Generator().manual_seed(5))
    offsets[-1] = 0

    def run(top=None):
        return scoring.cached_tail_log_probs(patcher, 1, contexts, answers, n, lambda c: vectors[None].expand(len(c), *vectors.shape), 0, top)

    full = run()
    counter = RowCounter(patcher.adapter)
    got = run(scoring.TopRows(k=k, reference=n - 1, offsets=offsets, candidates=10))
    best = (full[:, :-1] + offsets[:-1]).topk(k).indices
    assert torch.equal((got[:, :-1] + offsets[:-1]).topk(k).indices.sort().values, best.sort().values)
    assert torch.allclose(got.gather(1, best), full.gather(1, best), atol=1e-5)
    assert torch.allclose(got[:, -1], full[:, -1], atol=1e-5)  # the reference, exact
    assert (got >= full - 1e-5).all()  # bounds never under the exact value
    assert (got > full + 1e-3).any()  # and some vectors were only bounded
    answer_tokens = sum(len(a) for a in answers)
    full_rows = sum(r for r, subset in zip(counter.rows, counter.subsets) if subset is None)
    assert answer_tokens <= full_rows < answer_tokens * n  # fewer full unembeddings than every vector's


def test_top_rows_need_a_reference_column_for_the_posterior():
    from ffv_eval.vectors.basis import BasisError

    basis = Basis(["r0", "r1"], torch.randn(2, 32), 1, "x", Path("."))
    with pytest.raises(BasisError, match="with_baseline"):
        basis_logprobs(Patcher(tiny_llama()), CharTokenizer(), basis, [("ab", "ba")], top=scoring.TopRows(k=1, reference=2))


def test_top_rows_in_bfloat16_pick_the_best_vector_to_the_model_s_rounding():
    """A 16-bit model's logits round differently in a subset's kernel and the full one; the k best
    are still the full computation's, to that rounding (scoring.LOW_PRECISION_MARGIN)."""
    vectors, contexts, answers = _tail_inputs(seed=8)
    n = vectors.shape[0]
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    patcher = Patcher(model.to(torch.bfloat16))

    def run(top=None):
        return scoring.cached_tail_log_probs(patcher, 1, contexts, answers, n, lambda c: vectors[None].expand(len(c), *vectors.shape), 0, top)

    full, got = run(), run(scoring.TopRows(k=1, reference=n - 1, candidates=10))
    assert got.dtype == torch.float32 and (got > full + 0.5).any()
    chosen = got[:, :-1].argmax(-1)
    assert (full[:, :-1].gather(1, chosen[:, None])[:, 0] >= full[:, :-1].max(-1).values - 0.1).all()
    assert torch.allclose(got[:, :-1].max(-1).values, full[:, :-1].max(-1).values, atol=0.1)
