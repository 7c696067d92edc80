"""Update a twin when new visits arrive, faster than calibrating again.

``update_twin(twin, patient)`` treats the twin's posterior draws as a sample from
``p(theta | old data)`` and reweights them by the likelihood of the *new* observations
only (importance sampling; the old data's likelihood cancels because the old observations
are a subset of the new file's):

    log w_i = log p(new and old data | theta_i) - log p(old data | theta_i)

The draws are then resampled (systematic resampling) and rejuvenated: a short NUTS run
warm-started at the reweighted posterior (initial points drawn from the resampled
particles, fewer warm-up steps). When the importance weights collapse (effective sample
size below ``min_ess_fraction`` of the draws: the new data moved the posterior far) the
rejuvenation becomes a full warm-started NUTS run. The result is a new :class:`twin.twin.Twin`
whose diagnostics record the importance ESS and which path was taken.

Reference: Chopin (2002) "A sequential particle filter method for static models",
Biometrika 89:539 (reweight–resample–move).
"""

from __future__ import annotations

import time
import numpy as np

from twin.errors import InputError

__all__ = ["update_twin", "loglik_of_draws"]


def _value_point(bm, draw: dict) -> dict:
    """Value-variable point (transformed space) of ``bm.pmodel`` for one draw of named values."""
    pm_model = bm.pmodel
    pt = {}
    for rv in pm_model.free_RVs:
        v = np.asarray(draw[rv.name], dtype=np.float64)
        tr = pm_model.rvs_to_transforms.get(rv)
        vv = pm_model.rvs_to_values[rv]
        pt[vv.name] = np.asarray(tr.forward(v, *rv.owner.inputs).eval()) if tr is not None else v
    return pt


def loglik_of_draws(bm, draws: list[dict]) -> np.ndarray:
    """Total observed-data log-likelihood of ``bm`` at each draw (name -> value dicts)."""
    pmodel = bm.pmodel
    fn = pmodel.compile_fn(pmodel.observedlogp, inputs=pmodel.value_vars, on_unused_input="ignore", point_fn=True)
    transforms = {}
    for rv in pmodel.free_RVs:
        tr = pmodel.rvs_to_transforms.get(rv)
        if tr is not None:
            import pytensor

            x = rv.type()
            transforms[rv.name] = (pmodel.rvs_to_values[rv].name, pytensor.function([x], tr.forward(x, *rv.owner.inputs), on_unused_input="ignore"))
        else:
            transforms[rv.name] = (pmodel.rvs_to_values[rv].name, None)
    out = np.empty(len(draws))
    for i, d in enumerate(draws):
        pt = {}
        for name, (vname, f) in transforms.items():
            v = np.asarray(d[name], dtype=np.float64)
            pt[vname] = np.asarray(f(v)) if f is not None else v
        val = float(fn(pt))
        out[i] = val if np.isfinite(val) else -np.inf
    return out


def _systematic(weights: np.ndarray, n: int, rng) -> np.ndarray:
    u = (rng.random() + np.arange(n)) / n
    return np.minimum(np.searchsorted(np.cumsum(weights), u), len(weights) - 1)


