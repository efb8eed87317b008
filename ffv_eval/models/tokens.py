"""Prompts into token ids as lm-eval finds them, right and left padding, right padding's removal: the one home of
these helpers for extraction, training, the basis, composite vectors, decoding and ffv-patched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ffv_eval.data.prompts import answer_text
from ffv_eval.errors import TokenizationError


@dataclass(frozen=True)
class PromptSet:
    input_ids: list[list[int]]
    answer_ids: list[int]  # first token of each prompt's answer


def encode_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval finds them (`HFLM._encode_pair`): trailing
    whitespace of the context moves into the continuation, context + continuation is tokenized
    whole, and the continuation is the tokens after the context's own tokens. Unlike taking the
    continuation tokenized alone, this never yields the bare dummy-prefix piece that
    SentencePiece tokenizers (Llama 2, Mistral) put before a leading space. A context whose
    tokens are not a prefix of the whole text's tokens (the continuation merges into the
    context's last token) is an error."""
    stripped = context.rstrip()
    if stripped != context:
        context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = list(tokenizer(context).input_ids)
    whole_ids = list(tokenizer(context + continuation).input_ids)
    if whole_ids[: len(context_ids)] != context_ids:
        raise TokenizationError(f"{continuation!r} after {context[-40:]!r}: the prompt's tokens are not a prefix of the tokens of "
                                f"prompt + answer (the answer merges into the prompt's last token); separate the answer from "
                                f"the prompt, e.g. with a space")
    return context_ids, whole_ids[len(context_ids):]


def answer_token_id(tokenizer, prompt: str, word: str) -> int:
    """The first token of the answer `word` (` word`) where it follows `prompt`, as lm-eval scores it."""
    return _first_answer_token(encode_continuation(tokenizer, prompt, answer_text(word))[1], prompt, word)


def _first_answer_token(answer_ids: Sequence[int], prompt: str, word: str) -> int:
    if not answer_ids:
        raise TokenizationError(f"answer {word!r} encodes to no tokens after {prompt[-40:]!r}")
    return answer_ids[0]


def encode_prompts(tokenizer, texts: Sequence[str], answers: Sequence[str]) -> PromptSet:
    """Each prompt's ids and its answer's first token after it (see encode_continuation)."""
    input_ids, answer_ids = [], []
    for text, answer in zip(texts, answers, strict=True):
        context, continuation = encode_continuation(tokenizer, text, answer_text(answer))
        input_ids.append(context)
        answer_ids.append(_first_answer_token(continuation, text, answer))
    return PromptSet(input_ids, answer_ids)


@dataclass(frozen=True)
class AnswerSet:
    context_ids: list[list[int]]
    answer_ids: list[list[int]]  # every token of each prompt's answer, as lm-eval finds them (never empty)


def encode_answers(tokenizer, texts: Sequence[str], answers: Sequence[str]) -> AnswerSet:
    """Each prompt's ids and all its answer's tokens after it (see encode_continuation)."""
    context_ids, answer_ids = [], []
    for text, answer in zip(texts, answers, strict=True):
        context, continuation = encode_continuation(tokenizer, text, answer_text(answer))
        _first_answer_token(continuation, text, answer)  # an empty answer is an error
        context_ids.append(context)
        answer_ids.append(continuation)
    return AnswerSet(context_ids, answer_ids)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S], attention mask, and each row's last real position [B], on
    `device` (the model's input device)."""
    width = max(len(s) for s in sequences)
    # Built on the CPU from Python lists and moved in one copy.
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, mask.sum(dim=1) - 1


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, S] and attention mask on `device`, as `generate` takes a batch (every
    row's last prompt token at the last position)."""
    width = max(len(s) for s in sequences)
    # Built on the CPU from Python lists and moved in one copy.
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def without_right_padding(row: Sequence[int], pad_id: int) -> tuple[int, ...]:
    """A right-padded row's tokens without its trailing `pad_id`s."""
    end = len(row)
    while end and row[end - 1] == pad_id:
        end -= 1
    return tuple(row[:end])


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
