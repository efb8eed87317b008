"""Paired statistics: two conditions scored on the same items (questions, subcategories,
comparisons), compared item by item. Used by the leaderboard (each patched run against the
unpatched run of the same task) and by `ffv align` (FFV against FV).

A difference between two conditions measured on the same items is far less noisy than their
separate standard errors suggest: the item-to-item variance they share cancels. So the figures
here come from the per-item differences, all computed by scipy:

- `paired_gain`: the mean difference, a 95% bootstrap interval of it (`scipy.stats.bootstrap`,
  BCa, over the per-item differences, seeded) and a test of "no difference": for 0/1 outcomes the
  exact McNemar test (`scipy.stats.binomtest` on the discordant items: b right only without the
  change, c right only with it, p = binomtest(c, b + c, 0.5); p = 1 when b + c = 0), for
  continuous values the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, zero differences
  dropped; p = 1 when every difference is zero).
- `paired_correlation_difference`: for a statistic that is not a mean of per-item values, the
  difference of two Spearman correlations with one shared variable (relsim: each vector set's
  pair similarities against the human ratings): a paired BCa bootstrap interval (items resampled
  with all their values) and a paired permutation test (`scipy.stats.permutation_test`, the two conditions'
  values swapped within items).
- `match_outcomes`: the items two runs share, matched on lm-eval's `doc_id` and `doc_hash`; runs
  over different items are refused with an error that says how they differ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ffv_eval.errors import FFVError

RESAMPLES = 10_000
CONFIDENCE = 0.95
MCNEMAR = "exact McNemar"
WILCOXON = "Wilcoxon signed-rank"
PERMUTATION = "paired permutation"


class PairingError(FFVError, ValueError):
    """Two runs compared item by item that do not hold the same items."""


@dataclass(frozen=True)
class Outcome:
    """One item's value in one run: lm-eval's `doc_id`, `doc_hash` and the metric's value."""

    doc_id: int
    doc_hash: str | None
    value: float


@dataclass(frozen=True)
class PairedGain:
    """`treated` minus `base` over the same n items."""

    n: int
    mean_gain: float
    ci95: tuple[float, float]  # paired bootstrap interval of the mean difference
    test: str  # MCNEMAR for 0/1 outcomes, else WILCOXON
    p_value: float
    discordant: tuple[int, int] | None = None  # McNemar's (b, c): 1 in base only, 1 in treated only

    def as_dict(self) -> dict:
        return {"n": self.n, "mean_difference": self.mean_gain, "ci95": list(self.ci95), "test": self.test,
                "p": self.p_value, **({"discordant": list(self.discordant)} if self.discordant else {})}


@dataclass(frozen=True)
class CorrelationDifference:
    """Spearman(treated, shared) minus Spearman(base, shared) over the same n items."""

    n: int
    difference: float
    ci95: tuple[float, float]
    test: str  # PERMUTATION
    p_value: float

    def as_dict(self) -> dict:
        return {"n": self.n, "difference": self.difference, "ci95": list(self.ci95), "test": self.test, "p": self.p_value}


def signed_interval(value: float, ci95: Sequence[float]) -> str:
    """A difference and its interval as the reports show them: `+0.123 [+0.045, +0.201]`."""
    return f"{value:+.3f} [{ci95[0]:+.3f}, {ci95[1]:+.3f}]"


def match_outcomes(treated: Sequence[Outcome], base: Sequence[Outcome], treated_name: str = "the patched run",
                   base_name: str = "the unpatched run") -> tuple[np.ndarray, np.ndarray]:
    """The two runs' values over the same items, in doc_id order. An item must have one
    outcome per run, and the same doc_hash in both (when both record one); anything else is a
    PairingError naming the runs, the first offending doc_id and the likely cause."""
    by_run = []
    for name, outcomes in ((treated_name, treated), (base_name, base)):
        by_id: dict[int, Outcome] = {}
        for outcome in outcomes:
            if outcome.doc_id in by_id:
                raise PairingError(f"{name}: doc_id {outcome.doc_id} appears twice; one outcome per question expected")
            by_id[outcome.doc_id] = outcome
        by_run.append(by_id)
    treated_ids, base_ids = by_run
    if treated_ids.keys() != base_ids.keys():
        only_treated = sorted(treated_ids.keys() - base_ids.keys())
        only_base = sorted(base_ids.keys() - treated_ids.keys())
        parts = [f"{len(ids)} only in {name} (first doc_id {ids[0]})"
                 for ids, name in ((only_treated, treated_name), (only_base, base_name)) if ids]
        raise PairingError(f"{treated_name} ({len(treated_ids)} questions) and {base_name} ({len(base_ids)}) are not over "
                           f"the same questions: {'; '.join(parts)}. Compare runs made with the same --limit and data")
    ids = sorted(treated_ids)
    for doc_id in ids:
        a, b = treated_ids[doc_id].doc_hash, base_ids[doc_id].doc_hash
        if a is not None and b is not None and a != b:
            raise PairingError(f"doc_id {doc_id} is a different document in {treated_name} (doc_hash {a[:12]}...) and "
                               f"{base_name} (doc_hash {b[:12]}...): the runs read different data; rerun one of them")
    return (np.array([treated_ids[i].value for i in ids], dtype=float),
            np.array([base_ids[i].value for i in ids], dtype=float))