def update_twin(twin, patient, *, draws: int | None = None, chains: int | None = None, tune: int = 200, seed: int = 0,
                min_ess_fraction: float = 0.1, max_particles: int = 1000, progress: bool = False, target_accept: float = 0.9):
    """Update ``twin`` with ``patient`` (the same patient's file with new measurements).

    Returns a new Twin. ``draws``/``chains`` default to the twin's. The old observations
    must be contained in the new file (same arms, times and values); otherwise the
    update is refused (calibrate again instead).
    """
    import nutpie

    from twin.twin import Twin, provenance_for

    from .calibrate import build_model, diagnose, twin_idata

    if patient.id != twin.patient.id:
        raise InputError(f"update: the twin is of patient {twin.patient.id!r} but the file is patient {patient.id!r}")
    _check_subset(twin.patient, patient)
    diag_old = twin.diagnostics or {}
    free = diag_old.get("free") or list(twin.calibrated)
    t_start = time.perf_counter()
    kw = dict(free=free, fixed=twin.fixed, rtol=diag_old.get("rtol", 1e-6), atol=diag_old.get("atol", 1e-9))
    bm_old = build_model(twin.patient, twin.model, **kw)
    bm_new = build_model(patient, twin.model, **kw)
    n_new = sum(len(d["value"]) for a in bm_new.data.arms for d in a.obs.values())
    n_old = sum(len(d["value"]) for a in bm_old.data.arms for d in a.obs.values())
    rng = np.random.default_rng(seed)
    post = twin.idata.posterior
    names = [rv.name for rv in bm_new.pmodel.free_RVs]
    missing = [n for n in names if n not in post]
    if missing:
        raise InputError(f"update: the twin's posterior lacks {missing}; calibrate again instead")
    flat = {n: post[n].values.reshape((-1,) + post[n].shape[2:]) for n in names}
    total = len(next(iter(flat.values())))
    idx = np.arange(total) if total <= max_particles else np.sort(rng.choice(total, max_particles, replace=False))
    particles = [{n: flat[n][i] for n in names} for i in idx]
    logw = loglik_of_draws(bm_new, particles) - loglik_of_draws(bm_old, particles)
    finite = np.isfinite(logw)
    if not finite.any():
        raise InputError("update: every posterior draw gives the new data zero likelihood; calibrate again instead")
    w = np.where(finite, np.exp(logw - logw[finite].max()), 0.0)
    w /= w.sum()
    ess = float(1.0 / np.sum(w ** 2))
    t_weights = time.perf_counter() - t_start
    chains = int(chains or twin.n_chains)
    draws = int(draws or max(1, twin.n_draws // max(twin.n_chains, 1)))
    collapsed = ess < min_ess_fraction * len(particles)
    # rejuvenation: warm-started NUTS from resampled particles (more warm-up when weights collapsed)
    res = _systematic(w, chains, rng)
    inits = [particles[i] for i in res]
    cm = nutpie.compile_pymc_model(bm_new.pmodel, backend="numba")
    # initial points in the unconstrained space: the mean of the chains' starting particles
    start = _value_point(bm_new, {n: np.mean([np.asarray(p[n]) for p in inits], axis=0) for n in names})
    init_mean = np.concatenate([np.ravel(start[v.name]) for v in bm_new.pmodel.value_vars])
    idata = nutpie.sample(cm, draws=draws, tune=(tune * 3 if collapsed else tune), chains=chains, seed=int(seed),
                          progress_bar=progress, target_accept=target_accept, save_warmup=False, init_mean=init_mean)
    out, cov, sel, failures = twin_idata(bm_new, idata, seed=int(seed) + 1)
    extra = {"update": {"from_method": twin.method, "new_observations": int(n_new - n_old), "particles": int(len(particles)),
                        "importance_ess": round(ess, 1), "collapsed": bool(collapsed), "tune": int(tune * 3 if collapsed else tune),
                        "weights_s": round(t_weights, 3)},
             "wall_s": round(time.perf_counter() - t_start, 3), "free": list(free), "rtol": kw["rtol"], "atol": kw["atol"],
             "draws": draws, "chains": chains, "data_notes": list(bm_new.data.notes), "n0_mode": bm_new.n0_mode}
    diag = diagnose(out, "nuts", coverage90=cov, extra=extra)
    prov = provenance_for(patient, seed=int(seed), method="update", extra={"previous": twin.provenance})
    return Twin(patient=patient, model=twin.model, idata=out, fixed=twin.fixed, method="nuts", seed=int(seed), diagnostics=diag, provenance=prov)


def _check_subset(old, new) -> None:
    """The old measurements must all be in the new file."""
    cols = ["arm", "time", "observable"]
    a = old.measurements[cols + ["value"]].copy()
    b = new.measurements[cols + ["value"]].copy()
    m = a.merge(b, on=cols, how="left", suffixes=("", "_new"), indicator=True)
    lost = m[m["_merge"] != "both"]
    if len(lost):
        r = lost.iloc[0]
        raise InputError(f"update: {len(lost)} measurement(s) of the twin's data are missing from the new file (first: arm {r['arm']!r}, {r['observable']} at day {r['time']:g}); an update only adds visits — calibrate again instead")
    same = np.isclose(m["value"].to_numpy(dtype=float), m["value_new"].to_numpy(dtype=float), equal_nan=True)
    if not same.all():
        r = m[~same].iloc[0]
        raise InputError(f"update: a measurement changed value (arm {r['arm']!r}, {r['observable']} at day {r['time']:g}); an update only adds visits — calibrate again instead")
