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

:func:`run_validation` runs every split as one Dask task (one process per worker), writes one
JSON file per split under ``<outdir>/_work/`` (atomic; existing files are skipped, so a run is
resumable), then the CSV tables, the figures and the summary.
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
]

#: the fixed settings (decided before looking at results; echoed in docs/validation.md)
SETTINGS = {
    "method": "map",  # MAP + Laplace (calibrate(method="map"))
    "draws": 200,  # posterior draws per twin used for forecasts
    "level": 0.90,  # predictive interval
    "lv_starts": 4,  # multi-start least squares for the Lotka-Volterra baseline
    "pdx_max_treated": 3,  # single-agent arms per PDX (most frequent in the cohort first)
    "mrecist_min_day": 10.0,
    "classes": ("CR", "PR", "SD", "PD"),
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
    if br < -95 and bar < -40:
        return "CR"
    if br < -50 and bar < -20:
        return "PR"
    if br < 35 and bar < 30:
        return "SD"
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
        Y, _, info = comp.solve(theta, y0, sched, sensitivities=False, rtol=1e-6, atol=1e-9)
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
    return {"theta": best.x, "sd": max(sd, 0.05), "t0": t0, "ok": True}


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


def bruchovsky_split(pid: str, k: int, *, seed: int = 0, n_draws: int = 200, keep_curve: bool = True) -> dict:
    """One split: calibrate on PSA up to the end of cycle k-1, forecast cycle k. Returns a JSON-able
    dict with ``row`` (summary) and ``points`` (one dict per forecast point)."""
    import dataclasses

    _quiet()
    from twin.datasets import load_bruchovsky
    from twin.regimen import Regimen

    from .calibrate import calibrate, default_model

    t_start = time.perf_counter()
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
    row = {"patient": pid, "cycle": int(k), "cohort": p.labels.get("cohort"), "relapse": bool(p.labels.get("relapse", False)),
           "t_split": t_split, "t_end": t_end, "t_follow": t_follow, "n_train": int(len(train)), "n_test": int(len(test)),
           "n_test_censored": int(test["below_lloq"].astype(bool).sum()), "drugs_removed": "|".join(no_pk), "status": "ok", "error": ""}
    points = []
    curve = {}
    trn_ok = train[~train["below_lloq"].astype(bool) & (train["value"] > 0)]
    tst = test[~test["below_lloq"].astype(bool) & (test["value"] > 0)]
    rng = np.random.default_rng(seed + 7919 * k)
    tgrid = np.unique(np.concatenate([tst["time"].to_numpy(float), np.linspace(t_split, t_end, 60) if t_end > t_split else [], [t_follow]]))
    # ---------------- twin
    tw_pred = None
    try:
        if len(trn_ok) < 3:
            raise ValueError(f"only {len(trn_ok)} uncensored PSA values before day {t_split:g}")
        meas = p.measurements[p.measurements["time"] <= t_split].reset_index(drop=True)
        ptr = dataclasses.replace(p, measurements=meas)
        model = default_model(p)
        t_cal = time.perf_counter()
        tw = calibrate(ptr, model, method=SETTINGS["method"], draws=n_draws, chains=1, seed=seed, progress=False, observables=["psa"])
        row["calibrate_s"] = round(time.perf_counter() - t_cal, 2)
        d = tw.diagnostics
        row["twin_fit_cov90"] = d.get("ppc_coverage90")
        row["twin_diag_passed"] = bool(d.get("passed"))
        row["twin_diag_messages"] = " | ".join(d.get("messages", []))
        hist = p.history.table
        reg = Regimen(hist[hist["arm"] == "main"].assign(arm="main"))
        t0 = float(min(train["time"].min(), reg.table["time"].min() if len(reg) else math.inf))
        t_f = time.perf_counter()
        fc = forecast_draws(tw, reg, t0, tgrid, n_draws=n_draws, seed=seed)
        row["forecast_s"] = round(time.perf_counter() - t_f, 2)
        row["twin_solver_failures"] = fc["failures"]
        row["p_resistant_end"] = float(np.mean(fc["frac_resistant"][:, -1] > 0.5))
        row["frac_resistant_end_median"] = float(np.median(fc["frac_resistant"][:, -1]))
        ypred = _predictive(fc["psa"], fc["sigma"]["psa"], rng)
        tw_pred = ypred
        if keep_curve:
            q = np.quantile(ypred, [0.05, 0.5, 0.95], axis=0)
            curve["twin"] = {"t": tgrid.tolist(), "q05": q[0].tolist(), "q50": q[1].tolist(), "q95": q[2].tolist()}
    except Exception as e:  # recorded, the split goes on with the baselines
        row["status"] = "twin_failed"
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    # ---------------- baselines
    lv_pred = None
    try:
        if len(trn_ok) < 3:
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
            med = float(np.median(S))
            pt[f"{name}_pred"] = med
            pt[f"{name}_abslogerr"] = float(abs_log_error(med, r["value"]))
            pt[f"{name}_in90"] = bool(interval_hits(S, r["value"], SETTINGS["level"]))
            pt[f"{name}_crps"] = float(crps_log(S, r["value"]))
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
        if ds and all(_dosable(d) for d in ds) and len(_vol_curve(p, a)[0]) >= 3:
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


_DAYS = np.arange(0, 181, dtype=float)


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
    from twin.observation import CELL_VOLUME_MM3
    from twin.regimen import Regimen

    from .calibrate import calibrate, default_model

    t_start = time.perf_counter()
    p = load_pdxe()[pid]
    arms = list(arms)
    train_arms = [a for a in arms if a != held]
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
        model = default_model(p, arms=arms)
        t_cal = time.perf_counter()
        tw = calibrate(p, model, method=SETTINGS["method"], draws=n_draws, chains=1, seed=seed, progress=False,
                       arms=train_arms, observables=["tumor_volume"])
        row["calibrate_s"] = round(time.perf_counter() - t_cal, 2)
        d = tw.diagnostics
        row["twin_fit_cov90"] = d.get("ppc_coverage90")
        row["twin_diag_passed"] = bool(d.get("passed"))
        row["twin_diag_messages"] = " | ".join(d.get("messages", []))
        row["twin_dropped_arms"] = "|".join(a for a in train_arms if a not in set(tw.idata.posterior.coords["arm"].values.tolist())) if "arm" in tw.idata.posterior.coords else ""
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
    if v[0] > 0:
        mu, sd = _pop_mean(pop.get(held, {}), pid)
        if mu is not None:
            dd = np.clip(np.round(days).astype(int), 0, len(_DAYS) - 1)
            s = np.where(np.isfinite(sd[dd]) & (sd[dd] > 0), sd[dd], 0.5)
            s[0] = 1e-6
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
                s = np.where(np.isfinite(dsd[dd]) & (dsd[dd] > 0), dsd[dd], 0.5)
                s[0] = 1e-6
                preds["untr"] = v[0] * np.exp((own + dmu[dd])[None, :] + s[None, :] * rng.standard_normal((n_draws, len(t))))
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
    if kind == "bruchovsky":
        return f"{key[0]}_k{key[1]}"
    return f"{key[0]}__{key[1]}".replace("/", "_")


def _run_task(kind: str, key: tuple, seed: int, n_draws: int) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if kind == "bruchovsky":
            return bruchovsky_split(key[0], key[1], seed=seed, n_draws=n_draws)
        return pdxe_split(key[0], key[1], key[2], seed=seed, n_draws=n_draws)
    except Exception as e:  # never lose a task: a failure row
        row = {"patient" if kind == "bruchovsky" else "pdx": key[0], "status": "failed", "error": f"{type(e).__name__}: {e}"[:500],
               "traceback": traceback.format_exc()[-2000:]}
        if kind == "bruchovsky":
            row["cycle"] = key[1]
        else:
            row["held_out"] = key[1]
        return {"row": row, "points": [], "curve": {}}


def _collect(work: Path, kind: str) -> list[dict]:
    out = []
    for f in sorted((work / kind).glob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except Exception:  # pragma: no cover - a torn file cannot exist (atomic writes)
            continue
    return out


def run_validation(outdir="docs/validation", *, datasets=("bruchovsky", "pdxe"), quick=False, n_workers=2, seed=0,
                   max_patients=None, max_pdx=None, time_budget_s=None, n_draws=None, log=print) -> dict:
    """Run the held-out validation and write ``<outdir>/{bruchovsky,pdxe}.csv``, the point
    tables, the figures and ``summary.json``; return the summary dict.

    quick: 8 prostate patients (cycle-2 split only) and 5 PDXs. max_patients / max_pdx: caps.
    time_budget_s: stop submitting new splits after this many seconds (finished ones are kept;
    a later call resumes). Existing per-split files under ``<outdir>/_work`` are reused."""
    from twin._atomic import atomic_write_text

    outdir = Path(outdir)
    work = outdir / "_work"
    n_draws = int(n_draws or SETTINGS["draws"])
    tasks = []
    if "bruchovsky" in datasets:
        bt = bruchovsky_tasks(max_patients if max_patients is not None else (8 if quick else None))
        if quick:
            bt = [x for x in bt if x[1] == 2]
        # cycle-2 splits first (they also give the AUC), then later cycles
        bt.sort(key=lambda x: (x[1], x[0]))
        tasks += [("bruchovsky", x) for x in bt]
    if "pdxe" in datasets:
        pt = pdxe_tasks(max_pdx if max_pdx is not None else (5 if quick else None))
        tasks += [("pdxe", x) for x in pt]
    if "bruchovsky" in datasets and "pdxe" in datasets and not quick:
        # interleave: cycle-2 prostate splits, then PDX, then later cycles
        b2 = [t for t in tasks if t[0] == "bruchovsky" and t[1][1] == 2]
        bl = [t for t in tasks if t[0] == "bruchovsky" and t[1][1] > 2]
        pd_ = [t for t in tasks if t[0] == "pdxe"]
        tasks = b2 + pd_ + bl
    todo = [(k, key) for k, key in tasks if not (work / k / f"{_task_name(k, key)}.json").exists()]
    log(f"validation: {len(tasks)} splits, {len(tasks) - len(todo)} already done, {len(todo)} to run on {n_workers} worker(s)")
    for k in ("bruchovsky", "pdxe"):
        (work / k).mkdir(parents=True, exist_ok=True)
    if not (work / ".gitignore").exists():  # the per-split cache is never committed
        atomic_write_text(work / ".gitignore", "*\n")
    t_start = time.perf_counter()
    if todo:
        if n_workers <= 1:
            for kind, key in todo:
                if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                    log("validation: time budget reached; stopping")
                    break
                res = _run_task(kind, key, seed, n_draws)
                atomic_write_text(work / kind / f"{_task_name(kind, key)}.json", json.dumps(res, default=float))
                log(f"  done {kind} {key[:2]} in {res['row'].get('wall_s', '?')} s ({res['row'].get('status')})")
        else:
            from distributed import Client, LocalCluster, as_completed

            with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
                futs = {}
                queue = list(todo)
                ac = as_completed()

                def submit_one():
                    kind, key = queue.pop(0)
                    f = client.submit(_run_task, kind, key, seed, n_draws, key=f"{kind}-{_task_name(kind, key)}-{seed}", pure=False)
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
                    atomic_write_text(work / kind / f"{_task_name(kind, key)}.json", json.dumps(res, default=float))
                    log(f"  done {kind} {key[:2]} in {res['row'].get('wall_s', '?')} s ({res['row'].get('status')}) [{time.perf_counter() - t_start:.0f} s]")
                    over = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
                    if queue and not over:
                        submit_one()
                    elif over and queue:
                        log(f"validation: time budget reached; {len(queue)} split(s) not started")
                        queue.clear()
    done_keys = {(k, _task_name(k, key)) for k, key in tasks}
    return summarize(outdir, datasets=datasets, only=done_keys, log=log)


# ======================================================================================
# tables, figures, summary
# ======================================================================================
def summarize(outdir, *, datasets=("bruchovsky", "pdxe"), only=None, log=print) -> dict:
    """Build the CSVs, figures and ``summary.json`` from the per-split files."""
    import pandas as pd

    from twin._atomic import atomic_write_text

    outdir = Path(outdir)
    work = outdir / "_work"
    summary = {"settings": dict(SETTINGS, classes=list(SETTINGS["classes"]))}
    if "bruchovsky" in datasets:
        res = [r for r in _collect(work, "bruchovsky")
               if only is None or ("bruchovsky", _task_name("bruchovsky", (r["row"].get("patient"), r["row"].get("cycle")))) in only]
        if res:
            rows = pd.DataFrame([r["row"] for r in res]).sort_values(["patient", "cycle"])
            pts = pd.DataFrame([q for r in res for q in r.get("points", [])])
            atomic_write_text(outdir / "bruchovsky.csv", rows.to_csv(index=False))
            if len(pts):
                atomic_write_text(outdir / "bruchovsky_points.csv", pts.to_csv(index=False))
            s = {"n_patients": int(rows["patient"].nunique()), "n_splits": int(len(rows)), "n_points": int(len(pts)),
                 "n_twin_failed": int((rows["status"] != "ok").sum())}
            both = pts.dropna(subset=[c for c in ("twin_abslogerr", "lv_abslogerr", "lvcf_abslogerr") if c in pts]) if len(pts) else pts
            s["n_points_common"] = int(len(both))
            for m in ("twin", "lv", "lvcf"):
                if len(both) and f"{m}_abslogerr" in both:
                    s[f"{m}_med_abslogerr"] = float(both[f"{m}_abslogerr"].median())
                    s[f"{m}_cov90"] = float(both[f"{m}_in90"].astype(float).mean())
                    s[f"{m}_crps"] = float(both[f"{m}_crps"].mean())
            c2 = rows[rows["cycle"] == 2]
            if "p_resistant_end" in c2:
                ok = c2.dropna(subset=["p_resistant_end"])
                s["auc_n"] = int(len(ok))
                s["auc_n_relapse"] = int(ok["relapse"].sum())
                s["auc_twin"] = roc_auc(ok["p_resistant_end"], ok["relapse"])
                s["auc_twin_frac_median"] = roc_auc(ok["frac_resistant_end_median"], ok["relapse"])
            if "lv_frac_resistant_end" in c2:
                ok = c2.dropna(subset=["lv_frac_resistant_end"])
                s["auc_lv"] = roc_auc(ok["lv_frac_resistant_end"], ok["relapse"])
            base = [s.get(f"{m}_med_abslogerr", np.nan) for m in ("lv", "lvcf")]
            if "twin_med_abslogerr" in s and np.isfinite(np.nanmin(base)):
                s["best_baseline"] = ("lv", "lvcf")[int(np.nanargmin(base))]
                s["err_ratio"] = s["twin_med_abslogerr"] / float(np.nanmin(base))
            for c in ("calibrate_s", "forecast_s", "wall_s"):
                if c in rows:
                    s[f"median_{c}"] = float(rows[c].median())
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
            for m in ("twin", "pop", "untr"):
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
            base = [s.get(f"{m}_med_abslogerr", np.nan) for m in ("pop", "untr")]
            if "twin_med_abslogerr" in s and np.isfinite(np.nanmin(base)):
                s["best_baseline"] = ("pop", "untr")[int(np.nanargmin(base))]
                s["err_ratio"] = s["twin_med_abslogerr"] / float(np.nanmin(base))
            s["class_counts_obs"] = rows["class_obs"].value_counts().to_dict()
            for c in ("calibrate_s", "forecast_s", "wall_s"):
                if c in rows:
                    s[f"median_{c}"] = float(rows[c].median())
            summary["pdxe"] = s
            try:
                _figure_pdxe(outdir, res, rows)
            except Exception as e:  # pragma: no cover
                log(f"figure pdxe failed: {e}")
    b, p = summary.get("bruchovsky", {}), summary.get("pdxe", {})

    def f(x):
        return "nan" if x is None or not np.isfinite(x) else f"{x:.3f}"

    summary["bench_line"] = (f"BENCH validation bruchovsky_err_ratio={f(b.get('err_ratio'))} bruchovsky_cov90={f(b.get('twin_cov90'))} "
                             f"bruchovsky_auc={f(b.get('auc_twin'))} pdxe_err_ratio={f(p.get('err_ratio'))} pdxe_cov90={f(p.get('twin_cov90'))}")
    atomic_write_text(outdir / "summary.json", json.dumps(summary, indent=2, default=float))
    log(summary["bench_line"])
    return summary


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
        for name, col in (("twin", "C0"), ("lv", "C1")):
            c = r["curve"].get(name)
            if c:
                ax.fill_between(c["t"], c["q05"], c["q95"], color=col, alpha=0.2)
                ax.plot(c["t"], c["q50"], color=col, label={"twin": "twin (median, 90% PI)", "lv": "Lotka-Volterra"}[name])
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
        ax.boxplot([both[f"{m}_abslogerr"] for m in cols], showfliers=False)
        ax.set_xticks(range(1, len(cols) + 1), [{"twin": "twin", "lv": "Lotka-Volterra", "lvcf": "LVCF"}[m] for m in cols])
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


def results_markdown(outdir="docs/validation") -> str:
    """Markdown tables of ``<outdir>/summary.json`` and the CSVs (pasted into docs/validation.md)."""
    import pandas as pd

    outdir = Path(outdir)
    s = json.loads((outdir / "summary.json").read_text())
    lines = []

    def f(x, nd=3):
        return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    b = s.get("bruchovsky")
    if b:
        lines += [f"### Bruchovsky / Shaw: {b['n_patients']} patients, {b['n_splits']} splits, {b.get('n_points_common', 0)} held-out PSA values "
                  f"(twin failed on {b['n_twin_failed']} splits)", "",
                  "| method | median abs log error | 90% PI coverage | mean CRPS (log PSA) |", "|---|---|---|---|"]
        for m, lab in (("twin", "twin (mechanistic, MAP+Laplace)"), ("lv", "Lotka–Volterra (per patient)"), ("lvcf", "last value carried forward")):
            lines.append(f"| {lab} | {f(b.get(m + '_med_abslogerr'))} | {f(b.get(m + '_cov90'))} | {f(b.get(m + '_crps'))} |")
        lines += ["", f"Relapse from cycle-1 data ({b.get('auc_n', 0)} patients, {b.get('auc_n_relapse', 0)} relapsed): "
                  f"twin P(resistant > 50% at end of follow-up) AUC **{f(b.get('auc_twin'))}**; twin median resistant fraction AUC "
                  f"{f(b.get('auc_twin_frac_median'))}; LV resistant fraction AUC {f(b.get('auc_lv'))}.", ""]
        pts = outdir / "bruchovsky_points.csv"
        if pts.exists():
            p = pd.read_csv(pts).dropna(subset=["twin_abslogerr", "lv_abslogerr", "lvcf_abslogerr"])
            if len(p):
                lines += ["By cycle forecast (pooled points):", "", "| cycle k | points | twin | LV | LVCF | twin cov90 | LV cov90 | LVCF cov90 |", "|---|---|---|---|---|---|---|---|"]
                p["kk"] = p["cycle"].clip(upper=5)
                for k, g in p.groupby("kk"):
                    lines.append(f"| {k if k < 5 else '>=5'} | {len(g)} | {g.twin_abslogerr.median():.3f} | {g.lv_abslogerr.median():.3f} | {g.lvcf_abslogerr.median():.3f} | "
                                 f"{g.twin_in90.mean():.2f} | {g.lv_in90.mean():.2f} | {g.lvcf_in90.mean():.2f} |")
                lines.append("")
                lines += ["By forecast horizon (days after the training cut-off):", "", "| horizon | points | twin | LV | LVCF | twin cov90 |", "|---|---|---|---|---|---|"]
                p["hb"] = pd.cut(p["horizon"], [0, 90, 180, 365, 1e9], labels=["<= 90 d", "90-180 d", "180-365 d", "> 365 d"])
                for k, g in p.groupby("hb", observed=True):
                    lines.append(f"| {k} | {len(g)} | {g.twin_abslogerr.median():.3f} | {g.lv_abslogerr.median():.3f} | {g.lvcf_abslogerr.median():.3f} | {g.twin_in90.mean():.2f} |")
                lines.append("")
    pd_ = s.get("pdxe")
    if pd_:
        lines += [f"### PDXE: {pd_['n_pdx']} PDXs, {pd_['n_splits']} held-out arms ({pd_.get('n_points_common', 0)} volumes; twin failed on {pd_['n_twin_failed']} splits)", "",
                  "| method | median abs log error | 90% PI coverage | CRPS (log volume; mean over splits) | mRECIST balanced accuracy |", "|---|---|---|---|---|"]
        for m, lab in (("twin", "twin (mechanistic, MAP+Laplace)"), ("pop", "drug population mean curve"), ("untr", "own untreated + drug mean effect")):
            lines.append(f"| {lab} | {f(pd_.get(m + '_med_abslogerr'))} | {f(pd_.get(m + '_cov90'))} | {f(pd_.get(m + '_crps_mean_of_splits'))} | {f(pd_.get(m + '_balanced_accuracy'))} |")
        lines += ["", f"Observed mRECIST classes: {pd_.get('class_counts_obs')}.", ""]
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
    lines.append(s["bench_line"])
    return "\n".join(lines)
