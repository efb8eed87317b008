"""Function vectors by causal mediation (Todd et al. 2024).

1. Clean prompts: n-shot `Q: x\\nA: y` demonstrations of a relation, then a query.
2. Mean per-head attention output at the last token over clean prompts: [L, H, D].
3. Average indirect effect (AIE) of each head: patch its mean output into prompts whose
   demonstration labels are shuffled, and measure the gain in the answer's probability.
4. The function vector: the residual-stream contributions of the top-k heads, summed, to be
   added after one decoder block at the last prompt token. The block is chosen by zero-shot
   accuracy on the validation split.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ffv_eval.errors import SettingError, TokenizationError
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.data.prompts import answer_text, fewshot_prompt, query_text, shuffled_label_demos
from ffv_eval.data.relations import RelationData, WordPair
from ffv_eval.progress import no_progress

# The most rows of full-vocabulary logits that exist at once in extraction, mediation, training,
# basis and composite scoring (Gemma 3: 128 x 262k float32 logits = 128 MiB): `answer_log_probs`
# unembeds this many rows at a time. Not smaller: each call reads the whole unembedding matrix, so
# on a CPU a 64-row budget made mediation's 73-row batches of gemma-3-270m 30% slower.
LOGIT_ROWS = 128


@dataclass(frozen=True)
class ExtractionSettings:
    n_shots: int = 10
    n_mean_prompts: int = 32
    n_effect_prompts: int = 12
    top_k_choices: tuple[int, ...] = (1, 3, 10)
    scale_choices: tuple[float, ...] = (1.0, 2.0, 4.0)
    seed: int = 0
    head_batch: int = 128
    layer: int | None = None  # None: every layer is a candidate


@dataclass
class ExtractionResult:
    vector: torch.Tensor  # [hidden], float32 on the CPU
    layer: int
    heads: list[tuple[int, int, float]]  # (layer, head, AIE), best first
    scale: float  # already applied to `vector`
    indirect_effects: torch.Tensor  # [L, H] AIE, float32 on the CPU
    validation_accuracy: float
    validation_accuracy_by_layer: dict[int, float]  # best over top-k and scale, per layer
    zero_shot_validation_accuracy: float
    seconds: dict[str, float] = field(default_factory=dict)


# -- prompts and tokens --------------------------------------------------------------------
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


def icl_prompts(pairs: Sequence[WordPair], n_prompts: int, n_shots: int, rng: random.Random, shuffle_labels: bool):
    """n-shot prompts whose demonstrations and query are drawn from `pairs` (query never
    among its own demonstrations); with shuffle_labels the demonstrations' outputs are permuted."""
    if len(pairs) < n_shots + 1:
        raise SettingError(f"{n_shots}-shot prompts need at least {n_shots + 1} pairs, got {len(pairs)}")
    texts, answers = [], []
    for _ in range(n_prompts):
        chosen = rng.sample(list(pairs), n_shots + 1)
        demos, query = chosen[:-1], chosen[-1]
        if shuffle_labels:
            demos = shuffled_label_demos(demos, rng)
        texts.append(fewshot_prompt(demos, query.input))
        answers.append(query.output)
    return texts, answers


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


