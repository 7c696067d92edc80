"""Hierarchical cohort calibration: partial pooling of patient parameters.

For each *pooled* parameter ``theta`` with a log-normal population prior
``LogNormal(mu0, s0)`` (the model's default, omics-free):

    mu_theta  ~ Normal(mu0, s0)            population log-median
    tau_theta ~ HalfNormal(s0 / 2)         between-patient spread (log scale)
    z_i       ~ Normal(0, 1)               non-centred
    theta_i   = exp(mu_theta + tau_theta z_i)

Other estimated parameters keep their per-patient priors (omics-shifted), each patient has
its own error SDs and initial sizes. All patients share one model structure, one compiled
vector field and one joint posterior (NUTS or MAP + Laplace over all of it); the
per-patient twins are cut out of the joint posterior. This runs in one process (the
chains in parallel threads); Dask distributes the one-by-one mode
(:func:`calibration.cohort.calibrate_cohort`).

Reference: Gelman et al., *Bayesian Data Analysis* (3rd ed.), ch. 5; the non-centred
parameterisation after Papaspiliopoulos, Roberts & Sköld (2007).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from twin.errors import InputError

__all__ = ["calibrate_hierarchical", "HierarchicalResult", "DEFAULT_POOLED"]

DEFAULT_POOLED = ("r_max", "d_max", "K", "psa_prod", "psa_clear")


@dataclass
class HierarchicalResult:
    """The joint posterior (``idata``: population and every patient's variables), the
    per-patient twins, diagnostics of the joint run."""

    idata: Any
    twins: list
    pooled: tuple
    diagnostics: dict

    def population(self) -> "Any":
        """Posterior summary of the population parameters (median and 90% interval of
        ``exp(mu)`` — the population median — and of ``tau``)."""
        import pandas as pd

        rows = []
        for n in self.pooled:
            mu = np.exp(self.idata.posterior[f"mu_{n}"].values.ravel())
            tau = self.idata.posterior[f"tau_{n}"].values.ravel()
            rows.append({"parameter": n, "population_median": np.median(mu), "q05": np.quantile(mu, 0.05), "q95": np.quantile(mu, 0.95),
                         "tau_median": np.median(tau), "tau_q05": np.quantile(tau, 0.05), "tau_q95": np.quantile(tau, 0.95)})
        return pd.DataFrame(rows).set_index("parameter")


def calibrate_hierarchical(patients: Sequence, model, *, method: str = "nuts", draws: int = 1000, chains: int = 4, tune: int | None = None,
                           seed: int = 0, pooled: Sequence[str] = DEFAULT_POOLED, free: Sequence[str] | None = None,
                           fixed: Mapping[str, float] | None = None, rtol: float = 1e-6, atol: float = 1e-9, progress: bool = True,
                           target_accept: float = 0.9) -> HierarchicalResult:
    """Calibrate ``patients`` jointly with partial pooling of ``pooled`` parameters."""
    import arviz as az
    import pymc as pm

    from twin.twin import Twin, provenance_for

    from .calibrate import _likelihood, _n0_arm_prior, _pm_prior, _setup, diagnose
    from .ode import twin_ode

    patients = list(patients)
    if len(patients) < 2:
        raise InputError(f"calibrate_hierarchical: give at least 2 patients, received {len(patients)}")
    if method not in ("nuts", "map"):
        raise InputError(f"calibrate_hierarchical: method must be 'nuts' or 'map', received {method!r}")
    ids = [p.id for p in patients]
    if len(set(ids)) != len(ids):
        raise InputError("calibrate_hierarchical: patient ids must be unique")
    t_start = time.perf_counter()
    setups = [_setup(p, model, free=free, fixed=fixed, priors=None, arms=None, observables=None) for p in patients]
    theta = setups[0]["theta_names"]
    if any(s["theta_names"] != theta for s in setups):
        raise InputError("calibrate_hierarchical: the patients do not share one estimated set (e.g. different drugs given); pass free=[...] explicitly")
    base = model.default_priors()
    pooled = tuple(n for n in pooled if all(n in s["free"] for s in setups))
    for n in pooled:
        if base[n][0] != "lognormal":
            raise InputError(f"calibrate_hierarchical: pooled parameter {n!r} needs a log-normal prior, it has {base[n][0]!r}")
    tode = twin_ode(model, theta, setups[0]["fixed"])
    coords = {"patient": ids}
    obs_all = []
    with pm.Model(coords=coords) as pmodel:
        pop = {}
        for n in pooled:
            mu0, s0 = base[n][1]["mu"], base[n][1]["sigma"]
            mu = pm.Normal(f"mu_{n}", mu=mu0, sigma=s0)
            tau = pm.HalfNormal(f"tau_{n}", sigma=s0 / 2)
            z = pm.Normal(f"z_{n}", 0.0, 1.0, dims="patient")
            pop[n] = pm.Deterministic(n, pm.math.exp(mu + tau * z), dims="patient")
        for i, st in enumerate(setups):
            sfx = f"__{i}"
            rv = {}
            for n in st["free"]:
                if n in pooled:
                    rv[n] = pop[n][i]
                elif not (n == "N0" and st["n0_mode"] == "free"):
                    rv[n] = _pm_prior(pm, f"{n}{sfx}", *st["pri"][n])
            n0_arm = None
            if st["n0_mode"] == "free":
                pm_coords = {f"arm{sfx}": [a.arm for a in st["data"].arms]}
                pmodel.add_coords(pm_coords)
                n0_arm = _n0_arm_prior(pm, f"N0_arm{sfx}", st, f"arm{sfx}")
            sig = {o: pm.HalfNormal(f"sigma_{o}{sfx}", sigma=1.0) for o in st["data"].observables}
            sched, names = _likelihood(model, tode, st, rv, n0_arm, sig, suffix=sfx, rtol=rtol, atol=atol)
            obs_all.append((sched, names))
    if method == "nuts":
        import nutpie

        cm = nutpie.compile_pymc_model(pmodel, backend="numba")
        idata = nutpie.sample(cm, draws=draws, tune=draws if tune is None else tune, chains=chains, seed=seed, progress_bar=progress,
                              target_accept=target_accept, save_warmup=False)
        extra = {}
    else:
        from .calibrate import BuiltModel, CalibrationData, _laplace

        bm = BuiltModel(pmodel, tode, CalibrationData([], [], [], []), tuple(), {}, [], {}, "fixed")
        idata, extra = _laplace(bm, draws=draws, chains=chains, seed=seed, progress=progress)
    post = idata.posterior
    twins = []
    for i, (p, st) in enumerate(zip(patients, setups)):
        sfx = f"__{i}"
        vars_ = {}
        for n in st["free"]:
            if n in pooled:
                vars_[n] = post[n].isel(patient=i).drop_vars("patient", errors="ignore")
            elif f"{n}{sfx}" in post:
                vars_[n] = post[f"{n}{sfx}"]
        if f"N0_arm{sfx}" in post:
            v = post[f"N0_arm{sfx}"].rename({f"arm{sfx}": "arm"})
            vars_["N0_arm"] = v
            vars_["N0"] = v.isel(arm=0).drop_vars("arm")
        for o in st["data"].observables:
            vars_[f"sigma_{o}"] = post[f"sigma_{o}{sfx}"]
        import xarray as xr

        pp = xr.Dataset(vars_)
        fixed_all = {n: float(st["fixed"].get(n, v)) for n, v in model.default_values().items() if n not in st["free"]}
        diag = {"passed": None, "messages": [], "note": "one patient of a hierarchical (partially pooled) calibration; see the joint diagnostics",
                "pooled": list(pooled), "free": list(st["free"]), "n0_mode": st["n0_mode"], "rtol": rtol, "atol": atol}
        twins.append(Twin(patient=p, model=model, idata=az.InferenceData(posterior=pp), fixed=fixed_all, method=f"hierarchical-{method}",
                          seed=int(seed), diagnostics=diag, provenance=provenance_for(p, seed=int(seed), method=f"hierarchical-{method}")))
    keep = [v for v in post.data_vars if not v.startswith("z_")]
    idata_joint = az.InferenceData(posterior=post[keep], **({"sample_stats": idata.sample_stats} if "sample_stats" in idata.groups() else {}))
    joint = diagnose(idata_joint, method, coverage90=1.0, extra={**extra, "wall_s": round(time.perf_counter() - t_start, 3)})
    joint["messages"] = [m for m in joint["messages"] if not m.startswith("posterior predictive")]
    joint.pop("ppc_coverage90", None)
    joint["passed"] = not joint["messages"]
    for tw in twins:
        tw.diagnostics["passed"] = joint["passed"]
        tw.diagnostics["messages"] = list(joint["messages"])
    return HierarchicalResult(idata_joint, twins, pooled, joint)
