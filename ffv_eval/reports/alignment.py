"""Alignment of relation representations with human judgments.

A word pair's relation representation under a set of vectors (a model's shipped FVs, or its FFVs)
is its profile of log P(B's first token | `Q: A\\nA:` + vector) over the set, each vector at its
own layer, centred per vector over the pairs scored. Two pairs are as similar as their profiles
are correlated (Pearson).

- relsim: Spearman correlation between that similarity and the mean human rating of relational
  similarity, over the rated comparisons (Chen, Peterson & Griffiths 2017).
- SemEval-2012: a pair's prototypicality is the correlation of its profile with the mean profile
  of the other pairs of its subcategory; Spearman against the gold prototypicality ratings within
  each subcategory, averaged over subcategories.

Each figure has a percentile bootstrap interval (comparisons, or subcategories, resampled)."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.data.basis_sources import semeval_rated_subcategories
from ffv_eval.vectors.function_vectors import answer_scores
from ffv_eval.models.patching import Patcher
from ffv_eval.data.relations import RelationDataError, WordPair, data_dir_from_env
from ffv_eval.progress import no_progress, show_progress
from ffv_eval.vectors.store import StoredVector

RELSIM_FILE = Path("relsim") / "relsim_mean_ratings.csv"
RELSIM_COLUMNS = ("pair1_word1", "pair1_word2", "pair2_word1", "pair2_word2", "mean_rating")


@dataclass(frozen=True)
class Comparison:
    first: tuple[str, str]
    second: tuple[str, str]
    rating: float


# -- data ----------------------------------------------------------------------------------------
def read_relsim(path: Path) -> list[Comparison]:
    if not path.is_file():
        raise RelationDataError(f"relational similarity ratings: no file {path} (expected {RELSIM_FILE} under the data directory)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in RELSIM_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise RelationDataError(f"{path}: missing column(s) {', '.join(missing)}")
        out = []
        for lineno, row in enumerate(reader, start=2):
            try:
                rating = float(row["mean_rating"])
            except (TypeError, ValueError):
                raise RelationDataError(f"{path}: line {lineno}: field 'mean_rating' is not a number: {row['mean_rating']!r}") from None
            words = [row[c].strip() for c in RELSIM_COLUMNS[:4]]
            if not all(words):
                raise RelationDataError(f"{path}: line {lineno}: empty word")
            out.append(Comparison((words[0], words[1]), (words[2], words[3]), rating))
    return out


# -- statistics ----------------------------------------------------------------------------------
def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    order = values.argsort()
    ranks = torch.empty_like(values, dtype=torch.float64)
    sorted_values = values[order]
    i = 0
    n = len(values)
    while i < n:
        j = i
        while j + 1 < n and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denominator) if denominator > 0 else 0.0


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    return pearson(_ranks(torch.as_tensor(x, dtype=torch.float64)), _ranks(torch.as_tensor(y, dtype=torch.float64)))


def bootstrap_interval(statistic: Callable[[list[int]], float], n: int, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of statistic(indices) over resamples of range(n) with replacement."""
    rng = random.Random(seed)
    values = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return values[int(0.025 * (resamples - 1))], values[int(0.975 * (resamples - 1))]


# -- representations -----------------------------------------------------------------------------
@torch.no_grad()
def relation_profiles(patcher: Patcher, tokenizer, pairs: Sequence[tuple[str, str]], vectors: Sequence[StoredVector]) -> torch.Tensor:
    """[N, V]: log P(B | A, vector) for every pair and vector, centred per vector over the pairs."""
    word_pairs = [WordPair(a, b) for a, b in pairs]
    columns = []
    for stored in vectors:
        _, logprob = answer_scores(patcher, tokenizer, word_pairs, stored.metadata["layer"], stored.vector[None])
        columns.append(logprob[0].cpu())
    # float64 on the CPU: correlations and bootstrap statistics over the profiles, not model work.
    profiles = torch.stack(columns, dim=1).double()
    return profiles - profiles.mean(dim=0, keepdim=True)


