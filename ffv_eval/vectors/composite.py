"""Composite function vectors (CFV). For a source pair A:B, each basis FFV is scored by how well
it maps A to B (log-probability of B's first token after `Q: A\\nA:` with the FFV added); the
softmax over the basis is the posterior over relations. An affine map, fitted on training
analogies, turns the posterior into weights, and the CFV is the weighted sum of the basis
vectors, added where the model completes C (`Q: A\\nA: B\\n\\nQ: C\\nA:`).

The fitted map is stored as <basis dir>/composite.safetensors (tensors "weight" [R, R] and
"bias" [R]) beside composite.json (basis relation names, layer, temperature, model
fingerprint, training data and metrics)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ffv_eval import __version__
from ffv_eval.errors import TokenizationError
from ffv_eval.files.atomic import atomic_write, atomic_write_text
from ffv_eval.vectors.basis import Basis, BasisError, load_basis
from ffv_eval.data.basis_sources import BasisRelation
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


@dataclass(frozen=True)
class MapSettings:
    analogies_per_relation: int = 4
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 0.02
    l2: float = 1.0  # weight of |W - I|^2 + |b|^2, per relation
    temperature: float = 1.0
    validation_share: float = 0.2
    seed: int = 0


@dataclass
class CompositeMap:
    basis: Basis
    weight: torch.Tensor  # [R, R]
    bias: torch.Tensor  # [R]
    temperature: float
    metadata: dict = field(default_factory=dict)

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


@torch.no_grad()
def basis_logprobs(patcher: Patcher, tokenizer, basis: Basis, stems: Sequence[tuple[str, str]]) -> torch.Tensor:
    """[N, R]: log P(B's first token | `Q: A\nA:` + FFV_r) for each stem and basis relation.
    The prompt before its last token is run once per stem (key/value cache); only the last
    token is run for the R basis vectors, which all sit at the basis layer; their logits are
    unembedded LOGIT_ROWS rows at a time (function_vectors.answer_log_probs)."""
    device = input_device(patcher.model)
    n = len(basis.names)
    # float32: log-probabilities (see answer_log_probs); the posterior is a softmax over them.
    out = torch.zeros(len(stems), n, dtype=torch.float32, device=device)
    base = patcher.adapter.base_model()
    vectors = basis.vectors.to(device, torch.float32)
    positions = torch.zeros(n, dtype=torch.long, device=device)
    for i, (a, b) in enumerate(stems):
        context, answer = encode_continuation(tokenizer, query_text(a), answer_text(b))
        if not answer:
            raise BasisError(f"source pair {a}:{b}: the basis cannot encode {b!r}: it encodes to no tokens")
        ids = torch.tensor([context], dtype=torch.long, device=device)
        cache = base(input_ids=ids[:, :-1], use_cache=True).past_key_values
        cache.batch_repeat_interleave(n)
        hidden = patcher.final_hidden(ids[:, -1:].expand(n, 1), None, layer=basis.layer, vector=vectors,
                                      positions=positions, past_key_values=cache, use_cache=True)
        answers = torch.full((n,), answer[0], dtype=torch.long, device=device)
        out[i] = answer_log_probs(patcher.adapter, hidden[:, 0], answers)[0].to(device)
    return out


def relation_posterior(patcher: Patcher, tokenizer, basis: Basis, stems: Sequence[tuple[str, str]], temperature: float = 1.0) -> torch.Tensor:
    """[N, R]: for each stem (A, B), the softmax over basis relations of log P(B | A, FFV_r) / T."""
    return torch.softmax(basis_logprobs(patcher, tokenizer, basis, stems) / temperature, dim=-1)


def training_analogies(relations: Sequence[BasisRelation], n_training_pairs: int, per_relation: int, seed: int) -> list[Analogy]:
    """Analogies A:B::C:D from two pairs of one basis relation, drawn from the pairs its basis
    vector was not trained on (relations with fewer than two such pairs give none). Test-set
    pairs are already excluded from the basis relations (basis_sources.analogy_test_pairs)."""
    rng = random.Random(seed)
    out = []
    for relation in relations:
        spare = list(relation.pairs[n_training_pairs:])
        for _ in range(per_relation if len(spare) >= 2 else 0):
            (a, b), (c, d) = ((p.input, p.output) for p in rng.sample(spare, 2))
            out.append(Analogy(a, b, c, d, relation.name))
    return out


def one_shot_prompt(a: str, b: str, c: str) -> str:
    return fewshot_prompt([WordPair(a, b)], c)


def completion_scores(patcher: Patcher, tokenizer, analogies: Sequence[Analogy], layer: int, vectors: torch.Tensor | None):
    """Per analogy, for the token after `Q: A\\nA: B\\n\\nQ: C\\nA:` with vectors [N, hidden] added
    there: log P(D's first token) (float32, differentiable in the vectors) and whether it is the
    most likely token."""
    device = input_device(patcher.model)
    prompts = encode_prompts(tokenizer, [one_shot_prompt(x.a, x.b, x.c) for x in analogies], [x.d for x in analogies])
    ids, mask, last = right_pad(prompts.input_ids, pad_id_of(tokenizer), device)
    answers = torch.tensor(prompts.answer_ids, dtype=torch.long, device=device)
    hidden = patcher.final_hidden(ids, mask, layer=layer, vector=None if vectors is None else vectors.to(device), positions=last)
    last_hidden = hidden[torch.arange(len(analogies), device=hidden.device), last.to(hidden.device)]
    return answer_log_probs(patcher.adapter, last_hidden, answers)


@torch.no_grad()
def completion_accuracy(patcher, tokenizer, analogies, layer, vectors=None, batch_size: int = 64) -> float:
    hits = 0
    for start in range(0, len(analogies), batch_size):
        chunk = analogies[start : start + batch_size]
        _, top = completion_scores(patcher, tokenizer, chunk, layer, None if vectors is None else vectors[start : start + batch_size])
        hits += int(top.sum())
    return hits / max(1, len(analogies))


def fit_composite_map(
    patcher: Patcher,
    tokenizer,
    basis: Basis,
    analogies: Sequence[Analogy],
    settings: MapSettings = MapSettings(),
    progress: Callable[[str], None] = no_progress,
) -> CompositeMap:
    """Fit W, b (weights = W p + b, starting at W = I, b = 0) so that the CFV added where the
    model completes C makes D's first token likely, on the training analogies; a share is held
    out to report first-token accuracy unpatched, with W = I and with the fitted map."""
    if not analogies:
        raise BasisError("no training analogies: every basis relation has fewer than two spare pairs")
    for x in analogies:
        where = f"training analogy {x.a}:{x.b}::{x.c}:{x.d} from {x.relation}"
        check_words(tokenizer, [x.a], query_text(x.a), x.b, where)
        check_words(tokenizer, [x.a, x.b, x.c], one_shot_prompt(x.a, x.b, x.c), x.d, where)
    t = time.perf_counter()
    rng = random.Random(settings.seed)
    order = list(analogies)
    rng.shuffle(order)
    n_valid = int(len(order) * settings.validation_share)
    valid, train = order[:n_valid], order[n_valid:]
    posterior_train = relation_posterior(patcher, tokenizer, basis, [(x.a, x.b) for x in train], settings.temperature)
    posterior_valid = relation_posterior(patcher, tokenizer, basis, [(x.a, x.b) for x in valid], settings.temperature)
    progress(f"[ffv] posteriors of {len(order)} training analogies over {len(basis.names)} basis relations ({time.perf_counter() - t:.0f}s)")
    n = len(basis.names)
    device = input_device(patcher.model)
    basis_vectors = basis.vectors.to(device, torch.float32)
    # float32: the map and its Adam state, like a trained vector (see fine_tuning).
    identity = torch.eye(n, dtype=torch.float32, device=device)
    weight = identity.clone().requires_grad_(True)
    bias = torch.zeros(n, dtype=torch.float32, device=device).requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=settings.learning_rate)
    torch.manual_seed(settings.seed)
    losses = []
    t = time.perf_counter()
    with torch.enable_grad():
        for step in range(settings.steps):
            rows = rng.sample(range(len(train)), min(settings.batch_size, len(train)))
            p = posterior_train[rows]
            vectors = (p @ weight.T + bias) @ basis_vectors
            log_prob, _ = completion_scores(patcher, tokenizer, [train[i] for i in rows], basis.layer, vectors)
            loss = -log_prob.to(device).mean() + settings.l2 / n * ((weight - identity).pow(2).sum() + bias.pow(2).sum())
            if not torch.isfinite(loss):
                raise BasisError(f"fitting the composite map diverged at step {step + 1} (loss {loss.item()})")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if (step + 1) % 25 == 0 or step + 1 == settings.steps:
                progress(f"[ffv] map step {step + 1}/{settings.steps}: loss {sum(losses[-25:]) / len(losses[-25:]):.3f}")
    fitted = CompositeMap(basis, weight.detach().cpu().clone(), bias.detach().cpu().clone(), settings.temperature)
    unmapped = CompositeMap(basis, identity.cpu(), torch.zeros(n, dtype=torch.float32, device="cpu"), settings.temperature)
    metrics = {
        "validation_analogies": len(valid),
        "training_analogies": len(train),
        "validation_accuracy_unpatched": completion_accuracy(patcher, tokenizer, valid, basis.layer),
        "validation_accuracy_posterior_weights": completion_accuracy(patcher, tokenizer, valid, basis.layer, unmapped.vectors(posterior_valid)),
        "validation_accuracy_fitted_map": completion_accuracy(patcher, tokenizer, valid, basis.layer, fitted.vectors(posterior_valid)),
        "validation_top_relation_correct": _top_relation_share(basis, posterior_valid, valid),
        "first_loss": losses[0],
        "last_loss": sum(losses[-25:]) / len(losses[-25:]),
        "seconds": time.perf_counter() - t,
    }
    fitted.metadata = {"settings": settings.__dict__, "metrics": metrics}
    progress("[ffv] held-out training analogies, first-token accuracy: unpatched {validation_accuracy_unpatched:.3f}, "
             "posterior weights {validation_accuracy_posterior_weights:.3f}, fitted map {validation_accuracy_fitted_map:.3f}; "
             "top relation right {validation_top_relation_correct:.3f}".format(**metrics))
    return fitted


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
        "temperature": cmap.temperature,
        "basis": cmap.basis.names,
        **cmap.metadata,
        "ffv_eval_version": __version__,
    }
    atomic_write(path, lambda tmp: save_file({"weight": cmap.weight.contiguous(), "bias": cmap.bias.contiguous()}, tmp))
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
    return CompositeMap(basis, tensors["weight"], tensors["bias"], float(meta["temperature"]), meta)


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
            posterior = relation_posterior(self.patcher, self.tokenizer, self.cmap.basis, todo, self.cmap.temperature)
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
