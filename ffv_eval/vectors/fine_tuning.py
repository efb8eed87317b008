"""Fine-tuned function vectors (FFV): train only the vector, the model frozen, so that adding it
after one decoder block at the last token of zero-shot `Q: x\\nA:` prompts makes the model
predict each training pair's answer, with an L2 penalty that keeps the vector near its starting
norm. Batched, seeded and deterministic.

The loss (TrainingSettings.loss): "answer" (as the paper trains) is the mean cross-entropy over
all the answer's tokens, teacher-forced after the prompt, the vector added where the answer
begins (the prompt's last token); "answer-newline" (the default, chosen on the relations'
validation splits) the same over the answer and the newline that ends it (the relation tasks stop
generating there, and 10-shot demonstrations show it), so the vector also teaches the model to
stop after the answer; "first-token" is the cross-entropy of the answer's first token alone.
The start (TrainingSettings.init): the relation's FV (the default), a random direction of the
FV's norm (the ablation), or the in-context difference of the training pairs themselves
("icl-diff", function_vectors.icl_difference_vector: each pair's 10-shot prompt minus its
zero-shot prompt, after the vector's block; chosen for gemma-3-270m on the relations'
validation splits, docs/results.md).
The trained vector is returned multiplied by TrainingSettings.scale.
The answer's tokens are found as lm-eval finds a continuation's (models.tokens.encode_continuation)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ffv_eval.data.prompts import query_text
from ffv_eval.data.relations import RelationDataError, WordPair
from ffv_eval.errors import FFVError, SettingError
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import encode_answers, pad_id_of, right_pad
from ffv_eval.progress import no_progress
from ffv_eval.vectors.function_vectors import icl_difference_vector
from ffv_eval.vectors.scoring import answer_log_probs


class DivergedTraining(FFVError, RuntimeError):
    """Training made the loss or the vector non-finite (a learning rate too high for the model)."""


@dataclass(frozen=True)
class TrainingSettings:
    n_pairs: int = 20
    steps: int = 60
    batch_size: int = 4
    learning_rate: float = 0.05  # relative to the starting vector's RMS per coordinate
    l2: float = 0.01  # weight of (|v| / |v0|)^2
    init: str = "fv"  # one of INITS: the FV, a random direction with its norm, or the in-context difference
    seed: int = 0
    loss: str = "answer-newline"  # one of LOSSES (chosen on the validation splits: docs/results.md)
    # the trained vector is returned (and saved) multiplied by this, as an FV's chosen scale is
    # applied to it; below 1 the vector pushes less hard than the 20 pairs it fitted ask for
    # (chosen on the validation splits: docs/results.md)
    scale: float = 0.85
    # weight of an unlikelihood term against copying: -log(1 - P(the input's first token)) where
    # the answer begins (0: none; pairs whose answer begins with the input's token are exempt)
    copy_penalty: float = 0.0

    def checked(self) -> TrainingSettings:
        """These settings, or a SettingError naming the bad one (called before any model work)."""
        if self.init not in INITS:
            raise SettingError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.loss not in LOSSES:
            raise SettingError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise SettingError(f"--scale must be a positive number, got {self.scale!r}")
        if not (math.isfinite(self.copy_penalty) and self.copy_penalty >= 0):
            raise SettingError(f"copy_penalty must be a number >= 0, got {self.copy_penalty!r}")
        return self


LOSSES = ("answer", "answer-newline", "first-token")
INITS = ("fv", "random", "icl-diff")
ANSWER_END = "\n"  # what ends an answer: the relation tasks' stop sequence (tasks/relations, until)


@dataclass
class TrainingResult:
    vector: torch.Tensor  # float32 on the CPU
    initial_vector: torch.Tensor  # float32 on the CPU
    losses: list[float]
    seconds: float


def check_training_pairs(pairs: Sequence[WordPair], held_out: Sequence[WordPair], n_pairs: int, where: str) -> list[WordPair]:
    """The first n_pairs training pairs, refusing too few, duplicates and test overlap."""
    inputs = [p.input for p in pairs]
    duplicates = sorted({i for i in inputs if inputs.count(i) > 1})
    if duplicates:
        raise RelationDataError(f"{where}: duplicate training inputs: {', '.join(duplicates[:5])}")
    overlap = sorted(set(inputs) & {p.input for p in held_out})
    if overlap:
        raise RelationDataError(f"{where}: training pairs overlap the test split: {', '.join(overlap[:5])}")
    if len(pairs) < n_pairs:
        raise RelationDataError(f"{where}: {len(pairs)} training pairs, need at least {n_pairs}")
    return list(pairs[:n_pairs])


def random_like(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random direction with `vector`'s norm, float32 on `vector`'s device."""
    # Drawn on the CPU generator so that a seed gives the same direction on every device.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    direction = torch.randn(vector.shape, generator=generator, dtype=torch.float32, device="cpu").to(vector.device)
    return direction / direction.norm() * vector.float().norm()


