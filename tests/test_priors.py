import numpy as np
import pytest
from scipy import stats

from twin.priors import prior_median, sample_prior

PRI = {"a": ("normal", {"mu": 1.0, "sigma": 2.0}), "b": ("lognormal", {"mu": np.log(3.0), "sigma": 0.5}), "c": ("beta", {"alpha": 2.0, "beta": 8.0})}


def test_samples_follow_their_distributions():
    s = sample_prior(PRI, 20000, seed=1)
    assert stats.kstest(s["a"], stats.norm(1.0, 2.0).cdf).pvalue > 1e-3
    assert stats.kstest(s["b"], stats.lognorm(0.5, scale=3.0).cdf).pvalue > 1e-3
    assert stats.kstest(s["c"], stats.beta(2.0, 8.0).cdf).pvalue > 1e-3


def test_reproducible_and_independent_of_other_parameters():
    s1 = sample_prior(PRI, 10, seed=7)
    s2 = sample_prior(PRI, 10, seed=7)
    for k in PRI:
        np.testing.assert_array_equal(s1[k], s2[k])
    s3 = sample_prior({**PRI, "zz": ("normal", {"mu": 0.0, "sigma": 1.0})}, 10, seed=7)
    np.testing.assert_array_equal(s1["a"], s3["a"])
    assert not np.array_equal(sample_prior(PRI, 10, seed=8)["a"], s1["a"])


def test_medians_and_errors():
    m = prior_median(PRI)
    assert m["a"] == 1.0 and m["b"] == pytest.approx(3.0)
    assert m["c"] == pytest.approx(stats.beta(2, 8).median())
    with pytest.raises(ValueError, match="unknown prior distribution"):
        sample_prior({"x": ("gamma", {})}, 3, seed=0)
