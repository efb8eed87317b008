"""Paired statistics (ffv_eval.reports.paired) against independent references: McNemar's exact
test against a hand-enumerated binomial and a published example, the Wilcoxon signed-rank and
permutation p-values against full enumeration, the bootstrap interval against the normal
approximation and its behaviour under shifts and more data; and the pairing of lm-eval samples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ffv_eval.reports.paired import (
    MCNEMAR,
    PERMUTATION,
    WILCOXON,
    Outcome,
    PairingError,
    bootstrap_mean_interval,
    match_outcomes,
    mcnemar_exact,
    paired_correlation_difference,
    paired_gain,
)


def _binary_runs(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """(treated, base) with b items right in base only, c in treated only."""
    base = [1] * b + [0] * c + [1] * both + [0] * neither
    treated = [0] * b + [1] * c + [1] * both + [0] * neither
    return np.array(treated, dtype=float), np.array(base, dtype=float)


def _two_sided_binomial(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials, by enumerating every outcome: the
    total probability of outcomes no more likely than the one seen."""
    probability = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(p for p in probability if p <= probability[k] * (1 + 1e-12)))


# -- McNemar -------------------------------------------------------------------------------

@pytest.mark.parametrize("b, c", [(2, 7), (9, 3), (0, 4), (5, 5), (12, 30)])
def test_mcnemar_matches_a_hand_enumerated_binomial(b, c):
    treated, base = _binary_runs(b, c, both=6, neither=4)
    assert mcnemar_exact(treated, base) == (b, c, pytest.approx(_two_sided_binomial(c, b + c), rel=1e-12))
    gain = paired_gain(treated, base)
    assert gain.test == MCNEMAR and gain.discordant == (b, c) and gain.n == b + c + 10
    assert gain.mean_gain == pytest.approx((c - b) / (b + c + 10))


def test_mcnemar_on_the_published_example():
    """Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, Table 1: airway
    hyper-responsiveness before and after stem cell transplantation, discordant pairs 1 and 7:
    exact conditional McNemar p = 0.070 (= 18/256)."""
    treated, base = _binary_runs(1, 7, both=1, neither=12)
    b, c, p = mcnemar_exact(treated, base)
    assert (b, c) == (1, 7) and p == pytest.approx(18 / 256) and round(p, 3) == 0.070


def test_no_discordant_pair_gives_p_one_and_no_interval_width():
    treated, base = _binary_runs(0, 0, both=5, neither=5)
    gain = paired_gain(treated, base)
    assert (gain.p_value, gain.mean_gain, gain.ci95, gain.discordant) == (1.0, 0.0, (0.0, 0.0), (0, 0))


# -- continuous values ---------------------------------------------------------------------

def test_wilcoxon_for_continuous_values_matches_full_enumeration():
    differences = np.array([0.31, -0.12, 0.45, 0.08, 0.52, -0.03, 0.27, 0.19])  # distinct magnitudes, no zero
    base = np.linspace(0.1, 0.4, len(differences))
    gain = paired_gain(base + differences, base)
    assert gain.test == WILCOXON and gain.discordant is None
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = ranks[differences > 0].sum()
    expected = ranks.sum() / 2
    extreme = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - expected) >= abs(observed - expected) - 1e-9
                  for signs in itertools.product((0, 1), repeat=len(ranks)))
    assert gain.p_value == pytest.approx(extreme / 2 ** len(ranks))
    assert gain.mean_gain == pytest.approx(differences.mean())


# -- the bootstrap interval ------------------------------------------------------------------

def test_interval_agrees_with_the_normal_approximation_on_many_items():
    rng = np.random.default_rng(5)
    treated, base = (rng.random(3000) < 0.55).astype(float), (rng.random(3000) < 0.45).astype(float)
    gain = paired_gain(treated, base)
    d = treated - base
    half = 1.959964 * d.std(ddof=1) / math.sqrt(len(d))
    assert gain.ci95 == pytest.approx((d.mean() - half, d.mean() + half), abs=0.004)
    assert gain.ci95[0] < gain.mean_gain < gain.ci95[1]


def test_interval_shifts_with_a_constant_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    differences = rng.normal(0.1, 1.0, 200)
    low, high = bootstrap_mean_interval(differences, seed=3)
    assert (low, high) == bootstrap_mean_interval(differences, seed=3)  # seeded
    shifted = bootstrap_mean_interval(differences + 0.25, seed=3)
    assert shifted == pytest.approx((low + 0.25, high + 0.25), abs=1e-9)
    four_times = bootstrap_mean_interval(np.tile(differences, 4), seed=3)
    assert (four_times[1] - four_times[0]) / (high - low) == pytest.approx(0.5, abs=0.05)  # width ~ 1/sqrt(n)


# -- pairing lm-eval samples -----------------------------------------------------------------

def _outcomes(values, hashes=None, ids=None):
    ids = range(len(values)) if ids is None else ids
    return [Outcome(i, None if hashes is None else hashes[k], float(v)) for k, (i, v) in enumerate(zip(ids, values))]


def test_outcomes_are_matched_by_doc_id_whatever_their_order():
    treated = _outcomes([1, 0, 1], ["h0", "h1", "h2"])
    base = list(reversed(_outcomes([0, 0, 1], ["h0", "h1", "h2"])))
    t, b = match_outcomes(treated, base)
    assert t.tolist() == [1, 0, 1] and b.tolist() == [0, 0, 1]


def test_runs_over_different_questions_are_refused():
    with pytest.raises(PairingError, match=r"not over the same questions: 2 only in patched X \(first doc_id 3\)"):
        match_outcomes(_outcomes([1] * 5), _outcomes([1] * 3), "patched X", "base Y")
    with pytest.raises(PairingError, match=r"doc_id 1 is a different document .*aaa.*bbb.*rerun"):
        match_outcomes(_outcomes([1, 1], ["h", "aaa"]), _outcomes([1, 0], ["h", "bbb"]))
    with pytest.raises(PairingError, match="doc_id 0 appears twice"):
        match_outcomes(_outcomes([1, 1], ids=[0, 0]), _outcomes([1, 1]))


# -- a difference of correlations (relsim) ----------------------------------------------------

def test_correlation_difference_permutation_p_matches_full_enumeration():
    rng = np.random.default_rng(2)
    shared = rng.random(9)
    treated = shared + rng.normal(0, 0.3, 9)
    base = rng.random(9)
    result = paired_correlation_difference(treated, base, shared)  # 2^9 < 10,000 swaps: scipy enumerates them all

    def rho(x):
        return np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(shared)))[0, 1]  # no ties here

    observed = rho(treated) - rho(base)
    null = []
    for swaps in itertools.product((False, True), repeat=9):
        t = np.where(swaps, base, treated)
        b = np.where(swaps, treated, base)
        null.append(rho(t) - rho(b))
    null = np.array(null)
    expected = min(1.0, 2 * min(np.mean(null >= observed - 1e-12), np.mean(null <= observed + 1e-12)))
    assert result.test == PERMUTATION and result.difference == pytest.approx(observed)
    assert result.p_value == pytest.approx(expected)
    assert result.ci95[0] < observed < result.ci95[1]


def test_identical_sets_do_not_differ():
    shared = np.arange(10.0)
    values = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dtype=float)
    result = paired_correlation_difference(values, values, shared)
    assert (result.difference, result.ci95, result.p_value) == (0.0, (0.0, 0.0), 1.0)


