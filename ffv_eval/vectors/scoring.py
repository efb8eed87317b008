"""Scoring answers under a (patched) model: the log-probability of each answer's first token and
whether it is the most likely next token, unembedding a bounded number of rows at a time; and
whole answers after shared prompts under many vectors at once (cached_tail_log_probs, for the
CFV posterior and the CFV settings' validation questions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ffv_eval.data.prompts import query_text
from ffv_eval.data.relations import WordPair
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import encode_prompts, pad_id_of, right_pad

# The most rows of full-vocabulary logits that exist at once in extraction, mediation, training,
# basis and composite scoring (Gemma 3: 128 x 262k float32 logits = 128 MiB): `answer_log_probs`
# unembeds this many rows at a time. Not smaller: each call reads the whole unembedding matrix, so
# on a CPU a 64-row budget made mediation's 73-row batches of gemma-3-270m 30% slower.
LOGIT_ROWS = 128
ROWS_PER_PASS = 512  # (prompt, vector) rows run through the model together in cached_tail_log_probs
# TopRows in a 16-bit model: its logits are rounded to 2^-8 of their size (about 0.1 at Gemma's
# 20-30), differently by a subset's kernel and the full one, so a bound may sit that far under the
# full score; relations within this many nats of the k best are scored in full.
LOW_PRECISION_MARGIN = 0.25
# TopRows: prompts whose final hidden states wait for their bounds together (their full
# unembeddings batch across them; Gemma 3 270M: 256 x 79 x 640 float32 = 52 MiB)
BOUNDED_PROMPTS = 256



def answer_log_probs(adapter, final_hidden: torch.Tensor, answers: torch.Tensor, with_top_ids: bool = False):
    """Per row of final-normed hidden states [N, hidden]: log P(answers[n]) and whether it is the
    most likely token, [N] each (with_top_ids: also the most likely token), unembedding at most
    LOGIT_ROWS rows at a time. Differentiable: under autograd each chunk's logits are recomputed
    in the backward pass instead of kept."""
    log_probs, top_ids = [], []
    keep_graph = torch.is_grad_enabled() and final_hidden.requires_grad
    for start in range(0, final_hidden.shape[0], LOGIT_ROWS):
        rows = slice(start, start + LOGIT_ROWS)
        if keep_graph:
            log_prob, top = checkpoint(_chunk_log_probs, adapter, final_hidden[rows], answers[rows], use_reentrant=False)
        else:
            log_prob, top = _chunk_log_probs(adapter, final_hidden[rows], answers[rows])
        log_probs.append(log_prob)
        top_ids.append(top)
    top_ids = torch.cat(top_ids)
    is_top = top_ids == answers.to(top_ids.device)
    return (torch.cat(log_probs), is_top, top_ids) if with_top_ids else (torch.cat(log_probs), is_top)


def _chunk_log_probs(adapter, hidden: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # float32: a log-softmax over 10^5 bfloat16 logits would round the answer's probability away.
    logits = adapter.unembed(hidden).float()
    answers = answers.to(logits.device)
    log_prob = logits.log_softmax(-1).gather(-1, answers[:, None])[:, 0]
    return log_prob, logits.argmax(-1)


@dataclass(frozen=True)
class TopRows:
    """Ask cached_tail_log_probs for only what the `k` best vectors of each prompt need: those
    vectors' log-probabilities exact, the others' an upper bound below the k-th best. A vector's
    rank is its log-probability plus `offsets[vector]` ([n_vectors], or None: zeros). Column
    `reference` (say, no vector) is computed exactly for every prompt, and its `candidates` most
    likely tokens at each answer position (with the answer's token) bound the others: a
    log-softmax over a subset of the vocabulary is at least the full one, so the bound holds, and
    only vectors whose bound could still reach the k best are unembedded in full. The k best and
    their values are therefore those of the full computation (to rounding)."""

    k: int
    reference: int
    offsets: torch.Tensor | None = None
    candidates: int = 4096
    margin: float = 1e-3  # rank slack for rounding between the subset and the full log-softmax (float32 models)


@torch.no_grad()
def cached_tail_log_probs(patcher: Patcher, layer: int, contexts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                          n_vectors: int, vectors_of: Callable[[list[int]], torch.Tensor], pad_id: int,
                          top: TopRows | None = None) -> torch.Tensor:
    """[prompts, n_vectors], float32: log P(answers[i] | contexts[i]), summed over the answer's
    tokens (teacher-forced), with each of the prompt's vectors added after block `layer` at the
    context's last token; `vectors_of(indices)` gives the vectors of those prompts, [len(indices),
    n_vectors, hidden] float32 on the model's device. Exact and batched: prompts with the same
    number of tokens run together, all but their last token once (key/value cache), then their
    last token and the answer's tokens but the last once per vector, ROWS_PER_PASS rows at a
    time (the blocks up to `layer` once per prompt: Patcher.final_hidden_per_vector). With `top`,
    only the best vectors of each prompt are exact (TopRows)."""
    device = input_device(patcher.model)
    n = n_vectors
    scores = torch.zeros(len(contexts), n, dtype=torch.float32, device=device)
    by_length: dict[int, list[int]] = {}
    for i, context in enumerate(contexts):
        by_length.setdefault(len(context), []).append(i)
    base = patcher.adapter.base_model()
    group = max(1, ROWS_PER_PASS // n)
    bounded: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # with top: (prompt, final hidden [T, n, hidden], answer tokens)
    for indices in by_length.values():
        for start in range(0, len(indices), group):
            chunk = indices[start : start + group]
            ids = torch.tensor([contexts[i] for i in chunk], dtype=torch.long, device=device)
            cache = base(input_ids=ids[:, :-1], use_cache=True).past_key_values
            # the prompt's last token, then the answer's tokens but the last, right-padded (pads
            # come after every real token, so no mask is needed): row (prompt, vector), prompt-major;
            # blocks up to `layer` once per prompt
            tail_ids, _, _ = right_pad([[contexts[i][-1], *answers[i][:-1]] for i in chunk], pad_id, device)
            vectors = vectors_of(chunk)
            out = patcher.final_hidden_per_vector(tail_ids, cache, layer=layer, vectors=vectors.reshape(len(chunk) * n, vectors.shape[-1]),
                                                  positions=torch.zeros(len(chunk), dtype=torch.long, device=device))
            if top is not None:  # bounded after every chunk's forward, so that full unembeddings batch across chunks
                bounded += [(i, out[r * n : (r + 1) * n, : len(answers[i])].transpose(0, 1).contiguous(),
                             torch.tensor(answers[i], dtype=torch.long, device=device)) for r, i in enumerate(chunk)]
                if len(bounded) >= BOUNDED_PROMPTS:
                    _score_bounded(patcher.adapter, bounded, top, scores)
                continue
            rows = torch.tensor([r for r, i in enumerate(chunk) for _ in answers[i]], dtype=torch.long, device=device)
            steps = torch.tensor([t for i in chunk for t in range(len(answers[i]))], dtype=torch.long, device=device)
            tokens = torch.tensor([t for i in chunk for t in answers[i]], dtype=torch.long, device=device)
            flat_rows = (rows[:, None] * n + torch.arange(n, device=device)).reshape(-1)  # every (token, vector)
            log_prob, _ = answer_log_probs(patcher.adapter, out[flat_rows, steps.repeat_interleave(n)],
                                           tokens.repeat_interleave(n))  # float32
            per_row = torch.zeros(len(chunk) * n, dtype=torch.float32, device=device).index_add(0, flat_rows, log_prob.to(device))
            scores[chunk] = per_row.view(len(chunk), n)
    if bounded:
        _score_bounded(patcher.adapter, bounded, top, scores)
    return scores


def _score_bounded(adapter, bounded: list, top: TopRows, scores: torch.Tensor) -> None:
    """scores[prompt] for each (prompt, final hidden, answer tokens) waiting in `bounded`, which
    is emptied."""
    order = [i for i, _, _ in bounded]
    scores[order] = _top_row_log_probs(adapter, [h for _, h, _ in bounded], [t for _, _, t in bounded], top).to(scores.device)
    bounded.clear()


def _top_row_log_probs(adapter, hidden: list[torch.Tensor], tokens: list[torch.Tensor], top: TopRows) -> torch.Tensor:
    """Prompts' final hidden states ([answer tokens, n_vectors, hidden] each) and answer tokens
    ([answer tokens] each) -> [prompts, n_vectors] float32 (TopRows): exact for the reference and
    each prompt's best vectors, an upper bound for the rest. Full unembeddings are batched across
    the prompts (each reads the whole unembedding matrix, whatever its number of rows)."""
    n = hidden[0].shape[1]
    tokens = [t.to(h.device) for h, t in zip(hidden, tokens)]
    scores = torch.zeros(len(hidden), n, dtype=torch.float32, device=hidden[0].device)
    # the reference column in full, LOGIT_ROWS answer positions at a time: its log-probabilities
    # and each position's candidates (float32, as _chunk_log_probs)
    reference_hidden = torch.cat([h[:, top.reference] for h in hidden])
    answer_ids = torch.cat(tokens)
    ref_log_probs, candidates = [], []
    for start in range(0, reference_hidden.shape[0], LOGIT_ROWS):
        logits = adapter.unembed(reference_hidden[start : start + LOGIT_ROWS]).float()
        ids = answer_ids[start : start + LOGIT_ROWS].to(logits.device)
        ref_log_probs.append(logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0])
        candidates.append(logits.topk(min(top.candidates, logits.shape[-1]), dim=-1).indices)
    ref_log_probs, candidates = torch.cat(ref_log_probs), torch.cat(candidates)
    offsets = torch.zeros(n, device="cpu") if top.offsets is None else top.offsets.float().cpu()  # ranks are compared on the CPU
    margin = top.margin if reference_hidden.dtype == torch.float32 else max(top.margin, LOW_PRECISION_MARGIN)  # the model's dtype
    ranks, start = [], 0
    for i, (h, t) in enumerate(zip(hidden, tokens)):
        rows = slice(start, start + len(t))
        start += len(t)
        scores[i, top.reference] = ref_log_probs[rows].sum().to(scores.device)
        subset = torch.unique(torch.cat([candidates[rows].reshape(-1), t.to(candidates.device)]))
        sub_logits = adapter.unembed(h, subset).float()  # [T, n, |subset|]
        at = torch.searchsorted(subset, t.to(subset.device))
        answer_logit = sub_logits.gather(-1, at[:, None, None].expand(-1, n, 1).to(sub_logits.device))[..., 0]
        bound = (answer_logit - sub_logits.logsumexp(-1)).sum(0)  # >= the exact log-probabilities
        scores[i, : top.reference] = bound[: top.reference].to(scores.device)
        scores[i, top.reference + 1 :] = bound[top.reference + 1 :].to(scores.device)
        rank = bound.cpu() + offsets
        rank[top.reference] = -torch.inf  # exact already, and not ranked
        ranks.append(rank)
    order = [r.argsort(descending=True).tolist()[: n - 1] for r in ranks]
    best: list[list[float]] = [[] for _ in hidden]  # each prompt's k best exact ranks so far
    done = [0] * len(hidden)  # how many of each prompt's ordered vectors are exact
    first = True
    while True:
        todo = []
        for i in range(len(hidden)):
            for _ in range(top.k + 1 if first else 1):
                if done[i] == len(order[i]):
                    break
                if len(best[i]) >= top.k and min(best[i]) >= float(ranks[i][order[i][done[i]]]) + margin:
                    break  # no bound left can reach the k best
                todo.append((i, order[i][done[i]]))
                done[i] += 1
        first = False
        if not todo:
            return scores
        log_prob, _ = answer_log_probs(adapter, torch.cat([hidden[i][:, v] for i, v in todo]), torch.cat([tokens[i] for i, _ in todo]))
        start = 0
        for i, v in todo:
            value = log_prob[start : start + len(tokens[i])].sum()
            start += len(tokens[i])
            scores[i, v] = value.to(scores.device)
            best[i] = sorted([*best[i], float(value) + float(offsets[v])], reverse=True)[: top.k]


@torch.no_grad()
def answer_scores(
    patcher: Patcher,
    tokenizer,
    pairs: Sequence[WordPair],
    layer: int | None = None,
    vectors: torch.Tensor | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot `Q: x\nA:` prompts with each of `vectors` [V, hidden] added after block
    `layer` at the last prompt token (or none, V = 1): per vector and pair [V, N], whether the
    most likely next token is the answer's first token, and that token's log-probability."""
    device = input_device(patcher.model)
    prompts = encode_prompts(tokenizer, [query_text(p.input) for p in pairs], [p.output for p in pairs])
    n_vectors = 1 if vectors is None else vectors.shape[0]
    if vectors is not None:
        vectors = vectors.to(device, torch.float32)  # stored vectors are float32; patching casts to the model's dtype
    rows = [(v, i) for v in range(n_vectors) for i in range(len(pairs))]  # every vector x every prompt
    hits = torch.zeros(len(rows), dtype=torch.float32, device=device)
    logprob = torch.zeros(len(rows), dtype=torch.float32, device=device)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask, last = right_pad([prompts.input_ids[i] for _, i in chunk], pad_id_of(tokenizer), device)
        vector = None if vectors is None else vectors[torch.tensor([v for v, _ in chunk], dtype=torch.long, device=device)]
        hidden = patcher.final_hidden(ids, mask, layer=layer, vector=vector, positions=last)
        last_hidden = hidden[torch.arange(len(chunk), device=hidden.device), last.to(hidden.device)]
        answers = torch.tensor([prompts.answer_ids[i] for _, i in chunk], dtype=torch.long, device=device)
        chunk_logprob, chunk_hits = answer_log_probs(patcher.adapter, last_hidden, answers)
        hits[start : start + len(chunk)] = chunk_hits.float().to(device)
        logprob[start : start + len(chunk)] = chunk_logprob.to(device)
    return hits.view(n_vectors, len(pairs)), logprob.view(n_vectors, len(pairs))


def first_token_scores(patcher, tokenizer, pairs, layer=None, vectors=None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vector: the share of prompts whose most likely next token is the answer's first
    token, and the answer's mean log-probability (see answer_scores)."""
    hits, logprob = answer_scores(patcher, tokenizer, pairs, layer, vectors, batch_size)
    return hits.mean(dim=1), logprob.mean(dim=1)


def first_token_accuracy(patcher, tokenizer, pairs, layer=None, vector=None) -> float:
    accuracy, _ = first_token_scores(patcher, tokenizer, pairs, layer, None if vector is None else vector[None])
    return float(accuracy[0])
