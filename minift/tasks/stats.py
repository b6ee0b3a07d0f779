"""Metrics and paired significance tests for comparing two evaluated runs on the same items.

- `macro_f1`: unweighted mean of per-class F1 (classes absent from both gold and prediction are skipped).
- `mcnemar_exact`: exact (conditional) McNemar test on per-item correctness: given the discordant
  pairs, the count where only B is right is Binomial(n_discordant, 1/2) under H0 (McNemar 1947;
  Fagerland, Lydersen & Laake, BMC Med Res Methodol 2013).
- `paired_bootstrap`: resample items with replacement, the same indices for both runs, and recompute
  any statistic (macro-F1, mean ROUGE-L, ...) on each resample (Efron & Tibshirani 1993 ch. 16;
  Koehn 2004 for NLP metrics). Interval: percentile. p-value: the resampled differences, shifted to
  mean zero, are the null distribution (Berg-Kirkpatrick et al. 2012's "delta > 2*delta" rule).

Statistics given to `paired_bootstrap` are vectorized: they take an index matrix idx[B, n] and return [B].
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import binomtest

Stat = Callable[[np.ndarray], np.ndarray]  # idx (B, n) int -> (B,) float


def _f1_from_counts(tp, fp, fn):
    # F1 = 2tp / (2tp + fp + fn); 0/0 (class never predicted nor present) handled by the caller
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def macro_f1(gold: Sequence, pred: Sequence, labels: Sequence | None = None) -> float:
    """Macro-F1 over `labels` (default: the labels seen in gold). A prediction outside the label set
    (e.g. an unparseable answer, None) is a false negative for its gold class and a false positive for
    no class."""
    if len(gold) != len(pred):
        raise ValueError(f"macro_f1: {len(gold)} gold labels but {len(pred)} predictions")
    labels = sorted(set(gold), key=str) if labels is None else list(labels)
    if not labels:
        return 0.0
    f1s = []
    for c in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return float(np.mean(f1s))


def mean_stat(values: Sequence[float]) -> Stat:
    """Bootstrap statistic: the mean of per-item values on each resample."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: v[idx].mean(axis=1)  # (B, n) -> (B,)


def macro_f1_stat(gold: Sequence, pred: Sequence, labels: Sequence) -> Stat:
    """Bootstrap statistic: macro-F1 over `labels` on each resample, fully vectorized.
    Labels are encoded as ints; predictions outside `labels` get code -1 (never a true/false positive)."""
    code = {c: i for i, c in enumerate(labels)}
    g = np.array([code.get(x, -1) for x in gold])
    p = np.array([code.get(x, -1) for x in pred])

    def stat(idx: np.ndarray) -> np.ndarray:
        gi, pi = g[idx], p[idx]  # (B, n) each
        f1s = []
        for c in range(len(labels)):
            tp = ((gi == c) & (pi == c)).sum(axis=1)
            fp = ((gi != c) & (pi == c)).sum(axis=1)
            fn = ((gi == c) & (pi != c)).sum(axis=1)
            f1s.append(_f1_from_counts(tp, fp, fn))
        return np.stack(f1s, axis=1).mean(axis=1)  # (B, n_labels) -> (B,)

    return stat


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar test. n10: A right, B wrong; n01: A wrong, B right. Two-sided p from the
    binomial on the discordant pairs (equal to 2 * P(X <= min) capped at 1, since p = 1/2 is symmetric)."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: {a.shape[0]} items in A but {b.shape[0]} in B")
    n10 = int((a & ~b).sum())
    n01 = int((~a & b).sum())
    n = n10 + n01
    p = 1.0 if n == 0 else float(binomtest(n01, n, 0.5, alternative="two-sided").pvalue)
    return {"n": int(a.size), "a": float(a.mean()) if a.size else 0.0, "b": float(b.mean()) if b.size else 0.0,
            "diff": float(b.mean() - a.mean()) if a.size else 0.0, "n10": n10, "n01": n01, "p_value": p}


def paired_bootstrap(stat_a: Stat, stat_b: Stat, n: int, n_boot: int = 10000, seed: int = 0,
                     alpha: float = 0.05) -> dict:
    """Paired bootstrap of diff = stat_b - stat_a over the same n items.

    Returns the observed values and difference, a (1 - alpha) percentile interval of the difference,
    and a two-sided p-value for H0: diff = 0, computed as the share of resamples whose centred difference
    (d* - d) is at least as extreme as the observed d, with the +1 correction so p is never 0."""
    if n < 1:
        raise ValueError("paired_bootstrap: no items")
    full = np.arange(n)[None, :]  # (1, n): the observed sample
    a0, b0 = float(stat_a(full)[0]), float(stat_b(full)[0])
    d0 = b0 - a0
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, 2000):  # chunks bound memory: (2000, n) index matrix at a time
        idx = rng.integers(0, n, size=(min(2000, n_boot - start), n))
        diffs.append(stat_b(idx) - stat_a(idx))
    d = np.concatenate(diffs)
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    extreme = np.abs(d - d0) >= abs(d0) - 1e-12  # 1e-12: ties from float rounding count as extreme
    p = (extreme.sum() + 1) / (n_boot + 1)
    return {"n": n, "a": a0, "b": b0, "diff": d0, "ci_low": float(lo), "ci_high": float(hi),
            "p_value": float(min(1.0, p))}
