"""Error models: exact log-likelihoods against scipy.stats, censoring (M3), torch gradients."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from twin.observation import ErrorModel, observe_from_cells

PRED = np.array([120.0, 80.0, 15.0, 3.0])
OBS = np.array([130.0, 60.0, np.nan, 2.5])
CENS = np.array([False, False, True, False])
LLOQ = np.array([1.0, 1.0, 10.0, 1.0])


def _scipy_reference(kind, pred, obs, cens, lloq, sigma=0.2, a=2.0, b=0.1):
    total = 0.0
    for f, y, c, q in zip(pred, obs, cens, lloq):
        if kind == "lognormal":
            d = stats.lognorm(s=sigma, scale=f)
        else:
            sd = {"proportional": b * f, "additive": a, "combined": math.sqrt(a * a + (b * f) ** 2)}[kind]
            d = stats.norm(f, sd)
        total += d.logcdf(q) if c else d.logpdf(y)
    return total


@pytest.mark.parametrize("kind", ["lognormal", "proportional", "additive", "combined"])
def test_loglik_equals_scipy(kind):
    em = ErrorModel(kind, sigma=0.2, a=2.0, b=0.1)
    got = em.loglik(PRED, OBS, lloq=LLOQ, censored=CENS)
    assert got == pytest.approx(_scipy_reference(kind, PRED, OBS, CENS, LLOQ), rel=1e-12)


@pytest.mark.parametrize("kind", ["lognormal", "combined"])
def test_torch_equals_numpy_and_gradient_matches_finite_differences(kind):
    em = ErrorModel(kind, sigma=0.2, a=2.0, b=0.1)
    pred = torch.tensor(PRED, dtype=torch.float64, requires_grad=True)
    val = em.loglik(pred, OBS, lloq=LLOQ, censored=CENS)
    assert float(val.detach()) == pytest.approx(em.loglik(PRED, OBS, lloq=LLOQ, censored=CENS), rel=1e-12)
    (g,) = torch.autograd.grad(val, pred)
    h = 1e-6
    for i in range(len(PRED)):
        up, dn = PRED.copy(), PRED.copy()
        up[i] += h * PRED[i]
        dn[i] -= h * PRED[i]
        fd = (em.loglik(up, OBS, lloq=LLOQ, censored=CENS) - em.loglik(dn, OBS, lloq=LLOQ, censored=CENS)) / (2 * h * PRED[i])
        assert float(g[i]) == pytest.approx(fd, rel=1e-5)


def test_censored_value_is_a_censored_term_not_dropped():
    em = ErrorModel("lognormal", sigma=0.3)
    with_c = em.loglik(PRED, OBS, lloq=LLOQ, censored=CENS)
    without = em.loglik(PRED[~CENS], OBS[~CENS])
    assert with_c - without == pytest.approx(stats.lognorm(s=0.3, scale=15.0).logcdf(10.0))
    # a prediction far above the LLOQ makes the censored value improbable
    high = PRED.copy()
    high[2] = 1000.0
    assert em.loglik(high, OBS, lloq=LLOQ, censored=CENS) < with_c - 10


def test_bad_models_and_missing_lloq():
    with pytest.raises(ValueError, match="needs b"):
        ErrorModel("proportional")
    with pytest.raises(ValueError, match="unknown error model"):
        ErrorModel("poisson", sigma=1)
    with pytest.raises(ValueError, match="lloq"):
        ErrorModel("lognormal", sigma=0.1).loglik(PRED, OBS, censored=CENS)


def test_observation_functions():
    cells = np.array([1e9, 8e9])
    v = observe_from_cells(cells, "tumor_volume")
    np.testing.assert_allclose(v, [1000.0, 8000.0])
    d = observe_from_cells(cells, "sld")
    np.testing.assert_allclose(math.pi / 6 * d**3, v)  # sphere volume from the diameter
    assert d[1] / d[0] == pytest.approx(2.0)
    np.testing.assert_allclose(observe_from_cells(cells, "ctdna", shed=50.0), [50.0, 400.0])
    with pytest.raises(ValueError, match="no observation function"):
        observe_from_cells(cells, "psa")
