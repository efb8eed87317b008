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
from ffv_eval.vectors.composite_questions import VALIDATION_SETS, ChoiceQuestion, QuestionScorer
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
    # share of relations held out of the basis and of the map's fit while the settings are
    # chosen: half of them choose, the other half report the choice
    held_out_relations: float = 0.2
    posterior: str = "auto"  # one of POSTERIORS, or "auto": the one validation supports
    map: str = "auto"  # "fitted" (the paper's), "identity" (W = s I, b = 0), or "auto": the one validation supports
    top_k: tuple[int, ...] = (0, 1, 3)  # posterior sharpness tried with W = s I: relations kept (0: all)
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)  # CFV scales s tried with W = s I
    # margins (nats) of the "no relation" option tried with W = s I (None: no such option; see composite.py)
    no_relation: tuple[float | None, ...] = (None,)
    max_validation_analogies: int = 600  # per half of the held-out relations (a seeded sample)
    # multiple-choice sets whose valid.jsonl questions choose the settings (acc_d), when the data
    # directory has them, and how many of each (its first; 0: all)
    question_sets: tuple[str, ...] = VALIDATION_SETS
    questions_per_set: int = 100
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 0.02
    l2: float = 1.0  # weight of |W - I|^2 + |b|^2, per relation
    seed: int = 0

    def __post_init__(self):
        """Bad settings fail when they are made, before any model work."""
        if self.posterior not in (*POSTERIORS, "auto"):
            raise BasisError(f"posterior={self.posterior!r}: expected one of {', '.join(POSTERIORS)} or auto")
        if self.map not in ("fitted", "identity", "auto"):
            raise BasisError(f"map={self.map!r}: expected fitted, identity or auto")
        if not self.top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.top_k):
            raise BasisError(f"top_k {list(self.top_k)}: expected whole numbers >= 0 (0 keeps every relation)")
        if not self.scales or any(not s > 0 for s in self.scales):
            raise BasisError(f"scales {list(self.scales)}: expected positive numbers")
        if not self.no_relation or any(m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m))
                                       for m in self.no_relation):
            raise BasisError(f"no_relation {list(self.no_relation)}: expected margins in nats (numbers), or None for no "
                             f"no-relation option")
        if unknown := [name for name in self.question_sets if name not in VALIDATION_SETS]:
            raise BasisError(f"question sets {unknown}: expected some of {', '.join(VALIDATION_SETS)} (sets with a valid split)")
        if isinstance(self.questions_per_set, bool) or not isinstance(self.questions_per_set, int) or self.questions_per_set < 0:
            raise BasisError(f"questions_per_set {self.questions_per_set!r}: expected a whole number >= 0 (0: every question)")


@dataclass(frozen=True)
class Candidate:
    """One way to turn a posterior into a CFV: which posterior, how many of its relations kept,
    the margin of its no-relation option (None: none), the fitted map or W = s I."""

    posterior: str
    map: str  # "fitted" or "identity"
    top_k: int = 0
    scale: float = 1.0
    no_relation: float | None = None

    def preference(self) -> tuple:
        """Tie-break towards the paper's choice: softmax, fitted map, every relation, scale 1, no
        no-relation option."""
        return (self.posterior == "softmax", self.map == "fitted", self.top_k == 0, self.scale == 1.0, self.no_relation is None)


PAPER = Candidate("softmax", "fitted")


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


def split_held_out(held_out: set[str], seed: int) -> tuple[list[str], list[str]]:
    """The held-out relations in two seeded halves: those that choose the settings, those that
    report the choice (with one relation, it chooses and nothing reports)."""
    names = sorted(held_out)
    random.Random(f"{seed}:split").shuffle(names)
    half = (len(names) + 1) // 2
    return sorted(names[:half]), sorted(names[half:])


def _sample(analogies: Sequence[Analogy], n: int, seed: int) -> list[Analogy]:
    return list(analogies) if len(analogies) <= n else random.Random(seed).sample(list(analogies), n)


