"""Fine-tuned function vectors (FFV): train only the vector, the model frozen, so that adding it
after one decoder block at the last token of zero-shot `Q: x\\nA:` prompts makes the model
predict each training pair's answer (cross-entropy on the answer's first token), with an L2
penalty that keeps the vector near its starting norm. Batched, seeded and deterministic."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ffv_eval.function_vectors import encode_prompts, pad_id_of, right_pad
from ffv_eval.patching import Patcher
from ffv_eval.prompts import query_text
from ffv_eval.relations import RelationDataError, WordPair


class DivergedTraining(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainingSettings:
    n_pairs: int = 20
    steps: int = 60
    batch_size: int = 4
    learning_rate: float = 0.05  # relative to the starting vector's RMS per coordinate
    l2: float = 0.01  # weight of (|v| / |v0|)^2
    init: str = "fv"  # "fv" or "random" (a random direction with the FV's norm)
    seed: int = 0


@dataclass
class TrainingResult:
    vector: torch.Tensor
    initial_vector: torch.Tensor
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
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(vector.shape, generator=generator)
    return direction / direction.norm() * vector.norm()


def train_function_vector(
    patcher: Patcher,
    tokenizer,
    pairs: Sequence[WordPair],
    layer: int,
    initial: torch.Tensor,
    settings: TrainingSettings = TrainingSettings(),
    progress: Callable[[str], None] = lambda message: None,
) -> TrainingResult:
    if settings.init not in ("fv", "random"):
        raise ValueError(f"--init must be 'fv' or 'random', got {settings.init!r}")
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    v0 = initial.float() if settings.init == "fv" else random_like(initial.float(), settings.seed)
    vector = v0.clone().requires_grad_(True)
    scale = float(v0.norm() / math.sqrt(v0.numel()))
    optimizer = torch.optim.Adam([vector], lr=settings.learning_rate * scale)
    prompts = encode_prompts(tokenizer, [query_text(p.input) for p in pairs], [p.output for p in pairs])
    order: list[int] = []
    losses = []
    with torch.enable_grad():
        for step in range(settings.steps):
            batch = []
            while len(batch) < settings.batch_size:
                if not order:
                    order = list(range(len(pairs)))
                    rng.shuffle(order)
                batch.append(order.pop())
            ids, mask, last = right_pad([prompts.input_ids[i] for i in batch], pad_id_of(tokenizer))
            hidden = patcher.final_hidden(ids, mask, layer=layer, vector=vector, positions=last)
            logits = patcher.adapter.unembed(hidden[torch.arange(len(batch)), last]).float()
            answers = torch.tensor([prompts.answer_ids[i] for i in batch])
            loss = F.cross_entropy(logits, answers) + settings.l2 * (vector.norm() / v0.norm()) ** 2
            if not torch.isfinite(loss):
                raise DivergedTraining(f"training diverged at step {step + 1}: loss is {loss.item()} (try a lower learning rate)")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if (step + 1) % 10 == 0 or step + 1 == settings.steps:
                progress(f"step {step + 1}/{settings.steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.3f}, |v| {vector.norm():.0f}")
    result = vector.detach().clone()
    if not torch.isfinite(result).all():
        raise DivergedTraining("training produced a non-finite vector")
    return TrainingResult(result, v0, losses, time.perf_counter() - start)
