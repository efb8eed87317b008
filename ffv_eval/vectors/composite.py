"""Composite function vectors (CFV). For a source pair A:B, each basis FFV is scored by how well
it maps A to B (log-probability of B's first token after `Q: A\\nA:` with the FFV added); a
softmax over the basis turns the scores into the posterior over relations. Two posteriors:

    softmax     the paper's: softmax of log P(B | A, FFV_r), temperature 1
    calibrated  each relation against its own baseline: the gain log P(B | A, FFV_r) -
                log P(B | A) (how much FFV_r raises B over the same prompt without it), minus
                the mean gain of FFV_r over the training stems (how much it raises any answer),
                over a temperature fitted to put the posterior on each training stem's own
                relation. (A per-stem baseline alone would cancel in the softmax.)

An affine map, fitted on training analogies, turns the posterior into weights, and the CFV is
the weighted sum of the basis vectors, added where the model completes C
(`Q: A\\nA: B\\n\\nQ: C\\nA:`). The map is validated on the analogies of basis relations held out
of its fit; `posterior="auto"` and `map="auto"` keep the posterior, and the fitted map or W = I,
that validation supports.

The fitted map is stored as <basis dir>/composite.safetensors (tensors "weight" [R, R], "bias"
[R] and, calibrated, "relation_baseline" [R]) beside composite.json (basis relation names,
layer, posterior, temperature, model fingerprint, training data and metrics)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize_scalar
from tqdm.auto import tqdm

from ffv_eval import __version__
from ffv_eval.errors import TokenizationError
from ffv_eval.files.atomic import atomic_write, atomic_write_text
from ffv_eval.vectors.basis import Basis, BasisError, load_basis
from ffv_eval.data.basis_sources import BasisRelation
from ffv_eval.vectors.locations import find_basis_dir
from ffv_eval.vectors.function_vectors import answer_log_probs, answer_token_id, encode_continuation, encode_prompts, pad_id_of, right_pad
from ffv_eval.files.json_lines import json_document
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.data.prompts import answer_text, fewshot_prompt, query_text
from ffv_eval.data.relations import WordPair
from ffv_eval.progress import no_progress

COMPOSITE_FORMAT = "ffv-eval/composite/1"
COMPOSITE_FILE = "composite.safetensors"


@dataclass(frozen=True)
class Analogy:
    a: str
    b: str
    c: str
    d: str
    relation: str = ""


POSTERIORS = ("softmax", "calibrated")


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


@dataclass
class CompositeMap:
    basis: Basis
    weight: torch.Tensor  # [R, R]
    bias: torch.Tensor  # [R]
    temperature: float
    posterior_kind: str = "softmax"  # one of POSTERIORS
    relation_baseline: torch.Tensor | None = None  # [R], calibrated only
    metadata: dict = field(default_factory=dict)

    def posterior(self, log_probs: torch.Tensor) -> torch.Tensor:
        """basis_logprobs(..., with_baseline=True) [N, R + 1] -> posterior [N, R], float32."""
        return posterior_from(log_probs, self.posterior_kind, self.relation_baseline, self.temperature)

    def weights(self, posterior: torch.Tensor) -> torch.Tensor:
        """Posterior [N, R] -> weights [N, R], float32 on the posterior's device."""
        posterior = posterior.float()
        return posterior @ self.weight.to(posterior.device, torch.float32).T + self.bias.to(posterior.device, torch.float32)

    def vectors(self, posterior: torch.Tensor) -> torch.Tensor:
        """Posterior [N, R] -> CFVs [N, hidden], float32 on the posterior's device."""
        return self.weights(posterior) @ self.basis.vectors.to(posterior.device, torch.float32)


def check_words(tokenizer, words: Sequence[str], prompt: str, answer: str, where: str) -> None:
    """`words` (those in `prompt`) and `answer` are non-empty, and the answer has a first token
    after the prompt (see function_vectors.encode_continuation); else a BasisError naming `where`."""
    for word in (*words, answer):
        if not isinstance(word, str) or not word.strip():
            raise BasisError(f"{where}: empty word {word!r}: the basis cannot encode it")
    try:
        answer_token_id(tokenizer, prompt, answer)
    except TokenizationError as err:
        raise BasisError(f"{where}: the basis cannot encode {answer!r}: {err}") from err


ROWS_PER_PASS = 512  # (source pair, basis vector) rows run through the model together


