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

from ffv_eval.data.prompts import fewshot_prompt, query_text, shuffled_label_demos
from ffv_eval.data.relations import RelationData, WordPair
from ffv_eval.errors import SettingError
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import PromptSet, encode_prompts, pad_id_of, right_pad
from ffv_eval.progress import no_progress
from ffv_eval.vectors.scoring import answer_log_probs, first_token_accuracy, first_token_scores

# demonstrations per in-context prompt: the FV's prompts, the basis FFVs' starts and the icl-diff
# start (as 10-shot prompting shows); the one home of that default
ICL_SHOTS = 10


@dataclass(frozen=True)
class ExtractionSettings:
    n_shots: int = ICL_SHOTS
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


@torch.no_grad()
def icl_difference_vector(patcher: Patcher, tokenizer, pairs: Sequence[WordPair], layer: int, n_shots: int = ICL_SHOTS,
                          seed: int = 0, pairs_per_pass: int = 4) -> torch.Tensor:
    """An in-context "task vector": the mean over `pairs` of the residual stream after block
    `layer` at the prompt's last token, each input's n-shot prompt (demonstrations: other pairs,
    drawn with `seed`) minus its zero-shot prompt. [hidden] float32 on the CPU."""
    if len(pairs) < 2:
        raise SettingError(f"an in-context difference needs at least 2 pairs, got {len(pairs)}")
    rng = random.Random(seed)
    prompts = []
    for i, pair in enumerate(pairs):
        others = [p for j, p in enumerate(pairs) if j != i]
        prompts += [fewshot_prompt(rng.sample(others, min(n_shots, len(others))), pair.input), query_text(pair.input)]
    encoded = encode_prompts(tokenizer, prompts, [p.output for p in pairs for _ in range(2)])
    device = input_device(patcher.model)
    total = torch.zeros(patcher.adapter.hidden_size, device=device)
    step = 2 * pairs_per_pass  # a pair's two prompts always in the same pass
    for start in range(0, len(prompts), step):
        ids, mask, last = right_pad(encoded.input_ids[start : start + step], pad_id_of(tokenizer), device)
        hidden = patcher.block_output(ids, last, layer, attention_mask=mask)
        total += (hidden[0::2] - hidden[1::2]).sum(0)
    return (total / len(pairs)).cpu()


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
        f"({seconds['indirect_effects']:.1f}s); top: " + ", ".join(f"L{layer}H{h}={e:.4f}" for layer, h, e in ranked[:5])
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
