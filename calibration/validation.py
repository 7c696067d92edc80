"""Validation of calibrated twins on real patients: forecast held-out data, against baselines (issue #6).

Two held-out designs, both fixed before any result was looked at (``docs/validation.md``):

* **Bruchovsky/Shaw intermittent ADT** (:func:`bruchovsky_split`): for every patient and
  every treatment cycle ``k >= 2`` the twin is calibrated (``calibrate(method="map")``,
  default model) on the PSA measured up to the end of cycle ``k-1`` and forecasts PSA through
  the end of cycle ``k`` on the patient's actual dosing history. Baselines on the same split:
  last value carried forward (LVCF) and a per-patient two-population Lotka–Volterra model
  (Zhang et al. 2017). The twin calibrated on cycle 1 also gives each patient's probability of
  resistance at the end of follow-up (relapse ROC AUC).
* **PDXE** (:func:`pdxe_split`): for each selected PDX, untreated + up to 3 single-agent arms
  whose drugs have catalogue PK; each treated arm in turn is held out, the twin is calibrated on
  the others and predicts the held-out arm's volume curve and mRECIST class. Baselines: the
  drug's population mean curve and the PDX's own untreated curve shifted by the drug's mean effect.

* **PDXE combination arms** (kind ``pdxe_combo``, :mod:`calibration.validation_combo`): one twin per
  PDX calibrated on untreated + the component single-agent arms forecasts every combination arm
  (the held-arm code of :func:`pdxe_split`, :func:`_pdx_held_arm`), against the same two baselines
  and a Bliss / response-additivity baseline from the PDX's own monotherapy curves.

* **Twin + neural residual** (prostate, ``run_validation(residual=True)``): a cohort residual
  trained only on PSA up to the end of cycle 1 (no forecast window; :func:`train_bruchovsky_residual`),
  then each split re-calibrated with the residual held fixed (:func:`bruchovsky_residual_split`).

:func:`run_validation` runs every split as one Dask task (one process per worker), writes one
JSON file per split under ``<outdir>/_work/`` (atomic; existing files whose model fingerprint
matches the current model are skipped, so a run is resumable), then the CSV tables, the figures,
the summary and the page (:func:`write_page`: ``docs/validation/page_template.md`` filled from
the run's files; every number on the page is computed, and it ends with the BENCH line).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "run_validation", "bruchovsky_split", "pdxe_split", "bruchovsky_tasks", "pdxe_tasks",
    "abs_log_error", "interval_hits", "crps_log", "roc_auc", "mrecist", "balanced_accuracy",
    "lv_fit", "lv_simulate", "lvcf_samples", "forecast_draws", "summarize", "results_markdown", "SETTINGS",
    "RESIDUAL_SETTINGS", "MRECIST_RULES", "QUICK", "GOALS", "residual_training_series", "fit_psa_residual", "train_bruchovsky_residual",
    "bruchovsky_residual_split", "cycle1_twin", "model_fingerprint", "write_page", "fill_template", "page_values", "discussion_markdown",
    "model_markdown", "bench_line",
]

#: the fixed settings (decided before looking at results; printed in docs/validation.md from here)
SETTINGS = {
    "method": "map",  # MAP + Laplace (calibrate(method="map"))
    "draws": 200,  # posterior draws per twin used for forecasts
    "level": 0.90,  # predictive interval
    "lv_starts": 4,  # multi-start least squares for the Lotka-Volterra baseline
    "lv_sd_floor": 0.05,  # floor of the LV baseline's residual SD (log scale)
    "pdx_max_treated": 3,  # single-agent arms per PDX (most frequent in the cohort first)
    "pdx_min_volumes": 3,  # volumes an arm needs to be used
    "pdx_days": 180,  # the baselines' daily grid (days after the arm's first volume)
    "mrecist_min_day": 10.0,
    "classes": ("CR", "PR", "SD", "PD"),
    "min_train_psa": 3,  # uncensored training PSA values a prostate split needs
    "resistant_threshold": 0.5,  # P(resistant clone > this fraction of cells at the end of follow-up)
    "rtol": 1e-6,  # forecast solver tolerances (calibration.ode compiled engine)
    "atol": 1e-9,
}
#: mRECIST (Gao et al. 2015): class, BestResponse below, BestAvgResponse below (first match wins; else PD)
MRECIST_RULES = (("CR", -95.0, -40.0), ("PR", -50.0, -20.0), ("SD", 35.0, 30.0))
#: the ``--quick`` run: prostate patients (cycle-2 split only) and PDXs
QUICK = {"patients": 8, "pdx": 5}
#: the prostate neural-residual variant (``run_validation(residual=True)``), fixed before it was run
RESIDUAL_SETTINGS = {
    "hidden": (8,),  # MLP hidden widths (one layer of 8: (16, 16) made calibration ~5x slower than without the residual)
    "eps_max": 0.05,  # bound of the residual growth-rate term [1/day]
    "epochs": 20,  # full-batch Adam epochs (the weights of the epoch with the lowest training loss are kept)
    "lr": 1e-3,
    "step_days": 2.0,  # fixed RK4 step of the training integration [day] (smaller when the dynamics need it)
    "max_days": 730,  # training PSA within this many days of the patient's start (bounds the integration cost)
    "min_group": 5,  # patients a model structure (drug set) needs to get its own residual
}
_EPS_VOL = 0.1  # mm^3 floor for log volumes (docs/datasets.md: zero volumes)


# ======================================================================================
# metrics
# ======================================================================================
def abs_log_error(pred, obs) -> np.ndarray:
    """``|log(pred / obs)|`` elementwise (both positive)."""
    return np.abs(np.log(np.asarray(pred, float)) - np.log(np.asarray(obs, float)))


def interval_hits(samples, obs, level: float = 0.90, axis: int = 0) -> np.ndarray:
    """Whether each ``obs`` lies in the central ``level`` interval of its predictive
    ``samples`` (quantiles of the sample along ``axis``). Boolean array shaped like ``obs``."""
    s = np.asarray(samples, float)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a], axis=axis)
    y = np.asarray(obs, float)
    return (y >= lo) & (y <= hi)


def crps_log(samples, obs, axis: int = 0) -> np.ndarray:
    """CRPS of ``log(obs)`` under the sample ``log(samples)`` (``scenarios.compare.crps_sample``)."""
    from scenarios.compare import crps_sample

    return crps_sample(np.log(np.asarray(samples, float)), np.log(np.asarray(obs, float)), axis=axis)


def roc_auc(scores, labels) -> float:
    """ROC AUC by the Mann–Whitney statistic: P(score of a positive > score of a negative),
    ties counted 1/2. NaN when a class is empty; NaN scores are dropped."""
    s = np.asarray(scores, float)
    y = np.asarray(labels).astype(bool)
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


def mrecist(times, volumes, *, min_day: float = 10.0) -> str:
    """mRECIST class of one volume curve (Gao et al. 2015): ΔVol%(t) = 100 (V(t) - V0) / V0 with
    V0 the first volume; BestResponse = min ΔVol% over t >= ``min_day``; BestAvgResponse = min
    over t >= ``min_day`` of the running mean of ΔVol% (from day 0). CR: BR < -95 and BAR < -40;
    PR: BR < -50 and BAR < -20; SD: BR < 35 and BAR < 30; else PD. ``"NA"`` without data past ``min_day``."""
    t = np.asarray(times, float)
    v = np.asarray(volumes, float)
    o = np.argsort(t)
    t, v = t[o], v[o]
    if len(v) < 2 or not (v[0] > 0):
        return "NA"
    dv = 100.0 * (v - v[0]) / v[0]
    run = np.cumsum(dv) / np.arange(1, len(dv) + 1)
    late = t >= min_day
    if not late.any():
        return "NA"
    br, bar = float(dv[late].min()), float(run[late].min())
    for cls, br_max, bar_max in MRECIST_RULES:
        if br < br_max and bar < bar_max:
            return cls
    return "PD"


def balanced_accuracy(true, pred) -> float:
    """Mean over the classes present in ``true`` of the recall of that class."""
    t = np.asarray(true, dtype=object)
    p = np.asarray(pred, dtype=object)
    rec = [float(np.mean(p[t == c] == c)) for c in sorted(set(t.tolist()))]
    return float(np.mean(rec)) if rec else float("nan")


# ======================================================================================
# forecasting from a twin (compiled engine, as calibration.calibrate.posterior_predictive)
# ======================================================================================
def forecast_draws(tw, regimen, t0: float, times, *, n_draws: int = 200, n0=None, seed: int = 0) -> dict:
    """Simulate ``n_draws`` posterior draws of twin ``tw`` on ``regimen`` from ``t0`` and
    return noise-free states at ``times``: dict with ``cells``, ``frac_resistant`` (resistant
    cells / all cells), ``psa`` (when the model has it), ``tumor_volume`` — each ``(n, T)`` — plus
    ``sigma`` (error-model draws per observable, ``(n,)``) and ``failures``.
    ``n0``: the initial size (cells) to use instead of the posterior's ``N0``."""
    from twin.observation import CELL_VOLUME_MM3

    from ._engine import NUMPY
    from .ode import arm_schedule, twin_ode, y0_only_parameters

    model = tw.model
    free = list(tw.diagnostics.get("free") or tw.calibrated)
    y0_only = set(y0_only_parameters(model))
    theta_names = tuple(n for n in free if n not in y0_only)
    fixed = {k: v for k, v in tw.fixed.items()}
    tode = twin_ode(model, theta_names, fixed)
    comp = tode.compiled()
    times = np.asarray(times, float)
    sched, _ = arm_schedule(tode, regimen, times, t0=float(t0), t_end=float(max(times.max(), t0 + 1.0)))
    draws = tw.draws
    err = tw.error_draws
    total = tw.n_draws
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(total, size=min(n_draws, total), replace=False))
    ncell = [i for i, s in enumerate(model.state_names) if s.startswith("N_")]
    ires = [i for i, s in enumerate(model.state_names) if s.startswith("N_R")]
    ipsa = model.state_names.index("psa") if "psa" in model.state_names else None
    out = {"cells": [], "frac_resistant": [], "psa": []}
    failures = 0
    for j in sel:
        p = {n: float(draws[n][j]) for n in model.parameter_names}
        if n0 is not None:
            p["N0"] = float(n0)
        theta = np.array([p[n] for n in theta_names])
        y0 = np.array([float(v) for v in model.initial_state_values(p, NUMPY)])
        Y, _, info = comp.solve(theta, y0, sched, sensitivities=False, rtol=SETTINGS["rtol"], atol=SETTINGS["atol"])
        failures += info["status"] != 0
        cells = Y[:, ncell].sum(-1)
        out["cells"].append(cells)
        out["frac_resistant"].append(Y[:, ires].sum(-1) / np.maximum(cells, 1e-300) if ires else np.zeros_like(cells))
        if ipsa is not None:
            out["psa"].append(Y[:, ipsa])
    res = {k: np.asarray(v) for k, v in out.items() if len(v)}
    res["tumor_volume"] = res["cells"] * CELL_VOLUME_MM3
    res["sigma"] = {k[len("sigma_"):]: np.asarray(v)[sel] for k, v in err.items() if k.startswith("sigma_")}
    res["failures"] = int(failures)
    return res


def _predictive(mu, sigma, rng) -> np.ndarray:
    """Log-normal predictive sample ``mu * exp(sigma z)``; mu (n, T), sigma (n,)."""
    mu = np.maximum(np.asarray(mu, float), 1e-300)
    return mu * np.exp(np.asarray(sigma, float)[:, None] * rng.standard_normal(mu.shape))


# ======================================================================================
# baselines
# ======================================================================================
def lvcf_samples(train_values, n: int = 200) -> np.ndarray:
    """LVCF predictive sample of log-values, ``(m,)``: log(last value) + the symmetrised set of all
    pairwise log-ratios log(y_j / y_i), i < j, of the training values (resampled to ``n``).
    With fewer than 2 training values the spread is 0."""
    y = np.log(np.asarray(train_values, float))
    if len(y) < 2:
        return np.full(n, y[-1])
    i, j = np.triu_indices(len(y), 1)
    d = y[j] - y[i]
    d = np.concatenate([d, -d])
    q = (np.arange(n) + 0.5) / n
    return y[-1] + np.quantile(d, q)


def _on_function(phases):
    """Piecewise-constant on-treatment indicator from a phases table: list of (start, end, on)."""
    segs = [(float(r.start), float(r.end), 1.0 if str(r.phase) == "on" else 0.0) for r in phases.itertuples()]
    return sorted(segs)


def lv_simulate(theta, segs, times, t0: float = 0.0) -> np.ndarray:
    """Two-population Lotka–Volterra (Zhang et al. 2017): dS/dt = rS S (1-(S+R)/K) - d S on(t),
    dR/dt = rR R (1-(S+R)/K), integrated in log states; returns (S, R) at ``times`` (2, T).
    ``theta`` = log of (S0, R0, rS, rR, d, K); ``segs`` from the phases (on outside = last phase's)."""
    from scipy.integrate import solve_ivp

    lS0, lR0, lrS, lrR, ld, lK = theta
    rS, rR, d, K = math.exp(lrS), math.exp(lrR), math.exp(ld), math.exp(lK)
    times = np.asarray(times, float)
    tmax = float(times.max())
    bounds = sorted({t0, tmax, *[s for s, e, _ in segs if t0 < s < tmax], *[e for s, e, _ in segs if t0 < e < tmax]})

    def on_at(t):
        for s, e, o in segs:
            if s <= t < e:
                return o
        return segs[-1][2] if segs and t >= segs[-1][1] else 0.0

    y = np.array([lS0, lR0], float)
    out = np.full((2, len(times)), np.nan)
    out[:, times <= t0] = np.exp(y)[:, None]
    for a, b in zip(bounds[:-1], bounds[1:]):
        on = on_at(0.5 * (a + b))

        def f(t, z, on=on):
            g = 1.0 - (math.exp(min(z[0], 700.0)) + math.exp(min(z[1], 700.0))) / K
            return [rS * g - d * on, rR * g]

        m = (times > a) & (times <= b)
        te = np.unique(np.concatenate([times[m], [b]]))
        sol = solve_ivp(f, (a, b), y, method="LSODA", t_eval=te, rtol=1e-6, atol=1e-8)
        if not sol.success or sol.y.shape[1] != len(te):
            return out
        if m.any():
            out[:, m] = np.exp(sol.y[:, np.searchsorted(te, times[m])])
        y = sol.y[:, -1]
    return out


def lv_fit(times, values, segs, *, n_starts: int = 4, seed: int = 0) -> dict:
    """Least-squares fit of :func:`lv_simulate` (PSA = S + R) to log ``values`` at ``times``;
    returns dict(theta, sd (residual SD, dof-corrected), t0, ok)."""
    from scipy.optimize import least_squares

    t = np.asarray(times, float)
    y = np.log(np.asarray(values, float))
    t0 = float(t.min())
    ymax = float(y.max())
    lo = np.array([y[0] - 8, y[0] - 12, math.log(1e-4), math.log(1e-4), math.log(1e-4), ymax - 1])
    hi = np.array([y[0] + 3, y[0] + 3, math.log(0.5), math.log(0.5), math.log(2.0), ymax + 8])
    rng = np.random.default_rng(seed)

    def resid(th):
        S, R = lv_simulate(th, segs, t, t0)
        pred = np.log(np.maximum(S + R, 1e-300))
        r = pred - y
        return np.where(np.isfinite(r), r, 50.0)

    best = None
    base = np.array([y[0] - 0.05, y[0] - 4, math.log(0.02), math.log(0.01), math.log(0.05), ymax + 1])
    for s in range(n_starts):
        x0 = base if s == 0 else np.clip(base + rng.normal(0, [0.5, 2, 1, 1, 1, 1]), lo + 1e-6, hi - 1e-6)
        try:
            r = least_squares(resid, np.clip(x0, lo + 1e-6, hi - 1e-6), bounds=(lo, hi), method="trf", max_nfev=300, x_scale=1.0)
        except Exception:  # pragma: no cover
            continue
        if best is None or r.cost < best.cost:
            best = r
    if best is None:
        return {"theta": None, "sd": float("nan"), "t0": t0, "ok": False}
    n, p = len(y), 6
    sd = math.sqrt(2 * best.cost / max(n - p, 1))
    return {"theta": best.x, "sd": max(sd, SETTINGS["lv_sd_floor"]), "t0": t0, "ok": True}


