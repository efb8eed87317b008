"""Fitting a composite map (vectors/composite.py) to training analogies: analogies A:B::C:D from
two spare pairs of one basis relation, the held-out relations that validate the fit, the
posterior's temperature (scipy), the affine map W, b trained so that the CFV added where the
model completes C makes D's first token likely, and the validation that keeps the posterior and
the fitted map or W = I. The map's maths and file format are in composite.py."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import minimize_scalar
from tqdm.auto import tqdm

from ffv_eval.data.basis_sources import BasisRelation
from ffv_eval.data.prompts import fewshot_prompt, query_text
from ffv_eval.data.relations import WordPair
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import answer_token_id, encode_prompts, pad_id_of, right_pad
from ffv_eval.progress import no_progress
from ffv_eval.vectors.basis import Basis, BasisError
from ffv_eval.vectors.composite import POSTERIORS, CompositeMap, basis_logprobs, check_words, posterior_scores, relation_gains
from ffv_eval.vectors.scoring import answer_log_probs


@dataclass(frozen=True)
class Analogy:
    a: str
    b: str
    c: str
    d: str
    relation: str = ""



@dataclass(frozen=True)
class MapSettings:
    stems_per_relation: int = 16  # source pairs A:B per basis relation, from its spare pairs
    targets_per_stem: int = 8  # C:D per source pair, from the same spare pairs
    held_out_relations: float = 0.2  # share of relations whose analogies validate the map, not fit it
    posterior: str = "auto"  # one of POSTERIORS, or "auto": the one validation supports
    map: str = "auto"  # "fitted" (the paper's), "identity" (W = I, b = 0), or "auto": the one validation supports
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 0.02
    l2: float = 1.0  # weight of |W - I|^2 + |b|^2, per relation
    seed: int = 0



def fit_temperature(scores: torch.Tensor, relation_index: Sequence[int]) -> float:
    """The temperature that maximises the posterior of each stem's own relation (scipy, bounded
    to 0.01..100 on a log scale)."""
    # float64 on the CPU: a one-dimensional optimisation over a small matrix.
    scores = scores.detach().to("cpu", torch.float64)
    target = torch.tensor(list(relation_index), dtype=torch.long, device="cpu")

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(scores / math.exp(log_t), target))

    return math.exp(minimize_scalar(loss, bounds=(math.log(0.01), math.log(100.0)), method="bounded").x)


def training_analogies(relations: Sequence[BasisRelation], n_training_pairs: int, stems_per_relation: int,
                       targets_per_stem: int, seed: int) -> list[Analogy]:
    """Analogies A:B::C:D from two pairs of one basis relation, both among the pairs its basis
    vector was not trained on: up to `stems_per_relation` source pairs A:B, each with up to
    `targets_per_stem` other pairs C:D (relations with fewer than two such pairs give none).
    Test-set pairs are already excluded from the basis relations (basis_sources.analogy_test_pairs)."""
    rng = random.Random(seed)
    out = []
    for relation in relations:
        spare = list(relation.pairs[n_training_pairs:])
        if len(spare) < 2:
            continue
        for i, stem in enumerate(spare[:stems_per_relation]):
            others = spare[:i] + spare[i + 1 :]
            for target in rng.sample(others, min(targets_per_stem, len(others))):
                out.append(Analogy(stem.input, stem.output, target.input, target.output, relation.name))
    return out


def held_out_relations(analogies: Sequence[Analogy], share: float, seed: int) -> set[str]:
    """The relations whose analogies validate the map (a seeded `share` of them, at least one
    when there are two or more; none otherwise)."""
    names = sorted({x.relation for x in analogies})
    if len(names) < 2 or share <= 0:
        return set()
    return set(random.Random(seed).sample(names, min(len(names) - 1, max(1, round(share * len(names))))))


def one_shot_prompt(a: str, b: str, c: str) -> str:
    return fewshot_prompt([WordPair(a, b)], c)


def completion_scores(patcher: Patcher, tokenizer, analogies: Sequence[Analogy], layer: int, vectors: torch.Tensor | None,
                      with_top_ids: bool = False):
    """Per analogy, for the token after `Q: A\\nA: B\\n\\nQ: C\\nA:` with vectors [N, hidden] added
    there: log P(D's first token) (float32, differentiable in the vectors), whether it is the
    most likely token, and (with_top_ids) the most likely token."""
    device = input_device(patcher.model)
    prompts = encode_prompts(tokenizer, [one_shot_prompt(x.a, x.b, x.c) for x in analogies], [x.d for x in analogies])
    ids, mask, last = right_pad(prompts.input_ids, pad_id_of(tokenizer), device)
    answers = torch.tensor(prompts.answer_ids, dtype=torch.long, device=device)
    hidden = patcher.final_hidden(ids, mask, layer=layer, vector=None if vectors is None else vectors.to(device), positions=last)
    last_hidden = hidden[torch.arange(len(analogies), device=hidden.device), last.to(hidden.device)]
    return answer_log_probs(patcher.adapter, last_hidden, answers, with_top_ids=with_top_ids)


@torch.no_grad()
def completion_check(patcher, tokenizer, analogies: Sequence[Analogy], layer: int, vectors: torch.Tensor | None = None,
                     batch_size: int = 64) -> dict[str, float]:
    """First-token accuracy of D after `Q: A\\nA: B\\n\\nQ: C\\nA:` (vectors [N, hidden] added there),
    and the share of analogies whose top token is instead the first token of A, B or C (the
    model repeating a word of the prompt)."""
    hits = repeats = 0
    for start in range(0, len(analogies), batch_size):
        chunk = analogies[start : start + batch_size]
        rows = None if vectors is None else vectors[start : start + batch_size]
        _, top, top_ids = completion_scores(patcher, tokenizer, chunk, layer, rows, with_top_ids=True)
        hits += int(top.sum())
        for x, is_d, token in zip(chunk, top.tolist(), top_ids.tolist()):
            prompt = one_shot_prompt(x.a, x.b, x.c)
            repeats += not is_d and token in {answer_token_id(tokenizer, prompt, w) for w in (x.a, x.b, x.c)}
    n = max(1, len(analogies))
    return {"accuracy": hits / n, "repeats_abc": repeats / n}


def fit_composite_map(
    patcher: Patcher,
    tokenizer,
    basis: Basis,
    analogies: Sequence[Analogy],
    settings: MapSettings = MapSettings(),
    progress: Callable[[str], None] = no_progress,
) -> CompositeMap:
    """Fit W, b (weights = W p + b, starting at W = I, b = 0) so that the CFV added where the
    model completes C makes D's first token likely, on the analogies of all but the held-out
    basis relations; the held-out relations' analogies report first-token accuracy and repeats
    of A, B or C, unpatched, with W = I and with the fitted map, for each posterior tried
    (settings.posterior, or both with "auto"). With settings.map "auto", validation picks the
    posterior and whether the fitted map or W = I is kept (the paper's softmax and fitted map on
    a tie or without held-out relations)."""
    if not analogies:
        raise BasisError("no training analogies: every basis relation has fewer than two spare pairs")
    if settings.posterior not in (*POSTERIORS, "auto"):
        raise BasisError(f"posterior={settings.posterior!r}: expected one of {', '.join(POSTERIORS)} or auto")
    if settings.map not in ("fitted", "identity", "auto"):
        raise BasisError(f"map={settings.map!r}: expected fitted, identity or auto")
    for x in analogies:
        where = f"training analogy {x.a}:{x.b}::{x.c}:{x.d} from {x.relation}"
        check_words(tokenizer, [x.a], query_text(x.a), x.b, where)
        check_words(tokenizer, [x.a, x.b, x.c], one_shot_prompt(x.a, x.b, x.c), x.d, where)
    held_out = held_out_relations(analogies, settings.held_out_relations, settings.seed)
    train = [x for x in analogies if x.relation not in held_out]
    valid = [x for x in analogies if x.relation in held_out]
    t = time.perf_counter()
    stems = list(dict.fromkeys((x.a, x.b) for x in analogies))
    row = {stem: i for i, stem in enumerate(stems)}
    log_probs = basis_logprobs(patcher, tokenizer, basis, stems, with_baseline=True)
    lp_train = log_probs[[row[(x.a, x.b)] for x in train]]
    lp_valid = log_probs[[row[(x.a, x.b)] for x in valid]]
    progress(f"[ffv] posteriors of {len(stems)} source pairs ({len(train)} fitting and {len(valid)} validation analogies, "
             f"{len(held_out)} held-out relations) over {len(basis.names)} basis relations ({time.perf_counter() - t:.0f}s)")
    # Each relation's own baseline: its mean gain over the fitting stems (one row per stem).
    fit_stems = list(dict.fromkeys(row[(x.a, x.b)] for x in train))
    relation_baseline = relation_gains(log_probs[fit_stems]).mean(0).cpu()
    truth = [basis.names.index(x.relation) if x.relation in basis.names else -1 for x in train]
    known = [i for i, k in enumerate(truth) if k >= 0]
    unpatched = completion_check(patcher, tokenizer, valid, basis.layer) if valid else None
    kinds = POSTERIORS if settings.posterior == "auto" else (settings.posterior,)
    candidates = {}
    for kind in kinds:
        temperature = 1.0
        if kind == "calibrated" and known:
            temperature = fit_temperature(posterior_scores(lp_train[known], kind, relation_baseline), [truth[i] for i in known])
        cmap = CompositeMap(basis, *_identity_map(len(basis.names)), temperature, kind, relation_baseline if kind == "calibrated" else None)
        progress(f"[ffv] fitting the map on the {kind} posterior (temperature {temperature:.3g})")
        cmap.weight, cmap.bias, fit_metrics = _fit_map(patcher, tokenizer, basis, train, cmap.posterior(lp_train), settings, progress)
        metrics = {"temperature": temperature, **fit_metrics}
        if valid:
            posterior_valid = cmap.posterior(lp_valid)
            unmapped = CompositeMap(basis, *_identity_map(len(basis.names)), temperature, kind, cmap.relation_baseline)
            metrics.update({
                "validation_unpatched": unpatched,
                "validation_posterior_weights": completion_check(patcher, tokenizer, valid, basis.layer, unmapped.vectors(posterior_valid)),
                "validation_fitted_map": completion_check(patcher, tokenizer, valid, basis.layer, cmap.vectors(posterior_valid)),
                "validation_top_relation_correct": _top_relation_share(basis, posterior_valid, valid),
            })
            progress("[ffv] {kind} posterior, held-out relations' analogies: first-token accuracy unpatched {u[accuracy]:.3f}, "
                     "W = I {w[accuracy]:.3f}, fitted map {f[accuracy]:.3f}; repeats of A, B or C {u[repeats_abc]:.3f} / "
                     "{w[repeats_abc]:.3f} / {f[repeats_abc]:.3f}; top relation right {top:.3f}".format(
                         kind=kind, u=unpatched, w=metrics["validation_posterior_weights"], f=metrics["validation_fitted_map"],
                         top=metrics["validation_top_relation_correct"]))
        candidates[kind] = (cmap, metrics)
    # Validation picks the posterior and whether the fitted map beats W = I on relations it was
    # not fitted on; ties go to the paper's choice (softmax, fitted map).
    maps = {"auto": ("fitted", "identity"), "fitted": ("fitted",), "identity": ("identity",)}[settings.map]
    options = [(kind, how) for kind in kinds for how in maps]

    def validated(option) -> tuple:
        kind, how = option
        key = "validation_fitted_map" if how == "fitted" else "validation_posterior_weights"
        return (candidates[kind][1].get(key, {}).get("accuracy", 0.0), kind == "softmax", how == "fitted")

    chosen, how = max(options, key=validated)
    cmap = candidates[chosen][0]
    if how == "identity":
        cmap.weight, cmap.bias = _identity_map(len(basis.names))
    cmap.metadata = {
        "settings": dataclasses.asdict(settings),
        "posterior_choice": {"chosen": chosen, "map": how,
                             "by": "validation first-token accuracy on the held-out relations' analogies" if valid and len(options) > 1
                             else "settings" if len(options) == 1 else "no held-out relations: the paper's softmax and fitted map"},
        "held_out_relations": sorted(held_out),
        "analogies": {"fitting": len(train), "validation": len(valid), "source_pairs": len(stems)},
        "metrics": {kind: metrics for kind, (_, metrics) in candidates.items()},
    }
    return cmap


def _identity_map(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W = I, b = 0: the posterior itself as the weights. On the CPU, where maps are kept."""
    return torch.eye(n, dtype=torch.float32, device="cpu"), torch.zeros(n, dtype=torch.float32, device="cpu")


def _fit_map(patcher, tokenizer, basis: Basis, train: Sequence[Analogy], posterior_train: torch.Tensor, settings: MapSettings,
             progress) -> tuple[torch.Tensor, torch.Tensor, dict]:
    n = len(basis.names)
    device = input_device(patcher.model)
    basis_vectors = basis.vectors.to(device, torch.float32)
    posterior_train = posterior_train.to(device)
    # float32: the map and its Adam state, like a trained vector (see fine_tuning).
    identity = torch.eye(n, dtype=torch.float32, device=device)
    weight = identity.clone().requires_grad_(True)
    bias = torch.zeros(n, dtype=torch.float32, device=device).requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=settings.learning_rate)
    rng = random.Random(settings.seed)
    losses = []
    t = time.perf_counter()
    with torch.enable_grad():
        for step in tqdm(range(settings.steps), desc="fitting the composite map", disable=None):
            rows = rng.sample(range(len(train)), min(settings.batch_size, len(train)))
            vectors = (posterior_train[rows] @ weight.T + bias) @ basis_vectors
            log_prob, _ = completion_scores(patcher, tokenizer, [train[i] for i in rows], basis.layer, vectors)
            loss = -log_prob.to(device).mean() + settings.l2 / n * ((weight - identity).pow(2).sum() + bias.pow(2).sum())
            if not torch.isfinite(loss):
                raise BasisError(f"fitting the composite map diverged at step {step + 1} (loss {loss.item()})")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    last = losses[-25:]
    progress(f"[ffv] map fitted: loss {losses[0]:.3f} -> {sum(last) / len(last):.3f} ({time.perf_counter() - t:.0f}s)")
    return (weight.detach().cpu().clone(), bias.detach().cpu().clone(),
            {"first_loss": losses[0], "last_loss": sum(last) / len(last), "seconds": time.perf_counter() - t})


def _top_relation_share(basis: Basis, posterior: torch.Tensor, analogies: Sequence[Analogy]) -> float:
    if not analogies:
        return 0.0
    top = posterior.argmax(-1).tolist()
    return sum(basis.names[i] == x.relation for i, x in zip(top, analogies)) / len(analogies)