@torch.no_grad()
def basis_logprobs(patcher: Patcher, tokenizer, basis: Basis, stems: Sequence[tuple[str, str]],
                   with_baseline: bool = False) -> torch.Tensor:
    """[N, R] (with_baseline: [N, R + 1], the last column without a vector): log P(B's first
    token | `Q: A\nA:` + FFV_r) for each stem (A, B) and basis relation r. Exact and batched
    across stems: stems whose prompts have the same number of tokens run together, their prompts
    before the last token once (key/value cache), then the last token once per basis vector
    (all at the basis layer), ROWS_PER_PASS rows at a time, unembedded LOGIT_ROWS rows at a
    time (function_vectors.answer_log_probs)."""
    device = input_device(patcher.model)
    vectors = basis.vectors.to(device, torch.float32)
    if with_baseline:
        vectors = torch.cat([vectors, torch.zeros(1, vectors.shape[1], dtype=torch.float32, device=device)])
    n = vectors.shape[0]
    encoded = []
    for a, b in stems:
        context, answer = encode_continuation(tokenizer, query_text(a), answer_text(b))
        if not answer:
            raise BasisError(f"source pair {a}:{b}: the basis cannot encode {b!r}: it encodes to no tokens")
        encoded.append((context, answer[0]))
    by_length: dict[int, list[int]] = {}
    for i, (context, _) in enumerate(encoded):
        by_length.setdefault(len(context), []).append(i)
    # float32: log-probabilities (see answer_log_probs); the posterior is a softmax over them.
    out = torch.zeros(len(stems), n, dtype=torch.float32, device=device)
    base = patcher.adapter.base_model()
    group = max(1, ROWS_PER_PASS // n)
    for indices in by_length.values():
        for start in range(0, len(indices), group):
            chunk = indices[start : start + group]
            ids = torch.tensor([encoded[i][0] for i in chunk], dtype=torch.long, device=device)
            cache = base(input_ids=ids[:, :-1], use_cache=True).past_key_values
            cache.batch_repeat_interleave(n)
            hidden = patcher.final_hidden(ids[:, -1:].repeat_interleave(n, 0), None, layer=basis.layer,
                                          vector=vectors.repeat(len(chunk), 1),
                                          positions=torch.zeros(len(chunk) * n, dtype=torch.long, device=device),
                                          past_key_values=cache, use_cache=True)
            answers = torch.tensor([encoded[i][1] for i in chunk], dtype=torch.long, device=device).repeat_interleave(n)
            out[chunk] = answer_log_probs(patcher.adapter, hidden[:, 0], answers)[0].to(device).view(len(chunk), n)
    return out


def relation_gains(log_probs: torch.Tensor) -> torch.Tensor:
    """[N, R + 1] log-probabilities (last column: no vector) -> [N, R]: how much each basis FFV
    raises B over the same prompt without it."""
    return log_probs[:, :-1] - log_probs[:, -1:]


def posterior_scores(log_probs: torch.Tensor, kind: str, relation_baseline: torch.Tensor | None = None) -> torch.Tensor:
    """[N, R + 1] log-probabilities -> [N, R] scores whose softmax (over T) is the posterior."""
    if kind == "softmax":
        return log_probs[:, :-1]
    if kind == "calibrated":
        if relation_baseline is None:
            raise BasisError("the calibrated posterior needs each relation's baseline (relation_baseline)")
        return relation_gains(log_probs) - relation_baseline.to(log_probs.device, torch.float32)
    raise BasisError(f"unknown posterior {kind!r} (known: {', '.join(POSTERIORS)})")


def posterior_from(log_probs: torch.Tensor, kind: str, relation_baseline: torch.Tensor | None, temperature: float) -> torch.Tensor:
    return torch.softmax(posterior_scores(log_probs, kind, relation_baseline) / temperature, dim=-1)


def relation_posterior(patcher: Patcher, tokenizer, basis: Basis, stems: Sequence[tuple[str, str]], temperature: float = 1.0) -> torch.Tensor:
    """[N, R]: the paper's posterior, the softmax over basis relations of log P(B | A, FFV_r) / T."""
    return torch.softmax(basis_logprobs(patcher, tokenizer, basis, stems) / temperature, dim=-1)


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


def save_composite_map(cmap: CompositeMap, model_alias: str) -> Path:
    path = Path(cmap.basis.directory) / COMPOSITE_FILE
    meta = {
        "format": COMPOSITE_FORMAT,
        "model": model_alias,
        "model_fingerprint": cmap.basis.model_fingerprint,
        "layer": cmap.basis.layer,
        "posterior": cmap.posterior_kind,
        "temperature": cmap.temperature,
        "basis": cmap.basis.names,
        **cmap.metadata,
        "ffv_eval_version": __version__,
    }
    tensors = {"weight": cmap.weight.contiguous(), "bias": cmap.bias.contiguous()}
    if cmap.relation_baseline is not None:
        tensors["relation_baseline"] = cmap.relation_baseline.float().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def load_composite_map(directory: Path, fingerprint: str | None = None) -> CompositeMap:
    """The fitted map in a basis directory, with its basis; errors name the file and field."""
    path = Path(directory) / COMPOSITE_FILE
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        raise BasisError(f"no composite map in {directory} ({COMPOSITE_FILE} + composite.json); run: ffv basis build")
    meta = json_document(side, BasisError)
    for name in ("format", "model_fingerprint", "layer", "temperature", "basis"):
        if name not in meta:
            raise BasisError(f"{side}: field '{name}' is missing")
    kind = meta.get("posterior", "softmax")  # maps saved before the calibrated posterior are the paper's
    if kind not in POSTERIORS:
        raise BasisError(f"{side}: field 'posterior' is {kind!r}, expected one of {', '.join(POSTERIORS)}")
    if meta["format"] != COMPOSITE_FORMAT:
        raise BasisError(f"{side}: field 'format' is {meta['format']!r}, expected {COMPOSITE_FORMAT!r}")
    if not meta["basis"]:
        raise BasisError(f"{side}: field 'basis' is empty: an empty basis cannot compose anything")
    if fingerprint is not None and meta["model_fingerprint"] != fingerprint:
        raise BasisError(f"{side}: composite map built for model fingerprint {meta['model_fingerprint']} "
                         f"({meta.get('model', 'unknown')}), the loaded model is {fingerprint}")
    basis = load_basis(directory, meta["basis"], meta["model_fingerprint"])
    tensors = load_file(str(path))
    n = len(meta["basis"])
    if tensors["weight"].shape != (n, n) or tensors["bias"].shape != (n,):
        raise BasisError(f"{path}: weight/bias shapes {tuple(tensors['weight'].shape)}/{tuple(tensors['bias'].shape)} "
                         f"do not match the {n} basis relations in {side}")
    baseline = tensors.get("relation_baseline")
    if kind == "calibrated" and (baseline is None or baseline.shape != (n,)):
        raise BasisError(f"{path}: the calibrated posterior needs a tensor 'relation_baseline' of shape ({n},), "
                         f"found {None if baseline is None else tuple(baseline.shape)}; rebuild with ffv basis build")
    return CompositeMap(basis, tensors["weight"], tensors["bias"], float(meta["temperature"]), kind,
                        baseline if kind == "calibrated" else None, meta)


def model_composite_map(model_alias: str, fingerprint: str, basis_dir=None) -> CompositeMap:
    """The fitted map for a loaded model: from `basis_dir`, else the model's own basis directory
    (./vectors, then the shipped library; vectors.locations.find_basis_dir)."""
    directory = Path(basis_dir) if basis_dir else find_basis_dir(model_alias, fingerprint)
    if directory is None:
        raise BasisError(f"no composite map for {model_alias} (fingerprint {fingerprint}) in ./vectors or the shipped "
                         f"vectors: build one with `ffv basis build --model {model_alias} --data-dir <dir>`, or pass basis=<dir>")
    return load_composite_map(directory, fingerprint)


class CompositeVectors:
    """CFVs for source pairs on one model, cached per pair."""

    def __init__(self, patcher: Patcher, tokenizer, cmap: CompositeMap):
        self.patcher, self.tokenizer, self.cmap = patcher, tokenizer, cmap
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def layer(self) -> int:
        return self.cmap.basis.layer

    def prepare(self, stems: Sequence[tuple[str, str]], where: dict[tuple[str, str], str] | None = None) -> None:
        """Compute (batched) the CFVs of the stems not cached yet; `where` names each stem's
        origin (task, document) for errors."""
        todo = list(dict.fromkeys(s for s in stems if s not in self._cache))
        for a, b in todo:
            check_words(self.tokenizer, [a], query_text(a), b, (where or {}).get((a, b), f"source pair {a}:{b}"))
        if todo:
            posterior = self.cmap.posterior(basis_logprobs(self.patcher, self.tokenizer, self.cmap.basis, todo, with_baseline=True))
            for stem, p, v in zip(todo, posterior, self.cmap.vectors(posterior)):
                self._cache[stem] = (p, v)

    def vector(self, a: str, b: str) -> torch.Tensor:
        self.prepare([(a, b)])
        return self._cache[(a, b)][1]

    def explain(self, a: str, b: str, top: int = 10) -> list[tuple[str, float, float]]:
        """The top relations for A:B: (name, posterior, weight)."""
        self.prepare([(a, b)])
        posterior = self._cache[(a, b)][0]
        weights = self.cmap.weights(posterior[None])[0]
        order = posterior.argsort(descending=True)[:top]
        return [(self.cmap.basis.names[i], float(posterior[i]), float(weights[i])) for i in order]