class _Fit:
    """The posterior (temperature, relation baselines) and maps fitted on one basis and one set of
    analogies: what the candidates of fit_composite_map are built from."""

    def __init__(self, patcher, tokenizer, basis: Basis, log_probs: torch.Tensor, row: dict, fitting: Sequence[Analogy],
                 settings: MapSettings, progress):
        self.patcher, self.tokenizer, self.basis, self.settings, self.progress = patcher, tokenizer, basis, settings, progress
        self.log_probs, self.row, self.fitting = log_probs, row, list(fitting)
        stems = list(dict.fromkeys(row[(x.a, x.b)] for x in self.fitting))
        # Each relation's own baseline: its mean gain over the fitting stems (one row per stem).
        self.relation_baseline = relation_gains(log_probs[stems]).mean(0).cpu()
        self._temperatures: dict[str, float] = {}
        self._fitted: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, analogies: Sequence[Analogy]) -> torch.Tensor:
        return self.log_probs[[self.row[(x.a, x.b)] for x in analogies]]

    def temperature(self, kind: str) -> float:
        if kind not in self._temperatures:
            truth = [self.basis.names.index(x.relation) if x.relation in self.basis.names else -1 for x in self.fitting]
            known = [i for i, k in enumerate(truth) if k >= 0]
            self._temperatures[kind] = 1.0
            if kind == "calibrated" and known:
                scores = posterior_scores(self.rows([self.fitting[i] for i in known]), kind, self.relation_baseline)
                self._temperatures[kind] = fit_temperature(scores, [truth[i] for i in known])
        return self._temperatures[kind]

    def cmap(self, candidate: Candidate) -> CompositeMap:
        kind = candidate.posterior
        cmap = CompositeMap(self.basis, *_identity_map(len(self.basis.names)), self.temperature(kind), kind,
                            self.relation_baseline if kind == "calibrated" else None, top_k=candidate.top_k,
                            no_relation=candidate.no_relation)
        if candidate.map == "fitted":
            if kind not in self._fitted:
                self.progress(f"[ffv] fitting the map on the {kind} posterior (temperature {cmap.temperature:.3g}, "
                              f"{len(self.basis.names)} basis relations)")
                weight, bias, _ = _fit_map(self.patcher, self.tokenizer, self.basis, self.fitting,
                                           cmap.posterior(self.rows(self.fitting)), self.settings, self.progress)
                self._fitted[kind] = (weight, bias)
            cmap.weight, cmap.bias = (t.clone() for t in self._fitted[kind])
        cmap.weight, cmap.bias = cmap.weight * candidate.scale, cmap.bias * candidate.scale
        return cmap

    def check(self, candidate: Candidate, analogies: Sequence[Analogy]) -> dict[str, float]:
        cmap = self.cmap(candidate)
        return completion_check(self.patcher, self.tokenizer, analogies, self.basis.layer, cmap.vectors(cmap.posterior(self.rows(analogies))))


