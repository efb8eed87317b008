"""Decoding a vector into the tokens it promotes (ffv_eval.vectors.decoding), on the real Gemma 3 270M."""

import pytest

from ffv_eval.data.relations import load_relation
from ffv_eval.models.patching import Patcher
from ffv_eval.vectors.decoding import decode_vector


@pytest.mark.slow
def test_decoding_finds_a_known_answer_token(gemma):
    model, tok = gemma
    adapter = Patcher(model).adapter
    pairs = load_relation("antonym").test
    answer = tok(" " + pairs[0].output, add_special_tokens=False).input_ids[0]
    direction = model.lm_head.weight[answer].float()
    decoding = decode_vector(adapter, tok, direction * 100, pairs, k=20)
    assert decoding.hits[0] and decoding.tokens[0].strip() == tok.decode([answer]).strip()
    unrelated = decode_vector(adapter, tok, -direction * 100, pairs, k=20)
    assert not unrelated.hits[0]
    assert len(decoding.tokens) == 20 and decoding.n_hits == sum(decoding.hits)
