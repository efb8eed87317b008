"""Causal mediation (ffv_eval.vectors.function_vectors): the cached, head-batched indirect effects
against one plain forward per head, on tiny random Llama and Gemma 3 models and on the real
Gemma 3 270M."""

import random

import pytest
import torch

from ffv_eval.data.prompts import fewshot_prompt, query_text
from ffv_eval.data.relations import WordPair, load_relation
from ffv_eval.models import tokens
from ffv_eval.models.patching import Patcher
from ffv_eval.vectors import function_vectors as fv
from tests.conftest import CharTokenizer


def test_cached_batched_indirect_effects_equal_the_straightforward_loop(tiny_model):
    patcher = Patcher(tiny_model)
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(3)], answer_ids=[5, 17, 33])
    mean_heads = torch.randn(patcher.adapter.n_layers, patcher.adapter.n_heads, patcher.adapter.head_dim)
    fast = fv.indirect_effects(patcher, prompts, mean_heads, head_batch=5)  # several batches
    slow = fv.indirect_effects_reference(patcher, prompts, mean_heads)
    plain = fv.indirect_effects_reference(patcher, prompts, mean_heads, full_model=True)
    assert slow.abs().max() > 1e-4
    assert (fast - slow).abs().max() < 1e-5 and (plain - slow).abs().max() < 1e-5


def test_icl_difference_is_the_mean_n_shot_minus_zero_shot_stream_one_prompt_at_a_time(tiny_model):
    """icl_difference_vector, batched and right-padded, against each pair's two prompts run
    alone (the demonstrations drawn as the seed draws them, never the pair itself)."""
    patcher, tok = Patcher(tiny_model), CharTokenizer()
    pairs = [WordPair(w, w.upper()) for w in ["ab", "cde", "f", "ghij", "kl"]]
    got = fv.icl_difference_vector(patcher, tok, pairs, 1, n_shots=2, seed=3, pairs_per_pass=2)
    rng, diffs = random.Random(3), []
    for pair in pairs:
        demos = rng.sample([p for p in pairs if p != pair], 2)
        streams = [patcher.block_output(torch.tensor([tok(text).input_ids]), torch.tensor([len(tok(text).input_ids) - 1]), 1)[0]
                   for text in (fewshot_prompt(demos, pair.input), query_text(pair.input))]
        diffs.append(streams[0] - streams[1])
    expected = torch.stack(diffs).mean(0)
    assert expected.norm() > 1e-3 and torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(fv.SettingError, match="at least 2 pairs, got 1"):
        fv.icl_difference_vector(patcher, tok, pairs[:1], 1)


@pytest.mark.slow
def test_cached_indirect_effects_match_one_forward_per_head(gemma):
    model, tok = gemma
    patcher = Patcher(model)
    rel = load_relation("antonym")
    rng = random.Random(0)
    clean = fv.encode_prompts(tok, *fv.icl_prompts(rel.train, 4, 10, rng, False))
    mean_heads = fv.mean_head_outputs(patcher, clean, fv.pad_id_of(tok))
    corrupted = fv.encode_prompts(tok, *fv.icl_prompts(rel.train, 1, 10, rng, True))
    fast = fv.indirect_effects(patcher, corrupted, mean_heads)
    slow = fv.indirect_effects_reference(patcher, corrupted, mean_heads)
    assert slow.abs().max() > 1e-3
    assert (fast - slow).abs().max() < 1e-4