def _correlation_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of [N, V] with [N, V]."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def relsim_alignment(profiles: dict[tuple[str, str], torch.Tensor], comparisons: Sequence[Comparison], resamples: int = 1000) -> dict:
    first = torch.stack([profiles[c.first] for c in comparisons])
    second = torch.stack([profiles[c.second] for c in comparisons])
    similarity = _correlation_rows(first, second).tolist()
    ratings = [c.rating for c in comparisons]
    rho = spearman(similarity, ratings)
    low, high = bootstrap_interval(lambda idx: spearman([similarity[i] for i in idx], [ratings[i] for i in idx]),
                                   len(comparisons), resamples)
    return {"spearman": rho, "ci95": [low, high], "n_comparisons": len(comparisons)}


def prototypicality_alignment(profiles: dict[tuple[str, str], torch.Tensor], subcategories: Sequence[tuple[str, list[tuple[float, tuple[str, str]]]]],
                              resamples: int = 1000) -> dict:
    per_subcategory = {}
    for name, rated in subcategories:
        matrix = torch.stack([profiles[pair] for _, pair in rated])
        others_mean = (matrix.sum(dim=0, keepdim=True) - matrix) / (len(rated) - 1)
        score = _correlation_rows(matrix, others_mean).tolist()
        per_subcategory[name] = spearman(score, [r for r, _ in rated])
    values = list(per_subcategory.values())
    low, high = bootstrap_interval(lambda idx: sum(values[i] for i in idx) / len(idx), len(values), resamples)
    return {"mean_spearman": sum(values) / len(values), "ci95": [low, high], "n_subcategories": len(values),
            "per_subcategory": per_subcategory}


# -- the job -------------------------------------------------------------------------------------
def align(patcher: Patcher, tokenizer, vector_sets: dict[str, Sequence[StoredVector]], data_dir=None,
          max_comparisons: int | None = None, max_subcategories: int | None = None, max_pairs_per_subcategory: int = 16,
          seed: int = 0, resamples: int = 1000, progress: Callable[[str], None] = no_progress) -> dict:
    """Spearman alignment of each vector set's relation representations with relsim ratings and
    SemEval-2012 prototypicality; subsets (seeded) keep the cost down."""
    root = data_dir_from_env(data_dir)
    if root is None:
        raise RelationDataError("ffv align needs a data directory (--data-dir or FFV_DATA_DIR) with relsim/ and semeval2012/")
    rng = random.Random(seed)
    comparisons = read_relsim(Path(root) / RELSIM_FILE)
    if max_comparisons and len(comparisons) > max_comparisons:
        comparisons = rng.sample(comparisons, max_comparisons)
    subcategories = []
    for ident, name, rated, _ in semeval_rated_subcategories(root):
        chosen = sorted(rated, key=lambda r: (-r[0], r[1].input))
        if len(chosen) > max_pairs_per_subcategory:  # the most and the least prototypical, evenly spread
            step = (len(chosen) - 1) / (max_pairs_per_subcategory - 1)
            chosen = [chosen[round(i * step)] for i in range(max_pairs_per_subcategory)]
        subcategories.append((name, [(r, (p.input, p.output)) for r, p in chosen]))
    if max_subcategories and len(subcategories) > max_subcategories:
        subcategories = sorted(rng.sample(subcategories, max_subcategories))
    pairs = list(dict.fromkeys([c.first for c in comparisons] + [c.second for c in comparisons]
                               + [pair for _, rated in subcategories for _, pair in rated]))
    report = {"data": {"relsim": str(RELSIM_FILE), "semeval2012": "gold prototypicality ratings",
                       "pairs_scored": len(pairs), "seed": seed, "bootstrap_resamples": resamples},
              "representation": "per-vector-centred log P(B first token | 'Q: A\\nA:' + vector) over the vector set; "
                                "pair similarity = Pearson correlation of profiles",
              "sets": {}}
    for set_name, vectors in vector_sets.items():
        progress(f"[ffv] align: scoring {len(pairs)} pairs under {len(vectors)} {set_name} vectors")
        profile_matrix = relation_profiles(patcher, tokenizer, pairs, vectors)
        profiles = {pair: profile_matrix[i] for i, pair in enumerate(pairs)}
        report["sets"][set_name] = {
            "n_vectors": len(vectors),
            "relsim": relsim_alignment(profiles, comparisons, resamples),
            "semeval_prototypicality": prototypicality_alignment(profiles, subcategories, resamples),
        }
        r = report["sets"][set_name]
        progress(f"[ffv] align {set_name}: relsim Spearman {r['relsim']['spearman']:.3f} "
                 f"[{r['relsim']['ci95'][0]:.3f}, {r['relsim']['ci95'][1]:.3f}]; SemEval prototypicality "
                 f"{r['semeval_prototypicality']['mean_spearman']:.3f} [{r['semeval_prototypicality']['ci95'][0]:.3f}, "
                 f"{r['semeval_prototypicality']['ci95'][1]:.3f}]")
    return report


