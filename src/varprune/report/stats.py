"""Intervals and paired tests over seeds, written out so that a study's differences can be trusted or not.

* :func:`mean_interval`: the mean of per-seed values with its 95% confidence interval, Student's t with n - 1
  degrees of freedom (the seeds are the sample);
* :func:`paired`: a method against the baseline seed by seed (same seed, same data order): the mean difference,
  its 95% interval and the two-sided paired t-test's p-value.

Student's t distribution is computed here (the regularised incomplete beta function by its continued fraction,
the quantile by bisection on it), so varprune needs no statistics library at run time; the tests compare every
number with ``scipy.stats``. Where a value is undefined (one seed; differences of zero variance for the test)
it is None, and :func:`why_undefined` says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), to double precision."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The quantile of Student's t: the t with P(T <= t) = p (bisection to double precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var) if n > 1 else float("nan")


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, list[float] | None]:
    """``(mean, [low, high])``: the ``level`` confidence interval of the mean over the values (seeds);
    the interval is None for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean, sd = _mean_sd(values)
    if len(values) < 2:
        return mean, None
    half = t_ppf(0.5 + level / 2.0, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, [mean - half, mean + half]


def paired(values: Sequence[float], baseline: Sequence[float], name: str, level: float = LEVEL) -> dict:
    """A method's per-seed values against the baseline's of the same seeds: ``{"baseline", "diff", "ci95",
    "p_value", "n"}`` with ``diff`` the mean of (value - baseline) and the two-sided paired t-test; ``ci95`` and
    ``p_value`` are None where undefined (one seed; p also for differences of zero variance)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired: {len(values)} values against {len(baseline)} baseline values")
    diffs = [float(a) - float(b) for a, b in zip(values, baseline)]
    mean, interval = mean_interval(diffs, level)
    out = {"baseline": name, "diff": mean, "ci95": interval, "p_value": None, "n": len(diffs)}
    if len(diffs) > 1:
        _, sd = _mean_sd(diffs)
        if sd > 0:
            t = mean / (sd / math.sqrt(len(diffs)))
            out["p_value"] = min(1.0, 2.0 * (1.0 - t_cdf(abs(t), len(diffs) - 1)))
        # sd == 0 (every seed moved by exactly the same amount, common with coarse metrics on small test sets):
        # the t statistic is undefined, and a zero-width interval from a few seeds says nothing about the next
    return out


def why_undefined(entry: dict) -> str | None:
    """Why a paired result has no interval or p-value, in words (None when both are defined)."""
    if entry.get("n", 0) < 2:
        return "one seed: no interval or test (run more --seeds)"
    if entry.get("p_value") is None:
        return "every seed gave the same difference: no variance to test against (run more --seeds)"
    return None


def significant(entry: dict | None) -> bool:
    """Does the paired difference's interval exclude zero (with a defined test: a zero-width interval from seeds
    that all moved by the same amount is not evidence)?"""
    if not entry or entry.get("ci95") is None or entry.get("p_value") is None:
        return False
    lo, hi = entry["ci95"]
    return lo > 0 or hi < 0
