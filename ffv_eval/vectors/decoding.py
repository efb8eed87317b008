"""What a vector says on its own: the tokens it promotes when read through the model's final
norm and unembedding, and how many of them are the relation's own answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ffv_eval.data.prompts import query_text
from ffv_eval.data.relations import WordPair
from ffv_eval.models.architectures import ArchitectureAdapter
from ffv_eval.models.loading import input_device
from ffv_eval.models.tokens import answer_token_id


@dataclass
class Decoding:
    tokens: list[str]  # top-k promoted tokens, best first
    hits: list[bool]  # token is the first token of one of the relation's answers (after its `Q: x\nA:` prompt)
    n_hits: int


@torch.no_grad()
def decode_vector(adapter: ArchitectureAdapter, tokenizer, vector: torch.Tensor, pairs: Sequence[WordPair], k: int = 20) -> Decoding:
    answers = {answer_token_id(tokenizer, query_text(p.input), p.output) for p in pairs}
    dtype = adapter.model.get_input_embeddings().weight.dtype
    logits = adapter.decode_residual(vector.to(input_device(adapter.model), dtype))
    top = logits.topk(k).indices.tolist()
    hits = [t in answers for t in top]
    return Decoding([tokenizer.decode([t]) for t in top], hits, sum(hits))


def format_side_by_side(decodings: dict[str, Decoding]) -> str:
    """A table with one column per vector; answer tokens are marked with *."""
    names = list(decodings)
    width = max(12, *(len(n) for n in names))
    rows = [" | ".join(f"{n:<{width}}" for n in names)]
    rows.append(" | ".join(f"{f'{d.n_hits}/{len(d.tokens)} answer tokens':<{width}}" for d in decodings.values()))
    rows.append("-+-".join("-" * width for _ in names))
    for i in range(max(len(d.tokens) for d in decodings.values())):
        cells = []
        for d in decodings.values():
            text = repr(d.tokens[i])[1:-1] + (" *" if d.hits[i] else "") if i < len(d.tokens) else ""
            cells.append(f"{text:<{width}}")
        rows.append(" | ".join(cells))
    return "\n".join(rows)