# ======================================================================================
# Bruchovsky splits
# ======================================================================================
def _quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("pymc", "pytensor", "arviz", "numba"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _psa_table(patient):
    m = patient.measurements
    return m[m["observable"] == "psa"].sort_values("time").reset_index(drop=True)


def bruchovsky_tasks(max_patients=None) -> list[tuple]:
    """(patient id, k) for every patient with phases and every cycle k >= 2; patients with one
    cycle get (id, 2) too (no forecast points; the resistance probability for the AUC)."""
    from twin.datasets import load_bruchovsky

    out = []
    pats = [p for p in load_bruchovsky() if len(p.phases) and len(_psa_table(p))]
    if max_patients is not None:
        pats = pats[: int(max_patients)]
    for p in pats:
        ncyc = int(p.phases["cycle"].max())
        for k in range(2, max(ncyc, 2) + 1):
            out.append((p.id, k))
    return out


def _bruchovsky_prepare(pid: str, k: int) -> dict:
    """The data of split (``pid``, ``k``): the patient (antiandrogens without catalogue PK removed
    from its history), the training cut-off ``t_split`` (end of cycle k-1), the forecast window
    ``(t_split, t_end]`` (end of cycle k), training / test PSA, the forecast grid, the regimen."""
    import dataclasses

    from twin.datasets import load_bruchovsky
    from twin.regimen import Regimen

    p = load_bruchovsky()[pid]
    # antiandrogens without catalogue PK (flutamide, bicalutamide, nilutamide, goserelin; 7 patients)
    # are removed from the history: calibrate() would otherwise drop the patient's only arm
    h = p.history.table
    no_pk = sorted({d for d in set(h["drug"].str.lower()) if not _has_pk(d)}) if len(h) else []
    if no_pk:
        p = dataclasses.replace(p, history=Regimen(h[~h["drug"].str.lower().isin(no_pk)].reset_index(drop=True)))
    ph = p.phases
    t_split = float(ph.loc[ph["cycle"] == k - 1, "end"].max())
    if k <= int(ph["cycle"].max()):
        t_end = float(ph.loc[ph["cycle"] == k, "end"].max())
    else:
        t_end = t_split
    t_follow = float(max(ph["end"].max(), p.measurements["time"].max()))
    psa = _psa_table(p)
    train = psa[psa["time"] <= t_split]
    test = psa[(psa["time"] > t_split) & (psa["time"] <= t_end)]
    trn_ok = train[~train["below_lloq"].astype(bool) & (train["value"] > 0)]
    tst = test[~test["below_lloq"].astype(bool) & (test["value"] > 0)]
    tgrid = np.unique(np.concatenate([tst["time"].to_numpy(float), np.linspace(t_split, t_end, 60) if t_end > t_split else [], [t_follow]]))
    meas = p.measurements[p.measurements["time"] <= t_split].reset_index(drop=True)
    hist = p.history.table
    reg = Regimen(hist[hist["arm"] == "main"].assign(arm="main"))
    t0 = float(min(train["time"].min(), reg.table["time"].min() if len(reg) else math.inf)) if len(train) else math.nan
    return {"patient": p, "training_patient": dataclasses.replace(p, measurements=meas), "no_pk": no_pk, "phases": ph,
            "t_split": t_split, "t_end": t_end, "t_follow": t_follow, "train": train, "test": test, "trn_ok": trn_ok, "tst": tst,
            "tgrid": tgrid, "regimen": reg, "t0": t0}


def _twin_psa_forecast(d: dict, model, *, seed: int, n_draws: int, rng, prefix: str = "twin", keep_curve: bool = True):
    """Calibrate ``model`` on the split's training data ``d`` and forecast PSA on ``d["tgrid"]``.
    Returns (twin, predictive sample (n, T), row entries, curve or None)."""
    from .calibrate import calibrate

    if len(d["trn_ok"]) < SETTINGS["min_train_psa"]:
        raise ValueError(f"only {len(d['trn_ok'])} uncensored PSA values before day {d['t_split']:g}")
    row = {}
    t_cal = time.perf_counter()
    tw = calibrate(d["training_patient"], model, method=SETTINGS["method"], draws=n_draws, chains=1, seed=seed, progress=False, observables=["psa"])
    row[f"{prefix}_calibrate_s" if prefix != "twin" else "calibrate_s"] = round(time.perf_counter() - t_cal, 2)
    dg = tw.diagnostics
    row[f"{prefix}_fit_cov90"] = dg.get("ppc_coverage90")
    row[f"{prefix}_diag_passed"] = bool(dg.get("passed"))
    row[f"{prefix}_diag_messages"] = " | ".join(dg.get("messages", []))
    t_f = time.perf_counter()
    fc = forecast_draws(tw, d["regimen"], d["t0"], d["tgrid"], n_draws=n_draws, seed=seed)
    row[f"{prefix}_forecast_s" if prefix != "twin" else "forecast_s"] = round(time.perf_counter() - t_f, 2)
    row[f"{prefix}_solver_failures"] = fc["failures"]
    thr = SETTINGS["resistant_threshold"]
    pre = "" if prefix == "twin" else f"{prefix}_"
    row[f"{pre}p_resistant_end"] = float(np.mean(fc["frac_resistant"][:, -1] > thr))
    row[f"{pre}frac_resistant_end_median"] = float(np.median(fc["frac_resistant"][:, -1]))
    ypred = _predictive(fc["psa"], fc["sigma"]["psa"], rng)
    curve = None
    if keep_curve:
        q = np.quantile(ypred, [0.05, 0.5, 0.95], axis=0)
        curve = {"t": d["tgrid"].tolist(), "q05": q[0].tolist(), "q50": q[1].tolist(), "q95": q[2].tolist()}
    return tw, ypred, row, curve


def _point_metrics(pt: dict, name: str, S, obs: float) -> None:
    med = float(np.median(S))
    pt[f"{name}_pred"] = med
    pt[f"{name}_abslogerr"] = float(abs_log_error(med, obs))
    pt[f"{name}_in90"] = bool(interval_hits(S, obs, SETTINGS["level"]))
    pt[f"{name}_crps"] = float(crps_log(S, obs))


def _save_twin(tw, path) -> None:
    """``tw.save`` to a temporary sibling, then rename (a twin file is never torn)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.twin.nc")
    tw.save(tmp)
    os.replace(tmp, path)


def bruchovsky_split(pid: str, k: int, *, seed: int = 0, n_draws: int = 200, keep_curve: bool = True, save_twin=None) -> dict:
    """One split: calibrate on PSA up to the end of cycle k-1, forecast cycle k. Returns a JSON-able
    dict with ``row`` (summary) and ``points`` (one dict per forecast point). ``save_twin``: a
    ``.twin.nc`` path where the calibrated (mechanistic) twin is saved (the residual variant trains
    on the cycle-1 twins, ``k = 2``)."""
    _quiet()
    from .calibrate import default_model

    t_start = time.perf_counter()
    d = _bruchovsky_prepare(pid, k)
    p, ph, train, test, trn_ok, tst, tgrid = d["patient"], d["phases"], d["train"], d["test"], d["trn_ok"], d["tst"], d["tgrid"]
    t_split, t_end, t_follow = d["t_split"], d["t_end"], d["t_follow"]
    row = {"patient": pid, "cycle": int(k), "cohort": p.labels.get("cohort"), "relapse": bool(p.labels.get("relapse", False)),
           "t_split": t_split, "t_end": t_end, "t_follow": t_follow, "n_train": int(len(train)), "n_test": int(len(test)),
           "n_test_censored": int(test["below_lloq"].astype(bool).sum()), "drugs_removed": "|".join(d["no_pk"]), "status": "ok", "error": ""}
    points = []
    curve = {}
    rng = np.random.default_rng(seed + 7919 * k)
    # ---------------- twin
    tw_pred = None
    try:
        tw, tw_pred, extra, c = _twin_psa_forecast(d, default_model(p), seed=seed, n_draws=n_draws, rng=rng, keep_curve=keep_curve)
        row.update(extra)
        if c is not None:
            curve["twin"] = c
        if save_twin is not None:
            _save_twin(tw, save_twin)
    except Exception as e:  # recorded, the split goes on with the baselines
        row["status"] = "twin_failed"
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    # ---------------- baselines
    lv_pred = None
    try:
        if len(trn_ok) < SETTINGS["min_train_psa"]:
            raise ValueError("too few training values")
        segs = _on_function(ph)
        fit = lv_fit(trn_ok["time"], trn_ok["value"], segs, n_starts=SETTINGS["lv_starts"], seed=seed)
        if fit["ok"]:
            S, R = lv_simulate(fit["theta"], segs, tgrid, fit["t0"])
            mu = np.log(np.maximum(S + R, 1e-300))
            lv_pred = np.exp(mu[None, :] + fit["sd"] * rng.standard_normal((n_draws, len(tgrid))))
            row["lv_sd"] = fit["sd"]
            row["lv_frac_resistant_end"] = float(R[-1] / max(S[-1] + R[-1], 1e-300))
            if keep_curve:
                q = np.quantile(lv_pred, [0.05, 0.5, 0.95], axis=0)
                curve["lv"] = {"t": tgrid.tolist(), "q05": q[0].tolist(), "q50": q[1].tolist(), "q95": q[2].tolist()}
    except Exception as e:
        row["lv_error"] = f"{type(e).__name__}: {e}"[:300]
    lvcf = np.exp(lvcf_samples(trn_ok["value"].to_numpy(float), n_draws)) if len(trn_ok) else None
    if lvcf is not None:
        row["lvcf_last"] = float(trn_ok["value"].iloc[-1])
    # ---------------- per point
    for _, r in tst.iterrows():
        j = int(np.searchsorted(tgrid, float(r["time"])))
        pt = {"patient": pid, "cycle": int(k), "time": float(r["time"]), "obs": float(r["value"]), "horizon": float(r["time"]) - t_split}
        for name, S in (("twin", tw_pred[:, j] if tw_pred is not None else None),
                        ("lv", lv_pred[:, j] if lv_pred is not None else None),
                        ("lvcf", lvcf)):
            if S is None:
                continue
            _point_metrics(pt, name, S, float(r["value"]))
        points.append(pt)
    for name in ("twin", "lv", "lvcf"):
        e = [q[f"{name}_abslogerr"] for q in points if f"{name}_abslogerr" in q]
        row[f"{name}_med_abslogerr"] = float(np.median(e)) if e else float("nan")
        row[f"{name}_cov90"] = float(np.mean([q[f"{name}_in90"] for q in points if f"{name}_in90" in q])) if e else float("nan")
        row[f"{name}_crps"] = float(np.mean([q[f"{name}_crps"] for q in points if f"{name}_crps" in q])) if e else float("nan")
    row["wall_s"] = round(time.perf_counter() - t_start, 2)
    train_obs = {"t": train["time"].tolist(), "v": train["value"].tolist()} if keep_curve else {}
    test_obs = {"t": test["time"].tolist(), "v": test["value"].tolist()} if keep_curve else {}
    return {"row": row, "points": points, "curve": curve, "train": train_obs, "test": test_obs}


# ======================================================================================
# the prostate neural-residual variant ("twin + neural residual")
# ======================================================================================
def _model_group(model) -> str:
    """The model structure a residual belongs to, named by its drug set (a residual's drug
    inputs must be drugs of the model, so one residual is trained per drug set)."""
    return "+".join(model.drugs) or "untreated"


def residual_training_series(items, *, max_days=None) -> list[dict]:
    """The data the prostate residual is trained on.

    ``items``: (patient, model, parameters, t_cut) per patient; each gives one series with the
    patient's uncensored positive PSA at ``time <= t_cut`` (the validation passes the end of
    cycle 1: the training window of the patient's cycle-2 split, which no split forecasts),
    the initial time ``t0`` as in calibration (first PSA or dose), the regimen and the
    (posterior-median) parameters; ``max_days``: only values within that many days of ``t0``.
    Series with fewer than 2 values are skipped."""
    from twin.regimen import Regimen

    out = []
    for patient, model, params, t_cut in items:
        psa = _psa_table(patient)
        upto = psa[psa["time"] <= float(t_cut)]
        ok = upto[~upto["below_lloq"].astype(bool) & (upto["value"] > 0)].drop_duplicates("time")
        if len(ok) < 2:
            continue
        hist = patient.history.table
        reg = Regimen(hist[hist["arm"] == "main"].assign(arm="main")) if len(hist) else Regimen.empty()
        t0 = float(min(upto["time"].min(), reg.table["time"].min() if len(reg) else math.inf))
        if max_days is not None:
            ok = ok[ok["time"] <= t0 + float(max_days)]
            if len(ok) < 2:
                continue
        out.append({"patient": patient.id, "group": _model_group(model), "model": model, "parameters": dict(params), "t_cut": float(t_cut),
                    "t0": t0, "times": ok["time"].to_numpy(float), "log_psa": np.log(ok["value"].to_numpy(float)), "regimen": reg})
    return out


def _fastest_rate(m, p, y0, E) -> float:
    """Largest |eigenvalue| [1/day] of the vector field's Jacobian over the members, at y0,
    untreated and at each member's largest exposure."""
    import torch

    lam = 0.0
    B = y0.shape[0]
    emax = E.max(dim=1).values
    for b in range(B):
        pb = {k: v[b:b + 1] for k, v in p.items()}
        for e in (torch.zeros_like(emax[b:b + 1]), emax[b:b + 1]):
            J = torch.autograd.functional.jacobian(lambda yy: m.vector_field(0.0, yy[None, :], pb, e)[0], y0[b].detach())
            ev = torch.linalg.eigvals(J)
            if torch.isfinite(ev).all():
                lam = max(lam, float(ev.abs().max()))
    return lam


def _psa_rollout(m, p, y0, E, h: float, n: int, ipsa: int):
    """log PSA on the grid ``j h`` (j = 0..n) by classical RK4 with step ``h``; exposures ``E``
    (B, 2n+1, n_drugs) on the half-step grid. Differentiable in the residual's weights."""
    import torch

    y = y0
    logs = [torch.log(y[:, ipsa].clamp_min(1e-300))]
    for j in range(n):
        e0, em, e1 = E[:, 2 * j], E[:, 2 * j + 1], E[:, 2 * j + 2]
        k1 = m.vector_field(0.0, y, p, e0)
        k2 = m.vector_field(0.0, y + 0.5 * h * k1, p, em)
        k3 = m.vector_field(0.0, y + 0.5 * h * k2, p, em)
        k4 = m.vector_field(0.0, y + h * k3, p, e1)
        y = y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        logs.append(torch.log(y[:, ipsa].clamp_min(1e-300)))
    return torch.stack(logs, 1)


def fit_psa_residual(model, series, *, epochs: int, lr: float, seed: int = 0, step_days: float = 1.0, hidden=(16, 16),
                     eps_max: float = 0.05, callback=None):
    """Fit a :class:`twin.residual.NeuralResidual` on log PSA across ``series`` (from
    :func:`residual_training_series`, all of one model structure); the mechanistic parameters
    stay fixed. As :func:`twin.residual.train_residual` (full-batch Adam on the mean squared
    error, the last layer starting at zero), but on the ``psa`` state instead of the tumour
    volume, integrated by fixed-step RK4. Returns (residual, loss history)."""
    import torch

    from twin.residual import NeuralResidual

    from .residual import _exposure_function

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend
    try:
        base = model.without_residual()
        residual = NeuralResidual.for_model(base, seed=seed, hidden=tuple(hidden), eps_max=eps_max)
        m = base.with_residual(residual)
        B, nd, h = len(series), len(m.drugs), float(step_days)
        defaults = m.default_values()
        p = m.parameter_tensors({k: torch.as_tensor([float(s["parameters"].get(k, defaults[k])) for s in series], dtype=torch.float64)
                                 for k in m.parameter_names})
        with torch.no_grad():
            y0 = m.initial_state(p)
        ipsa = m.state_names.index("psa")
        horizon = max(float(s["times"][-1] - s["t0"]) for s in series)
        n = max(1, int(math.ceil(horizon / h)))
        half = np.arange(2 * n + 1) * (h / 2.0)
        E = np.zeros((B, 2 * n + 1, nd))
        for b, s in enumerate(series):
            if nd and len(s["regimen"]):
                f, _ = _exposure_function(m, s["regimen"])
                E[b] = np.array([f(s["t0"] + x) for x in half])
        E = torch.as_tensor(E)
        # RK4 is stable for h |lambda| < 2.78: shrink the step when the Jacobian's fastest rate
        # (at y0, untreated and at the largest exposure) needs it
        lam = _fastest_rate(m, p, y0, E)
        if lam * h > 2.0:
            h_new = 2.0 / lam
            k = int(math.ceil(h / h_new))
            h = h / k
            n = max(1, int(math.ceil(horizon / h)))
            half = np.arange(2 * n + 1) * (h / 2.0)
            E2 = np.zeros((B, 2 * n + 1, nd))
            for b, s in enumerate(series):
                if nd and len(s["regimen"]):
                    f, _ = _exposure_function(m, s["regimen"])
                    E2[b] = np.array([f(s["t0"] + x) for x in half])
            E = torch.as_tensor(E2)
        bi, j0, j1, w, obs = [], [], [], [], []
        for b, s in enumerate(series):
            rel = (s["times"] - s["t0"]) / h
            lo = np.floor(rel).astype(int)
            bi.append(np.full(len(rel), b))
            j0.append(lo)
            j1.append(np.minimum(lo + 1, n))
            w.append(rel - lo)
            obs.append(s["log_psa"])
        bi, j0, j1 = (torch.as_tensor(np.concatenate(x)) for x in (bi, j0, j1))
        w, obs = torch.as_tensor(np.concatenate(w)), torch.as_tensor(np.concatenate(obs))
        torch.manual_seed(seed)
        opt = torch.optim.Adam(residual.parameters(), lr=lr)
        history = []
        residual.train()
        last, best = None, (math.inf, None)
        for epoch in range(int(epochs) + 1):
            opt.zero_grad()
            L = _psa_rollout(m, p, y0, E, h, n, ipsa)
            pred = L[bi, j0] * (1 - w) + L[bi, j1] * w
            loss = torch.mean((pred - obs) ** 2)
            history.append(float(loss.detach()))
            if callback is not None:
                callback(epoch, history[-1])
            if not torch.isfinite(loss):
                if last is not None:  # keep the last weights with a finite loss
                    residual.load_state_dict(last)
                    history.append(history[-2])
                break
            last = {k: v.detach().clone() for k, v in residual.state_dict().items()}
            if history[-1] < best[0]:
                best = (history[-1], last)
            if epoch == int(epochs):
                break  # the last entry is the loss of the final weights
            loss.backward()
            opt.step()
        # keep the weights with the lowest training loss (epoch 0 = the zero residual): the
        # residual never fits the training data worse than the mechanistic twin alone
        if best[1] is not None:
            residual.load_state_dict(best[1])
        residual.best_epoch = int(np.argmin(history)) if history else 0
        residual.eval()
        residual.train_step_days = h
        return residual, history
    finally:
        torch.set_num_threads(n_threads)


def _residual_dir(work: Path) -> Path:
    return Path(work) / "bruchovsky_residual"


def _twin_dir(work: Path) -> Path:
    return Path(work) / "bruchovsky_twins"


def train_bruchovsky_residual(work, patients, *, seed: int = 0, settings=None, n_workers: int = 1, log=print, _fit=None, _medians=None) -> dict:
    """Train the prostate residual(s) on the cycle-1 twins saved under ``<work>/bruchovsky_twins``
    and write them with a manifest to ``<work>/bruchovsky_residual``; reuse them when the
    manifest matches (same patients, settings and seed). Returns the manifest.

    Training data (:func:`residual_training_series`): each patient's PSA up to the end of
    cycle 1, with the posterior-median parameters of the twin calibrated on exactly that data.
    Every forecast window of the validation is ``(end of cycle k-1, end of cycle k]`` with
    ``k >= 2``, so no forecast point is used. One residual per model structure (drug set)
    with >= ``min_group`` patients; other patients get no residual variant."""
    from twin.twin import Twin

    from .calibrate import default_model

    rs = dict(RESIDUAL_SETTINGS, **(settings or {}))
    rs_json = json.loads(json.dumps(rs, default=list))
    work = Path(work)
    rdir = _residual_dir(work)
    man_path = rdir / "manifest.json"
    tdir = _twin_dir(work)
    have = sorted(pid for pid in patients if (tdir / f"{pid}.twin.nc").exists())
    stamps = {pid: (tdir / f"{pid}.twin.nc").stat().st_mtime_ns for pid in have}  # a re-saved twin retrains
    if man_path.exists():
        man = json.loads(man_path.read_text())
        if (man.get("patients_available") == have and man.get("settings") == rs_json and man.get("seed") == seed
                and man.get("twin_stamps") == {k: v for k, v in stamps.items()}):
            log(f"residual: reusing {man_path} ({', '.join(man['groups']) or 'no group'})")
            return man
    from twin._atomic import atomic_write_text

    def medians(pid):
        tw = Twin.load(tdir / f"{pid}.twin.nc")
        return {k: float(np.median(v)) for k, v in tw.draws.items()}

    items = []
    for pid in have:
        d = _bruchovsky_prepare(pid, 2)
        model = default_model(d["patient"])
        med = {k: v for k, v in (_medians or medians)(pid).items() if k in model.parameter_names}
        items.append((d["patient"], model, med, d["t_split"]))
    series = residual_training_series(items, max_days=rs.get("max_days"))
    groups = {}
    for s in series:
        groups.setdefault(s["group"], []).append(s)
    man = {"seed": seed, "settings": rs_json, "patients_available": have, "twin_stamps": stamps, "groups": {}, "patient_group": {},
           "data": "PSA (uncensored, > 0) at time <= end of cycle 1 (the cycle-2 split's training window); parameters: the posterior medians of the twin calibrated on that window"}
    jobs = []
    for g, ss in sorted(groups.items()):
        if len(ss) < rs["min_group"]:
            log(f"residual: group {g} has {len(ss)} patient(s) < {rs['min_group']}: no residual")
            continue
        log(f"residual: training group {g} on {len(ss)} patients, {sum(len(s['times']) for s in ss)} PSA values ...")
        jobs.append((g, ss))
    if _fit is None and n_workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        meds = {it[0].id: it[2] for it in items}
        with ProcessPoolExecutor(max_workers=min(n_workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_train_group_job, g, [s["patient"] for s in ss], {s["patient"]: meds[s["patient"]] for s in ss}, seed, rs, str(rdir))
                    for g, ss in jobs]
            infos = [f.result() for f in futs]
    else:
        infos = [_train_group(g, ss, seed, rs, rdir, fit=_fit or fit_psa_residual, log=log) for g, ss in jobs]
    for (g, ss), info in zip(jobs, infos):
        log(f"residual: group {g}: {info['epochs']} epochs in {info['train_s']:.0f} s, MSE {info['loss_history'][0]:.4f} -> {info['loss_history'][-1]:.4f}")
        man["groups"][g] = info
        for s in ss:
            man["patient_group"][s["patient"]] = g
    atomic_write_text(man_path, json.dumps(man, indent=1, default=float))
    return man


def _train_group(g, ss, seed, rs, rdir, *, fit, log=print) -> dict:
    t = time.perf_counter()
    res, hist = fit(ss[0]["model"], ss, epochs=rs["epochs"], lr=rs["lr"], seed=seed, step_days=rs["step_days"], hidden=rs["hidden"],
                    eps_max=rs["eps_max"], callback=lambda e, l: log(f"  {g} epoch {e}: mse {l:.4f}") if e % 5 == 0 else None)
    pt, js = res.save(Path(rdir) / f"residual_{g}")
    return {"file": pt.name, "sha256": json.loads(js.read_text())["weights_sha256"], "patients": [s["patient"] for s in ss],
            "n_points": int(sum(len(s["times"]) for s in ss)), "t_cut": {s["patient"]: s["t_cut"] for s in ss}, "loss_history": hist,
            "epochs": len(hist) - 1, "best_epoch": getattr(res, "best_epoch", None), "loss_best": float(np.nanmin(hist)) if hist else None,
            "step_days": getattr(res, "train_step_days", rs["step_days"]), "train_s": round(time.perf_counter() - t, 1),
            "drugs": list(ss[0]["model"].drugs)}


def _train_group_job(g, pids, meds, seed, rs, rdir) -> dict:
    """:func:`_train_group` in a fresh process (the series are rebuilt there from the patients)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet()
    from .calibrate import default_model

    items = []
    for pid in pids:
        d = _bruchovsky_prepare(pid, 2)
        items.append((d["patient"], default_model(d["patient"]), meds[pid], d["t_split"]))
    return _train_group(g, residual_training_series(items, max_days=rs.get("max_days")), seed, rs, rdir, fit=fit_psa_residual, log=lambda *a: None)


def cycle1_twin(pid: str, path, *, seed: int = 0, n_draws: int = 200) -> dict:
    """Calibrate the mechanistic twin on PSA up to the end of cycle 1 (the ``k = 2`` split's
    training data) and save it to ``path`` (for a cycle-2 split finished before twins were kept)."""
    _quiet()
    from .calibrate import calibrate, default_model

    d = _bruchovsky_prepare(pid, 2)
    row = {"patient": pid, "status": "ok", "error": ""}
    try:
        if len(d["trn_ok"]) < SETTINGS["min_train_psa"]:
            raise ValueError(f"only {len(d['trn_ok'])} uncensored PSA values before day {d['t_split']:g}")
        t = time.perf_counter()
        tw = calibrate(d["training_patient"], default_model(d["patient"]), method=SETTINGS["method"], draws=n_draws, chains=1, seed=seed,
                       progress=False, observables=["psa"])
        row["calibrate_s"] = round(time.perf_counter() - t, 2)
        _save_twin(tw, path)
    except Exception as e:
        row["status"] = "twin_failed"
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return {"row": row}


def bruchovsky_residual_split(pid: str, k: int, residual_dir, *, seed: int = 0, n_draws: int = 200, keep_curve: bool = True) -> dict:
    """Split (``pid``, ``k``) with the twin + neural residual: the model of the patient's group with
    the trained residual held fixed (``model.with_residual``), calibrated on the same training data
    and forecast as the twin. Returns row (``twinres_*``), points and curve."""
    _quiet()
    from twin.residual import NeuralResidual

    from .calibrate import default_model

    t_start = time.perf_counter()
    d = _bruchovsky_prepare(pid, k)
    model = default_model(d["patient"])
    g = _model_group(model)
    man = json.loads((Path(residual_dir) / "manifest.json").read_text())
    row = {"patient": pid, "cycle": int(k), "twinres_group": g, "twinres_status": "ok", "twinres_error": ""}
    points, curve, pred = [], {}, None
    info = man["groups"].get(g) if man["patient_group"].get(pid, g) == g else None
    row["residual_sha256"] = info["sha256"] if info else None
    try:
        if info is None:
            raise ValueError(f"no residual for the model group {g!r}")
        res = NeuralResidual.load(Path(residual_dir) / info["file"])
        rng = np.random.default_rng(seed + 7919 * k + 104729)
        _, pred, extra, c = _twin_psa_forecast(d, model.with_residual(res), seed=seed, n_draws=n_draws, rng=rng, prefix="twinres", keep_curve=keep_curve)
        row.update(extra)
        if c is not None:
            curve["twinres"] = c
    except Exception as e:
        row["twinres_status"] = "failed" if info is not None else "no_residual"
        row["twinres_error"] = f"{type(e).__name__}: {e}"[:500]
    if pred is not None:
        for _, r in d["tst"].iterrows():
            j = int(np.searchsorted(d["tgrid"], float(r["time"])))
            pt = {"patient": pid, "cycle": int(k), "time": float(r["time"])}
            _point_metrics(pt, "twinres", pred[:, j], float(r["value"]))
            points.append(pt)
    row["twinres_wall_s"] = round(time.perf_counter() - t_start, 2)
    return {"row": row, "points": points, "curve": curve}


# ======================================================================================
# PDXE splits
# ======================================================================================
def _has_pk(drug: str) -> bool:
    from twin.drugs import lookup_drug

    cat = lookup_drug(drug)
    return cat is not None and cat.pk is not None and cat.pk.potency() is not None


def _dosable(drug: str) -> bool:
    """Catalogue PK and potency, and a standard dose (PDXE doses have no recorded amount)."""
    from twin.drugs import lookup_drug

    return _has_pk(drug) and lookup_drug(drug).pk.standard_dose_mg is not None


def _vol_curve(p, arm):
    m = p.measurements
    s = m[(m["observable"] == "tumor_volume") & (m["arm"] == arm)].sort_values("time")
    return s["time"].to_numpy(float), s["value"].to_numpy(float)


@lru_cache(maxsize=1)
def _pdx_arm_frequency() -> dict:
    from collections import Counter

    from twin.datasets import load_pdxe

    c = Counter()
    for p in load_pdxe():
        c.update(set(p.measurements.loc[p.measurements["observable"] == "tumor_volume", "arm"]))
    return dict(c)


def pdxe_arms(p, max_treated: int = 3) -> list[str]:
    """The arms used for PDX ``p``: untreated + up to ``max_treated`` single-agent arms (no '+',
    no dose suffix) whose drugs all have catalogue PK, potency and a standard dose, with >= 3 volumes, most frequent
    treatment in the cohort first (ties by name). Empty when fewer than 2 treated arms qualify."""
    freq = _pdx_arm_frequency()
    h = p.history.table
    m = p.measurements
    arms = sorted(set(m.loc[m["observable"] == "tumor_volume", "arm"]))
    if "untreated" not in arms:
        return []
    cand = []
    for a in arms:
        if a == "untreated" or "+" in a or "-" in a:
            continue
        ds = set(h.loc[h["arm"] == a, "drug"].str.lower())
        if ds and all(_dosable(d) for d in ds) and len(_vol_curve(p, a)[0]) >= SETTINGS["pdx_min_volumes"]:
            cand.append(a)
    cand.sort(key=lambda a: (-freq.get(a, 0), a))
    cand = cand[:max_treated]
    return ["untreated"] + cand if len(cand) >= 2 else []


def pdxe_tasks(max_pdx=None) -> list[tuple]:
    """(pdx id, held-out arm, arms) for the selected PDXs, ordered round-robin over tissues
    (sorted ids within a tissue) so that a partial run covers every tissue."""
    from twin.datasets import load_pdxe

    by = {}
    for p in load_pdxe():
        arms = pdxe_arms(p, SETTINGS["pdx_max_treated"])
        if arms:
            by.setdefault(p.labels.get("tissue", "?"), []).append((p.id, arms))
    for v in by.values():
        v.sort()
    order = []
    keys = sorted(by)
    i = 0
    while any(i < len(by[k]) for k in keys):
        for k in keys:
            if i < len(by[k]):
                order.append(by[k][i])
        i += 1
    if max_pdx is not None:
        order = order[: int(max_pdx)]
    return [(pid, held, tuple(arms)) for pid, arms in order for held in arms[1:]]


def _log_ratio_on_days(t, v, days):
    """log(V(t)/V(first)) linearly interpolated on integer ``days`` (NaN outside the curve)."""
    lv = np.log(np.maximum(v, _EPS_VOL))
    lr = lv - lv[0]
    tt = t - t[0]
    out = np.interp(days, tt, lr, left=np.nan, right=np.nan)
    return out


_DAYS = np.arange(0, SETTINGS["pdx_days"] + 1, dtype=float)


@lru_cache(maxsize=1)
def _population_curves() -> dict:
    """treatment -> {pdx id: log-ratio curve on _DAYS}; also 'untreated'."""
    from twin.datasets import load_pdxe

    out = {}
    for p in load_pdxe():
        m = p.measurements
        for a in set(m.loc[m["observable"] == "tumor_volume", "arm"]):
            t, v = _vol_curve(p, a)
            if len(t) < 2 or not v[0] > 0:
                continue
            out.setdefault(a, {})[p.id] = _log_ratio_on_days(t, v, _DAYS)
    return out


def _pop_mean(curves: dict, exclude: str):
    arr = np.array([c for k, c in curves.items() if k != exclude])
    if not len(arr):
        return None, None
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mu = np.nanmean(arr, 0)
            sd = np.nanstd(arr, 0, ddof=1) if len(arr) > 1 else np.full(len(_DAYS), np.nan)
    # carry the last defined value forward (curves end at different days)
    for a in (mu, sd):
        ok = np.flatnonzero(np.isfinite(a))
        if len(ok):
            a[ok[-1] + 1:] = a[ok[-1]]
            a[: ok[0]] = a[ok[0]]
    return mu, sd


def _extrapolate_log(t, v, days):
    """The PDX's own untreated log-ratio on ``days``; past its end, linear in log with the slope
    of its last (up to) 3 points."""
    lv = np.log(np.maximum(v, _EPS_VOL))
    tt = t - t[0]
    lr = lv - lv[0]
    out = np.interp(days, tt, lr)
    if len(tt) >= 2:
        k = min(3, len(tt))
        slope = np.polyfit(tt[-k:], lr[-k:], 1)[0]
        past = days > tt[-1]
        out[past] = lr[-1] + slope * (days[past] - tt[-1])
    return out


def pdxe_split(pid: str, held: str, arms: Sequence[str], *, seed: int = 0, n_draws: int = 200, keep_curve: bool = True) -> dict:
    """One PDX split: calibrate on ``arms`` minus ``held`` (model built on all ``arms``), forecast
    the held-out arm's volume from its first observed volume. Returns row / points / curve."""
    _quiet()
    from twin.datasets import load_pdxe

    from .calibrate import calibrate, default_model

    p = load_pdxe()[pid]
    arms = list(arms)
    train_arms = [a for a in arms if a != held]

    def twin(row):
        model = default_model(p, arms=arms)
        t_cal = time.perf_counter()
        tw = calibrate(p, model, method=SETTINGS["method"], draws=n_draws, chains=1, seed=seed, progress=False,
                       arms=train_arms, observables=["tumor_volume"])
        row["calibrate_s"] = round(time.perf_counter() - t_cal, 2)
        row.update(_pdx_twin_diagnostics(tw, train_arms))
        return tw

    return _pdx_held_arm(p, held, train_arms, twin, seed=seed, n_draws=n_draws, keep_curve=keep_curve)


def _pdx_twin_diagnostics(tw, train_arms) -> dict:
    """The row entries of a calibrated PDX twin (in-sample coverage, diagnostics, dropped arms)."""
    d = tw.diagnostics
    return {"twin_fit_cov90": d.get("ppc_coverage90"), "twin_diag_passed": bool(d.get("passed")),
            "twin_diag_messages": " | ".join(d.get("messages", [])),
            "twin_dropped_arms": "|".join(a for a in train_arms if a not in set(tw.idata.posterior.coords["arm"].values.tolist()))
            if "arm" in tw.idata.posterior.coords else ""}


def _pdx_baseline_sd(sd, dd):
    """The per-day predictive SD of a PDX baseline on day indices ``dd`` (0.5 where undefined, ~0 on day 0)."""
    s = np.where(np.isfinite(sd[dd]) & (sd[dd] > 0), sd[dd], 0.5)
    s[0] = 1e-6
    return s


def _pdx_held_arm(p, held: str, train_arms: Sequence[str], twin, *, seed: int = 0, n_draws: int = 200, keep_curve: bool = True,
                  extra_baselines=None) -> dict:
    """Forecast arm ``held`` of PDX ``p`` from its first observed volume and score it: the twin
    ``twin(row)`` returns (a callable that calibrates or hands over a calibrated twin and writes its
    row entries; it may raise: the row then says ``twin_failed``), and the baselines "pop" (the
    treatment's population mean curve over the other PDXs) and "untr" (the PDX's own untreated curve
    plus the treatment's mean effect in the other PDXs). ``extra_baselines(ctx)``: more baselines,
    ``{name: (n_draws, n_times) sample}``, given ``ctx`` (times, volumes, days, rng, n_draws and the
    "untr" baseline's per-day SD ``untr_sd`` (None without it)). The metrics: median |log error|,
    coverage, CRPS, mRECIST class per method. Returns row / curve / obs (``pdxe_split``'s result)."""
    from twin.observation import CELL_VOLUME_MM3
    from twin.regimen import Regimen

    t_start = time.perf_counter()
    pid = p.id
    t, v = _vol_curve(p, held)
    hist = p.history.table
    reg = Regimen(hist[hist["arm"] == held].assign(arm="main"))
    t0 = float(min(t[0], reg.table["time"].min() if len(reg) else math.inf))
    row = {"pdx": pid, "tissue": p.labels.get("tissue"), "held_out": held, "train_arms": "|".join(train_arms), "n_points": int(len(t) - 1),
           "status": "ok", "error": ""}
    obs_class = mrecist(t, v, min_day=SETTINGS["mrecist_min_day"])
    row["class_obs"] = obs_class
    fut = t > t[0]
    vf = v[fut]
    pos = vf > 0
    row["n_zero_volumes"] = int((~pos).sum())
    rng = np.random.default_rng(seed + zlib.crc32(f"{pid}/{held}".encode()) % 100_000)  # hash() is salted per process
    days = t - t[0]
    preds = {}
    curve = {}
    # ---------------- twin
    try:
        tw = twin(row)
        if not v[0] > 0:
            raise ValueError("held-out arm's first volume is 0")
        grid = np.unique(np.concatenate([t, np.linspace(t[0], t[-1], 60)]))
        t_f = time.perf_counter()
        fc = forecast_draws(tw, reg, t0, grid, n_draws=n_draws, n0=float(v[0]) / CELL_VOLUME_MM3, seed=seed)
        row["forecast_s"] = round(time.perf_counter() - t_f, 2)
        row["twin_solver_failures"] = fc["failures"]
        ypred = _predictive(fc["tumor_volume"], fc["sigma"]["tumor_volume"], rng)
        idx = np.searchsorted(grid, t)
        preds["twin"] = ypred[:, idx]
        med_curve = np.median(fc["tumor_volume"], 0)[idx]
        row["class_twin"] = mrecist(t, np.concatenate([[v[0]], med_curve[1:]]), min_day=SETTINGS["mrecist_min_day"])
        if keep_curve:
            q = np.quantile(ypred, [0.05, 0.5, 0.95], axis=0)
            curve["twin"] = {"t": grid.tolist(), "q05": q[0].tolist(), "q50": q[1].tolist(), "q95": q[2].tolist()}
    except Exception as e:
        row["status"] = "twin_failed"
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    # ---------------- baselines
    pop = _population_curves()
    untr_sd = None
    if v[0] > 0:
        mu, sd = _pop_mean(pop.get(held, {}), pid)
        if mu is not None:
            dd = np.clip(np.round(days).astype(int), 0, len(_DAYS) - 1)
            s = _pdx_baseline_sd(sd, dd)
            preds["pop"] = v[0] * np.exp(mu[dd][None, :] + s[None, :] * rng.standard_normal((n_draws, len(t))))
            row["n_pop_curves"] = int(len(pop.get(held, {})) - (pid in pop.get(held, {})))
        tu, vu = _vol_curve(p, "untreated")
        if len(tu) >= 2 and vu[0] > 0:
            # drug effect: mean over other PDXs of (treated - untreated) log-ratio, per day
            diffs = {}
            for other, c in pop.get(held, {}).items():
                if other != pid and other in pop.get("untreated", {}):
                    diffs[other] = c - pop["untreated"][other]
            dmu, dsd = _pop_mean(diffs, pid)
            if dmu is not None:
                own = _extrapolate_log(tu, vu, days)
                dd = np.clip(np.round(days).astype(int), 0, len(_DAYS) - 1)
                s = _pdx_baseline_sd(dsd, dd)
                untr_sd = s
                preds["untr"] = v[0] * np.exp((own + dmu[dd])[None, :] + s[None, :] * rng.standard_normal((n_draws, len(t))))
        if extra_baselines is not None:
            preds.update(extra_baselines({"t": t, "v": v, "days": days, "rng": rng, "n_draws": n_draws, "untr_sd": untr_sd, "row": row}))
    for name, S in preds.items():
        med = np.median(S, 0)
        if name != "twin":
            row[f"class_{name}"] = mrecist(t, np.concatenate([[v[0]], med[1:]]), min_day=SETTINGS["mrecist_min_day"])
        Sf = np.maximum(S[:, fut][:, pos], _EPS_VOL)
        y = vf[pos]
        if len(y):
            row[f"{name}_med_abslogerr"] = float(np.median(abs_log_error(np.median(Sf, 0), y)))
            row[f"{name}_cov90"] = float(np.mean(interval_hits(Sf, y, SETTINGS["level"])))
            row[f"{name}_crps"] = float(np.mean(crps_log(Sf, y)))
            row[f"{name}_abslogerr_list"] = json.dumps([round(float(x), 5) for x in abs_log_error(np.median(Sf, 0), y)])
            row[f"{name}_in90_list"] = json.dumps([int(x) for x in interval_hits(Sf, y, SETTINGS["level"])])
        if keep_curve and name != "twin":
            q = np.quantile(S, [0.05, 0.5, 0.95], axis=0)
            curve[name] = {"t": t.tolist(), "q05": q[0].tolist(), "q50": q[1].tolist(), "q95": q[2].tolist()}
    row["wall_s"] = round(time.perf_counter() - t_start, 2)
    return {"row": row, "curve": curve, "obs": {"t": t.tolist(), "v": v.tolist()} if keep_curve else {}}


# ======================================================================================
# runner
# ======================================================================================
def _task_name(kind, key):
    if kind in ("bruchovsky", "bruchovsky_res"):
        return f"{key[0]}_k{key[1]}"
    if kind == "bruchovsky_twin":
        return str(key[0])
    if kind == "pdxe_combo":
        return str(key[0]).replace("/", "_")
    return f"{key[0]}__{key[1]}".replace("/", "_")


#: where each kind of task writes its result file under ``_work``
_KIND_DIR = {"bruchovsky": "bruchovsky", "pdxe": "pdxe", "bruchovsky_twin": "bruchovsky_twins", "bruchovsky_res": "bruchovsky_residual/splits",
             "pdxe_combo": "pdxe_combo"}


def _result_path(work: Path, kind: str, key) -> Path:
    return Path(work) / _KIND_DIR[kind] / f"{_task_name(kind, key)}.json"


def _map_options() -> dict:
    from .calibrate import MAP_OPTIONS

    return dict(MAP_OPTIONS)


def model_fingerprint(kind: str, key) -> str:
    """A short hash of everything a split's twin depends on besides the data: the model
    ``default_model`` builds for it (its specification, parameters, defaults, the priors for the
    patient, states) and ``SETTINGS``. A finished split whose fingerprint differs from the current
    one is run again (e.g. after a change of the model), so a resumed run never mixes models.
    ``pdxe_combo`` (key: pdx id, training arms, combination arms): the model on all those arms, and
    ``COMBO_SETTINGS`` too (the other kinds' fingerprints do not depend on it)."""
    import hashlib

    from .calibrate import default_model

    if kind in ("bruchovsky", "bruchovsky_res", "bruchovsky_twin"):
        p = _bruchovsky_prepare(key[0], key[1] if len(key) > 1 else 2)["patient"]
        m = default_model(p)
    else:
        from twin.datasets import load_pdxe

        p = load_pdxe()[key[0]]
        m = default_model(p, arms=list(key[1]) + list(key[2]) if kind == "pdxe_combo" else list(key[2]))
    doc = {"spec": m.spec(), "parameters": list(m.parameter_names), "defaults": m.default_values(), "priors": m.priors_for(p),
           "states": list(m.state_names), "settings": SETTINGS, "map_options": _map_options()}
    if kind == "pdxe_combo":
        from .validation_combo import COMBO_SETTINGS

        doc["combo_settings"] = COMBO_SETTINGS
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished(work: Path, kind: str, key, fingerprints: dict) -> bool:
    f = _result_path(work, kind, key)
    if not f.exists():
        return False
    try:
        got = json.loads(f.read_text())["row"].get("model_fingerprint")
    except Exception:  # pragma: no cover
        return False
    want = fingerprints.get((kind, key))
    return want is None or got == want


def _run_task(kind: str, key: tuple, seed: int, n_draws: int, work=None) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if kind == "bruchovsky":
            save = str(_twin_dir(work) / f"{key[0]}.twin.nc") if (work is not None and key[1] == 2) else None
            return bruchovsky_split(key[0], key[1], seed=seed, n_draws=n_draws, save_twin=save)
        if kind == "bruchovsky_twin":
            return cycle1_twin(key[0], _twin_dir(work) / f"{key[0]}.twin.nc", seed=seed, n_draws=n_draws)
        if kind == "bruchovsky_res":
            return bruchovsky_residual_split(key[0], key[1], _residual_dir(work), seed=seed, n_draws=n_draws)
        if kind == "pdxe_combo":
            from .validation_combo import pdxe_combo_split

            return pdxe_combo_split(key[0], key[1], key[2], seed=seed, n_draws=n_draws)
        return pdxe_split(key[0], key[1], key[2], seed=seed, n_draws=n_draws)
    except Exception as e:  # never lose a task: a failure row
        row = {"patient" if kind not in ("pdxe", "pdxe_combo") else "pdx": key[0], "status": "failed", "error": f"{type(e).__name__}: {e}"[:500],
               "traceback": traceback.format_exc()[-2000:]}
        if kind in ("bruchovsky", "bruchovsky_res"):
            row["cycle"] = key[1]
        if kind == "bruchovsky_res":
            row.update(twinres_status="failed", twinres_error=row["error"])
        if kind == "pdxe":
            row["held_out"] = key[1]
        if kind == "pdxe_combo":
            row["combos"] = "|".join(key[2])
        return {"row": row, "points": [], "curve": {}}


def _collect(work: Path, kind: str) -> list[dict]:
    out = []
    for f in sorted((Path(work) / _KIND_DIR[kind]).glob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except Exception:  # pragma: no cover - a torn file cannot exist (atomic writes)
            continue
    return out


def _execute(work: Path, todo: list, *, n_workers: int, seed: int, n_draws: int, deadline, log, fingerprints=None) -> int:
    """Run ``todo`` [(kind, key)] (one Dask task each with ``n_workers`` > 1), writing each
    result atomically to :func:`_result_path`; stop submitting after ``deadline``
    (``time.perf_counter()`` value or None). Returns the number of tasks finished."""
    from twin._atomic import atomic_write_text

    t_start = time.perf_counter()
    done = 0
    fingerprints = fingerprints or {}

    def over():
        return deadline is not None and time.perf_counter() > deadline

    def write(kind, key, res):
        if (kind, key) in fingerprints:
            res["row"]["model_fingerprint"] = fingerprints[(kind, key)]
        atomic_write_text(_result_path(work, kind, key), json.dumps(res, default=float))

    if not todo:
        return 0
    if n_workers <= 1:
        for kind, key in todo:
            if over():
                log("validation: time budget reached; stopping")
                break
            res = _run_task(kind, key, seed, n_draws, work)
            write(kind, key, res)
            done += 1
            log(f"  done {kind} {key[:2]} in {res['row'].get('wall_s', res['row'].get('twinres_wall_s', res['row'].get('calibrate_s', '?')))} s "
                f"({res['row'].get('status', res['row'].get('twinres_status'))})")
        return done
    from distributed import Client, LocalCluster, as_completed

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        futs = {}
        queue = list(todo)
        ac = as_completed()

        def submit_one():
            kind, key = queue.pop(0)
            f = client.submit(_run_task, kind, key, seed, n_draws, str(work), key=f"{kind}-{_task_name(kind, key)}-{seed}", pure=False)
            futs[f] = (kind, key)
            ac.add(f)

        for _ in range(min(len(queue), n_workers)):
            submit_one()
        for f in ac:
            kind, key = futs.pop(f)
            try:
                res = f.result()
            except Exception as e:  # worker died
                res = {"row": {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}, "points": [], "curve": {}}
            write(kind, key, res)
            done += 1
            log(f"  done {kind} {key[:2]} in {res['row'].get('wall_s', res['row'].get('twinres_wall_s', res['row'].get('calibrate_s', '?')))} s "
                f"({res['row'].get('status', res['row'].get('twinres_status'))}) [{time.perf_counter() - t_start:.0f} s]")
            if queue and not over():
                submit_one()
            elif over() and queue:
                log(f"validation: time budget reached; {len(queue)} split(s) not started")
                queue.clear()
    return done


def _residual_task_done(work: Path, key, man: dict) -> bool:
    f = _result_path(work, "bruchovsky_res", key)
    if not f.exists():
        return False
    try:
        r = json.loads(f.read_text())["row"]
    except Exception:  # pragma: no cover
        return False
    g = r.get("twinres_group")
    want = man["groups"][g]["sha256"] if g in man["groups"] else None
    return r.get("residual_sha256") == want  # finished (also a failed twin) with the current residual


def run_validation(outdir="docs/validation", *, datasets=("bruchovsky", "pdxe", "pdxe_combo"), quick=False, n_workers=2, seed=0,
                   max_patients=None, max_pdx=None, time_budget_s=None, n_draws=None, residual=False, residual_cycles=None,
                   residual_settings=None, page="auto", command=None, log=print) -> dict:
    """Run the held-out validation and write ``<outdir>/{bruchovsky,pdxe}.csv``, the point
    tables, the figures, ``summary.json`` and the page (``page``; see :func:`summarize`);
    return the summary dict.

    datasets: any of "bruchovsky", "pdxe", "pdxe_combo" (PDX combination arms predicted from the
    monotherapies, :mod:`calibration.validation_combo`; one task per PDX).
    quick: ``QUICK["patients"]`` prostate patients (cycle-2 split only) and ``QUICK["pdx"]`` PDXs
    (``validation_combo.COMBO_QUICK_PDX`` for the combination arms); max_pdx caps both PDX kinds.
    max_patients / max_pdx: caps. time_budget_s: stop submitting new splits after this many
    seconds (finished ones are kept; a later call resumes). Existing per-split files under
    ``<outdir>/_work`` are reused.

    residual: also run the prostate variant "twin + neural residual": after the splits, the
    cycle-1 twins (saved by the ``k = 2`` splits; missing ones are calibrated) train one
    residual per model structure on PSA up to the end of cycle 1 (:func:`train_bruchovsky_residual`),
    then every split (or only cycles ``residual_cycles``, e.g. ``(2, 3)``) is re-calibrated
    with the residual held fixed and forecast. command: the command line, recorded with the
    options in ``_work/runs.json`` and the page."""
    from datetime import datetime, timezone

    from twin._atomic import atomic_write_text

    outdir = Path(outdir)
    work = outdir / "_work"
    n_draws = int(n_draws or SETTINGS["draws"])
    started = datetime.now(timezone.utc)
    options = {"datasets": list(datasets), "quick": bool(quick), "n_workers": int(n_workers), "seed": int(seed), "max_patients": max_patients,
               "max_pdx": max_pdx, "time_budget_s": time_budget_s, "n_draws": n_draws, "residual": bool(residual),
               "residual_cycles": list(residual_cycles) if residual_cycles else None, "residual_settings": residual_settings}
    tasks = []
    if "bruchovsky" in datasets:
        bt = bruchovsky_tasks(max_patients if max_patients is not None else (QUICK["patients"] if quick else None))
        if quick:
            bt = [x for x in bt if x[1] == 2]
        # cycle-2 splits first (they also give the AUC), then later cycles
        bt.sort(key=lambda x: (x[1], x[0]))
        tasks += [("bruchovsky", x) for x in bt]
    if "pdxe" in datasets:
        pt = pdxe_tasks(max_pdx if max_pdx is not None else (QUICK["pdx"] if quick else None))
        tasks += [("pdxe", x) for x in pt]
    if "bruchovsky" in datasets and "pdxe" in datasets and not quick:
        # interleave: cycle-2 prostate splits, then PDX, then later cycles
        b2 = [t for t in tasks if t[0] == "bruchovsky" and t[1][1] == 2]
        bl = [t for t in tasks if t[0] == "bruchovsky" and t[1][1] > 2]
        pd_ = [t for t in tasks if t[0] == "pdxe"]
        tasks = b2 + pd_ + bl
    if "pdxe_combo" in datasets:
        from .validation_combo import COMBO_QUICK_PDX, pdxe_combo_tasks

        tasks += [("pdxe_combo", x) for x in pdxe_combo_tasks(max_pdx if max_pdx is not None else (COMBO_QUICK_PDX if quick else None))]
    fps = {(k, key): model_fingerprint(k, key) for k, key in tasks}
    todo = [(k, key) for k, key in tasks if not _finished(work, k, key, fps)]
    n_stale = sum(_result_path(work, k, key).exists() for k, key in todo)
    log(f"validation: {len(tasks)} splits, {len(tasks) - len(todo)} already done, {len(todo)} to run on {n_workers} worker(s)"
        + (f" ({n_stale} finished with another model or settings: rerun)" if n_stale else ""))
    for k in _KIND_DIR.values():
        (work / k).mkdir(parents=True, exist_ok=True)
    if not (work / ".gitignore").exists():  # the per-split cache is never committed
        atomic_write_text(work / ".gitignore", "*\n")
    t_start = time.perf_counter()
    deadline = None if time_budget_s is None else t_start + float(time_budget_s)
    n_run = _execute(work, todo, n_workers=n_workers, seed=seed, n_draws=n_draws, deadline=deadline, log=log, fingerprints=fps)
    done_keys = {(k, _task_name(k, key)) for k, key in tasks}
    res_info = {}
    n_tasks = len(tasks)
    if residual and "bruchovsky" in datasets and not (deadline is not None and time.perf_counter() > deadline):
        bkeys = [key for k, key in tasks if k == "bruchovsky"]
        patients = sorted({key[0] for key in bkeys})
        # cycle-1 twins: saved by the k = 2 splits; calibrate the missing ones (not those whose
        # cycle-2 split could not calibrate a twin: too little cycle-1 data)
        need = []
        for pid in patients:
            fp = fps.get(("bruchovsky", (pid, 2))) or model_fingerprint("bruchovsky", (pid, 2))
            f2 = _result_path(work, "bruchovsky", (pid, 2))
            r2 = json.loads(f2.read_text())["row"] if f2.exists() else {}
            if r2.get("model_fingerprint") == fp and r2.get("status") != "ok":
                continue  # no twin from cycle 1 (too little data): none to train on
            if (_twin_dir(work) / f"{pid}.twin.nc").exists() and r2.get("model_fingerprint") == fp:
                continue  # saved by the current cycle-2 split
            ft = _result_path(work, "bruchovsky_twin", (pid,))
            if ft.exists() and json.loads(ft.read_text())["row"].get("model_fingerprint") == fp:
                continue
            need.append(("bruchovsky_twin", (pid,)))
            fps[("bruchovsky_twin", (pid,))] = fp
        n_tasks += len(need)
        if need:
            log(f"residual: calibrating {len(need)} missing cycle-1 twin(s)")
            n_run += _execute(work, need, n_workers=n_workers, seed=seed, n_draws=n_draws, deadline=deadline, log=log, fingerprints=fps)
        t_tr = time.perf_counter()
        man = train_bruchovsky_residual(work, patients, seed=seed, settings=residual_settings, n_workers=n_workers, log=log)
        res_info["train_wall_s"] = round(time.perf_counter() - t_tr, 1)
        rkeys = [key for key in bkeys if not residual_cycles or key[1] in set(residual_cycles)]
        n_tasks += len(rkeys)
        for key in rkeys:
            fps[("bruchovsky_res", key)] = fps[("bruchovsky", key)]
        rtodo = [("bruchovsky_res", key) for key in rkeys if not (_residual_task_done(work, key, man) and _finished(work, "bruchovsky_res", key, fps))]
        log(f"residual: {len(rkeys)} splits, {len(rkeys) - len(rtodo)} already done, {len(rtodo)} to run")
        if deadline is None or time.perf_counter() < deadline:
            n_run += _execute(work, rtodo, n_workers=n_workers, seed=seed, n_draws=n_draws, deadline=deadline, log=log, fingerprints=fps)
        done_keys |= {("bruchovsky_res", _task_name("bruchovsky_res", key)) for key in rkeys}
    # the run record (options, command, timing) for the page
    runs_path = work / "runs.json"
    try:
        runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    except Exception:  # pragma: no cover
        runs = []
    runs.append({"started_utc": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t_start, 1), "command": command,
                 "options": options, "n_tasks": n_tasks, "n_run": n_run, "cpu_count": os.cpu_count(), **res_info})
    atomic_write_text(runs_path, json.dumps(runs, indent=1, default=str))
    # the page covers every data set: this run's selection for what it ran, the finished
    # results already in the work folder for the others (a pdxe-only run keeps the prostate tables)
    kinds = set(datasets) | ({"bruchovsky_res"} if residual and "bruchovsky" in datasets else set())
    return summarize(outdir, datasets=ALL_DATASETS, only=_RunSelection(done_keys, kinds), log=log, page=page)


#: the data sets of the validation (``--datasets``)
ALL_DATASETS = ("bruchovsky", "pdxe", "pdxe_combo")


class _RunSelection:
    """``(kind, task name) in sel``: the task belongs to the run's selection ``keys`` when its
    kind was run, and any finished task of a kind the run did not touch."""

    def __init__(self, keys, kinds):
        self.keys, self.kinds = set(keys), set(kinds)

    def __contains__(self, item) -> bool:
        return item[0] not in self.kinds or item in self.keys


# ======================================================================================
# tables, figures, summary
# ======================================================================================
def _hanley_mcneil(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """Approximate 95% interval of a ROC AUC (Hanley & McNeil 1982)."""
    if not (np.isfinite(auc) and n_pos and n_neg):
        return float("nan"), float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = math.sqrt(max(auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2), 0.0) / (n_pos * n_neg))
    return max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)


