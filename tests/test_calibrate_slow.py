"""Slow statistical tests of calibration (``make test-slow``); fast versions live in
``tests/test_calibrate.py``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*BLAS.*")

from test_calibrate import FREE, LLOQ, PRIORS, TIMES, TRUTH, _fixed, chemo_model, chemo_regimen  # noqa: E402

from calibration.calibrate import calibrate  # noqa: E402
from calibration.synthetic import synthetic_patient  # noqa: E402

pytestmark = pytest.mark.slow


def test_posterior_recovery_on_20_synthetic_patients():
    """20 synthetic patients whose parameters are drawn from the priors: true values inside
    the 94% intervals for >= 90% of the (patient, parameter) pairs; R-hat <= 1.01 everywhere."""
    import arviz as az

    m = chemo_model()
    rng = np.random.default_rng(2026)
    hits, total, rhats = 0, 0, []
    for i in range(20):
        truth = dict(TRUTH)
        for n, (_, par) in PRIORS.items():
            truth[n] = float(np.exp(par["mu"] + par["sigma"] * rng.standard_normal()))
        truth["N0"] = float(TRUTH["N0"] * np.exp(0.3 * rng.standard_normal()))
        pat = synthetic_patient(m, truth, chemo_regimen(), TIMES, sigma=0.1, seed=100 + i, lloq=LLOQ, patient_id=f"rec-{i}")
        tw = calibrate(pat, m, method="nuts", draws=1000, tune=1000, chains=4, seed=i, free=FREE, fixed=_fixed(), priors=PRIORS, progress=False)
        rhats.append(tw.diagnostics["rhat_max"])
        hdi = az.hdi(tw.idata.posterior, hdi_prob=0.94)
        for n in ("r_max", "K", "kill_docetaxel", "N0"):
            lo, hi = (float(x) for x in np.ravel(hdi[n].values))
            hits += lo <= truth[n] <= hi
            total += 1
    assert hits / total >= 0.9, (hits, total)
    assert max(rhats) <= 1.01, rhats


def test_update_agrees_with_full_recalibration():
    """Longer chains than the fast version: medians within a quarter posterior SD."""
    import dataclasses

    from calibration.update import update_twin

    m = chemo_model()
    pat = synthetic_patient(m, TRUTH, chemo_regimen(), TIMES, sigma=0.1, seed=3, lloq=LLOQ, patient_id="upd")
    early = dataclasses.replace(pat, measurements=pat.measurements[pat.measurements["time"] <= 56].reset_index(drop=True))
    kw = dict(free=FREE, fixed=_fixed(), progress=False)
    old = calibrate(early, m, method="nuts", draws=1000, chains=4, seed=1, **kw)
    new = update_twin(old, pat, draws=1000, chains=4, tune=300, seed=2)
    full = calibrate(pat, m, method="nuts", draws=1000, chains=4, seed=3, **kw)
    assert new.diagnostics["passed"], new.diagnostics["messages"]
    for n in ("r_max", "K", "kill_docetaxel"):
        a, b = np.log(new.draws[n]), np.log(full.draws[n])
        assert abs(np.median(a) - np.median(b)) < 0.25 * np.std(b), n
        assert 0.7 < np.std(a) / np.std(b) < 1.4, n