def without_right_padding(row: Sequence[int], pad_id: int) -> tuple[int, ...]:
    """A right-padded row's tokens without its trailing `pad_id`s."""
    end = len(row)
    while end and row[end - 1] == pad_id:
        end -= 1
    return tuple(row[:end])


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


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# -- step 2: mean head outputs -------------------------------------------------------------
@torch.no_grad()
def mean_head_outputs(patcher: Patcher, prompts: PromptSet, pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """[L, H, D] float32 mean of the heads' outputs at each prompt's last token."""
    device = input_device(patcher.model)
    total = None
    for start in range(0, len(prompts.input_ids), batch_size):
        ids, mask, last = right_pad(prompts.input_ids[start : start + batch_size], pad_id, device)
        # float32: a mean over many prompts accumulated in bfloat16 would round away small heads.
        heads = patcher.head_outputs(ids, last, attention_mask=mask).float().sum(dim=0)
        total = heads if total is None else total + heads
    return total / len(prompts.input_ids)


# -- step 3: indirect effects --------------------------------------------------------------
def _all_heads(patcher: Patcher) -> list[tuple[int, int]]:
    a = patcher.adapter
    return [(layer, head) for layer in range(a.n_layers) for head in range(a.n_heads)]


@torch.no_grad()
def indirect_effects(patcher: Patcher, prompts: PromptSet, mean_heads: torch.Tensor, head_batch: int = 128) -> torch.Tensor:
    """Per-prompt indirect effect of every head, [N, L, H]. The prefix before the last token
    is run once per prompt (key/value cache); only the last position is re-run, for many
    patched heads per batch (row 0 of the first batch is the unpatched baseline). A batch of
    head_batch rows runs in one forward; its last-position hidden states are unembedded at most
    LOGIT_ROWS rows at a time (answer_log_probs)."""
    a = patcher.adapter
    device = input_device(patcher.model)
    rows = [(-1, 0)] + _all_heads(patcher)
    step = max(1, head_batch)
    # float32: indirect effects are differences of probabilities, often below bfloat16's resolution.
    effects = torch.zeros(len(prompts.input_ids), a.n_layers, a.n_heads, dtype=torch.float32, device=device)
    for p, (ids, answer) in enumerate(zip(prompts.input_ids, prompts.answer_ids)):
        ids = torch.tensor([ids], dtype=torch.long, device=device)
        prefix_cache = a.base_model()(input_ids=ids[:, :-1], use_cache=True).past_key_values
        probs = []
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
            layers = [layer for layer, _ in chunk]
            heads = [head for _, head in chunk]
            values = torch.stack([mean_heads[max(layer, 0), head] for layer, head in chunk])
            hidden = patcher.last_hidden_with_head_patches(
                ids[:, -1:].expand(len(chunk), 1), layers, heads, values, past_key_values=cache, use_cache=True
            )
            answers = torch.full((len(chunk),), answer, dtype=torch.long, device=hidden.device)
            probs.append(answer_log_probs(a, hidden, answers)[0].exp())  # float32 (see _chunk_log_probs)
        probs = torch.cat(probs).to(device)
        effects[p] = (probs[1:] - probs[0]).view(a.n_layers, a.n_heads)
    return effects


def _answer_probability(logits: torch.Tensor, answer: int) -> torch.Tensor:
    # float32: the softmax over the whole vocabulary (see _chunk_log_probs).
    return torch.softmax(logits.float(), dim=-1)[:, answer]


@torch.no_grad()
def indirect_effects_reference(patcher: Patcher, prompts: PromptSet, mean_heads: torch.Tensor, full_model: bool = False,
                               heads: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The straightforward loop: one forward pass per head per prompt. Slow; kept as the ground
    truth that `indirect_effects` is tested and benchmarked against. full_model: a plain model
    forward with logits at every position (otherwise only the last position is unembedded).
    heads: only these (layer, head) pairs, the others' effects left 0 (to time the loop on a subset)."""
    a = patcher.adapter
    device = input_device(patcher.model)
    effects = torch.zeros(len(prompts.input_ids), a.n_layers, a.n_heads, dtype=torch.float32, device=device)
    for p, (ids, answer) in enumerate(zip(prompts.input_ids, prompts.answer_ids)):
        ids = torch.tensor([ids], dtype=torch.long, device=device)
        base = _answer_probability(a.unembed(a.base_model()(input_ids=ids).last_hidden_state[:, -1]), answer)[0]
        for layer, head in _all_heads(patcher) if heads is None else heads:
            logits = patcher.last_logits_with_head_patches(ids, [layer], [head], mean_heads[layer, head][None], full_model)
            effects[p, layer, head] = _answer_probability(logits, answer)[0].to(device) - base.to(device)
    return effects


# -- step 4: the vector and its layer ------------------------------------------------------
def top_heads(aie: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    n_heads = aie.shape[1]
    values, flat = aie.flatten().topk(min(k, aie.numel()))
    return [(int(i) // n_heads, int(i) % n_heads, float(v)) for v, i in zip(values, flat)]


def assemble_vector(patcher: Patcher, mean_heads: torch.Tensor, heads: Sequence[tuple[int, int, float]]) -> torch.Tensor:
    """Sum of the chosen heads' mean outputs in the residual-stream basis, float32 (a stored
    vector's dtype), on the model's input device."""
    vector = torch.zeros(patcher.adapter.hidden_size, dtype=torch.float32, device=input_device(patcher.model))
    for layer in sorted({h[0] for h in heads}):
        contributions = patcher.adapter.head_contributions(layer, mean_heads[layer])
        for _, head, _ in (h for h in heads if h[0] == layer):
            vector += contributions[head].to(vector.device, torch.float32)
    return vector


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


def extract_function_vector(
    patcher: Patcher,
    tokenizer,
    relation: RelationData,
    settings: ExtractionSettings = ExtractionSettings(),
    progress: Callable[[str], None] = no_progress,
) -> ExtractionResult:
    a = patcher.adapter
    if settings.layer is not None and not 0 <= settings.layer < a.n_layers:
        raise SettingError(f"layer {settings.layer} out of range: the model has layers 0..{a.n_layers - 1}")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    clean = encode_prompts(tokenizer, *icl_prompts(relation.train, settings.n_mean_prompts, settings.n_shots, rng, False))
    mean_heads = mean_head_outputs(patcher, clean, pad_id_of(tokenizer))
    seconds["mean_head_outputs"] = time.perf_counter() - t
    progress(f"mean head outputs over {settings.n_mean_prompts} clean {settings.n_shots}-shot prompts ({seconds['mean_head_outputs']:.1f}s)")

    t = time.perf_counter()
    corrupted = encode_prompts(tokenizer, *icl_prompts(relation.train, settings.n_effect_prompts, settings.n_shots, rng, True))
    aie = indirect_effects(patcher, corrupted, mean_heads, settings.head_batch).mean(dim=0)
    ranked = top_heads(aie, max(settings.top_k_choices))
    seconds["indirect_effects"] = time.perf_counter() - t
    progress(
        f"indirect effects of {a.n_layers * a.n_heads} heads on {settings.n_effect_prompts} shuffled-label prompts "
        f"({seconds['indirect_effects']:.1f}s); top: " + ", ".join(f"L{l}H{h}={e:.4f}" for l, h, e in ranked[:5])
    )

    # Choose top-k, layer and scale by zero-shot validation accuracy (mean answer log-prob
    # breaks ties); every candidate vector for one layer runs in one batch.
    t = time.perf_counter()
    candidates = [(k, scale) for k in settings.top_k_choices for scale in settings.scale_choices]
    vectors = torch.stack([assemble_vector(patcher, mean_heads, ranked[:k]) * scale for k, scale in candidates])
    baseline = first_token_accuracy(patcher, tokenizer, relation.validation)
    layers = [settings.layer] if settings.layer is not None else list(range(a.n_layers))
    best, by_layer = None, {}
    for layer in layers:
        accuracy, logprob = first_token_scores(patcher, tokenizer, relation.validation, layer, vectors)
        by_layer[layer] = float(accuracy.max())
        for c, (k, scale) in enumerate(candidates):
            key = (float(accuracy[c]), float(logprob[c]))
            if best is None or key > best[0]:
                best = (key, layer, k, scale, c)
    (accuracy, _), layer, k, scale, c = best
    seconds["selection"] = time.perf_counter() - t
    progress(
        f"validation accuracy: zero-shot {baseline:.2f}; best FV: top-{k} heads x{scale:g} at layer {layer} "
        f"{accuracy:.2f} ({seconds['selection']:.1f}s over {len(layers)} layers x {len(candidates)} candidates)"
    )
    return ExtractionResult(vectors[c].cpu(), layer, ranked[:k], scale, aie.cpu(), accuracy, by_layer, baseline, seconds)