def _method_stats(df, m: str, prefix: str = "") -> dict:
    if not len(df) or f"{m}_abslogerr" not in df:
        return {}
    return {f"{prefix}{m}_med_abslogerr": float(df[f"{m}_abslogerr"].median()), f"{prefix}{m}_cov90": float(df[f"{m}_in90"].astype(float).mean()),
            f"{prefix}{m}_crps": float(df[f"{m}_crps"].mean())}


def _merge_residual(work: Path, rows, pts, only):
    """Add the ``twinres_*`` columns of the residual-variant splits (those of the current
    residual, :func:`train_bruchovsky_residual`) to the split rows and the points."""
    import pandas as pd

    man_path = _residual_dir(work) / "manifest.json"
    if not man_path.exists():
        return rows, pts, None
    man = json.loads(man_path.read_text())
    keys = set(zip(rows["patient"], rows["cycle"]))
    rr, rp, curves = [], [], {}
    for r in _collect(work, "bruchovsky_res"):
        row = r["row"]
        key = (row.get("patient"), row.get("cycle"))
        if key not in keys or (only is not None and ("bruchovsky_res", _task_name("bruchovsky_res", key)) not in only):
            continue
        g = row.get("twinres_group")
        if row.get("residual_sha256") != (man["groups"][g]["sha256"] if g in man["groups"] else None):
            continue  # computed with an earlier residual
        rr.append({k: v for k, v in row.items() if k not in ("patient", "cycle")} | {"patient": key[0], "cycle": key[1]})
        rp += r.get("points", [])
        if r.get("curve", {}).get("twinres"):
            curves[key] = r["curve"]["twinres"]
    if not rr:
        return rows, pts, man
    man = dict(man, _curves=curves)
    rows = rows.merge(pd.DataFrame(rr), on=["patient", "cycle"], how="left")
    if rp and len(pts):
        q = pd.DataFrame(rp)
        q["_n"] = q.groupby(["patient", "cycle", "time"]).cumcount()
        pts = pts.assign(_n=pts.groupby(["patient", "cycle", "time"]).cumcount())
        pts = pts.merge(q, on=["patient", "cycle", "time", "_n"], how="left").drop(columns="_n")
    return rows, pts, man


