"""ffv align: statistics, data reading, and a real (small) run on Gemma 3 270M."""

import random

import numpy as np
import pytest
import torch

from ffv_eval.data.relations import RelationDataError
from ffv_eval.evaluation.alignment import (
    Comparison,
    bootstrap_interval,
    prototypicality_alignment,
    read_relsim,
    relsim_alignment,
    spearman,
)
from ffv_eval.reports.paired import PERMUTATION, WILCOXON
from tests.conftest import toy_alignment


def test_spearman_matches_the_rank_formula_and_handles_ties():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [5, 6, 7, 8, 7]) == pytest.approx(8 / 95 ** 0.5)  # ranks [1, 2, 3.5, 5, 3.5] against [1..5]
    assert spearman(x, [10, 9, 8, 7, 6]) == pytest.approx(-1.0)
    rng = random.Random(1)
    a = [rng.random() for _ in range(50)]
    b = [rng.random() for _ in range(50)]
    rank_a = {i: r for r, i in enumerate(sorted(range(50), key=lambda i: a[i]))}
    rank_b = {i: r for r, i in enumerate(sorted(range(50), key=lambda i: b[i]))}
    d2 = sum((rank_a[i] - rank_b[i]) ** 2 for i in range(50))
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (50 * (50 ** 2 - 1)))


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [float(i % 7) for i in range(100)]
    stat = lambda idx: sum(values[i] for i in idx) / len(idx)  # noqa: E731
    low, high = bootstrap_interval(stat, len(values), 300, seed=3)
    assert (low, high) == bootstrap_interval(stat, len(values), 300, seed=3)
    assert low < sum(values) / len(values) < high


def test_profiles_that_follow_the_ratings_align_and_noise_does_not():
    torch.manual_seed(0)
    pairs = [(f"a{i}", f"b{i}") for i in range(40)]
    profiles = {p: torch.randn(8, dtype=torch.float64) for p in pairs}
    comparisons = []
    for i in range(0, 40, 2):
        for j in range(1, 40, 2):
            sim = float(torch.corrcoef(torch.stack([profiles[pairs[i]], profiles[pairs[j]]]))[0, 1])
            comparisons.append(Comparison(pairs[i], pairs[j], 4 + 3 * sim))
    aligned = relsim_alignment(profiles, comparisons, resamples=200)
    assert aligned["spearman"] == pytest.approx(1.0) and aligned["ci95"][0] > 0.99
    shuffled_ratings = random.Random(0).sample([c.rating for c in comparisons], len(comparisons))
    shuffled = [Comparison(c.first, c.second, r) for c, r in zip(comparisons, shuffled_ratings)]
    assert abs(relsim_alignment(profiles, shuffled, resamples=200)["spearman"]) < 0.2
    centre = torch.randn(8, dtype=torch.float64)
    members = [(float(k), (f"c{k}", f"d{k}")) for k in range(10)]
    for k, (_, pair) in enumerate(members):  # higher rating: closer to the subcategory's centre
        profiles[pair] = centre * k + torch.randn(8, dtype=torch.float64) * 3
    proto = prototypicality_alignment(profiles, [("toy", members)], resamples=50)
    assert proto["mean_spearman"] > 0.5 and proto["n_subcategories"] == 1


def test_relsim_reader_names_file_and_line(tmp_path):
    path = tmp_path / "relsim.csv"
    path.write_text("pair1_word1,pair1_word2,pair2_word1,pair2_word2,mean_rating\na,b,c,d,3.5\na,b,c,d,high\n")
    with pytest.raises(RelationDataError, match=r"relsim.csv: line 3: field 'mean_rating'"):
        read_relsim(path)
    path.write_text("pair1_word1,pair1_word2,mean_rating\n")
    with pytest.raises(RelationDataError, match="missing column"):
        read_relsim(path)
    with pytest.raises(RelationDataError, match="no file"):
        read_relsim(tmp_path / "nothing.csv")


