"""Reference problem RTM-1 (tumour growth inhibition with a resistant clone, one patient).

Specification: ``/work/shared/benchmarks/RTM-1.md``. The vector field and the PK input
are written once (against an array namespace ``xp``) and used by the compiled engine
(:mod:`calibration._engine`), by the numpy/scipy reference solve and by the benchmark.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from ._engine import NUMPY, CompiledODE, ODEModel, Schedule

# fixed (data) constants
KA, KE, EC50, DOSE = 1.0, 0.3, 1.0, 1.0
DOSE_TIMES = np.arange(0.0, 121.0)  # days 0..120
VISITS = np.arange(0.0, 365.0, 14.0)  # 27 visits, days 0..364

THETA_NAMES = ("r", "K", "Emax", "mu")  # vector-field parameters, in order
PARAM_NAMES = THETA_NAMES + ("f0", "sigma")
TRUTH = {"r": 0.05, "K": 10.0, "Emax": 0.12, "mu": 1e-4, "f0": 1e-3, "sigma": 0.1}
#: LogNormal(log m, 1) priors (median m) for r, K, Emax, mu, f0; sigma ~ HalfNormal(0.5)
PRIOR_MEDIANS = {"r": 0.05, "K": 10.0, "Emax": 0.12, "mu": 1e-4, "f0": 1e-3}
SIGMA_PRIOR_SCALE = 0.5

DATA_PATHS = (
    os.environ.get("TWIN_RTM1_DATA", ""),
    "/work/shared/benchmarks/rtm1_data.csv",
    str(Path(__file__).resolve().parents[1] / "shared" / "benchmarks" / "rtm1_data.csv"),
)


# ----------------------------------------------------------------------------------------
# the one definition
# ----------------------------------------------------------------------------------------
def rhs(t, y, theta, u, xp):
    """dS/dt, dR/dt; ``u[0]`` is the drug concentration C(t)."""
    S, R = y[0], y[1]
    r, K, emax, mu = theta[0], theta[1], theta[2], theta[3]
    c = u[0]
    effect = emax * c / (EC50 + c)
    growth = r * (1.0 - (S + R) / K)
    return [growth * S - effect * S - mu * S, growth * R + mu * S]


def pk_input(s, w, xp):
    """C at time ``s`` after a segment start where (depot, central) amounts are ``w``."""
    a0, c0 = w[0], w[1]
    eke, eka = xp.exp(-KE * s), xp.exp(-KA * s)
    return [c0 * eke + a0 * (KA / (KA - KE)) * (eke - eka)]


MODEL = ODEModel(rhs=rhs, inputs=pk_input, n_states=2, n_params=4, n_w=2, name="rtm1")


def initial_state(f0, xp=NUMPY):
    return [1.0 - f0, f0]


# ----------------------------------------------------------------------------------------
# data and schedule
# ----------------------------------------------------------------------------------------
def concentration(t):
    """C(t) by superposition over doses t_d <= t (numpy; the spec's formula)."""
    t = np.asarray(t, dtype=np.float64)
    dt = t[..., None] - DOSE_TIMES
    on = dt >= 0
    dt = np.where(on, dt, 0.0)
    return np.sum(np.where(on, DOSE * KA / (KA - KE) * (np.exp(-KE * dt) - np.exp(-KA * dt)), 0.0), axis=-1)


def schedule(obs_times=VISITS) -> Schedule:
    """Segments between doses (last one to the last visit) with the PK state at each start."""
    obs = np.asarray(obs_times, dtype=np.float64)
    end = max(float(obs[-1]), DOSE_TIMES[-1] + 1.0)
    bounds = np.concatenate([DOSE_TIMES, [end]])
    w = np.zeros((len(DOSE_TIMES), 2))
    a = c = 0.0
    for k, td in enumerate(DOSE_TIMES):
        if k > 0:
            s = td - DOSE_TIMES[k - 1]
            eke, eka = np.exp(-KE * s), np.exp(-KA * s)
            c = c * eke + a * KA / (KA - KE) * (eke - eka)
            a = a * eka
        a += DOSE
        w[k] = (a, c)
    return Schedule(bounds, w, obs)


def reference_solve(theta, f0, obs_times=VISITS, *, rtol=1e-10, atol=1e-14, method="LSODA"):
    """scipy solve, piecewise between doses, C(t) by superposition; returns (T, 2)."""
    from scipy.integrate import solve_ivp

    theta = [float(v) for v in theta]
    obs = np.asarray(obs_times, dtype=np.float64)

    def f(t, y):
        return rhs(t, y, theta, [concentration(t)], NUMPY)

    bounds = list(DOSE_TIMES) + [max(obs[-1], DOSE_TIMES[-1] + 1.0)]
    y = np.array(initial_state(float(f0)), dtype=np.float64)
    out = np.full((len(obs), 2), np.nan)
    out[obs <= bounds[0]] = y
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        sel = (obs > t0) & (obs <= t1)
        sol = solve_ivp(f, (t0, t1), y, method=method, rtol=rtol, atol=atol, t_eval=obs[sel] if sel.any() else None)
        if sol.status != 0:
            raise RuntimeError(sol.message)
        if sel.any():
            out[sel] = sol.y.T[-int(sel.sum()):]
        y = sol.y[:, -1]
    return out


def load_data():
    """(days, V_obs, V_true) of RTM-1; regenerated from the spec if the CSV is not found."""
    import csv

    for p in DATA_PATHS:
        if p and Path(p).is_file():
            with open(p, newline="") as fh:
                rows = list(csv.DictReader(fh))
            day = np.array([float(r["day"]) for r in rows])
            return day, np.array([float(r["V_obs"]) for r in rows]), np.array([float(r["V_true"]) for r in rows])
    y = reference_solve([TRUTH[k] for k in THETA_NAMES], TRUTH["f0"], VISITS, method="DOP853", rtol=1e-12)
    v = y.sum(axis=1)
    eps = np.random.default_rng(0).standard_normal(len(VISITS))
    return VISITS.copy(), np.exp(np.log(v) + TRUTH["sigma"] * eps), v


# ----------------------------------------------------------------------------------------
# compiled engine and PyMC model
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def compiled() -> CompiledODE:
    return CompiledODE(MODEL)


def build_pymc_model(days=None, v_obs=None, *, rtol=1e-8, atol=1e-10):
    """PyMC model of RTM-1 whose ODE is :class:`calibration._engine.ODESolveOp`."""
    import pymc as pm
    import pytensor.tensor as pt

    if days is None or v_obs is None:
        days, v_obs, _ = load_data()
    op = compiled().op(schedule(days), rtol=rtol, atol=atol)
    with pm.Model() as model:
        rv = {k: pm.LogNormal(k, mu=np.log(PRIOR_MEDIANS[k]), sigma=1.0) for k in ("r", "K", "Emax", "mu", "f0")}
        sigma = pm.HalfNormal("sigma", sigma=SIGMA_PRIOR_SCALE)
        theta = pt.stack([rv[k] for k in THETA_NAMES])
        y0 = pt.stack([1.0 - rv["f0"], rv["f0"]])
        Y, _ = op(theta, y0)
        pm.Normal("log_v", mu=pt.log(Y[:, 0] + Y[:, 1]), sigma=sigma, observed=np.log(v_obs))
    return model
