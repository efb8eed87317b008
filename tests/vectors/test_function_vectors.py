"""Causal mediation (ffv_eval.vectors.function_vectors): the cached, head-batched indirect effects
against one plain forward per head, on tiny random Llama and Gemma 3 models and on the real
Gemma 3 270M."""

import random

import pytest
import torch

from ffv_eval.data.relations import load_relation
from ffv_eval.models import tokens
from ffv_eval.models.patching import Patcher
from ffv_eval.vectors import function_vectors as fv


def test_cached_batched_indirect_effects_equal_the_straightforward_loop(tiny_model):
    patcher = Patcher(tiny_model)
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(3)], answer_ids=[5, 17, 33])
    mean_heads = torch.randn(patcher.adapter.n_layers, patcher.adapter.n_heads, patcher.adapter.head_dim)
    fast = fv.indirect_effects(patcher, prompts, mean_heads, head_batch=5)  # several batches
    slow = fv.indirect_effects_reference(patcher, prompts, mean_heads)
    plain = fv.indirect_effects_reference(patcher, prompts, mean_heads, full_model=True)
    assert slow.abs().max() > 1e-4
    assert (fast - slow).abs().max() < 1e-5 and (plain - slow).abs().max() < 1e-5


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