def fit_composite_map(
    patcher: Patcher,
    tokenizer,
    basis: Basis,
    analogies: Sequence[Analogy],
    settings: MapSettings = MapSettings(),
    progress: Callable[[str], None] = no_progress,
    questions: Sequence[ChoiceQuestion] = (),
) -> CompositeMap:
    """Choose how a posterior becomes a CFV, then fit that on every analogy and the whole basis.

    A seeded share of the relations is held out of the basis *and* of the fit: with the basis
    less those relations, each candidate (posterior softmax or calibrated; the fitted affine map
    at scale 1 with every relation, or W = s I for each top_k, scale and no-relation margin of the
    settings) is fitted on the other relations' analogies and scored (first-token accuracy of D, the CFV added where
    the model completes C) on the analogies of one half of the held-out relations; the best one
    (ties to the paper's softmax and fitted map) is then reported, beside unpatched and the
    paper's choice, on the other half. Without held-out relations (or with one candidate) the
    settings decide. With validation `questions` (multiple-choice analogies, the valid splits
    of the question sets), every candidate is also fitted on all analogies with the full basis
    and scored by acc_d on them; the best mean over the question sets chooses instead (ties: the
    held-out relations' accuracy, then the paper's choice). The chosen candidate is finally
    fitted on all analogies with the full basis: that map is returned, its metadata holding
    every figure."""
    if not analogies:
        raise BasisError("no training analogies: every basis relation has fewer than two spare pairs")
    for x in analogies:
        where = f"training analogy {x.a}:{x.b}::{x.c}:{x.d} from {x.relation}"
        check_words(tokenizer, [x.a], query_text(x.a), x.b, where)
        check_words(tokenizer, [x.a, x.b, x.c], one_shot_prompt(x.a, x.b, x.c), x.d, where)
    kinds = POSTERIORS if settings.posterior == "auto" else (settings.posterior,)
    maps = ("fitted", "identity") if settings.map == "auto" else (settings.map,)
    candidates = [Candidate(kind, how, k, s, m) for kind in kinds for how in maps
                  for k, s, m in ([(0, 1.0, None)] if how == "fitted" else
                                  [(k, s, m) for m in settings.no_relation for k in settings.top_k for s in settings.scales])]
    held_out = held_out_relations(analogies, settings.held_out_relations, settings.seed) if len(candidates) > 1 else set()
    choosing, reporting = split_held_out(held_out, settings.seed)
    fitting = [x for x in analogies if x.relation not in held_out]
    choose = _sample([x for x in analogies if x.relation in choosing], settings.max_validation_analogies, settings.seed)
    report = _sample([x for x in analogies if x.relation in reporting], settings.max_validation_analogies, settings.seed)

    t = time.perf_counter()
    stems = list(dict.fromkeys((x.a, x.b) for x in analogies))
    row = {stem: i for i, stem in enumerate(stems)}
    log_probs = basis_logprobs(patcher, tokenizer, basis, stems, with_baseline=True)
    progress(f"[ffv] posteriors of {len(stems)} source pairs over {len(basis.names)} basis relations ({time.perf_counter() - t:.0f}s)")
    validation = None
    chosen = max(candidates, key=Candidate.preference)  # without validation: the one nearest the paper's
    if held_out:
        reduced = basis.without(held_out)
        columns = [basis.names.index(n) for n in reduced.names] + [len(basis.names)]  # and the no-vector column
        trial = _Fit(patcher, tokenizer, reduced, log_probs[:, columns], row, fitting, settings, progress)
        progress(f"[ffv] choosing the CFV settings with {len(held_out)} relations held out of the basis and the fit: "
                 f"{len(fitting)} fitting analogies, {len(choose)} choosing ({', '.join(choosing)}), "
                 f"{len(report)} reporting ({', '.join(reporting)})")
        unpatched = completion_check(patcher, tokenizer, choose, basis.layer)
        tried = []
        for candidate in tqdm(candidates, desc="CFV settings", disable=None):
            tried.append((candidate, trial.check(candidate, choose)))
            progress(f"[ffv]   {candidate}: first-token accuracy {tried[-1][1]['accuracy']:.3f} (unpatched {unpatched['accuracy']:.3f})")
        chosen = max(tried, key=lambda ct: (ct[1]["accuracy"], ct[0].preference()))[0]
        reported = {"unpatched": completion_check(patcher, tokenizer, report, basis.layer)} if report else {}
        if report:
            reported["chosen"] = trial.check(chosen, report)
            reported["paper"] = trial.check(PAPER, report) if PAPER in candidates else None
            progress("[ffv] chosen {c}; on the reporting relations: first-token accuracy unpatched {r[unpatched][accuracy]:.3f}, "
                     "chosen {r[chosen][accuracy]:.3f}{paper}".format(
                         c=chosen, r=reported, paper=f", paper's {reported['paper']['accuracy']:.3f}" if reported["paper"] else ""))
        validation = {
            "basis_relations": len(reduced.names),
            "temperatures": {k: trial.temperature(k) for k in kinds},
            "choosing": {"relations": choosing, "analogies": len(choose), "unpatched": unpatched,
                         "candidates": [{**dataclasses.asdict(c), **m} for c, m in tried]},
            "reporting": {"relations": reporting, "analogies": len(report), **reported},
        }
    final = _Fit(patcher, tokenizer, basis, log_probs, row, analogies, settings, progress)
    by = ("first-token accuracy on held-out relations absent from the basis" if validation
          else "settings" if len(candidates) == 1 else "no held-out relations: the paper's softmax and fitted map")
    on_questions = None
    if questions and len(candidates) > 1:
        relation_accuracy = {c: m["accuracy"] for c, m in tried} if validation else {}
        chosen, on_questions = _choose_on_questions(patcher, tokenizer, final, candidates, questions, relation_accuracy, progress)
        by = (f"acc_d on the valid splits of {', '.join(on_questions['sets'])} (mean over the sets), ties by first-token "
              f"accuracy on held-out relations absent from the basis")
    cmap = final.cmap(chosen)
    cmap.metadata = {
        "settings": dataclasses.asdict(settings),
        "posterior_choice": {**dataclasses.asdict(chosen), "chosen": chosen.posterior, "by": by},
        "held_out_relations": {"choosing": choosing, "reporting": reporting},
        "analogies": {"fitting": len(fitting), "choosing": len(choose), "reporting": len(report),
                      "final_fit": len(analogies), "source_pairs": len(stems)},
        "validation": validation,
        "validation_questions": on_questions,
    }
    return cmap