def format_alignment_markdown(report: dict, model: str) -> str:
    lines = [f"## Alignment with human judgments: {model}", "",
             "| vectors | relsim Spearman [95% CI] | SemEval-2012 prototypicality, mean Spearman [95% CI] |", "|---|---|---|"]
    for name, r in report["sets"].items():
        rs, sp = r["relsim"], r["semeval_prototypicality"]
        lines.append(f"| {name} ({r['n_vectors']}) | {rs['spearman']:.3f} [{rs['ci95'][0]:.3f}, {rs['ci95'][1]:.3f}] "
                     f"(n={rs['n_comparisons']}) | {sp['mean_spearman']:.3f} [{sp['ci95'][0]:.3f}, {sp['ci95'][1]:.3f}] "
                     f"({sp['n_subcategories']} subcategories) |")
    return "\n".join(lines) + "\n"


def write_alignment(report: dict, path: str | Path) -> Path:
    atomic_write_text(Path(path), json.dumps(report, indent=2) + "\n")
    return Path(path)


def align_shipped_vectors(model_alias: str, kinds: Sequence[str] = ("fv", "ffv"), data_dir=None, output=None, markdown=None,
                          max_comparisons: int | None = None, max_subcategories: int | None = None, seed: int = 0,
                          progress: Callable[[str], None] = show_progress, placement=None) -> dict:
    """`ffv align`: the model's shipped vectors of each kind, against relsim and SemEval-2012.
    placement: a model_loading.Placement (default: the default device, the checkpoint's dtype)."""
    from ffv_eval.models.loading import Placement, load_model_and_tokenizer, model_fingerprint
    from ffv_eval.vectors.store import VECTORS_DIR, load_vector

    placement = (placement or Placement()).checked()
    vector_sets = {}
    for kind in kinds:
        paths = sorted((VECTORS_DIR / model_alias / kind).glob("*.safetensors"))
        if not paths:
            raise RelationDataError(f"no shipped {kind} vectors for {model_alias} in {VECTORS_DIR / model_alias / kind}")
        vector_sets[kind] = [load_vector(p) for p in paths]
    if data_dir_from_env(data_dir) is None:
        raise RelationDataError("ffv align needs a data directory (--data-dir or FFV_DATA_DIR) with relsim/ and semeval2012/")
    model, tokenizer = load_model_and_tokenizer(model_alias, **vars(placement))
    fingerprint = model_fingerprint(model)
    for kind, vectors in vector_sets.items():
        for v in vectors:
            if v.metadata["model_fingerprint"] != fingerprint:
                raise RelationDataError(f"{v.path}: made for model fingerprint {v.metadata['model_fingerprint']}, the model is {fingerprint}")
    report = align(Patcher(model), tokenizer, vector_sets, data_dir, max_comparisons, max_subcategories, seed=seed, progress=progress)
    report["model"] = model_alias
    report["model_fingerprint"] = fingerprint
    if output:
        write_alignment(report, output)
    if markdown:
        atomic_write_text(Path(markdown), format_alignment_markdown(report, model_alias))
    print(format_alignment_markdown(report, model_alias))
    return report