def pdx_pooled_stats(common, methods) -> dict:
    """Pooled PDX metrics per method over the rows ``common`` (splits every method scored):
    median |log error| and 90% coverage over all held-out volumes, mean CRPS of the splits,
    mRECIST balanced accuracy; ``n_points_common``."""
    s = {}
    for m in methods:
        col = f"{m}_abslogerr_list"
        if col in common and len(common):
            e = np.concatenate([json.loads(x) for x in common[col]])
            h = np.concatenate([json.loads(x) for x in common[f"{m}_in90_list"]])
            s[f"{m}_med_abslogerr"] = float(np.median(e))
            s[f"{m}_cov90"] = float(np.mean(h))
            s[f"{m}_crps_mean_of_splits"] = float(common[f"{m}_crps"].mean())
            s["n_points_common"] = int(len(e))
            cl = common[common["class_obs"] != "NA"]
            if f"class_{m}" in cl:
                s[f"{m}_balanced_accuracy"] = balanced_accuracy(cl["class_obs"], cl[f"class_{m}"].fillna("NA"))
    return s


def summarize(outdir, *, datasets=("bruchovsky", "pdxe", "pdxe_combo"), only=None, log=print, page="auto") -> dict:
    """Build the CSVs, figures, ``summary.json`` and the page from the per-split files.

    page: path of the Markdown page to write (:func:`write_page`), ``"auto"`` (default:
    ``docs/validation.md`` when ``outdir`` is ``docs/validation``, else ``<outdir>/validation.md``)
    or None (no page)."""
    import pandas as pd

    from twin._atomic import atomic_write_text

    outdir = Path(outdir)
    work = outdir / "_work"
    summary = {"settings": dict(SETTINGS, classes=list(SETTINGS["classes"])), "mrecist_rules": [list(r) for r in MRECIST_RULES], "quick": dict(QUICK)}
    runs_path = work / "runs.json"
    summary["runs"] = json.loads(runs_path.read_text()) if runs_path.exists() else []
    if "bruchovsky" in datasets:
        res = [r for r in _collect(work, "bruchovsky")
               if only is None or ("bruchovsky", _task_name("bruchovsky", (r["row"].get("patient"), r["row"].get("cycle")))) in only]
        if res:
            rows = pd.DataFrame([r["row"] for r in res]).sort_values(["patient", "cycle"])
            pts = pd.DataFrame([q for r in res for q in r.get("points", [])])
            rows, pts, man = _merge_residual(work, rows, pts, only)
            for r in res:  # the residual variant's forecast curve beside the twin's (figure)
                c = (man or {}).get("_curves", {}).get((r["row"].get("patient"), r["row"].get("cycle")))
                if c:
                    r.setdefault("curve", {})["twinres"] = c
            atomic_write_text(outdir / "bruchovsky.csv", rows.to_csv(index=False))
            if len(pts):
                atomic_write_text(outdir / "bruchovsky_points.csv", pts.to_csv(index=False))
            s = {"n_patients": int(rows["patient"].nunique()), "n_splits": int(len(rows)), "n_points": int(len(pts)),
                 "n_twin_failed": int((rows["status"] != "ok").sum()), "cycles": sorted(int(c) for c in rows["cycle"].unique())}
            both = pts.dropna(subset=[c for c in ("twin_abslogerr", "lv_abslogerr", "lvcf_abslogerr") if c in pts]) if len(pts) else pts
            s["n_points_common"] = int(len(both))
            for m in ("twin", "lv", "lvcf"):
                s.update(_method_stats(both, m))
            if len(both) and "twin_pred" in both:
                lr = np.log(both["twin_pred"] / both["obs"])
                s["twin_frac_overpredicted"] = float((lr > 0).mean())
                s["twin_median_logratio"] = float(lr.median())
                if "lv_pred" in both:
                    lr = np.log(both["lv_pred"] / both["obs"])
                    s["lv_frac_overpredicted"] = float((lr > 0).mean())
                    s["lv_median_logratio"] = float(lr.median())
            ok_rows = rows[rows["status"] == "ok"]
            if "twin_fit_cov90" in ok_rows and len(ok_rows):
                s["twin_fit_cov90_median"] = float(pd.to_numeric(ok_rows["twin_fit_cov90"], errors="coerce").median())
                s["twin_diag_passed_frac"] = float(ok_rows["twin_diag_passed"].astype(float).mean())
            c2 = rows[rows["cycle"] == 2]
            thr = SETTINGS["resistant_threshold"]
            if "p_resistant_end" in c2:
                ok = c2.dropna(subset=["p_resistant_end"])
                y = ok["relapse"].astype(bool)
                s["auc_n"] = int(len(ok))
                s["auc_n_relapse"] = int(y.sum())
                s["auc_twin"] = roc_auc(ok["p_resistant_end"], y)
                s["auc_twin_ci95"] = list(_hanley_mcneil(s["auc_twin"], int(y.sum()), int((~y).sum())))
                s["auc_twin_frac_median"] = roc_auc(ok["frac_resistant_end_median"], y)
                hi = ok["p_resistant_end"] > thr
                s["twin_n_p_resistant_high"] = int(hi.sum())
                s["twin_sensitivity"] = float(hi[y].mean()) if y.any() else float("nan")
                s["twin_specificity"] = float((~hi[~y]).mean()) if (~y).any() else float("nan")
            if "lv_frac_resistant_end" in c2:
                ok = c2.dropna(subset=["lv_frac_resistant_end"])
                s["auc_lv"] = roc_auc(ok["lv_frac_resistant_end"], ok["relapse"])
            base = [s.get(f"{m}_med_abslogerr", np.nan) for m in ("lv", "lvcf")]
            if "twin_med_abslogerr" in s and np.isfinite(np.nanmin(base)):
                s["best_baseline"] = ("lv", "lvcf")[int(np.nanargmin(base))]
                s["err_ratio"] = s["twin_med_abslogerr"] / float(np.nanmin(base))
            for c in ("calibrate_s", "forecast_s", "wall_s"):
                if c in rows:
                    v = pd.to_numeric(rows[c], errors="coerce").dropna()
                    if len(v):
                        s[f"median_{c}"], s[f"min_{c}"], s[f"max_{c}"], s[f"sum_{c}"] = float(v.median()), float(v.min()), float(v.max()), float(v.sum())
            # data handling
            rem = rows[rows["drugs_removed"].fillna("").astype(str) != ""] if "drugs_removed" in rows else rows.iloc[:0]
            s["n_splits_drugs_removed"] = int(len(rem))
            s["n_patients_drugs_removed"] = int(rem["patient"].nunique())
            dd = {}
            for pid, g in rem.groupby("patient"):
                for dname in str(g["drugs_removed"].iloc[0]).split("|"):
                    dd[dname] = dd.get(dname, 0) + 1
            s["drugs_removed_patients"] = dict(sorted(dd.items()))
            s["n_test_censored"] = int(pd.to_numeric(rows.get("n_test_censored", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
            try:
                from twin.datasets import load_bruchovsky

                allp = load_bruchovsky()
                s["n_patients_bundle"] = int(len(allp))
                s["patients_without_phases"] = sorted(p.id for p in allp if not len(p.phases))
            except Exception:  # pragma: no cover
                pass
            # the residual variant
            if "twinres_abslogerr" in pts:
                sub = both.dropna(subset=["twinres_abslogerr"]) if "twinres_abslogerr" in both else both.iloc[:0]
                r = {"n_points": int(len(sub)), "n_splits": int(rows["twinres_status"].notna().sum()),
                     "n_failed": int((rows["twinres_status"].fillna("ok") != "ok").sum()),
                     "cycles": sorted(int(c) for c in rows.loc[rows["twinres_status"].notna(), "cycle"].unique())}
                for m in ("twinres", "twin", "lv", "lvcf"):
                    r.update(_method_stats(sub, m))
                if len(sub) and "twinres_pred" in sub:
                    r["twinres_frac_overpredicted"] = float((sub["twinres_pred"] > sub["obs"]).mean())
                if "twinres_p_resistant_end" in c2:
                    ok = c2.dropna(subset=["twinres_p_resistant_end"])
                    r["auc_n"] = int(len(ok))
                    r["auc_twinres"] = roc_auc(ok["twinres_p_resistant_end"], ok["relapse"].astype(bool))
                both_t = rows.dropna(subset=[c for c in ("calibrate_s", "twinres_calibrate_s") if c in rows])
                if len(both_t) and "twinres_calibrate_s" in both_t:
                    for c in ("calibrate_s", "forecast_s"):
                        a, b = pd.to_numeric(both_t[c], errors="coerce"), pd.to_numeric(both_t[f"twinres_{c}"], errors="coerce")
                        r[f"median_{c}_without"], r[f"median_{c}_with"] = float(a.median()), float(b.median())
                        r[f"median_{c}_ratio"] = float((b / a).median())
                    r["median_wall_s_with"] = float(pd.to_numeric(both_t["twinres_wall_s"], errors="coerce").median())
                    r["n_splits_timed"] = int(len(both_t))
                if man:
                    r["groups"] = {g: {k: v for k, v in info.items() if k in ("patients", "n_points", "train_s", "drugs", "sha256", "best_epoch", "loss_best", "step_days")}
                                   | {"n_patients": len(info["patients"]), "loss_first": info["loss_history"][0], "loss_last": info["loss_history"][-1],
                                      "epochs": len(info["loss_history"]) - 1}
                                   for g, info in man["groups"].items()}
                    r["settings"] = man["settings"]
                    r["patients_without_residual"] = sorted(set(rows.loc[rows["twinres_status"] == "no_residual", "patient"]))
                s["residual"] = r
            summary["bruchovsky"] = s
            try:
                _figure_bruchovsky(outdir, res, rows, pts)
            except Exception as e:  # pragma: no cover
                log(f"figure bruchovsky failed: {e}")
    if "pdxe" in datasets:
        res = [r for r in _collect(work, "pdxe")
               if only is None or ("pdxe", _task_name("pdxe", (r["row"].get("pdx"), r["row"].get("held_out")))) in only]
        if res:
            rows = pd.DataFrame([r["row"] for r in res]).sort_values(["pdx", "held_out"])
            atomic_write_text(outdir / "pdxe.csv", rows.to_csv(index=False))
            s = {"n_pdx": int(rows["pdx"].nunique()), "n_splits": int(len(rows)), "n_twin_failed": int((rows["status"] != "ok").sum())}
            common = rows.dropna(subset=[c for c in ("twin_abslogerr_list", "pop_abslogerr_list", "untr_abslogerr_list") if c in rows])
            s["n_splits_common"] = int(len(common))
            s.update(pdx_pooled_stats(common, ("twin", "pop", "untr")))
            base = [s.get(f"{m}_med_abslogerr", np.nan) for m in ("pop", "untr")]
            if "twin_med_abslogerr" in s and np.isfinite(np.nanmin(base)):
                s["best_baseline"] = ("pop", "untr")[int(np.nanargmin(base))]
                s["err_ratio"] = s["twin_med_abslogerr"] / float(np.nanmin(base))
            s["class_counts_obs"] = rows["class_obs"].value_counts().to_dict()
            for m in ("twin", "pop", "untr"):
                if f"class_{m}" in rows:
                    s[f"class_counts_{m}"] = rows[f"class_{m}"].fillna("NA").value_counts().to_dict()
            s["n_tissues"] = int(rows["tissue"].nunique()) if "tissue" in rows else 0
            s["pdx_per_tissue"] = rows.groupby("tissue")["pdx"].nunique().to_dict() if "tissue" in rows else {}
            s["n_zero_volumes"] = int(pd.to_numeric(rows.get("n_zero_volumes", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
            try:
                s["n_pdx_eligible"] = int(len({t[0] for t in pdxe_tasks(None)}))
            except Exception:  # pragma: no cover
                pass
            for c in ("calibrate_s", "forecast_s", "wall_s"):
                if c in rows:
                    v = pd.to_numeric(rows[c], errors="coerce").dropna()
                    if len(v):
                        s[f"median_{c}"], s[f"min_{c}"], s[f"max_{c}"], s[f"sum_{c}"] = float(v.median()), float(v.min()), float(v.max()), float(v.sum())
            summary["pdxe"] = s
            try:
                _figure_pdxe(outdir, res, rows)
            except Exception as e:  # pragma: no cover
                log(f"figure pdxe failed: {e}")
    if "pdxe_combo" in datasets:
        from .validation_combo import combo_summary

        res = [r for r in _collect(work, "pdxe_combo") if only is None or ("pdxe_combo", _task_name("pdxe_combo", (r["row"].get("pdx"),))) in only]
        if res:
            c = combo_summary(outdir, res, log=log)
            if c:
                summary["pdxe_combo"] = c
    summary["bench_line"] = bench_line(summary)
    atomic_write_text(outdir / "summary.json", json.dumps(summary, indent=2, default=float))
    log(summary["bench_line"])
    if page == "auto":
        page = _default_page(outdir)
    if page is not None:
        write_page(outdir, page, log=log)
    return summary


def bench_line(summary: dict) -> str:
    """The page's last line (the mechanistic twin, as the issue defines the goals)."""
    b, p = summary.get("bruchovsky", {}), summary.get("pdxe", {})

    def f(x):
        return "nan" if x is None or not np.isfinite(x) else f"{x:.3f}"

    return (f"BENCH validation bruchovsky_err_ratio={f(b.get('err_ratio'))} bruchovsky_cov90={f(b.get('twin_cov90'))} "
            f"bruchovsky_auc={f(b.get('auc_twin'))} pdxe_err_ratio={f(p.get('err_ratio'))} pdxe_cov90={f(p.get('twin_cov90'))}")


def _default_page(outdir) -> Path:
    outdir = Path(outdir).resolve()
    repo_docs = Path(__file__).resolve().parents[1] / "docs"
    if outdir == repo_docs / "validation":
        return repo_docs / "validation.md"
    return outdir / "validation.md"


def _figure_bruchovsky(outdir: Path, res, rows, pts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    # (a) an example forecast: the cycle-2 split with the most test points and a twin curve
    ex = [r for r in res if r.get("curve", {}).get("twin") and r["row"].get("cycle") == 2 and r["row"].get("n_test", 0) > 0]
    ax = axes[0]
    if ex:
        r = max(ex, key=lambda r: (r["row"].get("relapse", False), r["row"]["n_test"]))
        for name, col in (("twin", "C0"), ("twinres", "C3"), ("lv", "C1")):
            c = r["curve"].get(name)
            if c:
                ax.fill_between(c["t"], c["q05"], c["q95"], color=col, alpha=0.2 if name != "twinres" else 0.1)
                ax.plot(c["t"], c["q50"], color=col, label={"twin": "twin (median, 90% PI)", "twinres": "twin + neural residual", "lv": "Lotka-Volterra"}[name])
        ax.plot(r["train"]["t"], r["train"]["v"], "k.", label="training PSA")
        ax.plot(r["test"]["t"], r["test"]["v"], "rx", label="held-out PSA")
        if "lvcf_last" in r["row"]:
            ax.axhline(r["row"]["lvcf_last"], color="C2", ls="--", label="LVCF")
        ax.set_yscale("log")
        ax.set_xlabel("day")
        ax.set_ylabel("PSA [ng/mL]")
        ax.set_title(f"{r['row']['patient']}: forecast of cycle 2")
        ax.legend(fontsize=7)
    # (b) |log error| by method (common points)
    ax = axes[1]
    cols = [m for m in ("twin", "lv", "lvcf") if f"{m}_abslogerr" in pts]
    if cols:
        both = pts.dropna(subset=[f"{m}_abslogerr" for m in cols])
        data = [both[f"{m}_abslogerr"] for m in cols]
        labels = [{"twin": "twin", "lv": "Lotka-Volterra", "lvcf": "LVCF"}[m] for m in cols]
        if "twinres_abslogerr" in both and both["twinres_abslogerr"].notna().any():
            data.insert(1, both["twinres_abslogerr"].dropna())
            labels.insert(1, "twin + residual\n(its splits)")
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel("|log(pred/obs)| per held-out PSA")
        ax.set_title(f"forecast error ({len(both)} points)")
    # (c) ROC of the resistance probability
    ax = axes[2]
    c2 = rows[rows["cycle"] == 2]
    for col, lab, cc in (("p_resistant_end", "twin P(resistant > 50%)", "C0"), ("lv_frac_resistant_end", "LV resistant fraction", "C1")):
        if col in c2:
            ok = c2.dropna(subset=[col])
            y = ok["relapse"].astype(bool).to_numpy()
            s = ok[col].to_numpy(float)
            if y.any() and (~y).any():
                th = np.unique(np.concatenate([[np.inf], s, [-np.inf]]))[::-1]
                tpr = [np.mean(s[y] >= x) for x in th]
                fpr = [np.mean(s[~y] >= x) for x in th]
                ax.plot(fpr, tpr, color=cc, label=f"{lab} (AUC {roc_auc(s, y):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("relapse from cycle-1 data")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(outdir / "bruchovsky.png", dpi=110)
    plt.close(fig)


def _figure_pdxe(outdir: Path, res, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ex = [r for r in res if r.get("curve", {}).get("twin")]
    ax = axes[0]
    if ex:
        r = sorted(ex, key=lambda r: (r["row"].get("n_points", 0), r["row"]["pdx"], r["row"]["held_out"]))[len(ex) // 2]  # a median-length arm
        for name, col, lab in (("twin", "C0", "twin"), ("pop", "C1", "drug population mean"), ("untr", "C2", "own untreated + drug effect")):
            c = r["curve"].get(name)
            if c:
                ax.fill_between(c["t"], c["q05"], c["q95"], color=col, alpha=0.15)
                ax.plot(c["t"], c["q50"], color=col, label=lab)
        ax.plot(r["obs"]["t"], r["obs"]["v"], "kx", label="held-out volumes")
        ax.set_yscale("log")
        ax.set_xlabel("day")
        ax.set_ylabel("tumour volume [mm³]")
        ax.set_title(f"{r['row']['pdx']}: held-out arm {r['row']['held_out']}")
        ax.legend(fontsize=7)
    ax = axes[1]
    data, labs = [], []
    for m, lab in (("twin", "twin"), ("pop", "drug pop. mean"), ("untr", "own untreated\n+ drug effect")):
        col = f"{m}_abslogerr_list"
        if col in rows:
            e = [x for s in rows[col].dropna() for x in json.loads(s)]
            if e:
                data.append(e)
                labs.append(lab)
    if data:
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(labs) + 1), labs)
        ax.set_ylabel("|log(pred/obs)| per held-out volume")
        ax.set_title(f"held-out arm error ({len(rows)} splits)")
    fig.tight_layout()
    fig.savefig(outdir / "pdxe.png", dpi=110)
    plt.close(fig)


_LABELS = {"twin": "twin (mechanistic, MAP + Laplace)", "twinres": "twin + neural residual", "lv": "Lotka–Volterra (per patient)",
           "lvcf": "last value carried forward", "pop": "drug population mean curve", "untr": "own untreated + drug mean effect"}


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def results_markdown(outdir="docs/validation", *, bench: bool = True) -> str:
    """Markdown tables of ``<outdir>/summary.json`` and the CSVs (section 3 of the page); the
    BENCH line last unless ``bench=False``."""
    import pandas as pd

    outdir = Path(outdir)
    s = json.loads((outdir / "summary.json").read_text())
    lines = []
    f = _fmt
    lvl = int(round(100 * s["settings"]["level"]))
    b = s.get("bruchovsky")
    if b:
        r = b.get("residual") or {}
        lines += [f"### Bruchovsky / Shaw: {b['n_patients']} patients, {b['n_splits']} splits, {b.get('n_points_common', 0)} held-out PSA values "
                  f"(twin failed on {b['n_twin_failed']} splits)", "",
                  f"| method | points | median abs log error | {lvl}% PI coverage | mean CRPS (log PSA) |", "|---|---|---|---|---|"]
        n = b.get("n_points_common", 0)
        for m in ("twin", "twinres", "lv", "lvcf"):
            src_ = r if m == "twinres" else b
            if m == "twinres" and not r:
                continue
            npts = r.get("n_points", 0) if m == "twinres" else n
            lab = _LABELS[m] + (f" (cycles {', '.join(str(c) for c in r.get('cycles', []))} only)" if m == "twinres" and r.get("cycles") != b.get("cycles") else "")
            lines.append(f"| {lab} | {npts} | {f(src_.get(m + '_med_abslogerr'))} | {f(src_.get(m + '_cov90'))} | {f(src_.get(m + '_crps'))} |")
        lines += ["", f"Relapse from cycle-1 data ({b.get('auc_n', 0)} patients, {b.get('auc_n_relapse', 0)} relapsed): "
                  f"twin P(resistant at end of follow-up) AUC **{f(b.get('auc_twin'))}** (Hanley–McNeil 95% interval "
                  f"{f((b.get('auc_twin_ci95') or [None, None])[0], 2)}–{f((b.get('auc_twin_ci95') or [None, None])[1], 2)}); twin median resistant fraction AUC "
                  f"{f(b.get('auc_twin_frac_median'))}; LV resistant fraction AUC {f(b.get('auc_lv'))}"
                  + (f"; twin + neural residual AUC {f(r.get('auc_twinres'))} ({r.get('auc_n', 0)} patients)" if r and "auc_twinres" in r else "") + ".", ""]
        if r and r.get("n_points"):
            lines += [f"Twin with and without its neural residual, on the {r['n_points']} held-out PSA values of the {r.get('n_splits', 0)} splits "
                      f"the residual variant ran on (cycles {', '.join(str(c) for c in r.get('cycles', []))}; it failed on {r.get('n_failed', 0)}):", "",
                      f"| method | median abs log error | {lvl}% PI coverage | mean CRPS (log PSA) |", "|---|---|---|---|"]
            for m in ("twinres", "twin", "lv", "lvcf"):
                lines.append(f"| {_LABELS[m]} | {f(r.get(m + '_med_abslogerr'))} | {f(r.get(m + '_cov90'))} | {f(r.get(m + '_crps'))} |")
            lines.append("")
        pts = outdir / "bruchovsky_points.csv"
        if pts.exists():
            p = pd.read_csv(pts).dropna(subset=["twin_abslogerr", "lv_abslogerr", "lvcf_abslogerr"])
            has_r = "twinres_abslogerr" in p and p["twinres_abslogerr"].notna().any()
            if len(p):
                hdr = "| cycle k | points | twin |" + (" twin + residual |" if has_r else "") + " LV | LVCF | twin cov90 |" + (" twin + res. cov90 |" if has_r else "") + " LV cov90 | LVCF cov90 |"
                lines += ["By cycle forecast (pooled points; median abs log error, then coverage):", "", hdr, "|" + "---|" * (hdr.count("|") - 1)]
                p["kk"] = p["cycle"].clip(upper=5)
                for k, g in p.groupby("kk"):
                    rr = f" {f(float(g.twinres_abslogerr.median()))} |" if has_r else ""
                    rc = f" {f(float(g.twinres_in90.dropna().astype(float).mean()), 2)} |" if has_r else ""
                    lines.append(f"| {k if k < 5 else '>=5'} | {len(g)} | {g.twin_abslogerr.median():.3f} |{rr} {g.lv_abslogerr.median():.3f} | {g.lvcf_abslogerr.median():.3f} | "
                                 f"{g.twin_in90.mean():.2f} |{rc} {g.lv_in90.mean():.2f} | {g.lvcf_in90.mean():.2f} |")
                lines.append("")
                hdr = "| horizon | points | twin |" + (" twin + residual |" if has_r else "") + " LV | LVCF | twin cov90 |"
                lines += ["By forecast horizon (days after the training cut-off):", "", hdr, "|" + "---|" * (hdr.count("|") - 1)]
                p["hb"] = pd.cut(p["horizon"], _HORIZON_BINS, labels=_HORIZON_LABELS)
                for k, g in p.groupby("hb", observed=True):
                    rr = f" {f(float(g.twinres_abslogerr.median()))} |" if has_r else ""
                    lines.append(f"| {k} | {len(g)} | {g.twin_abslogerr.median():.3f} |{rr} {g.lv_abslogerr.median():.3f} | {g.lvcf_abslogerr.median():.3f} | {g.twin_in90.mean():.2f} |")
                lines.append("")
    pd_ = s.get("pdxe")
    if pd_:
        lines += [f"### PDXE: {pd_['n_pdx']} PDXs, {pd_['n_splits']} held-out arms ({pd_.get('n_points_common', 0)} volumes; twin failed on {pd_['n_twin_failed']} splits)", "",
                  f"| method | median abs log error | {lvl}% PI coverage | CRPS (log volume; mean over splits) | mRECIST balanced accuracy |", "|---|---|---|---|---|"]
        for m in ("twin", "pop", "untr"):
            lines.append(f"| {_LABELS[m]} | {f(pd_.get(m + '_med_abslogerr'))} | {f(pd_.get(m + '_cov90'))} | {f(pd_.get(m + '_crps_mean_of_splits'))} | {f(pd_.get(m + '_balanced_accuracy'))} |")
        cc = pd_.get("class_counts_obs") or {}
        lines += ["", "mRECIST classes (observed, and from each method's median curve): " + "; ".join(
            f"{lab} " + ", ".join(f"{k} {v}" for k, v in sorted((pd_.get(key) or {}).items()))
            for lab, key in (("observed", "class_counts_obs"), ("twin", "class_counts_twin"), ("drug pop. mean", "class_counts_pop"),
                             ("own untreated + effect", "class_counts_untr")) if pd_.get(key)) + "." if cc else "", ""]
        csv = outdir / "pdxe.csv"
        if csv.exists():
            r = pd.read_csv(csv)
            if {"twin_med_abslogerr", "pop_med_abslogerr", "untr_med_abslogerr"} <= set(r):
                lines += ["By held-out drug (median over splits of the split's median abs log error; twin coverage):", "",
                          "| held-out drug | splits | twin | drug pop. mean | own untreated + effect | twin cov90 |", "|---|---|---|---|---|---|"]
                for d, g in r.groupby("held_out"):
                    lines.append(f"| {d} | {len(g)} | {g.twin_med_abslogerr.median():.3f} | {g.pop_med_abslogerr.median():.3f} | "
                                 f"{g.untr_med_abslogerr.median():.3f} | {g.twin_cov90.median():.2f} |")
                lines.append("")
    from .validation_combo import combo_results_markdown

    lines += [combo_results_markdown(s, outdir), ""]
    if bench:
        lines.append(s["bench_line"])
    return "\n".join(lines)


_HORIZON_BINS = [0, 90, 180, 365, 1e9]
_HORIZON_LABELS = ["<= 90 d", "90-180 d", "180-365 d", "> 365 d"]


# ======================================================================================
# the page (docs/validation.md): template + generated parts
# ======================================================================================
TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "validation" / "page_template.md"
#: the issue's goals: (summary section, key, label, kind, bounds)
GOALS = (
    ("bruchovsky", "err_ratio", "Bruchovsky error ratio (twin / best baseline)", "max", 0.7),
    ("bruchovsky", "twin_cov90", "Bruchovsky 90% coverage", "range", (0.85, 0.95)),
    ("bruchovsky", "auc_twin", "Bruchovsky relapse AUC", "min", 0.85),
    ("pdxe", "err_ratio", "PDXE error ratio (twin / best baseline)", "max_strict", 1.0),
    ("pdxe", "twin_cov90", "PDXE 90% coverage", "range", (0.85, 0.95)),
)
_PLACEHOLDER = __import__("re").compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")


def fill_template(text: str, values: dict) -> str:
    """Replace every ``{{name}}`` (``{{a.b}}`` looks up ``values["a"]["b"]``); a name without a
    value raises ``KeyError`` (so no placeholder is ever left on the page)."""
    def look(m):
        v = values
        for part in m.group(1).split("."):
            if not isinstance(v, dict) or part not in v:
                raise KeyError(f"page template: no value for placeholder {m.group(0)}")
            v = v[part]
        return str(v)

    return _PLACEHOLDER.sub(look, text)


def _goal_met(kind, bound, x):
    if x is None or not np.isfinite(x):
        return None
    if kind == "max":
        return x <= bound
    if kind == "max_strict":
        return x < bound
    if kind == "min":
        return x >= bound
    return bound[0] <= x <= bound[1]


def _goal_text(kind, bound):
    if kind == "max":
        return f"<= {bound:g}"
    if kind == "max_strict":
        return f"< {bound:g}"
    if kind == "min":
        return f">= {bound:g}"
    return f"{100 * bound[0]:g}–{100 * bound[1]:g}%"


def _pct(x, nd=1):
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.{nd}f}%"


def _prior_text(dist, par) -> str:
    if dist == "lognormal":
        return f"log-normal, median {math.exp(par['mu']):.3g}, sd(log) {par['sigma']:.3g}"
    if dist == "normal":
        return f"normal({par['mu']:.3g}, {par['sigma']:.3g})"
    if dist == "beta":
        return f"beta({par['alpha']:.3g}, {par['beta']:.3g})"
    return f"{dist}({', '.join(f'{k}={v:.3g}' for k, v in par.items())})"


def model_markdown(patient, model, *, observables, arms=None) -> str:
    """A parameter table of ``model`` for ``patient`` from the model itself: names, units,
    defaults, the priors ``calibrate`` uses (``model.priors_for``), whether calibrate estimates
    the parameter (its default estimated set for these data), the description; then the states."""
    pri = dict(model.priors_for(patient))
    free = None
    try:
        from .calibrate import _setup

        st = _setup(patient, model, free=None, fixed=None, priors=None, arms=arms, observables=observables)
        free, pri = set(st["free"]), st["pri"]
    except Exception:  # pragma: no cover - the model description never blocks the page
        free = set(model.free_parameter_names())
    units, desc, dflt = model.parameter_units, model.describe(), model.default_values()
    lines = ["| parameter | unit | default | prior | estimated | description |", "|---|---|---|---|---|---|"]
    for n in model.parameter_names:
        pr = _prior_text(*pri[n]) if n in pri else "–"
        lines.append(f"| `{n}` | {units.get(n, '')} | {dflt[n]:.3g} | {pr} | {'yes' if n in free else 'no (default)'} | {desc.get(n, '')} |")
    lines += ["", f"States: {', '.join(f'`{s}`' for s in model.state_names)}. Mechanisms: "
              + (", ".join(f"`{m.name}` (blunting {', '.join(m.drugs) or 'no drug'})" for m in model.mechanisms) or "none")
              + f". Growth `{model.growth}`, pathway states {'on' if model.pathway else 'off'}, persisters {'on' if model.persisters else 'off'}."
              + (" Plus the error model: one `sigma_<observable>` per calibrated observable." if True else "")]
    return "\n".join(lines)


def _model_description(summary: dict, outdir: Path) -> str:
    """The models of the run, built by ``default_model`` for the data actually used."""
    import pandas as pd

    from .calibrate import default_model

    out = []
    csv = outdir / "bruchovsky.csv"
    if "bruchovsky" in summary and csv.exists():
        pids = sorted(pd.read_csv(csv)["patient"].unique())
        groups = {}
        for pid in pids:
            d = _bruchovsky_prepare(pid, 2)
            m = default_model(d["patient"])
            groups.setdefault(_model_group(m), []).append((d["training_patient"], m))
        out += ["**The prostate twins** (`default_model` of each patient; one model structure per drug set): "
                + "; ".join(f"drugs {', '.join(f'`{x}`' for x in g.split('+'))}: {len(v)} patients" for g, v in sorted(groups.items(), key=lambda kv: -len(kv[1])))
                + ". Parameters of the largest group (priors and the estimated set for its first patient's cycle-1 data):", ""]
        big = max(groups.values(), key=len)
        out += [model_markdown(big[0][0], big[0][1], observables=["psa"]), ""]
        others = sorted({n for v in groups.values() for _, m in v for n in m.parameter_names} - set(big[0][1].parameter_names))
        if others:
            out += [f"Other groups add: {', '.join(f'`{n}`' for n in others)}.", ""]
    csv = outdir / "pdxe.csv"
    if "pdxe" in summary and csv.exists():
        rows = pd.read_csv(csv)
        from twin.datasets import load_pdxe

        pdx = load_pdxe()
        models = []
        for pid, g in rows.groupby("pdx"):
            arms = ["untreated"] + sorted(set(g["held_out"]))
            models.append((pdx[pid], default_model(pdx[pid], arms=arms), arms, g["train_arms"].iloc[0].split("|")))
        p0, m0, arms0, train0 = models[0]
        out += [f"**The PDX twins** (`default_model(pdx, arms=all)`; {len({m.drugs for _, m, _, _ in models})} distinct drug sets over "
                f"{len(models)} PDXs). Parameters for {p0.id} (arms {', '.join(arms0)}; priors and the estimated set for its first split's training arms):", "",
                model_markdown(p0, m0, observables=["tumor_volume"], arms=train0), ""]
        others = sorted({n for _, m, _, _ in models for n in m.parameter_names} - set(m0.parameter_names))
        if others:
            out += [f"Other PDXs' models add: {', '.join(f'`{n}`' for n in others)}.", ""]
    return "\n".join(out).strip()


def _residual_method(summary: dict) -> str:
    rs = (summary.get("bruchovsky") or {}).get("residual")
    st = rs.get("settings") if rs else {k: list(v) if isinstance(v, tuple) else v for k, v in RESIDUAL_SETTINGS.items()}
    txt = (f"The residual (`twin.residual.NeuralResidual`: a bounded term eps_max tanh(MLP) added to the net growth rate of every clone, "
           f"inputs = log tumour burden and each drug's exposure; hidden widths {tuple(st['hidden'])}, eps_max {st['eps_max']}/day) is trained "
           f"**only on data no split forecasts**: every patient's PSA up to the end of cycle 1 (the training window of the cycle-2 split; "
           f"at most {st.get('max_days')} days from the patient's start, to bound the cost; "
           f"every forecast window lies after it), with the mechanistic parameters fixed at the posterior medians of the mechanistic twin "
           f"calibrated on exactly that window (saved by the cycle-2 splits as `_work/bruchovsky_twins/<patient>.twin.nc`). One residual per "
           f"model structure (drug set) with at least {st['min_group']} patients (a residual's drug inputs must be the model's drugs). "
           f"Training: full-batch Adam, learning rate {st['lr']}, {st['epochs']} epochs, on the mean squared error of log PSA, integrated by RK4 with a "
           f"{st['step_days']}-day step, shortened where the dynamics need it (`fit_psa_residual`; `twin.residual.train_residual` fits "
           f"tumour volume only); the residual's training never sees a forecast window. Then each split it runs on (section 1) is "
           f"re-calibrated with `default_model(patient).with_residual(residual)` (weights held fixed) on the same training data as the "
           f"mechanistic twin and forecast the same way.")
    if not rs:
        return txt + " **This run did not include the residual variant** (no `--residual`)."
    return txt


def _run_description(summary: dict) -> str:
    runs = summary.get("runs") or []
    b, p = summary.get("bruchovsky"), summary.get("pdxe")
    lines = []
    if runs:
        lines += ["Runs that produced the splits of this page (from `_work/runs.json`, oldest first; finished splits of earlier runs are reused):", "",
                  "| started (UTC) | command | options | splits (run / total) | wall |", "|---|---|---|---|---|"]
        for r in runs:
            o = r.get("options", {})
            opts = ", ".join(f"{k}={v}" for k, v in o.items() if v not in (None, False) and k not in ("datasets",)) + f", datasets={'+'.join(o.get('datasets', []))}"
            lines.append(f"| {r.get('started_utc')} | `{r.get('command') or 'run_validation(...)'}` | {opts} | {r.get('n_run')} / {r.get('n_tasks')} | "
                         f"{r.get('wall_s', 0) / 60:.1f} min on {o.get('n_workers')} worker(s), {r.get('cpu_count')} CPU(s) |")
        lines.append("")
    else:
        lines += ["No run record (`_work/runs.json`) was found; the numbers come from the per-split files present.", ""]
    if b:
        lines.append(f"- Bruchovsky / Shaw: {b['n_patients']} patients"
                     + (f" of the {b['n_patients_bundle']} in the bundle" if "n_patients_bundle" in b else "")
                     + f", {b['n_splits']} splits (forecast cycles {', '.join(str(c) for c in b.get('cycles', []))}), {b.get('n_points_common', 0)} held-out PSA values compared; "
                     + f"the twin's calibration failed on {b['n_twin_failed']} splits."
                     + (f" Twin + neural residual: {b['residual']['n_splits']} splits (cycles {', '.join(str(c) for c in b['residual'].get('cycles', []))}), "
                        f"failed on {b['residual']['n_failed']}." if b.get("residual") else " No residual variant in this run."))
    if p:
        lines.append(f"- PDXE: {p['n_pdx']} PDXs" + (f" of the {p['n_pdx_eligible']} eligible" if "n_pdx_eligible" in p else "")
                     + f" ({p.get('n_tissues', 0)} tissues: " + ", ".join(f"{k} {v}" for k, v in sorted(p.get("pdx_per_tissue", {}).items()))
                     + f"), {p['n_splits']} held-out arms, {p.get('n_points_common', 0)} volumes compared; the twin's calibration failed on {p['n_twin_failed']} splits.")
    c = summary.get("pdxe_combo")
    if c:
        lines.append(f"- PDXE combination arms (predicted from the monotherapies): {c['n_pdx']} PDXs"
                     + (f" of the {c['n_pdx_tasks']} eligible" if "n_pdx_tasks" in c else "")
                     + f", {c['n_combos']} combination arms; the twin failed on {c['n_twin_failed']} arms.")
    seeds = sorted({r.get("options", {}).get("seed") for r in runs if r.get("options")})
    if seeds:
        lines.append(f"- Seed(s): {', '.join(str(x) for x in seeds)}; posterior draws per twin: "
                     f"{', '.join(str(x) for x in sorted({r['options'].get('n_draws') for r in runs if r.get('options')}))}.")
    return "\n".join(lines)


def _timings(summary: dict) -> str:
    b, p = summary.get("bruchovsky"), summary.get("pdxe")
    out = []
    cores = sorted({r.get("cpu_count") for r in summary.get("runs", []) if r.get("cpu_count")})
    where = f" (machine with {', '.join(str(c) for c in cores)} CPU core(s), see section 1)" if cores else ""
    if b and "median_wall_s" in b:
        out.append(f"Timings{where}: prostate split median {b['median_wall_s']:.1f} s wall (calibrate median {b.get('median_calibrate_s', float('nan')):.1f} s, "
                   f"range {b.get('min_calibrate_s', float('nan')):.0f}–{b.get('max_calibrate_s', float('nan')):.0f} s; forecast of the posterior draws "
                   f"median {b.get('median_forecast_s', float('nan')):.1f} s; the baselines the rest; {b.get('sum_wall_s', 0) / 3600:.2f} CPU-hours over all splits).")
    r = (b or {}).get("residual") or {}
    if r.get("n_splits_timed"):
        out.append(f"Cost of the neural residual, on the {r['n_splits_timed']} splits with both: calibration median {r['median_calibrate_s_without']:.1f} s without, "
                   f"{r['median_calibrate_s_with']:.1f} s with (median ratio {r['median_calibrate_s_ratio']:.2f}); forecast {r['median_forecast_s_without']:.1f} s "
                   f"vs {r['median_forecast_s_with']:.1f} s (ratio {r['median_forecast_s_ratio']:.2f}); residual split median {r['median_wall_s_with']:.1f} s wall "
                   "(the two variants' splits may come from different runs of section 1, under other machine load and code builds, so "
                   "these ratios are indicative only; tests/benchmarks/ measures speed side by side). "
                   + "Training: " + "; ".join(f"group {g} {v['n_patients']} patients, {v['n_points']} PSA values, {v['epochs']} epochs, {v['train_s']:.0f} s "
                                              f"(training MSE of log PSA {v['loss_first']:.3f} without the residual, {v.get('loss_best', v['loss_last']):.3f} with the kept weights of epoch "
                                              f"{v.get('best_epoch', '–')}; RK4 step {_fmt(v.get('step_days'), 2)} d)" for g, v in (r.get("groups") or {}).items()) + ".")
    if p and "median_wall_s" in p:
        out.append(f"PDX split median {p['median_wall_s']:.1f} s wall (calibrate median {p.get('median_calibrate_s', float('nan')):.1f} s, "
                   f"forecast {p.get('median_forecast_s', float('nan')):.1f} s; {p.get('sum_wall_s', 0) / 3600:.2f} CPU-hours over all splits).")
    return "\n\n".join(out)


def _goals_table(summary: dict) -> str:
    names = {"lv": "LV", "lvcf": "LVCF", "pop": "drug population mean", "untr": "own untreated + drug effect"}
    lines = ["| goal | target | result | met? |", "|---|---|---|---|"]
    for ds, key, lab, kind, bound in GOALS:
        s = summary.get(ds) or {}
        x = s.get(key)
        if key == "err_ratio" and x is not None and s.get("best_baseline"):
            res = f"{x:.2f} ({s['twin_med_abslogerr']:.3f} / {s[s['best_baseline'] + '_med_abslogerr']:.3f}, best baseline {names[s['best_baseline']]})"
        elif kind == "range":
            res = _pct(x)
        else:
            res = _fmt(x, 2)
        met = _goal_met(kind, bound, x)
        lines.append(f"| {lab} | {_goal_text(kind, bound)} | {res} | {'–' if met is None else ('yes' if met else '**no**')} |")
    met = [_goal_met(kind, bound, (summary.get(ds) or {}).get(key)) for ds, key, _, kind, bound in GOALS]
    n_met, n_known = sum(bool(m) for m in met), sum(m is not None for m in met)
    lines += ["", f"{n_met} of the {n_known} goals with a result are met" + (" (none)." if n_known and not n_met else ".")
              + " The goals refer to the mechanistic twin (the BENCH line below); the residual variant is compared in section 3 and below."]
    return "\n".join(lines)


def _cov_sentence(name, c, lo=0.85, hi=0.95, lvl=90):
    if c is None or not np.isfinite(c):
        return f"{name}: no coverage."
    where = "below" if c < lo else ("above" if c > hi else "within")
    why = {"below": "its intervals are too narrow", "above": "its intervals are wider than needed", "within": "as calibrated intervals should"}[where]
    return f"{name}'s {lvl}% interval covers {_pct(c)} of the held-out values, {where} the {100 * lo:g}–{100 * hi:g}% goal ({why})."


def _verdict(t: float, e: float) -> str:
    """'wins' / 'loses' / 'ties' (within 2%) for error ``t`` against ``e``."""
    if abs(t / e - 1) < 0.02:
        return "roughly ties"
    return "wins" if t < e else "loses"


def discussion_markdown(summary: dict, outdir) -> str:
    """Sentences computed from the numbers: where the twin wins or loses and against the goals."""
    import pandas as pd

    outdir = Path(outdir)
    out = []
    names = {"lv": "the per-patient Lotka–Volterra fit", "lvcf": "last value carried forward", "pop": "the drug population mean curve",
             "untr": "own untreated + drug effect"}
    b = summary.get("bruchovsky")
    lvl = int(round(100 * summary["settings"]["level"]))
    if b and "twin_med_abslogerr" in b:
        t = b["twin_med_abslogerr"]
        out.append("**Bruchovsky / Shaw.**")
        bb = b.get("best_baseline")
        if bb:
            r = b["err_ratio"]
            verdict = "the twin beats it" if r < 1 else "the twin loses to it"
            goal = "meets" if r <= 0.7 else "misses"
            out.append(f"- The twin's median error is {r:.2f}x the best baseline's ({names[bb]}, {b[bb + '_med_abslogerr']:.3f} vs the twin's {t:.3f}): "
                       f"{verdict}, and the ratio {goal} the goal of <= 0.7.")
        for m in ("lv", "lvcf"):
            if m != bb and f"{m}_med_abslogerr" in b:
                e = b[f"{m}_med_abslogerr"]
                out.append(f"- Against {names[m]} ({e:.3f}) the twin {_verdict(t, e)} (ratio {t / e:.2f}).")
        out.append("- " + _cov_sentence("The twin", b.get("twin_cov90"), lvl=lvl) + " "
                   + " ".join(f"{names[m][0].upper() + names[m][1:]}: {_pct(b.get(m + '_cov90'))}." for m in ("lv", "lvcf") if m + "_cov90" in b))
        if "twin_frac_overpredicted" in b:
            out.append(f"- Direction: the twin's point forecast is above the observed PSA for {_pct(b['twin_frac_overpredicted'], 0)} of held-out values "
                       f"(median factor {math.exp(b['twin_median_logratio']):.2g})"
                       + (f"; the LV baseline's for {_pct(b['lv_frac_overpredicted'], 0)} (median factor {math.exp(b['lv_median_logratio']):.2g})." if "lv_frac_overpredicted" in b else "."))
        if "twin_fit_cov90_median" in b:
            out.append(f"- In-sample the twin fits its training data (median in-sample {lvl}% coverage {_pct(b['twin_fit_cov90_median'], 0)}; "
                       f"{_pct(b.get('twin_diag_passed_frac'), 0)} of fits pass the calibration diagnostics), so the held-out error is "
                       + ("an extrapolation failure rather than a fitting failure." if b['twin_fit_cov90_median'] >= 0.8 else "partly a fitting failure already."))
        if "auc_twin" in b:
            a = b["auc_twin"]
            lo, hi = b.get("auc_twin_ci95", [float("nan")] * 2)
            out.append(f"- Relapse: AUC {a:.2f} (95% interval {lo:.2f}–{hi:.2f}; {b['auc_n_relapse']} relapsed of {b['auc_n']}) "
                       f"{'meets' if a >= 0.85 else 'misses'} the >= 0.85 goal. P(resistant) > {SETTINGS['resistant_threshold']:g} for "
                       f"{b.get('twin_n_p_resistant_high', '–')} of {b['auc_n']} patients: sensitivity {_fmt(b.get('twin_sensitivity'), 2)}, "
                       f"specificity {_fmt(b.get('twin_specificity'), 2)}. The LV resistant fraction gives AUC {_fmt(b.get('auc_lv'), 2)}.")
        pts = outdir / "bruchovsky_points.csv"
        if pts.exists():
            p = pd.read_csv(pts).dropna(subset=["twin_abslogerr", "lv_abslogerr", "lvcf_abslogerr"])
            if len(p):
                best = p[["lv_abslogerr", "lvcf_abslogerr"]].median().idxmin().split("_")[0]
                p["kk"] = p["cycle"].clip(upper=5)
                by = p.groupby("kk")[["twin_abslogerr", f"{best}_abslogerr"]].median()
                win = [("cycle " + (str(k) if k < 5 else ">=5")) for k, r in by.iterrows() if r.iloc[0] < r.iloc[1]]
                out.append(f"- By forecast cycle the twin beats {names[best]} in {len(win)} of {len(by)} cycle groups" + (f" ({', '.join(win)})." if win else "."))
                p["hb"] = pd.cut(p["horizon"], _HORIZON_BINS, labels=_HORIZON_LABELS)
                bh = p.groupby("hb", observed=True)[["twin_abslogerr", f"{best}_abslogerr"]].median()
                win = [str(k) for k, r in bh.iterrows() if r.iloc[0] < r.iloc[1]]
                worst = bh["twin_abslogerr"].idxmax() if len(bh) else None
                out.append(f"- By horizon the twin beats {names[best]} in {len(win)} of {len(bh)} horizon bins" + (f" ({', '.join(win)})" if win else "")
                           + (f"; its error is largest at {worst} ({bh.loc[worst, 'twin_abslogerr']:.3f})." if worst is not None else "."))
        r = b.get("residual")
        if r and r.get("n_points"):
            e1, e0 = r.get("twinres_med_abslogerr"), r.get("twin_med_abslogerr")
            ch = (e1 - e0) / e0 if e0 else float("nan")
            out.append(f"- **Neural residual**: on the {r['n_points']} points of its {r['n_splits']} splits the twin + residual has median error {e1:.3f} "
                       f"against {e0:.3f} without: the residual {'improves' if e1 < e0 else 'worsens'} the twin's error by {abs(100 * ch):.0f}%; "
                       f"coverage {_pct(r.get('twinres_cov90'))} vs {_pct(r.get('twin_cov90'))}; CRPS {_fmt(r.get('twinres_crps'))} vs {_fmt(r.get('twin_crps'))}. "
                       + (f"Against the best baseline on these points ({names[min(('lv', 'lvcf'), key=lambda m: r.get(m + '_med_abslogerr', math.inf))]}, "
                          f"{min(r.get('lv_med_abslogerr', math.inf), r.get('lvcf_med_abslogerr', math.inf)):.3f}) the twin + residual "
                          f"{'wins' if e1 < min(r.get('lv_med_abslogerr', math.inf), r.get('lvcf_med_abslogerr', math.inf)) else 'loses'}."))
            if "auc_twinres" in r:
                out.append(f"- Relapse AUC with the residual: {_fmt(r['auc_twinres'], 2)} ({r.get('auc_n', 0)} patients) vs {_fmt(b.get('auc_twin'), 2)} without.")
            if r.get("cycles") != b.get("cycles"):
                out.append(f"- The residual variant ran on cycles {', '.join(str(c) for c in r.get('cycles', []))} only (of {', '.join(str(c) for c in b.get('cycles', []))}); "
                           "its numbers are not comparable with the all-cycle table.")
            if r.get("patients_without_residual"):
                out.append(f"- {len(r['patients_without_residual'])} patient(s) belong to a drug set with too few patients for a residual and have no residual variant.")
    p = summary.get("pdxe")
    if p and "twin_med_abslogerr" in p:
        t = p["twin_med_abslogerr"]
        out += ["", "**PDXE.**"]
        bb = p.get("best_baseline")
        if bb:
            r = p["err_ratio"]
            out.append(f"- The twin's median error is {r:.2f}x the best baseline's ({names[bb]}, {p[bb + '_med_abslogerr']:.3f} vs {t:.3f}): "
                       f"{'the twin beats it' if r < 1 else 'the twin loses to it'}; the goal (< 1) is {'met' if r < 1 else 'missed'}.")
        for m in ("pop", "untr"):
            if m != bb and f"{m}_med_abslogerr" in p:
                e = p[f"{m}_med_abslogerr"]
                out.append(f"- Against {names[m]} ({e:.3f}) the twin {_verdict(t, e)} (ratio {t / e:.2f}).")
        out.append("- " + _cov_sentence("The twin", p.get("twin_cov90"), lvl=lvl) + " "
                   + " ".join(f"{names[m][0].upper() + names[m][1:]}: {_pct(p.get(m + '_cov90'))}." for m in ("pop", "untr") if m + "_cov90" in p))
        k = len([c for c in (p.get("class_counts_obs") or {}) if c != "NA"])
        if "twin_balanced_accuracy" in p and k:
            out.append(f"- mRECIST balanced accuracy: twin {p['twin_balanced_accuracy']:.2f}, drug population mean {_fmt(p.get('pop_balanced_accuracy'), 2)}, "
                       f"own untreated + effect {_fmt(p.get('untr_balanced_accuracy'), 2)}; chance for the {k} observed classes is {1 / k:.2f}.")
        csv = outdir / "pdxe.csv"
        if csv.exists():
            rows = pd.read_csv(csv)
            if {"twin_med_abslogerr", "pop_med_abslogerr", "untr_med_abslogerr"} <= set(rows):
                grp = rows.groupby("held_out")
                g = grp[["twin_med_abslogerr", "pop_med_abslogerr", "untr_med_abslogerr"]].median()
                g["n"] = grp.size()
                g["best"] = g[["pop_med_abslogerr", "untr_med_abslogerr"]].min(axis=1)
                g["ratio"] = g["twin_med_abslogerr"] / g["best"]
                good = [d for d, r in g.iterrows() if r["ratio"] <= 1.1]
                out.append(f"- By held-out drug the twin is within 10% of (or better than) the best baseline for {len(good)} of {len(g)} drugs"
                           + (f" ({', '.join(good)})" if good else "") + ".")
                big = g[g["n"] >= 3]  # the largest gap among drugs with >= 3 held-out arms (one arm is an anecdote)
                if len(big):
                    wd = big["ratio"].idxmax()
                    sub = rows[rows["held_out"] == wd]
                    shrink = int(sub["class_twin"].isin(["PR", "CR"]).sum()) if "class_twin" in sub else 0
                    obs = int(sub["class_obs"].isin(["PR", "CR"]).sum())
                    out.append(f"- The largest gap among drugs with at least 3 held-out arms is {wd} ({int(g.loc[wd, 'n'])} arms; twin {g.loc[wd, 'twin_med_abslogerr']:.3f} vs {g.loc[wd, 'best']:.3f}, {g.loc[wd, 'ratio']:.1f}x): "
                               f"the twin predicts PR/CR in {shrink} of its {len(sub)} arms, PR/CR was observed in {obs}.")
    from .validation_combo import combo_discussion_markdown

    out += ["", combo_discussion_markdown(summary)]
    return "\n".join(out)


def _data_notes(summary: dict) -> str:
    b, p = summary.get("bruchovsky"), summary.get("pdxe")
    out = []
    if b:
        dr = b.get("drugs_removed_patients") or {}
        if dr:
            out.append(f"- {b.get('n_patients_drugs_removed', 0)} Bruchovsky patients took antiandrogens without catalogue PK ("
                       + ", ".join(f"{d} {n} patient{'s' if n > 1 else ''}" for d, n in dr.items())
                       + f"): those doses are removed from the twin's history (`drugs_removed` column, {b.get('n_splits_drugs_removed', 0)} splits); "
                       "otherwise `calibrate()` rejects the patient. The LV and LVCF baselines never use doses.")
        if b.get("patients_without_phases"):
            out.append(f"- Patients without on/off phases are not used: {', '.join(b['patients_without_phases'])}.")
        out.append(f"- {b.get('n_test_censored', 0)} censored held-out PSA value(s) are excluded from the error metrics (censored "
                   "in the bundle: values below detection, and PSA written exactly at an assay reporting floor, decision D19); the "
                   "calibration uses them as censored observations.")
    if p:
        out.append(f"- PDXE: {p.get('n_zero_volumes', 0)} held-out zero volumes are excluded from the error metrics but kept for mRECIST. Arms whose "
                   "drug has catalogue PK and potency but no standard dose are not used (PDXE records no amounts, and `calibrate()` rejects a PDX "
                   "whose model has such an arm).")
    return "\n".join(out)


def page_values(outdir, page_path) -> dict:
    """Every placeholder value of the page template, from ``<outdir>/summary.json`` and the CSVs."""
    outdir = Path(outdir)
    s = json.loads((outdir / "summary.json").read_text())
    rel = os.path.relpath(outdir.resolve(), Path(page_path).resolve().parent)
    fig_dir = "" if rel == "." else rel.replace(os.sep, "/") + "/"
    try:
        model_desc = _model_description(s, outdir)
    except Exception as e:  # pragma: no cover - never block the page on the description
        model_desc = f"(model description unavailable: {type(e).__name__}: {e})"
    rules = "; ".join(f"{c}: BR < {br:g} and BAR < {bar:g}" for c, br, bar in s.get("mrecist_rules", MRECIST_RULES))
    return {
        "settings": {k: (", ".join(v) if isinstance(v, list) else v) for k, v in s["settings"].items()},
        "level_pct": f"{100 * s['settings']['level']:g}",
        "resistant_pct": f"{100 * s['settings']['resistant_threshold']:g}",
        "quick_patients": s.get("quick", QUICK)["patients"], "quick_pdx": s.get("quick", QUICK)["pdx"],
        "mrecist_rules": rules, "fig_dir": fig_dir,
        "figures": "\n\n".join(f"![{cap}]({fig_dir}{name}.png)" for name, cap in (
            ("bruchovsky", "Bruchovsky: an example cycle-2 forecast, error by method, relapse ROC"),
            ("pdxe", "PDXE: an example held-out arm (median-length arm), error by method"),
            ("pdxe_combo", "PDXE combination arms: an example (median-length arm) forecast from the monotherapies, error by method")) if name in s and (outdir / f"{name}.png").exists()),
        "run_description": _run_description(s), "model_description": model_desc, "residual_method": _residual_method(s),
        "results": results_markdown(outdir, bench=False), "timings": _timings(s), "goals_table": _goals_table(s),
        "discussion": discussion_markdown(s, outdir), "data_notes": _data_notes(s), "bench": s["bench_line"],
    }


def write_page(outdir, page_path, *, template=None, log=print) -> Path:
    """Write the validation page ``page_path`` atomically from the template
    (``docs/validation/page_template.md``) and the run's files; its last line is the BENCH line."""
    from twin._atomic import atomic_write_text

    text = Path(template or TEMPLATE).read_text(encoding="utf-8")
    page = fill_template(text, page_values(outdir, page_path)).rstrip() + "\n"
    assert page.rstrip().splitlines()[-1].startswith("BENCH validation "), "the page must end with the BENCH line"
    atomic_write_text(page_path, page)
    log(f"wrote {page_path}")
    return Path(page_path)
