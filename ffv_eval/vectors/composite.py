"""Composite function vectors (CFV). For a source pair A:B, each basis FFV is scored by how well
it maps A to B (log-probability of B's first token after `Q: A\\nA:` with the FFV added); a
softmax over the basis turns the scores into the posterior over relations. Two posteriors:

    softmax     the paper's: softmax of log P(B | A, FFV_r), temperature 1
    calibrated  each relation against its own baseline: the gain log P(B | A, FFV_r) -
                log P(B | A) (how much FFV_r raises B over the same prompt without it), minus
                the mean gain of FFV_r over the training stems (how much it raises any answer),
                over a temperature fitted to put the posterior on each training stem's own
                relation. (A per-stem baseline alone would cancel in the softmax.)

A "no relation" option may compete in the posterior (`no_relation`, a margin in nats): its score
is the score of the same prompt without a vector (softmax: log P(B | A); calibrated: a gain of 0)
plus the margin, and the mass it takes adds no vector, so a source pair no basis FFV maps better
than the bare prompt (by the margin) gets a smaller CFV, or none.

The posterior may keep only its `top_k` most likely relations (renormalised; 0 keeps all). An
affine map, fitted on training analogies, turns the posterior into weights (W = s I, b = 0 for
the posterior itself at scale s), and the CFV is the weighted sum of the basis vectors, added
where the model completes C (`Q: A\\nA: B\\n\\nQ: C\\nA:`). Which posterior, top_k, scale and map
a model uses is chosen on basis relations held out of the basis itself
(composite_fit.fit_composite_map). This module holds the map's maths; its fitting is
composite_fit.py.

The fitted map is stored as <basis dir>/composite.safetensors (tensors "weight" [R, R], "bias"
[R] and, calibrated, "relation_baseline" [R]) beside composite.json (basis relation names,
layer, posterior, temperature, top_k, model fingerprint, training data and metrics), files that
vectors.library reads and writes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ffv_eval import __version__
from ffv_eval.data.prompts import answer_text, query_text
from ffv_eval.errors import TokenizationError
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import answer_token_id, encode_continuation, pad_id_of
from ffv_eval.vectors.basis import Basis, BasisError, load_basis
from ffv_eval.vectors.library import composite_files, find_basis_dir, read_composite_metadata, read_composite_tensors, write_composite_map
from ffv_eval.vectors.scoring import TopRows, cached_tail_log_probs

POSTERIORS = ("softmax", "calibrated")
NO_RELATION = "(no relation)"  # the no-relation option's name where relations are listed


@dataclass
class CompositeMap:
    basis: Basis
    weight: torch.Tensor  # [R, R]
    bias: torch.Tensor  # [R]
    temperature: float
    posterior_kind: str = "softmax"  # one of POSTERIORS
    relation_baseline: torch.Tensor | None = None  # [R], calibrated only
    metadata: dict = field(default_factory=dict)
    top_k: int = 0  # keep the k most likely relations of each posterior (0: all)
    no_relation: float | None = None  # margin of the "no relation" option (None: no such option)

    def posterior(self, log_probs: torch.Tensor) -> torch.Tensor:
        """basis_logprobs(..., with_baseline=True) [N, R + 1] -> posterior [N, R], float32 (with
        the no-relation option, the relations' share only: rows sum to 1 less its mass)."""
        return self.full_posterior(log_probs)[:, : len(self.basis.names)]

    def full_posterior(self, log_probs: torch.Tensor) -> torch.Tensor:
        """[N, R + 1] -> [N, R], or [N, R + 1] with the no-relation option's mass last."""
        scores = posterior_scores(log_probs, self.posterior_kind, self.relation_baseline, self.no_relation)
        return keep_top(torch.softmax(scores / self.temperature, dim=-1), self.top_k)

    def top_rows(self) -> TopRows | None:
        """What the posterior needs of basis_logprobs(..., with_baseline=True): with top_k, only
        the top_k relations' log-probabilities exactly (the others' bounds rank below them);
        without, everything (None). The no-relation option changes nothing here: it is exact (the
        column without a vector), and the k best relations are exact whether it ranks among them
        or not."""
        if self.top_k <= 0:
            return None
        R = len(self.basis.names)
        offsets = torch.zeros(R + 1, device="cpu")  # a relation's rank in posterior_scores, less the stem's own terms (ranked on the CPU)
        if self.posterior_kind == "calibrated":
            offsets[:R] = -self.relation_baseline.float().cpu()
        return TopRows(k=self.top_k, reference=R, offsets=offsets)

    def weights(self, posterior: torch.Tensor) -> torch.Tensor:
        """Posterior [N, R] -> weights [N, R], float32 on the posterior's device."""
        posterior = posterior.float()
        return posterior @ self.weight.to(posterior.device, torch.float32).T + self.bias.to(posterior.device, torch.float32)

    def vectors(self, posterior: torch.Tensor) -> torch.Tensor:
        """Posterior [N, R] -> CFVs [N, hidden], float32 on the posterior's device."""
        return self.weights(posterior) @ self.basis.vectors.to(posterior.device, torch.float32)


def check_words(tokenizer, words: Sequence[str], prompt: str, answer: str, where: str) -> None:
    """`words` (those in `prompt`) and `answer` are non-empty, and the answer has a first token
    after the prompt (see models.tokens.encode_continuation); else a BasisError naming `where`."""
    for word in (*words, answer):
        if not isinstance(word, str) or not word.strip():
            raise BasisError(f"{where}: empty word {word!r}: the basis cannot encode it")
    try:
        answer_token_id(tokenizer, prompt, answer)
    except TokenizationError as err:
        raise BasisError(f"{where}: the basis cannot encode {answer!r}: {err}") from err


@torch.no_grad()
def basis_logprobs(patcher: Patcher, tokenizer, basis: Basis, stems: Sequence[tuple[str, str]],
                   with_baseline: bool = False, top: TopRows | None = None) -> torch.Tensor:
    """[N, R] (with_baseline: [N, R + 1], the last column without a vector): log P(B's first
    token | `Q: A\nA:` + FFV_r) for each stem (A, B) and basis relation r. Exact and batched
    across stems and relations (vectors.scoring.cached_tail_log_probs: each prompt before its
    last token once, then its last token once per basis vector, at the basis layer). With `top`
    (CompositeMap.top_rows), only the best relations of each stem are exact."""
    device = input_device(patcher.model)
    vectors = basis.vectors.to(device, torch.float32)
    if with_baseline:
        vectors = torch.cat([vectors, torch.zeros(1, vectors.shape[1], dtype=torch.float32, device=device)])
    contexts, answers = [], []
    for a, b in stems:
        context, answer = encode_continuation(tokenizer, query_text(a), answer_text(b))
        if not answer:
            raise BasisError(f"source pair {a}:{b}: the basis cannot encode {b!r}: it encodes to no tokens")
        contexts.append(context)
        answers.append(answer[:1])
    # float32: log-probabilities (see answer_log_probs); the posterior is a softmax over them.
    if top is not None and not with_baseline:
        raise BasisError("basis_logprobs: bounds on the relations (top) need the column without a vector (with_baseline=True)")
    return cached_tail_log_probs(patcher, basis.layer, contexts, answers, vectors.shape[0],
                                 lambda chunk: vectors[None].expand(len(chunk), *vectors.shape), pad_id_of(tokenizer), top)


def relation_gains(log_probs: torch.Tensor) -> torch.Tensor:
    """[N, R + 1] log-probabilities (last column: no vector) -> [N, R]: how much each basis FFV
    raises B over the same prompt without it."""
    return log_probs[:, :-1] - log_probs[:, -1:]


def posterior_scores(log_probs: torch.Tensor, kind: str, relation_baseline: torch.Tensor | None = None,
                     no_relation: float | None = None) -> torch.Tensor:
    """[N, R + 1] log-probabilities -> [N, R] scores whose softmax (over T) is the posterior;
    with a `no_relation` margin, [N, R + 1], the last the no-relation option's: the bare
    prompt's score (softmax: its log-probability; calibrated: a gain of 0) plus the margin."""
    if kind == "softmax":
        scores, bare = log_probs[:, :-1], log_probs[:, -1:]
    elif kind == "calibrated":
        if relation_baseline is None:
            raise BasisError("the calibrated posterior needs each relation's baseline (relation_baseline)")
        scores = relation_gains(log_probs) - relation_baseline.to(log_probs.device, torch.float32)
        bare = torch.zeros_like(log_probs[:, -1:])
    else:
        raise BasisError(f"unknown posterior {kind!r} (known: {', '.join(POSTERIORS)})")
    return scores if no_relation is None else torch.cat([scores, bare + no_relation], dim=-1)


def keep_top(posterior: torch.Tensor, k: int) -> torch.Tensor:
    """[N, R] posterior -> the same with only each row's k largest entries, renormalised (k <= 0
    or k >= R: unchanged)."""
    if k <= 0 or k >= posterior.shape[-1]:
        return posterior
    values, index = posterior.topk(k, dim=-1)
    kept = torch.zeros_like(posterior).scatter(-1, index, values)
    return kept / kept.sum(-1, keepdim=True)


def relation_posterior(patcher: Patcher, tokenizer, basis: Basis, stems: Sequence[tuple[str, str]], temperature: float = 1.0) -> torch.Tensor:
    """[N, R]: the paper's posterior, the softmax over basis relations of log P(B | A, FFV_r) / T."""
    return torch.softmax(basis_logprobs(patcher, tokenizer, basis, stems) / temperature, dim=-1)


def save_composite_map(cmap: CompositeMap, model_alias: str) -> Path:
    """Write the map into its basis directory (the library's composite map files); returns the
    tensors' file."""
    meta = {
        "model": model_alias,
        "model_fingerprint": cmap.basis.model_fingerprint,
        "layer": cmap.basis.layer,
        "posterior": cmap.posterior_kind,
        "temperature": cmap.temperature,
        "top_k": cmap.top_k,
        "no_relation": cmap.no_relation,
        "basis": cmap.basis.names,
        **cmap.metadata,
        "ffv_eval_version": __version__,
    }
    tensors = {"weight": cmap.weight, "bias": cmap.bias}
    if cmap.relation_baseline is not None:
        tensors["relation_baseline"] = cmap.relation_baseline.float()
    return write_composite_map(cmap.basis.directory, meta, tensors)


def load_composite_map(directory: Path, fingerprint: str | None = None) -> CompositeMap:
    """The fitted map in a basis directory, with its basis; errors name the file and field."""
    meta = read_composite_metadata(directory, fingerprint)
    path, side = composite_files(directory)
    kind = meta.get("posterior", "softmax")  # maps saved before the calibrated posterior are the paper's
    if kind not in POSTERIORS:
        raise BasisError(f"{side}: field 'posterior' is {kind!r}, expected one of {', '.join(POSTERIORS)}")
    basis = load_basis(directory, meta["basis"], meta["model_fingerprint"])
    n = len(meta["basis"])
    tensors = read_composite_tensors(directory, n)
    baseline = tensors.get("relation_baseline")
    if kind == "calibrated" and (baseline is None or baseline.shape != (n,)):
        raise BasisError(f"{path}: the calibrated posterior needs a tensor 'relation_baseline' of shape ({n},), "
                         f"found {None if baseline is None else tuple(baseline.shape)}; rebuild with ffv basis build")
    top_k = meta.get("top_k", 0)  # maps saved before top_k keep every relation
    if not isinstance(top_k, int) or top_k < 0:
        raise BasisError(f"{side}: field 'top_k' is {top_k!r}, expected a whole number >= 0 (0 keeps every relation)")
    no_relation = meta.get("no_relation")  # maps saved before the no-relation option have none
    if no_relation is not None and (isinstance(no_relation, bool) or not isinstance(no_relation, (int, float))
                                    or not math.isfinite(no_relation)):
        raise BasisError(f"{side}: field 'no_relation' is {no_relation!r}, expected a number (the no-relation option's "
                         f"margin in nats) or null (no such option)")
    return CompositeMap(basis, tensors["weight"], tensors["bias"], float(meta["temperature"]), kind,
                        baseline if kind == "calibrated" else None, meta, top_k,
                        None if no_relation is None else float(no_relation))


def model_composite_map(model_alias: str, fingerprint: str, basis_dir=None) -> CompositeMap:
    """The fitted map for a loaded model: from `basis_dir`, else the model's own basis directory
    (./vectors, then the shipped library; vectors.library.find_basis_dir)."""
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
            log_probs = basis_logprobs(self.patcher, self.tokenizer, self.cmap.basis, todo, with_baseline=True, top=self.cmap.top_rows())
            posterior = self.cmap.posterior(log_probs)
            for stem, p, v in zip(todo, posterior, self.cmap.vectors(posterior)):
                self._cache[stem] = (p, v)

    def vector(self, a: str, b: str) -> torch.Tensor:
        self.prepare([(a, b)])
        return self._cache[(a, b)][1]

    def explain(self, a: str, b: str, top: int = 10) -> list[tuple[str, float, float]]:
        """The top relations for A:B: (name, posterior, weight); with the no-relation option,
        NO_RELATION among them at its mass (weight 0: it adds no vector)."""
        self.prepare([(a, b)])
        posterior = self._cache[(a, b)][0]
        weights = self.cmap.weights(posterior[None])[0]
        rows = [(self.cmap.basis.names[i], float(posterior[i]), float(weights[i])) for i in posterior.argsort(descending=True)[:top]]
        if self.cmap.no_relation is not None:
            rows = sorted([*rows, (NO_RELATION, max(0.0, 1.0 - float(posterior.sum())), 0.0)], key=lambda row: -row[1])[:top]
        return rows