def _choose_on_questions(patcher, tokenizer, final: _Fit, candidates: Sequence[Candidate], questions: Sequence[ChoiceQuestion],
                         relation_accuracy: dict[Candidate, float], progress) -> tuple[Candidate, dict]:
    """Every candidate fitted with the full basis on every analogy, scored by acc_d on the
    validation questions (their CFVs from their own stems' posteriors): the best mean over the
    question sets, ties by `relation_accuracy`, then the paper's choice."""
    t = time.perf_counter()
    stems = list(dict.fromkeys((q.a, q.b) for q in questions))
    log_probs = basis_logprobs(patcher, tokenizer, final.basis, stems, with_baseline=True)
    rows = log_probs[[stems.index((q.a, q.b)) for q in questions]]
    vectors = []
    for candidate in candidates:
        cmap = final.cmap(candidate)
        vectors.append(cmap.vectors(cmap.posterior(rows)))
    scored = QuestionScorer(patcher, tokenizer, questions, final.basis.layer).acc_d([None, *vectors])
    unpatched, results = scored[0], scored[1:]
    for candidate, result in zip(candidates, results):
        progress(f"[ffv]   {candidate}: validation acc_d {result['mean']:.3f} (unpatched {unpatched['mean']:.3f})")
    best = max(range(len(candidates)), key=lambda i: (results[i]["mean"], relation_accuracy.get(candidates[i], -1.0),
                                                      candidates[i].preference()))
    sets = list(dict.fromkeys(q.source for q in questions))
    progress(f"[ffv] chosen on {len(questions)} validation questions ({', '.join(sets)}): {candidates[best]}, acc_d "
             f"{results[best]['mean']:.3f} against unpatched {unpatched['mean']:.3f} ({time.perf_counter() - t:.0f}s)")
    return candidates[best], {
        "sets": sets, "questions": {name: sum(q.source == name for q in questions) for name in sets}, "split": "valid",
        "metric": "acc_d", "unpatched": unpatched,
        "candidates": [{**dataclasses.asdict(c), "acc_d": r} for c, r in zip(candidates, results)],
    }


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