def is_binary(*values: np.ndarray) -> bool:
    return all(np.isin(v, (0.0, 1.0)).all() for v in values)


def mcnemar_exact(treated: np.ndarray, base: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): b items are 1 in base only, c in treated only; p is the exact two-sided
    McNemar p-value, binomtest(c, b + c, 0.5), and 1 when no item is discordant."""
    b = int(np.sum((base == 1) & (treated == 0)))
    c = int(np.sum((base == 0) & (treated == 1)))
    return b, c, 1.0 if b + c == 0 else float(stats.binomtest(c, b + c, 0.5).pvalue)


def _interval(result) -> tuple[float, float]:
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_mean_interval(differences: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% BCa bootstrap interval of the mean of the differences (scipy), seeded. All equal
    differences have no spread to resample: the interval is that one value."""
    if np.all(differences == differences[0]):
        return float(differences[0]), float(differences[0])
    result = stats.bootstrap((differences,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
                             batch=max(1, 2_000_000 // len(differences)), random_state=np.random.default_rng(seed))
    return _interval(result)


def paired_gain(treated: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray, resamples: int = RESAMPLES,
                seed: int = 0) -> PairedGain:
    """treated minus base, item by item (the i-th values belong to the same item): mean, 95%
    bootstrap interval, and McNemar (0/1 outcomes) or Wilcoxon signed-rank (otherwise)."""
    treated, base = np.asarray(treated, dtype=float), np.asarray(base, dtype=float)
    if treated.shape != base.shape or treated.ndim != 1:
        raise PairingError(f"paired values need two equally long lists, got {treated.shape} and {base.shape}")
    if len(treated) == 0:
        raise PairingError("no items to compare")
    differences = treated - base
    interval = bootstrap_mean_interval(differences, resamples, seed)
    if is_binary(treated, base):
        b, c, p = mcnemar_exact(treated, base)
        return PairedGain(len(treated), float(differences.mean()), interval, MCNEMAR, p, (b, c))
    p = 1.0 if not differences.any() else float(stats.wilcoxon(differences, zero_method="wilcox").pvalue)
    return PairedGain(len(treated), float(differences.mean()), interval, WILCOXON, p)


def paired_gain_by_key(treated: Mapping, base: Mapping, what: str, resamples: int = RESAMPLES, seed: int = 0) -> PairedGain:
    """paired_gain over the keys both mappings hold, which must be the same keys."""
    if treated.keys() != base.keys():
        raise PairingError(f"{what}: not the same items in both ({sorted(map(str, treated.keys() ^ base.keys()))[:3]} ...)")
    keys = list(treated)
    return paired_gain([treated[k] for k in keys], [base[k] for k in keys], resamples, seed)


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along an axis: Pearson's r of the ranks (scipy's rankdata and pearsonr)."""
    return stats.pearsonr(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis).statistic


def paired_correlation_difference(treated: Sequence[float], base: Sequence[float], shared: Sequence[float],
                                  resamples: int = RESAMPLES, seed: int = 0) -> CorrelationDifference:
    """Spearman(treated, shared) minus Spearman(base, shared), the i-th values of all three
    belonging to one item: a paired bootstrap interval (items resampled with all three values)
    and a paired permutation test (treated and base values swapped within items: under "no
    difference" either condition could have given either value)."""
    treated, base, shared = (np.asarray(v, dtype=float) for v in (treated, base, shared))
    if not treated.shape == base.shape == shared.shape or treated.ndim != 1:
        raise PairingError(f"paired values need three equally long lists, got {treated.shape}, {base.shape}, {shared.shape}")
    if len(treated) < 3:
        raise PairingError(f"a difference of correlations needs at least 3 items, got {len(treated)}")

    if np.array_equal(treated, base):  # no difference in any resample or permutation
        return CorrelationDifference(len(treated), 0.0, (0.0, 0.0), PERMUTATION, 1.0)

    def difference(t, b, s=shared, axis=-1):
        return _spearman(t, s, axis) - _spearman(b, s, axis)

    rng = np.random.default_rng(seed)
    observed = float(difference(treated, base))
    batch = max(1, 2_000_000 // len(treated))
    interval = _interval(stats.bootstrap((treated, base, shared), difference, paired=True, vectorized=True, batch=batch,
                                         n_resamples=resamples, confidence_level=CONFIDENCE, random_state=rng))
    p = stats.permutation_test((treated, base), lambda t, b, axis=-1: difference(t, b, axis=axis),
                               permutation_type="samples", vectorized=True, n_resamples=resamples, batch=batch,
                               random_state=rng).pvalue
    return CorrelationDifference(len(treated), observed, interval, PERMUTATION, float(p))
