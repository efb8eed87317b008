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

Each figure has a percentile bootstrap interval (comparisons, or subcategories, resampled).

Each further vector set is compared with the first (FFV with FV by default) as a paired test,
through `paired`, on the same items: relsim, the difference of the two Spearman correlations
over the same comparisons, with a paired bootstrap interval and a paired permutation test (the
two sets' similarities swapped within comparisons; the figure is a correlation, not a mean of
per-item outcomes, so neither McNemar nor Wilcoxon applies); SemEval-2012, the mean difference
of the per-subcategory Spearman correlations over the same subcategories, with a paired
bootstrap interval and the Wilcoxon signed-rank test (continuous values, so not McNemar).
All statistics are scipy's."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ffv_eval.data.basis_sources import semeval_rated_subcategories
from ffv_eval.data.relations import RelationDataError, WordPair, data_dir_from_env
from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.models.patching import Patcher
from ffv_eval.progress import no_progress, show_progress
from ffv_eval.reports.paired import RESAMPLES, paired_correlation_difference, paired_gain_by_key, signed_interval
from ffv_eval.vectors.scoring import answer_scores
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


# -- statistics (scipy's) ------------------------------------------------------------------------
def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rho (scipy; ties share their mean rank)."""
    return float(stats.spearmanr(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).statistic)


def bootstrap_interval(statistic: Callable[[Sequence[int]], float], n: int, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of statistic(indices) over resamples of range(n) with replacement
    (scipy.stats.bootstrap, seeded); one item has no spread: its own value, twice."""
    if n < 2:
        value = statistic(list(range(n)))
        return value, value
    result = stats.bootstrap((np.arange(n),), statistic, vectorized=False, n_resamples=resamples, method="percentile",
                             random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


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


def relsim_similarities(profiles: dict[tuple[str, str], torch.Tensor], comparisons: Sequence[Comparison]) -> list[float]:
    """Each comparison's pair similarity: the correlation of the two pairs' profiles."""
    first = torch.stack([profiles[c.first] for c in comparisons])
    second = torch.stack([profiles[c.second] for c in comparisons])
    return _correlation_rows(first, second).tolist()


def relsim_alignment(profiles: dict[tuple[str, str], torch.Tensor], comparisons: Sequence[Comparison], resamples: int = 1000) -> dict:
    similarity = relsim_similarities(profiles, comparisons)
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


def compare_sets(similarities: dict[str, list[float]], comparisons: Sequence[Comparison], sets: dict[str, dict],
                 resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Each set after the first against the first, paired over the same items (see the module
    docstring): `<set> - <first>` -> relsim and SemEval-2012 differences with interval and test."""
    names = list(sets)
    ratings = [c.rating for c in comparisons]
    out = {}
    for name in names[1:]:
        base = names[0]
        out[f"{name} - {base}"] = {
            "relsim": paired_correlation_difference(similarities[name], similarities[base], ratings, resamples, seed).as_dict(),
            "semeval_prototypicality": paired_gain_by_key(
                sets[name]["semeval_prototypicality"]["per_subcategory"], sets[base]["semeval_prototypicality"]["per_subcategory"],
                f"SemEval-2012 subcategories of {name} and {base}", resamples, seed).as_dict(),
        }
    return out


# -- the job -------------------------------------------------------------------------------------
def align(patcher: Patcher, tokenizer, vector_sets: dict[str, Sequence[StoredVector]], data_dir=None,
          max_comparisons: int | None = None, max_subcategories: int | None = None, max_pairs_per_subcategory: int = 16,
          seed: int = 0, resamples: int = 1000, progress: Callable[[str], None] = no_progress,
          paired_resamples: int = RESAMPLES) -> dict:
    """Spearman alignment of each vector set's relation representations with relsim ratings and
    SemEval-2012 prototypicality, and each set after the first compared with the first, paired
    (`comparisons` in the report); subsets (seeded) keep the cost down."""
    root = data_dir_from_env(data_dir)
    if root is None:
        raise RelationDataError("ffv align needs a data directory (--data-dir or FFV_DATA_DIR) with relsim/ and semeval2012/")
    rng = random.Random(seed)
    comparisons = read_relsim(Path(root) / RELSIM_FILE)
    if max_comparisons and len(comparisons) > max_comparisons:
        comparisons = rng.sample(comparisons, max_comparisons)
    subcategories = []
    for _ident, name, rated, _ in semeval_rated_subcategories(root):
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
                       "pairs_scored": len(pairs), "seed": seed, "bootstrap_resamples": resamples,
                       "paired_resamples": paired_resamples},
              "representation": "per-vector-centred log P(B first token | 'Q: A\\nA:' + vector) over the vector set; "
                                "pair similarity = Pearson correlation of profiles",
              "paired_tests": "relsim: difference of Spearman correlations over the same comparisons, paired BCa "
                              "bootstrap interval, paired permutation test; SemEval-2012: mean difference of the "
                              "per-subcategory Spearman correlations, paired BCa bootstrap interval, Wilcoxon signed-rank",
              "sets": {}}
    similarities = {}
    for set_name, vectors in vector_sets.items():
        progress(f"[ffv] align: scoring {len(pairs)} pairs under {len(vectors)} {set_name} vectors")
        profile_matrix = relation_profiles(patcher, tokenizer, pairs, vectors)
        profiles = {pair: profile_matrix[i] for i, pair in enumerate(pairs)}
        similarities[set_name] = relsim_similarities(profiles, comparisons)
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
    if len(report["sets"]) > 1:
        report["comparisons"] = compare_sets(similarities, comparisons, report["sets"], paired_resamples, seed)
        for name, c in report["comparisons"].items():
            progress(f"[ffv] align {name}: {comparison_text(c)}")
    return report


def comparison_text(comparison: dict) -> str:
    """One line: both paired differences with interval, test and p."""
    rs, sp = comparison["relsim"], comparison["semeval_prototypicality"]
    return (f"relsim Spearman {signed_interval(rs['difference'], rs['ci95'])} ({rs['test']} p={rs['p']:.3g}, n={rs['n']}); "
            f"SemEval prototypicality {signed_interval(sp['mean_difference'], sp['ci95'])} ({sp['test']} p={sp['p']:.3g}, "
            f"n={sp['n']})")


def format_alignment_markdown(report: dict, model: str) -> str:
    lines = [f"## Alignment with human judgments: {model}", "",
             "| vectors | relsim Spearman [95% CI] | SemEval-2012 prototypicality, mean Spearman [95% CI] |", "|---|---|---|"]
    for name, r in report["sets"].items():
        rs, sp = r["relsim"], r["semeval_prototypicality"]
        lines.append(f"| {name} ({r['n_vectors']}) | {rs['spearman']:.3f} [{rs['ci95'][0]:.3f}, {rs['ci95'][1]:.3f}] "
                     f"(n={rs['n_comparisons']}) | {sp['mean_spearman']:.3f} [{sp['ci95'][0]:.3f}, {sp['ci95'][1]:.3f}] "
                     f"({sp['n_subcategories']} subcategories) |")
    if report.get("comparisons"):
        lines += ["", "Paired differences over the same comparisons and subcategories (95% bootstrap interval; relsim: "
                  "paired permutation test, SemEval-2012: Wilcoxon signed-rank):", "",
                  "| difference | relsim Spearman [95% CI] | p | SemEval-2012 prototypicality [95% CI] | p |", "|---|---|---|---|---|"]
        for name, c in report["comparisons"].items():
            rs, sp = c["relsim"], c["semeval_prototypicality"]
            lines.append(f"| {name} | {signed_interval(rs['difference'], rs['ci95'])} (n={rs['n']}) | {rs['p']:.3g} | "
                         f"{signed_interval(sp['mean_difference'], sp['ci95'])} (n={sp['n']}) | {sp['p']:.3g} |")
    return "\n".join(lines) + "\n"


def write_alignment(report: dict, path: str | Path) -> Path:
    atomic_write_text(Path(path), json.dumps(report, indent=2) + "\n")
    return Path(path)


def align_shipped_vectors(model_alias: str, kinds: Sequence[str] = ("fv", "ffv"), data_dir=None, output=None, markdown=None,
                          max_comparisons: int | None = None, max_subcategories: int | None = None, seed: int = 0,
                          progress: Callable[[str], None] = show_progress, placement=None) -> dict:
    """`ffv align`: the model's vectors of each kind (./vectors, then the shipped library), against
    relsim and SemEval-2012. placement: a model_loading.Placement (default: the default device,
    the checkpoint's dtype)."""
    from ffv_eval.models.loading import Placement, load_model_and_tokenizer, model_fingerprint
    from ffv_eval.vectors.library import kind_dirs, model_vectors
    from ffv_eval.vectors.store import load_vector

    placement = (placement or Placement()).checked()
    vector_sets = {}
    for kind in kinds:
        paths = model_vectors(model_alias, kind)
        if not paths:
            raise RelationDataError(f"no {kind} vectors for {model_alias} in {' or '.join(map(str, kind_dirs(model_alias, kind)))}")
        vector_sets[kind] = [load_vector(p) for p in paths]
    if data_dir_from_env(data_dir) is None:
        raise RelationDataError("ffv align needs a data directory (--data-dir or FFV_DATA_DIR) with relsim/ and semeval2012/")
    model, tokenizer = load_model_and_tokenizer(model_alias, placement=placement)
    fingerprint = model_fingerprint(model)
    for vectors in vector_sets.values():
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