@pytest.mark.slow
def test_align_on_gemma_with_shipped_fv_and_ffv(gemma, shared_data, monkeypatch):
    from scipy import stats

    from ffv_eval.data.relations import HEADLINE_RELATIONS
    from ffv_eval.evaluation import alignment
    from ffv_eval.models.patching import Patcher
    from ffv_eval.vectors.library import shipped_path
    from ffv_eval.vectors.store import load_vector

    seen = []  # what align hands to relsim_alignment, to recompute the figures with scipy

    def recorded(profiles, comparisons, resamples=1000, original=alignment.relsim_alignment):
        seen.append((profiles, comparisons, original(profiles, comparisons, resamples)))
        return seen[-1][2]

    monkeypatch.setattr(alignment, "relsim_alignment", recorded)
    model, tok = gemma
    sets = {kind: [load_vector(shipped_path("gemma-3-270m", kind, r)) for r in HEADLINE_RELATIONS] for kind in ("fv", "ffv")}
    report = alignment.align(Patcher(model), tok, sets, shared_data, max_comparisons=60, max_subcategories=3,
                             max_pairs_per_subcategory=8, resamples=200)
    for kind, (profiles, comparisons, relsim) in zip(("fv", "ffv"), seen, strict=True):
        r = report["sets"][kind]
        assert r["relsim"] is relsim and r["relsim"]["n_comparisons"] == 60 and r["semeval_prototypicality"]["n_subcategories"] == 3
        similarity = [stats.pearsonr(profiles[c.first], profiles[c.second]).statistic for c in comparisons]
        ratings = [c.rating for c in comparisons]
        assert relsim["spearman"] == pytest.approx(stats.spearmanr(similarity, ratings).statistic, abs=1e-9)
        # scipy's paired percentile bootstrap on the same data; 200 resamples here (seeded) put the
        # endpoints within 0.05 of scipy's 2000 (a 50% interval instead of 95% is off by 0.17)
        ci = stats.bootstrap((similarity, ratings), lambda x, y: stats.spearmanr(x, y).statistic, paired=True, vectorized=False,
                             n_resamples=2000, method="percentile", random_state=0).confidence_interval
        assert relsim["ci95"] == pytest.approx([ci.low, ci.high], abs=0.1), (kind, relsim["ci95"], ci)
    # the two vector sets give different representations, hence different figures
    assert report["sets"]["fv"]["relsim"]["spearman"] != report["sets"]["ffv"]["relsim"]["spearman"]


# -- paired: each vector set against the first ---------------------------------------------------
def test_align_compares_each_set_with_the_first_paired():
    from scipy import stats

    from ffv_eval.evaluation.alignment import compare_sets, format_alignment_markdown

    sets, similarities, comparisons = toy_alignment()
    comparison = compare_sets(similarities, comparisons, sets, resamples=2000)
    assert list(comparison) == ["good - noise"]
    rs, sp = comparison["good - noise"]["relsim"], comparison["good - noise"]["semeval_prototypicality"]
    ratings = [c.rating for c in comparisons]
    rho = {k: stats.spearmanr(similarities[k], ratings).statistic for k in similarities}
    assert rs["difference"] == pytest.approx(rho["good"] - rho["noise"]) == pytest.approx(
        sets["good"]["relsim"]["spearman"] - sets["noise"]["relsim"]["spearman"])
    assert rs["test"] == PERMUTATION and rs["n"] == len(comparisons) and rs["ci95"][0] > 0 and rs["p"] < 0.01
    per_good = sets["good"]["semeval_prototypicality"]["per_subcategory"]
    per_noise = sets["noise"]["semeval_prototypicality"]["per_subcategory"]
    assert sp["test"] == WILCOXON and sp["n"] == 6
    assert sp["mean_difference"] == pytest.approx(np.mean([per_good[k] - per_noise[k] for k in per_good]))
    assert sp["p"] == pytest.approx(stats.wilcoxon([per_good[k] - per_noise[k] for k in per_good]).pvalue)
    report = {"sets": {k: {**v, "n_vectors": 3} for k, v in sets.items()}, "comparisons": comparison}
    markdown = format_alignment_markdown(report, "toy")
    assert f"| good - noise | {rs['difference']:+.3f} [{rs['ci95'][0]:+.3f}, {rs['ci95'][1]:+.3f}]" in markdown