def starting_vectors(patcher: Patcher, tokenizer, pair_lists: Sequence[Sequence[WordPair]], layer: int,
                     initials: torch.Tensor, settings: TrainingSettings) -> list[torch.Tensor]:
    """Each relation's start as settings.init says, from its FV (`initials`, [relations,
    hidden]) and its training pairs; float32 on the model's device."""
    device = input_device(patcher.model)
    initials = initials.to(device, torch.float32)
    if settings.init == "random":
        return [random_like(v, settings.seed) for v in initials]
    if settings.init == "icl-diff":  # demonstrations drawn from the same training pairs
        return [icl_difference_vector(patcher, tokenizer, pairs, layer, seed=settings.seed).to(device)
                for pairs in pair_lists]
    return list(initials)


def train_function_vector(
    patcher: Patcher,
    tokenizer,
    pairs: Sequence[WordPair],
    layer: int,
    initial: torch.Tensor,
    settings: TrainingSettings = TrainingSettings(),
    progress: Callable[[str], None] = no_progress,
) -> TrainingResult:
    """One relation's FFV (see train_function_vectors)."""
    return train_function_vectors(patcher, tokenizer, [pairs], layer, initial[None], settings, progress)[0]


def train_function_vectors(
    patcher: Patcher,
    tokenizer,
    pair_lists: Sequence[Sequence[WordPair]],
    layer: int,
    initials: torch.Tensor,
    settings: TrainingSettings = TrainingSettings(),
    progress: Callable[[str], None] = no_progress,
) -> list[TrainingResult]:
    """FFVs of several relations at once: one forward pass per step carries settings.batch_size
    prompts of every relation, each row patched with its own relation's vector. Every vector
    has its own Adam state, learning rate, sampling order and loss term, so the result for a
    relation is what training it alone would give (up to float rounding in batched kernels)."""
    settings = settings.checked()
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = input_device(patcher.model)
    n_relations = len(pair_lists)
    # float32 whatever the model's dtype: the trained vectors and their Adam state (steps of
    # 0.05 x the vector's RMS would vanish in bfloat16's 8-bit mantissa); patching casts each
    # step's vector to the model's dtype, and gradients flow back through that cast.
    starts = starting_vectors(patcher, tokenizer, pair_lists, layer, initials, settings)
    vectors = [v0.clone().requires_grad_(True) for v0 in starts]
    optimizer = torch.optim.Adam(
        [{"params": [v], "lr": settings.learning_rate * float(v0.norm() / math.sqrt(v0.numel()))} for v, v0 in zip(vectors, starts)]
    )
    ending = ANSWER_END if settings.loss == "answer-newline" else ""
    prompts = [encode_answers(tokenizer, [query_text(p.input) for p in pairs], [p.output + ending for p in pairs])
               for pairs in pair_lists]
    # per pair: the answer tokens the loss covers (all of them, with the newline, or the first)
    targets = [[ids[:1] if settings.loss == "first-token" else ids for ids in answers.answer_ids] for answers in prompts]
    # per pair: the input's first token where the answer begins (the copy the penalty discourages),
    # or -1 where the answer itself begins with it
    copies = [[-1] * len(pairs) for pairs in pair_lists]
    if settings.copy_penalty:
        for r, pairs in enumerate(pair_lists):
            inputs = encode_answers(tokenizer, [query_text(p.input) for p in pairs], [p.input for p in pairs]).answer_ids
            copies[r] = [ids[0] if ids and ids[0] != target[0] else -1 for ids, target in zip(inputs, targets[r])]
    samplers = [_Sampler(len(pairs), settings.seed) for pairs in pair_lists]
    losses: list[list[float]] = [[] for _ in range(n_relations)]
    with torch.enable_grad():
        for step in range(settings.steps):
            rows = [(r, i) for r in range(n_relations) for i in samplers[r].take(settings.batch_size)]
            # teacher forcing: the prompt, then every answer token but the last; the vector goes at
            # the prompt's last token, whose output predicts the answer's first token
            contexts = [prompts[r].context_ids[i] for r, i in rows]
            answers = [targets[r][i] for r, i in rows]
            ids, mask, _ = right_pad([c + a[:-1] for c, a in zip(contexts, answers)], pad_id_of(tokenizer), device)
            answer_start = torch.tensor([len(c) - 1 for c in contexts], dtype=torch.long, device=device)
            which = torch.tensor([r for r, _ in rows], dtype=torch.long, device=device)
            hidden = patcher.final_hidden(ids, mask, layer=layer, vector=torch.stack(vectors)[which], positions=answer_start)
            row_of = [j for j, a in enumerate(answers) for _ in a]
            rows_t = torch.tensor(row_of, dtype=torch.long, device=hidden.device)
            positions = torch.tensor([len(contexts[j]) - 1 + t for j, a in enumerate(answers) for t in range(len(a))],
                                     dtype=torch.long, device=hidden.device)
            tokens = torch.tensor([token for a in answers for token in a], dtype=torch.long, device=device)
            log_prob, _ = answer_log_probs(patcher.adapter, hidden[rows_t, positions], tokens)  # float32
            # cross-entropy per row: the mean over its answer tokens
            lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32, device=device)
            per_token = torch.zeros(len(rows), dtype=torch.float32, device=device).index_add(0, rows_t.to(device), (-log_prob).to(device))
            per_row = per_token / lengths
            if settings.copy_penalty and any(copies[r][i] >= 0 for r, i in rows):
                copy = torch.tensor([copies[r][i] for r, i in rows], dtype=torch.long, device=device)
                starts_at = hidden[torch.arange(len(rows), device=hidden.device), answer_start.to(hidden.device)]
                log_copy, _ = answer_log_probs(patcher.adapter, starts_at, copy.clamp(min=0))  # float32
                # -log(1 - p), p kept below 1 so that a certain copy gives a large finite loss
                unlikely = -torch.log1p(-log_copy.to(device).exp().clamp(max=1 - 1e-6))
                per_row = per_row + settings.copy_penalty * torch.where(copy >= 0, unlikely, torch.zeros_like(unlikely))
            per_row = per_row.view(n_relations, settings.batch_size)
            per_relation = per_row.mean(dim=1) + settings.l2 * torch.stack(
                [(v.norm() / v0.norm()) ** 2 for v, v0 in zip(vectors, starts)])
            if not torch.isfinite(per_relation).all():
                bad = int((~torch.isfinite(per_relation)).nonzero()[0])
                raise DivergedTraining(f"training diverged at step {step + 1} (relation {bad + 1} of {n_relations}): "
                                       f"loss is {per_relation[bad].item()} (try a lower learning rate)")
            optimizer.zero_grad()
            per_relation.sum().backward()
            optimizer.step()
            for r in range(n_relations):
                losses[r].append(per_relation[r].item())
            if (step + 1) % 10 == 0 or step + 1 == settings.steps:
                recent = [sum(x[-10:]) / len(x[-10:]) for x in losses]
                progress(f"step {step + 1}/{settings.steps}: loss {sum(recent) / n_relations:.3f}"
                         + (f", |v| {vectors[0].norm():.0f}" if n_relations == 1 else f" (mean of {n_relations} relations)"))
    seconds = time.perf_counter() - start
    results = []
    for v, v0, relation_losses in zip(vectors, starts, losses):
        result = v.detach().cpu() * settings.scale
        if not torch.isfinite(result).all():
            raise DivergedTraining("training produced a non-finite vector")
        results.append(TrainingResult(result, v0.detach().cpu().clone(), relation_losses, seconds / n_relations))
    return results


class _Sampler:
    """Shuffled passes over a relation's pairs, its own seeded order."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        batch = []
        while len(batch) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            batch.append(self.order.pop())
        return batch
