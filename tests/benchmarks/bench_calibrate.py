"""Calibrate RTM-1 with three stacks, side by side (a script; not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_calibrate.py [--stacks twin,numpyro,pm_ode]
        [--pm-ode-chains 2 --pm-ode-tune 100 --pm-ode-draws 100]

(a) twin: calibration._engine (numba DP5(4) + forward sensitivities, one PyTensor Op with a
    registered numba_funcify) sampled by nutpie's numba backend;
(b) pm_ode: PyMC's ``pm.ode.DifferentialEquation`` (scipy odeint + sensitivities, Python
    callbacks) with ``pm.sample``. pm.ode cannot represent doses as events: the PK is the
    analytic superposition concentration computed inside the RHS from t (the integrator
    steps over the kinks in dC/dt at dose times). It is slow, so by default it runs
    reduced settings (see the printed line) and the ESS/s is compared, not the wall.
(c) numpyro: NumPyro NUTS + diffrax (Dopri5, PID rtol 1e-8, piecewise between doses with
    the same segment PK constants as twin). Chains run sequentially: chain_method="parallel"
    (pmap over 4 host devices) fails inside diffrax's checkpointed while loop with jax 0.10.2 /
    diffrax 0.7.2 ("Closure-converted function called with different dynamic arguments").

Same data (rtm1_data.csv), priors, NUTS settings (4 chains, 1000 tune + 1000 draws,
target_accept 0.9) except where a line says otherwise. The last line is
``BENCH calibrate twin_wall_s=<s> vs_numpyro=<ratio or nan> vs_pm_ode=<ratio>``, where the
ratios are (other stack's wall) / (twin's wall), extrapolated to the full settings by draws
for a reduced run (marked in its line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CHAINS, TUNE, DRAWS, TARGET = 4, 1000, 1000, 0.9


def summarize(name, idata_or_dict, wall, compile_s, sampling_s, divergences, note=""):
    import arviz as az

    from calibration import _rtm1 as R

    post = idata_or_dict
    ess = az.ess(post, var_names=list(R.PARAM_NAMES), method="bulk")
    rhat = az.rhat(post, var_names=list(R.PARAM_NAMES))
    hdi = az.hdi(post, var_names=list(R.PARAM_NAMES), hdi_prob=0.94)
    min_ess = float(min(float(ess[k]) for k in R.PARAM_NAMES))
    max_rhat = float(max(float(rhat[k]) for k in R.PARAM_NAMES))
    inside = {k: bool(float(hdi[k][0]) <= R.TRUTH[k] <= float(hdi[k][1])) for k in R.PARAM_NAMES}
    res = dict(stack=name, wall_s=wall, compile_s=compile_s, sampling_s=sampling_s, min_ess_bulk=min_ess, max_rhat=max_rhat,
               divergences=int(divergences), ess_per_s=min_ess / sampling_s, truth_in_hdi94=inside, note=note)
    print(f"[{name}] wall {wall:.1f} s (compile {compile_s:.1f} s, sampling {sampling_s:.1f} s); min bulk ESS {min_ess:.0f}; "
          f"max R-hat {max_rhat:.3f}; divergences {int(divergences)}; ESS/s {res['ess_per_s']:.2f}; truth in 94% HDI: "
          + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in inside.items()) + (f"; {note}" if note else ""), flush=True)
    for k in R.PARAM_NAMES:
        print(f"    {k}: HDI94 [{float(hdi[k][0]):.4g}, {float(hdi[k][1]):.4g}] truth {R.TRUTH[k]:g}", flush=True)
    return res


# ----------------------------------------------------------------------------------------
def run_twin(seed=1):
    import nutpie

    from calibration import _rtm1 as R

    t0 = time.perf_counter()
    R.compiled()  # symbolic derivation + numba kernels (jit happens inside nutpie's compile)
    model = R.build_pymc_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*object mode.*")  # no Python callbacks allowed
        cm = nutpie.compile_pymc_model(model, backend="numba")
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tr = nutpie.sample(cm, chains=CHAINS, tune=TUNE, draws=DRAWS, target_accept=TARGET, seed=seed, progress_bar=False)
    sampling_s = time.perf_counter() - t1
    div = int(tr.sample_stats["diverging"].sum())
    return summarize("twin engine + nutpie(numba)", tr, compile_s + sampling_s, compile_s, sampling_s, div)


# ----------------------------------------------------------------------------------------
def run_pm_ode(chains, tune, draws, seed=1):
    import pymc as pm
    import pytensor.tensor as pt

    from calibration import _engine as eng
    from calibration import _rtm1 as R

    days, v_obs, _ = R.load_data()
    dose_t = R.DOSE_TIMES

    def rhs(y, t, p):
        dt = t - dose_t
        on = dt >= 0
        dts = pt.switch(on, dt, 0.0)
        c = pt.sum(pt.switch(on, R.DOSE * R.KA / (R.KA - R.KE) * (pt.exp(-R.KE * dts) - pt.exp(-R.KA * dts)), 0.0))
        return R.rhs(t, [y[0], y[1]], [p[0], p[1], p[2], p[3]], [c], eng.PYTENSOR)

    ode = pm.ode.DifferentialEquation(func=rhs, times=days[1:], n_states=2, n_theta=4, t0=0.0)
    with pm.Model() as model:
        rv = {k: pm.LogNormal(k, mu=np.log(R.PRIOR_MEDIANS[k]), sigma=1.0) for k in ("r", "K", "Emax", "mu", "f0")}
        sigma = pm.HalfNormal("sigma", sigma=R.SIGMA_PRIOR_SCALE)
        Y = ode(y0=[1.0 - rv["f0"], rv["f0"]], theta=[rv[k] for k in R.THETA_NAMES])
        logv = pt.concatenate([pt.zeros(1), pt.log(Y[:, 0] + Y[:, 1])])  # V(0) = S0 + R0 = 1
        pm.Normal("log_v", mu=logv, sigma=sigma, observed=np.log(v_obs))
    t0 = time.perf_counter()
    with model:
        tr = pm.sample(draws=draws, tune=tune, chains=chains, cores=min(chains, 2), target_accept=TARGET, random_seed=seed,
                       progressbar=False, compute_convergence_checks=False)
    wall = time.perf_counter() - t0
    sampling_s = float(tr.sample_stats.attrs.get("sampling_time", wall))
    div = int(tr.sample_stats["diverging"].sum())
    note = "" if (chains, tune, draws) == (CHAINS, TUNE, DRAWS) else f"REDUCED: {chains} chains x ({tune} tune + {draws} draws)"
    return summarize("pm.ode.DifferentialEquation + pm.sample", tr, wall, wall - sampling_s, sampling_s, div, note)


# ----------------------------------------------------------------------------------------
def run_numpyro(seed=1):
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={CHAINS}")
    import jax

    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS
    from types import SimpleNamespace

    from calibration import _rtm1 as R

    JXP = SimpleNamespace(name="jax", exp=jnp.exp, log=jnp.log, sqrt=jnp.sqrt, abs=jnp.abs, where=jnp.where,
                          maximum=jnp.maximum, minimum=jnp.minimum, sigmoid=jax.nn.sigmoid)
    days, v_obs, _ = R.load_data()
    sc = R.schedule(days)
    b, W = jnp.asarray(sc.boundaries), jnp.asarray(sc.w)
    n_day = len(b) - 2  # unit segments [k, k+1], k = 0..119; last segment [120, 364]
    early = days <= b[n_day]
    late_t = jnp.asarray(days[~early])
    early_idx = np.asarray(days[early]).astype(int)  # visits on dose days: state at boundary k

    def vf(t, y, args):
        theta, t0, w = args
        u = R.pk_input(t - t0, w, JXP)
        return jnp.stack(R.rhs(t, [y[0], y[1]], [theta[0], theta[1], theta[2], theta[3]], u, JXP))

    term = diffrax.ODETerm(vf)
    ctrl = diffrax.PIDController(rtol=1e-8, atol=1e-10)

    def solve(theta, y0):
        def seg(y, k):
            t0, t1 = b[k], b[k + 1]
            sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), t0, t1, 0.1, y, args=(theta, t0, W[k]), stepsize_controller=ctrl,
                                      saveat=diffrax.SaveAt(t1=True), max_steps=4096, throw=False)
            y1 = jnp.where(sol.result == diffrax.RESULTS.successful, sol.ys[-1], jnp.nan)
            return y1, y1

        y120, ys = jax.lax.scan(seg, y0, jnp.arange(n_day))
        bounds_states = jnp.concatenate([y0[None], ys])
        sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), b[n_day], b[-1], 0.1, y120, args=(theta, b[n_day], W[n_day]),
                                  stepsize_controller=ctrl, saveat=diffrax.SaveAt(ts=late_t), max_steps=16384, throw=False)
        late = jnp.where(sol.result == diffrax.RESULTS.successful, sol.ys, jnp.nan)  # failed solve -> NaN -> rejected
        return jnp.concatenate([bounds_states[early_idx], late])

    def model(logv_obs):
        rv = {k: numpyro.sample(k, dist.LogNormal(np.log(R.PRIOR_MEDIANS[k]), 1.0)) for k in ("r", "K", "Emax", "mu", "f0")}
        sigma = numpyro.sample("sigma", dist.HalfNormal(R.SIGMA_PRIOR_SCALE))
        theta = jnp.stack([rv[k] for k in R.THETA_NAMES])
        Y = solve(theta, jnp.stack([1.0 - rv["f0"], rv["f0"]]))
        numpyro.sample("log_v", dist.Normal(jnp.log(Y[:, 0] + Y[:, 1]), sigma), obs=logv_obs)

    # accuracy check against the engine's LSODA reference at the truth
    th_true = jnp.asarray([R.TRUTH[k] for k in R.THETA_NAMES])
    t0 = time.perf_counter()
    Yt = jax.jit(solve)(th_true, jnp.asarray([1 - R.TRUTH["f0"], R.TRUTH["f0"]])).block_until_ready()
    ref = R.reference_solve(np.asarray(th_true), R.TRUTH["f0"], days)
    print(f"[numpyro] diffrax vs LSODA max rel err {np.max(np.abs(np.asarray(Yt) - ref) / np.abs(ref)):.2e} "
          f"(forward jit {time.perf_counter() - t0:.1f} s)", flush=True)
    # compile time: jit of the potential's value and gradient (the MCMC run jits again, inside)
    from numpyro.infer.util import initialize_model

    t0 = time.perf_counter()
    info = initialize_model(jax.random.PRNGKey(0), model, model_args=(jnp.asarray(np.log(v_obs)),))
    vg = jax.jit(jax.value_and_grad(info.potential_fn))
    jax.block_until_ready(vg(info.param_info.z))
    compile_s = time.perf_counter() - t0
    mcmc = MCMC(NUTS(model, target_accept_prob=TARGET), num_warmup=TUNE, num_samples=DRAWS, num_chains=CHAINS,
                chain_method=os.environ.get("BENCH_NUMPYRO_CHAIN_METHOD", "sequential"), progress_bar=False)
    t1 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(np.log(v_obs)), extra_fields=("diverging",))
    run_s = time.perf_counter() - t1
    import arviz as az

    idata = az.from_numpyro(mcmc)
    div = int(np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"]).sum())
    return summarize("NumPyro NUTS + diffrax", idata, compile_s + run_s, compile_s, run_s, div,
                     note="sampling_s includes MCMC's own jit of the sampler")


# ----------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", default="twin,numpyro,pm_ode")
    ap.add_argument("--pm-ode-chains", type=int, default=2)
    ap.add_argument("--pm-ode-tune", type=int, default=100)
    ap.add_argument("--pm-ode-draws", type=int, default=100)
    ap.add_argument("--real-patient", action="store_true", help="also time the default twin on bundled patient bruchovsky-101")
    ap.add_argument("--real-patient-method", default="nuts")
    ap.add_argument("--real-patient-draws", type=int, default=500)
    args = ap.parse_args(argv)
    stacks = args.stacks.split(",")
    res = {}
    print(f"RTM-1 calibration benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load {os.getloadavg()}", flush=True)
    if "twin" in stacks:
        res["twin"] = run_twin()
    if "numpyro" in stacks:
        try:
            res["numpyro"] = run_numpyro()
        except ImportError as exc:
            print(f"[numpyro] skipped: {exc}", flush=True)
    if "pm_ode" in stacks:
        res["pm_ode"] = run_pm_ode(args.pm_ode_chains, args.pm_ode_tune, args.pm_ode_draws)

    if args.real_patient:
        res["real"] = run_real_patient(args.real_patient_method, args.real_patient_draws)

    # ESS/s ratios (the definition): twin ESS/s / other stack's ESS/s; a stack that
    # did not finish has no ESS: its ratio is printed as a lower bound from its time-out.
    tw = res["twin"]["wall_s"] if "twin" in res else float("nan")
    te = res["twin"]["ess_per_s"] if "twin" in res else float("nan")

    def ratio(key):
        r = res.get(key)
        if r is None:
            return "nan"
        if r.get("ess_per_s"):
            return f"{te / r['ess_per_s']:.2f}"
        return f">{r['lower_bound']:.2f}" if r.get("lower_bound") else "nan"

    print(f"BENCH calibrate twin_wall_s={tw:.1f} vs_numpyro={ratio('numpyro')} vs_pm_ode={ratio('pm_ode')}", flush=True)
    return res


def run_real_patient(method="nuts", draws=500):
    """The default twin model on the bundled prostate patient bruchovsky-101 (4 years of PSA,
    911 daily oral doses): wall time, diagnostics."""
    import warnings as _w

    from calibration.calibrate import calibrate
    from twin.datasets import load_patient_example

    _w.filterwarnings("ignore")
    p = load_patient_example()
    t0 = time.perf_counter()
    tw = calibrate(p, method=method, draws=draws, tune=draws, chains=4, seed=1, progress=False)
    wall = time.perf_counter() - t0
    d = tw.diagnostics
    keys = ("rhat_max", "ess_bulk_min", "ess_tail_min", "divergences", "bfmi_min", "ppc_coverage90", "passed")
    print(f"[real patient {p.id}, default model, {method} 4 x ({draws} + {draws})] wall {wall:.1f} s (build {d['build_s']:.1f} s, "
          f"sampling {d['sampling_s']:.1f} s); " + ", ".join(f"{k} {d[k]}" for k in keys if k in d), flush=True)
    if "ess_bulk_min" in d:
        print(f"    min bulk ESS / sampling s = {d['ess_bulk_min'] / d['sampling_s']:.2f}", flush=True)
    return {"wall_s": wall, **{k: d.get(k) for k in keys}}


if __name__ == "__main__":
    main()
