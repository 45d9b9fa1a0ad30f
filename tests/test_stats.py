"""report/stats.py against scipy.stats: Student's t, the mean's interval, the paired t-test."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from varprune.report.stats import mean_interval, paired, significant, t_cdf, t_ppf, why_undefined


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 100])
def test_student_t_matches_scipy(df):
    for t in (-30.0, -4.1, -1.0, -0.1, 0.0, 0.3, 1.96, 2.7, 12.0):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-12, abs=1e-15)
    for p in (0.001, 0.025, 0.2, 0.5, 0.8, 0.975, 0.999):
        assert t_ppf(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=12))
def test_mean_interval_matches_scipy(values):
    mean, interval = mean_interval(values)
    assert mean == pytest.approx(np.mean(values), rel=1e-12, abs=1e-9)
    sem = stats.sem(values)
    if sem > 0:
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
        assert interval[0] == pytest.approx(lo, rel=1e-9, abs=1e-9)
        assert interval[1] == pytest.approx(hi, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=10))
def test_paired_test_matches_scipy(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    out = paired(a, b, "sgd")
    diffs = np.subtract(a, b)
    assert out["diff"] == pytest.approx(diffs.mean(), abs=1e-12) and out["baseline"] == "sgd"
    ref = stats.ttest_rel(a, b)
    if np.std(diffs) > 1e-9 * max(1.0, abs(diffs.mean())):
        assert out["p_value"] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-12)
        lo, hi = stats.t.interval(0.95, len(a) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
        assert out["ci95"] == pytest.approx([lo, hi], rel=1e-8, abs=1e-12)
        assert significant(out) == (lo > 0 or hi < 0)


def test_undefined_values_are_none_and_said():
    one = paired([0.9], [0.8], "sgd")
    assert one["ci95"] is None and one["p_value"] is None and "one seed" in why_undefined(one)
    assert mean_interval([0.5]) == (0.5, None)
    same = paired([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "sgd")
    assert same["p_value"] is None and math.isnan(stats.ttest_rel([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]).pvalue)
    assert "same difference" in why_undefined(same) and not significant(same)
    # every seed +0.25 exactly: scipy's t is a rounding artefact (p ~ 1e-31); a zero-width interval from three
    # seeds is no evidence, so no p-value and no finding
    shifted = paired([0.75, 0.5, 0.25], [0.5, 0.25, 0.0], "sgd")  # exact in binary: every difference is 0.25
    assert shifted["diff"] == 0.25 and shifted["p_value"] is None and not significant(shifted)
    assert "same difference" in why_undefined(shifted)
    with pytest.raises(ValueError):
        paired([0.1, 0.2], [0.1], "sgd")


def test_time_per_epoch_is_compared_with_the_baseline_whatever_its_name():
    """A study of AdamW runs has no method named sgd: the time column compares with the baseline (it read "—")."""
    from varprune.report.summary import summarize
    from varprune.report.tables import study_table

    def doc(ppl):
        row = {"sparsity": 0.5, "pruner": "magnitude", "perplexity": ppl + 1}
        return {"metric": "perplexity", "bn_retuning": False, "dense_perplexity": ppl, "results": [row]}

    spec = {"methods": ["adamw", "var"], "seeds": [0, 1], "sparsities": [0.5]}
    docs = {(m, s): doc(100.0 + 3 * s + (m == "var")) for m in spec["methods"] for s in spec["seeds"]}
    times = {"adamw": 2.0, "var": 3.0}
    summary = summarize(spec, docs, times)
    assert summary["methods"]["var"]["time_vs_baseline"] == times["var"] / times["adamw"]
    assert summary["methods"]["var"]["time_vs_sgd"] is None
    table = study_table(summary)
    assert "time/epoch vs adamw" in table
    assert f"{times['var'] / times['adamw']:.2f}x" in next(line for line in table.splitlines() if "| var |" in line)
