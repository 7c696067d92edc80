"""Bayesian calibration of a twin from one patient file: ``calibrate(patient, model) -> Twin``.

The PyMC model (``docs/calibration.md``):

- **priors**: :meth:`TwinModel.priors_for` (the model's defaults shifted by the patient's
  omics, ``docs/omics-mapping.md``) for the estimated parameters; the initial size ``N0``
  of each arm is centred on the arm's first size measurement (log-normal, sigma 0.5) when the
  patient has one, and held at its default otherwise (with PSA only, ``N0`` and PSA
  production are not separately identifiable);
- **likelihood**: every measurement of an observable the model predicts (psa,
  tumor_volume, sld, total_cells) under a log-normal error model with one
  ``sigma_<observable> ~ HalfNormal(1)``; values below the LLOQ enter as censored terms
  ``log P(Y < LLOQ)`` (``pm.Censored``), never dropped;
- **ODE**: :meth:`TwinModel.equations` compiled by :mod:`calibration._engine` (numba,
  forward sensitivities), one solve per treatment arm on the arm's dosing history.

Methods: ``nuts`` (nutpie, numba backend; the reference), ``advi`` (mean-field, quick
look), ``map`` (MAP + Laplace approximation in the unconstrained space).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from twin.errors import InputError, close_matches
from twin.model import _ident

__all__ = ["calibrate", "default_model", "build_model", "CalibrationData", "diagnose", "METHODS", "SIZE_OBSERVABLES"]

warnings.filterwarnings("ignore", message=".*could not link to a BLAS.*")

METHODS = ("nuts", "advi", "map")
SIZE_OBSERVABLES = ("tumor_volume", "sld", "total_cells")
_AR_DRUGS = {"leuprolide", "cyproterone_acetate", "abiraterone", "enzalutamide", "bicalutamide", "degarelix",
             "goserelin", "apalutamide", "darolutamide", "androgen_deprivation"}
#: thresholds of the default diagnostics (Vehtari et al. 2021; Betancourt 2016)
THRESHOLDS = {"rhat_max": 1.01, "ess_bulk_min": 400.0, "ess_tail_min": 400.0, "divergences": 0, "bfmi_min": 0.3, "ppc_coverage90_min": 0.75}


# ----------------------------------------------------------------------------------------
# the default model for a patient
# ----------------------------------------------------------------------------------------
def default_model(patient, *, arms: Sequence[str] | None = None, mechanisms: Sequence | None = None, persisters: bool = False):
    """The default calibration model of ``patient``: the reduced twin (``pathway=False``;
    decision D12) with every drug of the patient's history (of ``arms``, default all) that has PK in twin's catalogue,
    the androgen-receptor graph (PSA biomarker) when an androgen-axis drug was given and
    the MAPK/PI3K graph otherwise, and one resistant clone ``resistant`` blunting all of them."""
    from twin.drugs import lookup_drug
    from twin.graph import load_pathway
    from twin.model import Mechanism, TwinModel

    drugs = []
    hist = patient.history.table
    if arms is not None and len(hist):
        hist = hist[hist["arm"].isin(list(arms))]
    for d in sorted(set(hist["drug"].str.lower())) if len(hist) else []:
        cat = lookup_drug(d)
        if cat is None or cat.pk is None or cat.pk.potency() is None:
            continue
        rows = hist[hist["drug"].str.lower() == d]
        if rows["amount"].isna().any() and not getattr(cat.pk, "standard_dose_mg", None):
            continue  # doses without amounts and no standard dose to fill them: the arm is skipped (noted)
        drugs.append(cat.name if hasattr(cat, "name") else d)
    androgen_axis = bool(set(drugs) & _AR_DRUGS or "psa" in patient.observed)
    graph = load_pathway("androgen_receptor" if androgen_axis else "mapk_pi3k")
    if mechanisms is None:
        mechanisms = [Mechanism("resistant", tuple(drugs))] if drugs else []
    # androgen deprivation acts through the androgen axis (testosterone suppression, and its
    # recovery over months after a treatment break; cyproterone is antigonadotropic too):
    # every drug of such a patient acts through an effect compartment (decision D18)
    return TwinModel.from_graph(graph, drugs=drugs, mechanisms=mechanisms, persisters=persisters, pathway=False,
                                effect_delay=androgen_axis)


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
@dataclass
class ArmData:
    """One treatment arm: its regimen, start time, observation grid and the observations."""

    arm: str
    regimen: Any
    t0: float
    times: np.ndarray  # unique sorted observation times
    obs: dict = field(default_factory=dict)  # observable -> dict(index, value, censored, lloq)


@dataclass
class CalibrationData:
    arms: list
    observables: list
    notes: list
    dropped_arms: list


def _series_table(patient, model, arms: Sequence[str] | None, observables: Sequence[str] | None) -> CalibrationData:
    from twin.regimen import Regimen

    m = patient.measurements
    known = [o for o in model.observable_names]
    if observables is None:
        observables = [o for o in patient.observed if o in known]
    else:
        bad = [o for o in observables if o not in known]
        if bad:
            raise InputError(f"calibrate: the model cannot predict {bad}; it predicts {known}.{close_matches(bad[0], known)}")
    if not observables:
        raise InputError(
            f"calibrate: patient {patient.id!r} has no measurement the model can predict; "
            f"measured {patient.observed}, the model predicts {known}; fix: add measurements of one of them"
        )
    notes, dropped = [], []
    all_arms = sorted(set(m.loc[m["observable"].isin(observables), "arm"]))
    if arms is not None:
        bad = [a for a in arms if a not in all_arms]
        if bad:
            raise InputError(f"calibrate: arm(s) {bad} have no measurement of {list(observables)}; arms with data: {all_arms}")
        all_arms = list(arms)
    hist = patient.history.table
    out = []
    for arm in all_arms:
        reg = Regimen(hist[hist["arm"] == arm].assign(arm="main")) if len(hist) else Regimen.empty()
        unknown = sorted(set(reg.table["drug"].str.lower()) - set(model.drugs)) if len(reg) else []
        if unknown:
            dropped.append(arm)
            notes.append(f"arm {arm!r} skipped: it doses {unknown}, which the model does not know (no PK in the catalogue, or doses without amounts and no standard dose)")
            continue
        sub = m[(m["arm"] == arm) & m["observable"].isin(observables)].sort_values("time")
        times = np.unique(sub["time"].to_numpy(dtype=float))
        t_first_dose = float(reg.table["time"].min()) if len(reg) else math.inf
        ad = ArmData(arm, reg, float(min(times[0], t_first_dose)), times)
        for o in observables:
            s = sub[sub["observable"] == o]
            if not len(s):
                continue
            val = s["value"].to_numpy(dtype=float)
            cens = s["below_lloq"].astype(bool).to_numpy()
            lloq = s["lloq"].to_numpy(dtype=float)
            nonpos = ~cens & ~(val > 0)
            if nonpos.any():
                allv = m.loc[(m["observable"] == o) & ~m["below_lloq"].astype(bool), "value"].to_numpy(dtype=float)
                pos = allv[allv > 0]
                floor = float(pos.min()) if len(pos) else 1e-6
                notes.append(f"arm {arm!r}: {int(nonpos.sum())} {o} value(s) <= 0 taken as censored below {floor:g} (the patient's smallest positive {o}; a log-normal error model cannot place mass at 0)")
                cens = cens | nonpos
                lloq = np.where(nonpos, floor, lloq)
            bad_lloq = cens & ~(lloq > 0)
            if bad_lloq.any():
                raise InputError(f"calibrate: patient {patient.id!r}, arm {arm!r}: {int(bad_lloq.sum())} censored {o} value(s) without a positive LLOQ; fix: give the assay's lloq in the measurements file")
            ad.obs[o] = {"index": np.searchsorted(times, s["time"].to_numpy(dtype=float)), "value": val, "censored": cens, "lloq": lloq}
        out.append(ad)
    if not out:
        raise InputError(f"calibrate: patient {patient.id!r} has no arm the model can simulate ({'; '.join(notes)})")
    return CalibrationData(out, list(observables), notes, dropped)


# ----------------------------------------------------------------------------------------
# the PyMC model
# ----------------------------------------------------------------------------------------
def _pm_prior(pm, name, dist, par, dims=None):
    if dist == "lognormal":
        return pm.LogNormal(name, mu=par["mu"], sigma=par["sigma"], dims=dims)
    if dist == "normal":
        return pm.Normal(name, mu=par["mu"], sigma=par["sigma"], dims=dims)
    if dist == "beta":
        return pm.Beta(name, alpha=par["alpha"], beta=par["beta"], dims=dims)
    raise InputError(f"calibrate: prior of {name!r} has unknown distribution {dist!r}; expected lognormal, normal or beta")


def _first_size_cells(ad: ArmData) -> float | None:
    from twin.observation import CELL_VOLUME_MM3

    for o in SIZE_OBSERVABLES:
        d = ad.obs.get(o)
        if d is None:
            continue
        ok = ~d["censored"]
        if not ok.any():
            continue
        v = float(d["value"][ok][0])
        if o == "tumor_volume":
            return v / CELL_VOLUME_MM3
        if o == "sld":
            return math.pi / 6.0 * v ** 3 / CELL_VOLUME_MM3
        return v
    return None


def _setup(patient, model, *, free, fixed, priors, arms, observables) -> dict:
    """Data, priors and the estimated set of one patient (no PyMC yet)."""
    from .ode import y0_only_parameters

    if getattr(model, "pathway", False):
        raise InputError(
            "calibrate: the model has pathway states; calibration uses the reduced model "
            "(TwinModel.from_graph(..., pathway=False), decision D12 in docs/decisions.md) because the "
            "pathway relaxes ~1000x faster than the tumour and makes every gradient cost seconds"
        )
    data = _series_table(patient, model, arms, observables)
    pri = dict(model.priors_for(patient))
    if priors:
        pri.update(priors)
    fixed = {k: float(v) for k, v in dict(fixed or {}).items()}
    has_size = any(o in SIZE_OBSERVABLES for o in data.observables)
    if free is None:
        dosed = set()
        for a in data.arms:
            if len(a.regimen):
                dosed |= set(a.regimen.table["drug"].str.lower())
        free = [n for n in model.free_parameter_names() if n not in fixed
                and not (n.startswith("kill_") and not any(n == f"kill_{_ident(d)}" for d in dosed))]
        if not dosed:  # untreated only: resistance is not identifiable
            free = [n for n in free if not n.startswith(("frac_", "blunt_"))]
        if not has_size and "N0" in free:
            free.remove("N0")  # PSA-only: N0 fixed (not identifiable apart from psa_prod)
    free = tuple(free)
    unknown = [n for n in free + tuple(fixed) if n not in model.parameter_names]
    if unknown:
        raise InputError(f"calibrate: unknown parameter(s) {unknown}.{close_matches(unknown[0], list(model.parameter_names))}")
    missing = [n for n in free if n not in pri and not (n == "N0" and has_size)]
    if missing:
        raise InputError(f"calibrate: no prior for {missing[0]!r}; give priors={{'{missing[0]}': ('lognormal', {{'mu': ..., 'sigma': ...}})}}")
    y0_only = set(y0_only_parameters(model))
    return {"data": data, "pri": pri, "fixed": fixed, "free": free, "has_size": has_size,
            "theta_names": tuple(n for n in free if n not in y0_only),
            "n0_mode": "free" if "N0" in free and has_size else ("free-prior" if "N0" in free else "fixed")}


def _n0_arm_prior(pm, name, setup, dims):
    mus = []
    for a in setup["data"].arms:
        c = _first_size_cells(a)
        mus.append(math.log(c) if c else setup["pri"]["N0"][1]["mu"])
    return pm.LogNormal(name, mu=np.array(mus), sigma=0.5, dims=dims)


def _likelihood(model, tode, setup, rv: dict, n0_arm, sig: dict, *, suffix: str, rtol: float, atol: float):
    """Add one patient's observed and censored terms to the current PyMC model; ``rv`` maps
    estimated parameter names to their random variables. Returns (schedules, obs_names)."""
    import pymc as pm
    import pytensor.tensor as pt

    from twin.observation import CELL_VOLUME_MM3

    from ._engine import PYTENSOR
    from .ode import arm_schedule

    data, fixed = setup["data"], setup["fixed"]
    defaults = model.default_values()
    theta = pt.stack([rv[n] for n in setup["theta_names"]]) if setup["theta_names"] else pt.zeros(0)
    schedules, obs_names = [], {}
    ncell = [i for i, s in enumerate(model.state_names) if s.startswith("N_")]
    for k, a in enumerate(data.arms):
        sched, notes = arm_schedule(tode, a.regimen, a.times, t0=a.t0)
        data.notes.extend(f"arm {a.arm!r}: {n}" for n in notes)
        schedules.append(sched)
        p = {n: float(fixed.get(n, defaults[n])) for n in model.parameter_names}
        p.update(rv)
        if n0_arm is not None:
            p["N0"] = n0_arm[k]
        y0 = pt.stack([pt.as_tensor_variable(v).astype("float64") for v in model.initial_state_values(p, PYTENSOR)])
        Y, _ = tode.compiled().op(sched, rtol=rtol, atol=atol)(theta, y0)
        cells = Y[:, ncell[0]]
        for i in ncell[1:]:
            cells = cells + Y[:, i]
        for o, d in a.obs.items():
            if o == "psa":
                pred = Y[:, model.state_names.index("psa")]
            elif o == "tumor_volume":
                pred = cells * CELL_VOLUME_MM3
            elif o == "sld":
                pred = (6.0 * cells * CELL_VOLUME_MM3 / math.pi) ** (1.0 / 3.0)
            else:
                pred = cells
            mu = pt.log(pt.maximum(pred, 1e-300))[d["index"]]
            unc = ~d["censored"]
            if unc.any():
                name = f"obs_{o}_{k}{suffix}"
                pm.LogNormal(name, mu=mu[np.flatnonzero(unc)], sigma=sig[o], observed=d["value"][unc])
                obs_names[name] = (k, o, "observed")
            if d["censored"].any():
                name = f"cens_{o}_{k}{suffix}"
                cidx = np.flatnonzero(d["censored"])
                pm.Censored(name, pm.LogNormal.dist(mu=mu[cidx], sigma=sig[o]), lower=d["lloq"][cidx], upper=None, observed=d["lloq"][cidx])  # left-censored: log P(Y < LLOQ)
                obs_names[name] = (k, o, "censored")
    return schedules, obs_names


@dataclass
class BuiltModel:
    pmodel: Any
    tode: Any
    data: CalibrationData
    free: tuple
    fixed: dict
    schedules: list
    obs_names: dict  # observed RV name -> (arm index, observable, kind)
    n0_mode: str


def build_model(patient, model, *, free: Sequence[str] | None = None, fixed: Mapping[str, float] | None = None,
                priors: Mapping[str, tuple] | None = None, arms=None, observables=None, rtol: float = 1e-6,
                atol: float = 1e-9) -> BuiltModel:
    """The PyMC model of ``patient`` under ``model`` (see the module docstring)."""
    import pymc as pm

    from .ode import twin_ode

    st = _setup(patient, model, free=free, fixed=fixed, priors=priors, arms=arms, observables=observables)
    tode = twin_ode(model, st["theta_names"], st["fixed"])
    with pm.Model(coords={"arm": [a.arm for a in st["data"].arms]}) as pmodel:
        rv = {n: _pm_prior(pm, n, *st["pri"][n]) for n in st["free"] if not (n == "N0" and st["n0_mode"] == "free")}
        n0_arm = None
        if st["n0_mode"] == "free":
            n0_arm = _n0_arm_prior(pm, "N0_arm", st, "arm")
            pm.Deterministic("N0", n0_arm[0])
        sig = {o: pm.HalfNormal(f"sigma_{o}", sigma=1.0) for o in st["data"].observables}
        schedules, obs_names = _likelihood(model, tode, st, rv, n0_arm, sig, suffix="", rtol=rtol, atol=atol)
    return BuiltModel(pmodel, tode, st["data"], st["free"], st["fixed"], schedules, obs_names, st["n0_mode"])


# ----------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------
def _nuts(bm: BuiltModel, *, draws, tune, chains, seed, progress, target_accept):
    import nutpie

    cm = nutpie.compile_pymc_model(bm.pmodel, backend="numba")
    return nutpie.sample(cm, draws=draws, tune=tune, chains=chains, seed=seed, progress_bar=progress, target_accept=target_accept, save_warmup=False)


def _advi(bm: BuiltModel, *, draws, chains, seed, progress, n_iter):
    import pymc as pm

    with bm.pmodel:
        approx = pm.fit(n=n_iter, method="advi", random_seed=seed, progressbar=progress)
        idata = approx.sample(draws * chains, random_seed=seed, return_inferencedata=True)
    return idata, {"advi_final_loss": float(approx.hist[-1]) if len(approx.hist) else float("nan")}


#: L-BFGS-B settings of the MAP search (scipy ``minimize`` options).
MAP_OPTIONS = {"maxiter": 5000, "maxfun": 20000, "ftol": 1e-12, "gtol": 1e-6}


def _laplace(bm: BuiltModel, *, draws, chains, seed, progress, n_starts: int = 4):
    """MAP (L-BFGS-B on the log-density and its gradient computed together, in the
    unconstrained space, from the prior medians) and a Gaussian at the mode whose
    covariance is the inverse negative Hessian (central differences of the gradient)."""
    import arviz as az
    from pymc.blocking import DictToArrayBijection, RaveledVars
    from scipy.optimize import minimize

    pmodel = bm.pmodel
    vvars = pmodel.value_vars
    start = pmodel.initial_point()
    x0 = DictToArrayBijection.map({v.name: np.asarray(start[v.name], dtype=np.float64) for v in vvars})
    f = pmodel.logp_dlogp_function(ravel_inputs=True)
    f.set_extra_values({})
    nfev = [0]

    def negative(x):
        nfev[0] += 1
        lp, g = f(RaveledVars(np.asarray(x, dtype=np.float64), x0.point_map_info))
        lp = float(lp)
        if not np.isfinite(lp):
            return 1e300, np.zeros_like(x)
        return -lp, -np.asarray(g, dtype=np.float64)

    rng = np.random.default_rng(seed)
    starts = [x0.data] + [x0.data + rng.standard_normal(x0.data.size) for _ in range(max(0, n_starts - 1))]
    res = None
    for x_start in starts:  # multi-start: the best finite optimum wins
        r = minimize(negative, x_start, jac=True, method="L-BFGS-B", options=dict(MAP_OPTIONS))
        if np.isfinite(r.fun) and (res is None or r.fun < res.fun):
            res = r
    xm = res.x
    n = xm.size
    H = np.zeros((n, n))
    for i in range(n):
        h = 1e-5 * max(1.0, abs(xm[i]))
        e = np.zeros(n)
        e[i] = h
        H[:, i] = (negative(xm + e)[1] - negative(xm - e)[1]) / (2 * h)  # Hessian of -logp
    H = 0.5 * (H + H.T)
    evals, evecs = np.linalg.eigh(H)
    info = {"map_logp": float(-res.fun), "map_starts": len(starts), "map_converged": bool(res.success), "map_message": str(res.message), "map_evaluations": int(nfev[0]),
            "laplace_min_eigenvalue": float(evals.min()), "laplace_clipped": int((evals <= 1e-8).sum())}
    evals = np.where(evals > 1e-8, evals, 1.0)  # flat/negative directions: unit scale (and flagged)
    cov = (evecs / evals) @ evecs.T
    z = rng.multivariate_normal(xm, cov, size=draws * chains, method="eigh")
    fn = pmodel.compile_fn(pmodel.unobserved_value_vars, inputs=vvars, on_unused_input="ignore", point_fn=True)
    names = [v.name for v in pmodel.unobserved_value_vars]
    cols = {nm: [] for nm in names}
    for row in z:
        vals = fn(DictToArrayBijection.rmap(RaveledVars(row, x0.point_map_info)))
        for nm, v in zip(names, vals):
            cols[nm].append(np.asarray(v))
    keep = [nm for nm in names if not nm.endswith("__")]
    post = {nm: np.stack(cols[nm]).reshape((chains, draws) + np.shape(cols[nm][0])) for nm in keep}
    dims = {nm: list(pmodel.named_vars_to_dims[nm]) for nm in keep if nm in pmodel.named_vars_to_dims}
    coords = {k: list(v) for k, v in pmodel.coords.items() if v is not None}
    idata = az.from_dict(posterior=post, coords=coords, dims=dims)
    return idata, info


# ----------------------------------------------------------------------------------------
# posterior predictive and diagnostics
# ----------------------------------------------------------------------------------------
def _flat(idata, name):
    v = idata.posterior[name].values
    return v.reshape((-1,) + v.shape[2:])


def posterior_predictive(bm: BuiltModel, idata, *, seed: int, max_draws: int = 400):
    """Predictions (noise-free ``mu_<obs>_<k>``) and replicated data at the observation
    times for up to ``max_draws`` posterior draws (thinned evenly), via the compiled solver."""
    from twin.observation import CELL_VOLUME_MM3

    from ._engine import NUMPY

    model, tode = bm.tode.model, bm.tode
    nchain, ndraw = idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]
    total = nchain * ndraw
    step = max(1, int(math.ceil(total / max_draws)))
    sel = np.arange(0, total, step)
    defaults = model.default_values()
    flat = {n: _flat(idata, n) for n in list(bm.free) + ["N0_arm"] if n in idata.posterior}
    sig = {o: _flat(idata, f"sigma_{o}") for o in bm.data.observables}
    comp = tode.compiled()
    ncell = [i for i, s in enumerate(model.state_names) if s.startswith("N_")]
    rng = np.random.default_rng(seed)
    mu = {k: [] for k in bm.obs_names}
    rep = {k: [] for k in bm.obs_names}
    failures = 0
    for j in sel:
        p = {n: float(bm.fixed.get(n, defaults[n])) for n in model.parameter_names}
        for n, v in flat.items():
            if n != "N0_arm":
                p[n] = float(v[j])
        theta = np.array([p[n] for n in tode.theta_names])
        preds = {}
        for k, a in enumerate(bm.data.arms):
            pk = dict(p)
            if "N0_arm" in flat:
                pk["N0"] = float(flat["N0_arm"][j][k])
            y0 = np.array([float(v) for v in model.initial_state_values(pk, NUMPY)])
            Y, _, info = comp.solve(theta, y0, bm.schedules[k], sensitivities=False, rtol=1e-6, atol=1e-9)
            failures += info["status"] != 0
            cells = Y[:, ncell].sum(-1)
            preds[k] = {"psa": Y[:, model.state_names.index("psa")] if model.has_psa else None,
                        "tumor_volume": cells * CELL_VOLUME_MM3, "sld": (6.0 * cells * CELL_VOLUME_MM3 / math.pi) ** (1 / 3), "total_cells": cells}
        for name, (k, o, kind) in bm.obs_names.items():
            d = bm.data.arms[k].obs[o]
            idx = d["index"][~d["censored"]] if kind == "observed" else d["index"][d["censored"]]
            m_ = np.log(np.maximum(preds[k][o][idx], 1e-300))
            mu[name].append(np.exp(m_))
            rep[name].append(np.exp(m_ + sig[o][j] * rng.standard_normal(m_.shape)))
    out_mu = {k: np.stack(v)[None] for k, v in mu.items()}
    out_rep = {k: np.stack(v)[None] for k, v in rep.items()}
    return out_mu, out_rep, sel, failures


def _coverage90(bm: BuiltModel, rep) -> float:
    hits, n = 0, 0
    for name, (k, o, kind) in bm.obs_names.items():
        if kind != "observed":
            continue
        d = bm.data.arms[k].obs[o]
        y = d["value"][~d["censored"]]
        lo, hi = np.quantile(rep[name][0], [0.05, 0.95], axis=0)
        hits += int(((y >= lo) & (y <= hi)).sum())
        n += len(y)
    return hits / n if n else float("nan")


def diagnose(idata, method: str, *, coverage90: float, extra: Mapping | None = None) -> dict:
    """R-hat, bulk/tail ESS, divergences, energy BFMI (NUTS), posterior predictive 90%
    coverage; ``passed`` is False with a message for every failed check."""
    import arviz as az

    d: dict[str, Any] = {"method": method, "thresholds": dict(THRESHOLDS)}
    msgs = []
    d["ppc_coverage90"] = float(coverage90)
    if not (coverage90 >= THRESHOLDS["ppc_coverage90_min"]):
        msgs.append(f"posterior predictive check: only {coverage90:.0%} of the observations lie in the 90% predictive interval (expected >= {THRESHOLDS['ppc_coverage90_min']:.0%}): the model does not reproduce this patient's data")
    if method == "nuts":
        post = idata.posterior[[v for v in idata.posterior.data_vars if v != "N0"]]
        rhat = az.rhat(post)
        essb = az.ess(post, method="bulk")
        esst = az.ess(post, method="tail")
        d["rhat_max"] = float(max(float(rhat[v].max()) for v in rhat.data_vars))
        d["ess_bulk_min"] = float(min(float(essb[v].min()) for v in essb.data_vars))
        d["ess_tail_min"] = float(min(float(esst[v].min()) for v in esst.data_vars))
        d["divergences"] = int(idata.sample_stats["diverging"].sum())
        try:
            d["bfmi_min"] = float(np.min(az.bfmi(idata)))
        except Exception:  # pragma: no cover - energy missing
            d["bfmi_min"] = float("nan")
        if not d["rhat_max"] <= THRESHOLDS["rhat_max"]:
            msgs.append(f"R-hat {d['rhat_max']:.3f} > {THRESHOLDS['rhat_max']}: chains disagree; run longer (more tune/draws)")
        if not d["ess_bulk_min"] >= THRESHOLDS["ess_bulk_min"]:
            msgs.append(f"bulk ESS {d['ess_bulk_min']:.0f} < {THRESHOLDS['ess_bulk_min']:.0f}: too few effective draws")
        if not d["ess_tail_min"] >= THRESHOLDS["ess_tail_min"]:
            msgs.append(f"tail ESS {d['ess_tail_min']:.0f} < {THRESHOLDS['ess_tail_min']:.0f}: interval ends unreliable")
        if d["divergences"] > THRESHOLDS["divergences"]:
            msgs.append(f"{d['divergences']} divergent transitions: the posterior has regions the sampler cannot explore; raise target_accept or reparameterise")
        if not d["bfmi_min"] >= THRESHOLDS["bfmi_min"]:
            msgs.append(f"energy BFMI {d['bfmi_min']:.2f} < {THRESHOLDS['bfmi_min']}: poor exploration of the energy")
    else:
        if method == "map" and (extra or {}).get("laplace_clipped", 0):
            msgs.append(f"Laplace approximation: the log-density is not concave at the mode in {extra['laplace_clipped']} direction(s) (a saddle or a flat ridge); the intervals are not trustworthy — use method='nuts'")
        if method == "map" and not (extra or {}).get("map_converged", True):
            msgs.append(f"MAP optimisation did not converge: {extra.get('map_message')}")
        d["note"] = f"{method}: an approximate posterior; MCMC diagnostics (R-hat, ESS, divergences) do not apply; use method='nuts' for the reference"
    warn = []
    for v in [x for x in idata.posterior.data_vars if str(x).startswith("sigma_")]:
        med = float(np.median(idata.posterior[v].values))
        if med > 0.5:
            warn.append(f"{v} = {med:.2f}: the residual error of log {str(v)[6:]} is a factor {math.exp(med):.1f}; the model explains this patient's data poorly (the wide predictive intervals, not the model, carry the coverage)")
    d["warnings"] = warn
    if extra and extra.get("ppc_solver_failures"):
        msgs.append(f"the ODE solver failed for {extra['ppc_solver_failures']} of {extra.get('ppc_draws')} posterior draws (stiff or exploding trajectories)")
    if extra:
        d.update(extra)
    d["messages"] = msgs
    d["passed"] = not msgs
    return d


# ----------------------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------------------
def calibrate(patient, model=None, *, method: str = "nuts", draws: int = 1000, chains: int = 4, tune: int | None = None,
              seed: int = 0, free: Sequence[str] | None = None, fixed: Mapping[str, float] | None = None,
              priors: Mapping[str, tuple] | None = None, arms: Sequence[str] | None = None,
              observables: Sequence[str] | None = None, target_accept: float = 0.9, advi_iterations: int = 20000,
              rtol: float = 1e-6, atol: float = 1e-9, progress: bool = True, map_starts: int = 4):
    """Calibrate a twin of ``patient``: the posterior of ``model``'s parameters given the
    patient's measurements and dosing history.

    Parameters
    ----------
    patient : :class:`twin.Patient`.
    model : :class:`twin.model.TwinModel` with ``pathway=False`` (default :func:`default_model`).
    method : ``"nuts"`` (reference), ``"advi"`` or ``"map"`` (MAP + Laplace).
    draws, chains, tune : posterior draws per chain, chains, warm-up (default = draws).
    seed : every random choice derives from it.
    free, fixed, priors : parameters to estimate (default: the model's free set, ``N0``
        held fixed without a size measurement), values of held parameters, prior overrides
        ``name -> (dist, params)``.
    arms, observables : restrict the data used (default: all the model can predict).
    rtol, atol : solver tolerances (states and sensitivities).
    map_starts : ``method="map"``: L-BFGS starts (the prior medians, then random perturbations
        of them in the unconstrained space); the best optimum wins.

    Returns
    -------
    :class:`twin.twin.Twin` with posterior, posterior_predictive, observed_data,
    constant_data (the dosing history) and sample_stats groups, diagnostics and provenance.
    """
    from twin.twin import Twin, provenance_for

    if method not in METHODS:
        raise InputError(f"calibrate: method must be one of {list(METHODS)}, received {method!r}.{close_matches(str(method), list(METHODS))}")
    for nm, v in (("draws", draws), ("chains", chains)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"calibrate: {nm} must be a whole number >= 1, received {v!r}")
    if model is None:
        model = default_model(patient, arms=arms)
    tune = draws if tune is None else int(tune)
    t_start = time.perf_counter()
    bm = build_model(patient, model, free=free, fixed=fixed, priors=priors, arms=arms, observables=observables, rtol=rtol, atol=atol)
    extra: dict = {}
    t_build = time.perf_counter() - t_start
    if method == "nuts":
        idata = _nuts(bm, draws=int(draws), tune=tune, chains=int(chains), seed=int(seed), progress=progress, target_accept=target_accept)
    elif method == "advi":
        idata, extra = _advi(bm, draws=int(draws), chains=int(chains), seed=int(seed), progress=progress, n_iter=int(advi_iterations))
    else:
        idata, extra = _laplace(bm, draws=int(draws), chains=int(chains), seed=int(seed), progress=progress, n_starts=int(map_starts))
    t_sample = time.perf_counter() - t_start - t_build
    idata_out, cov, sel, failures = twin_idata(bm, idata, seed=int(seed) + 1)
    extra.update({"wall_s": round(time.perf_counter() - t_start, 3), "build_s": round(t_build, 3), "sampling_s": round(t_sample, 3),
                  "ppc_draws": int(len(sel)), "ppc_solver_failures": int(failures), "data_notes": list(bm.data.notes),
                  "free": list(bm.free), "n0_mode": bm.n0_mode, "rtol": rtol, "atol": atol,
                  "draws": int(draws), "chains": int(chains), "tune": int(tune) if method == "nuts" else None})
    diag = diagnose(idata_out, method, coverage90=cov, extra=extra)
    fixed_all = {n: float(bm.fixed.get(n, v)) for n, v in model.default_values().items() if n not in bm.free}
    prov = provenance_for(patient, seed=int(seed), method=method)
    return Twin(patient=patient, model=model, idata=idata_out, fixed=fixed_all, method=method, seed=int(seed), diagnostics=diag, provenance=prov)


def twin_idata(bm: BuiltModel, idata, *, seed: int):
    """The twin's InferenceData from a sampler's: the posterior of the estimated and error
    parameters, posterior-predictive draws, observed data, constant data (the dosing
    history) and sample stats. Returns (idata, 90% coverage, thinned draw indices, solver
    failures)."""
    import arviz as az

    keep = [v for v in idata.posterior.data_vars if v in set(bm.free) | {"N0", "N0_arm"} or v.startswith("sigma_")]
    mu, rep, sel, failures = posterior_predictive(bm, idata, seed=seed)
    observed = {}
    for name, (k, o, kind) in bm.obs_names.items():
        d = bm.data.arms[k].obs[o]
        observed[name] = d["value"][~d["censored"]] if kind == "observed" else d["lloq"][d["censored"]]
    pp = az.from_dict(posterior_predictive={**rep, **{f"mu_{k}": v for k, v in mu.items()}}, observed_data=observed, constant_data=_constant_data(bm))
    out = az.InferenceData(posterior=idata.posterior[keep], posterior_predictive=pp.posterior_predictive, observed_data=pp.observed_data, constant_data=pp.constant_data)
    if "sample_stats" in idata.groups():
        out.add_groups({"sample_stats": idata.sample_stats})
    return out, _coverage90(bm, rep), sel, failures


def _constant_data(bm: BuiltModel) -> dict:
    """The dosing history (events) and the arms' start times, as arrays."""
    out = {}
    for k, a in enumerate(bm.data.arms):
        ev = a.regimen.events() if len(a.regimen) else None
        out[f"t0_{k}"] = np.array([a.t0])
        out[f"obs_times_{k}"] = a.times
        if ev is not None and len(ev):
            out[f"dose_time_{k}"] = ev["time"].to_numpy(dtype=float)
            out[f"dose_amount_{k}"] = np.nan_to_num(ev["amount"].to_numpy(dtype=float), nan=-1.0)
            out[f"dose_drug_{k}"] = ev["drug"].astype(str).to_numpy()
    return out
