"""Compiled ODE engine (calibration._engine) on the reference problem RTM-1."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("pytensor")
pytest.importorskip("numba")

import pytensor  # noqa: E402
import pytensor.tensor as pt  # noqa: E402
from scipy import stats  # noqa: E402

from calibration import _engine as eng  # noqa: E402
from calibration import _rtm1 as R  # noqa: E402

THETA = np.array([R.TRUTH[k] for k in R.THETA_NAMES])
F0 = R.TRUTH["f0"]
SIGMA = R.TRUTH["sigma"]


@pytest.fixture(scope="module")
def data():
    return R.load_data()


@pytest.fixture(scope="module")
def compiled():
    return R.compiled()


@pytest.fixture(scope="module")
def reference():
    return R.reference_solve(THETA, F0, R.VISITS, rtol=1e-10)


def _loglik_fn(op, v_obs, mode=None):
    th, f0 = pt.dvector("th"), pt.dscalar("f0")
    Y, _ = op(th, pt.stack([1.0 - f0, f0]))
    ll = pt.sum(-0.5 * ((np.log(v_obs) - pt.log(Y[:, 0] + Y[:, 1])) / SIGMA) ** 2) - len(v_obs) * np.log(SIGMA * np.sqrt(2 * np.pi))
    g = pytensor.grad(ll, [th, f0])
    return pytensor.function([th, f0], [ll, *g], mode=mode)


def test_one_definition_runs_on_numpy_torch_and_pytensor():
    rng = np.random.default_rng(1)
    y = [rng.uniform(0.1, 1.0, 5), rng.uniform(1e-3, 0.1, 5)]
    th = list(THETA)
    w = [rng.uniform(0, 2, 5), rng.uniform(0, 2, 5)]
    s = rng.uniform(0, 1, 5)
    ref = np.array(R.rhs(0.0, y, th, R.pk_input(s, w, eng.NUMPY), eng.NUMPY))
    ys, ws, ss = [pt.dvector() for _ in y], [pt.dvector() for _ in w], pt.dvector()
    sym = R.rhs(0.0, ys, th, R.pk_input(ss, ws, eng.PYTENSOR), eng.PYTENSOR)
    got = pytensor.function([*ys, *ws, ss], sym)(*y, *w, s)
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-14)
    torch = pytest.importorskip("torch")
    tx = eng.torch_namespace()
    T = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    tt = R.rhs(0.0, [T(a) for a in y], th, R.pk_input(T(s), [T(a) for a in w], tx), tx)
    np.testing.assert_allclose(np.array([a.numpy() for a in tt]), ref, rtol=1e-14)


def test_segment_inputs_match_superposition_and_twin_pk():
    sc = R.schedule()
    t = np.linspace(0, 200, 801) + 0.37
    k = np.searchsorted(sc.boundaries, t, side="right") - 1
    u = R.pk_input(t - sc.boundaries[k], sc.w[k].T, eng.NUMPY)[0]
    np.testing.assert_allclose(u, R.concentration(t), rtol=1e-12, atol=1e-14)
    from twin.pk import DoseTable, PKParams, concentration

    c = concentration(PKParams(cl=R.KE, v=1.0, ka=R.KA), DoseTable.repeated(R.DOSE, 1.0, len(R.DOSE_TIMES), route="oral"), t)
    np.testing.assert_allclose(u, c, rtol=1e-10, atol=1e-14)


def test_forward_matches_lsoda(compiled, reference, data):
    sc = R.schedule()
    Y, S, info = compiled.solve(THETA, [1 - F0, F0], sc, rtol=1e-10, atol=1e-12)
    assert info["status"] == 0
    np.testing.assert_allclose(Y, reference, rtol=1e-6)
    # default tolerance (used for sampling) meets RTM-1's 1e-4 requirement with margin
    Yd, _, _ = compiled.solve(THETA, [1 - F0, F0], sc)
    np.testing.assert_allclose(Yd, reference, rtol=1e-5)
    # and the forward-only solver agrees
    Yp, _, _ = compiled.solve(THETA, [1 - F0, F0], sc, rtol=1e-10, atol=1e-12, sensitivities=False)
    np.testing.assert_allclose(Yp, reference, rtol=1e-6)
    # the data file's noise-free V
    np.testing.assert_allclose(Y.sum(axis=1), data[2], rtol=1e-6)


def test_op_forward_matches_lsoda(compiled, reference):
    op = compiled.op(R.schedule(), rtol=1e-10, atol=1e-12)
    th, y0 = pt.dvector(), pt.dvector()
    Y, _ = op(th, y0)
    got = pytensor.function([th, y0], Y)(THETA, [1 - F0, F0])
    np.testing.assert_allclose(got, reference, rtol=1e-6)


def test_sensitivities_match_finite_differences(compiled):
    sc = R.schedule()
    q0 = np.concatenate([THETA, [1 - F0, F0]])
    _, S, _ = compiled.solve(q0[:4], q0[4:], sc, rtol=1e-12, atol=1e-16)
    for j in range(6):
        h = 1e-5 * max(abs(q0[j]), 1e-3)
        qp, qm = q0.copy(), q0.copy()
        qp[j] += h
        qm[j] -= h
        Yp, _, _ = compiled.solve(qp[:4], qp[4:], sc, rtol=1e-12, atol=1e-16, sensitivities=False)
        Ym, _, _ = compiled.solve(qm[:4], qm[4:], sc, rtol=1e-12, atol=1e-16, sensitivities=False)
        fd = (Yp - Ym) / (2 * h)
        np.testing.assert_allclose(S[:, :, j], fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_loglik_gradient_matches_central_differences(compiled, data):
    op = compiled.op(R.schedule(data[0]), rtol=1e-12, atol=1e-16)
    f = _loglik_fn(op, data[1])
    x0 = np.concatenate([THETA, [F0]])
    ll, g_th, g_f0 = f(x0[:4], x0[4])
    g = np.concatenate([g_th, [g_f0]])
    fd = np.empty(5)
    for j in range(5):
        h = 1e-4 * abs(x0[j])
        xp, xm = x0.copy(), x0.copy()
        xp[j] += h
        xm[j] -= h
        fd[j] = (f(xp[:4], xp[4])[0] - f(xm[:4], xm[4])[0]) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_verify_grad(compiled):
    op = compiled.op(R.schedule(), rtol=1e-12, atol=1e-16)
    rng = np.random.default_rng(42)
    # in log-parameters, so that verify_grad's absolute step is a relative one (mu = 1e-4)
    pytensor.gradient.verify_grad(lambda lth, ly0: op(pt.exp(lth), pt.exp(ly0))[0], [np.log(THETA), np.log([1 - F0, F0])], rng=rng, eps=1e-6)


def test_numba_mode_compiles_without_object_mode_and_agrees(compiled, data):
    op = compiled.op(R.schedule(data[0]))
    ref = _loglik_fn(op, data[1])(THETA, F0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*object mode.*")
        f = _loglik_fn(op, data[1], mode="NUMBA")
        got = f(THETA, F0)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_pymc_logp_equals_hand_computed_scipy(data):
    pm = pytest.importorskip("pymc")
    days, v_obs, _ = data
    model = R.build_pymc_model(days, v_obs, rtol=1e-10, atol=1e-12)
    vals = {"r": 0.047, "K": 9.0, "Emax": 0.11, "mu": 2e-4, "f0": 2e-3, "sigma": 0.12}
    point = {f"{k}_log__": np.log(v) for k, v in vals.items()}
    th = [vals[k] for k in R.THETA_NAMES]
    prior = sum(stats.lognorm.logpdf(vals[k], s=1.0, scale=R.PRIOR_MEDIANS[k]) for k in R.PRIOR_MEDIANS)
    prior += stats.halfnorm.logpdf(vals["sigma"], scale=R.SIGMA_PRIOR_SCALE)

    def hand(Y):
        return stats.norm.logpdf(np.log(v_obs), loc=np.log(Y.sum(axis=1)), scale=vals["sigma"]).sum() + prior

    got = model.compile_logp(jacobian=False)(point)
    # structure exact: same ODE solution (the engine's, at the model's tolerance) -> 1e-8
    Y_engine, _, _ = R.compiled().solve(th, [1 - vals["f0"], vals["f0"]], R.schedule(days), rtol=1e-10, atol=1e-12)
    expected = hand(Y_engine)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    # and fully independent: scipy LSODA (rtol 1e-10) solution; the residual/sigma^2 factor
    # amplifies the ~1e-8 solver differences, hence 1e-6
    np.testing.assert_allclose(got, hand(R.reference_solve(th, vals["f0"], days, rtol=1e-10)), rtol=1e-6)
    # with the log-transform Jacobian: + sum(log value)
    got_j = model.compile_logp(jacobian=True)(point)
    np.testing.assert_allclose(got_j, expected + sum(np.log(v) for v in vals.values()), rtol=1e-8)
