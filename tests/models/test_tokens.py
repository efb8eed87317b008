"""Answer tokens as lm-eval finds continuation tokens (ffv_eval.models.tokens): tokenizers with a
dummy prefix (a BPE one and a trained SentencePiece model, Llama 2 style), the embedded models'
tokenizers, and continuations with trailing whitespace."""

import pytest

from ffv_eval.data.prompts import query_text
from ffv_eval.data.relations import WordPair, load_relation, project_relations
from ffv_eval.models import tokens
from tests.conftest import dummy_prefix_tokenizer


def lm_eval_continuation(tokenizer, context: str, continuation: str) -> list[int]:
    """The reference: lm-eval's own HFLM._encode_pair and tok_encode, on a bare instance."""
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM.__new__(HFLM)
    hflm.tokenizer, hflm.add_bos_token, hflm.backend, hflm.custom_prefix_token_id = tokenizer, None, "causal", None
    return hflm._encode_pair(context, continuation)[1]


def _check_answer_tokens(tokenizer, pairs):
    for pair in pairs:
        prompt = query_text(pair.input)
        token = tokens.answer_token_id(tokenizer, prompt, pair.output)
        assert token == lm_eval_continuation(tokenizer, prompt, " " + pair.output)[0], pair
        piece = tokenizer.convert_ids_to_tokens([token])[0]
        assert piece not in ("▁", "Ġ", " ") and tokenizer.decode([token]).strip(), (pair, piece)
        assert pair.output.startswith(tokenizer.decode([token]).strip()), (pair, piece)


def test_answer_tokens_with_a_dummy_prefix_sentencepiece_tokenizer_are_the_words_first_piece():
    tokenizer = dummy_prefix_tokenizer()
    pairs = [WordPair("hot", "cold"), WordPair("big", "smaller"), WordPair("up", "downhill"), WordPair("fast", "slowest")]
    for pair in pairs:  # the problem: the word tokenized alone starts with a bare "▁"
        alone = tokenizer(" " + pair.output, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁"
    _check_answer_tokens(tokenizer, pairs)
    prompts = tokens.encode_prompts(tokenizer, [query_text(p.input) for p in pairs], [p.output for p in pairs])
    assert prompts.input_ids[0] == tokenizer(query_text("hot")).input_ids
    assert tokenizer.convert_ids_to_tokens(prompts.answer_ids) == ["▁cold", "▁small", "▁down", "▁slow"]


def sentencepiece_tokenizer(directory):
    """A real SentencePiece model with a dummy prefix, trained offline by the `sentencepiece`
    trainer with Llama 2's settings (BPE, byte fallback, whitespace kept as is), loaded through
    transformers' SentencePiece backend in legacy mode as Llama 2 and Mistral v0.1 are."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    words = ["hot", "cold", "big", "small", "fast", "slow", "happy", "sad", "light", "dark", "up", "down"]
    corpus = ([f"Q: {a}\nA: {b}" for a, b in zip(words[::2], words[1::2])] * 20
              + [f"{a} {b}" for a in words for b in words] + ["smaller downhill slowest"] * 5)
    prefix = str(directory / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=340, model_type="bpe", add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", byte_fallback=True, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return SentencePieceBackend(vocab_file=prefix + ".model", legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_answer_tokens_with_a_trained_sentencepiece_model_are_the_words_first_piece(tmp_path):
    tokenizer = sentencepiece_tokenizer(tmp_path)
    pairs = [WordPair("hot", "cold"), WordPair("big", "small"), WordPair("up", "downhill"), WordPair("fast", "slowest")]
    for pair in pairs:  # the problem: the word tokenized alone starts with a bare "▁" piece
        assert tokenizer.convert_ids_to_tokens(tokenizer(" " + pair.output, add_special_tokens=False).input_ids)[0] == "▁"
    _check_answer_tokens(tokenizer, pairs)
    prompts = tokens.encode_prompts(tokenizer, [query_text(p.input) for p in pairs], [p.output for p in pairs])
    assert tokenizer.convert_ids_to_tokens(prompts.answer_ids[:2]) == ["▁cold", "▁small"]


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma-3-270m"])
def test_answer_tokens_of_the_embedded_tokenizers_match_lm_eval(model):
    from transformers import AutoTokenizer

    from ffv_eval.models.loading import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model))
    pairs = [p for name in project_relations() for p in load_relation(name).test[:8]]
    _check_answer_tokens(tokenizer, pairs)


def test_continuations_move_trailing_whitespace_and_refuse_a_merged_prompt():
    from transformers import AutoTokenizer

    from ffv_eval.models.loading import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m"))
    assert tokens.encode_continuation(tokenizer, "Q: hot\nA: ", "cold") == tokens.encode_continuation(tokenizer, "Q: hot\nA:", " cold")
    assert tokens.encode_continuation(tokenizer, "Q: hot\nA: ", "cold")[1] == lm_eval_continuation(tokenizer, "Q: hot\nA: ", "cold")
    with pytest.raises(ValueError, match="the prompt's tokens are not a prefix of the tokens of prompt \\+ answer"):
        tokens.encode_continuation(tokenizer, "Q: hot\nA: co", "ld")


def test_left_pad_puts_every_rows_last_token_last_and_masks_the_pads():
    import torch

    from ffv_eval.models.tokens import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], 0, torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
