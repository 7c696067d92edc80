"""Running a scenario: every arm x every posterior (or prior) draw of one twin.

:func:`run_scenario` is the batched what-if engine behind ``twin simulate``::

    twin = prior_twin(patient, model, n_draws=100, seed=1)
    result = run_scenario(twin, Scenario.from_toml("adt.toml"))
    save_result(result, "results/")      # trajectories.nc + outcomes.csv

How the arms are simulated
--------------------------
* **Protocol arms** (a fixed plan) are expanded with the patient's covariates into one
  :class:`twin.Regimen` each, and all protocol arms go through *one* :func:`twin.simulate`
  call (every draw under every protocol regimen).
* **Adaptive arms** (a policy deciding at visits) are integrated visit to visit. At each
  visit the observables of every draw are read from its own trajectory, the policy decides
  per draw (:meth:`scenarios.policy.Policy.decide`), and each draw continues with its own
  action. Drug exposure is analytic PK over *all* past doses (a depot given 3 weeks ago
  still acts), so a draw's future depends on its whole dose history. Draws are therefore
  grouped by identical decision history (the sequence of dose factors, which fixes the
  doses); each group is integrated over the next visit interval from its members' states
  at the previous visit, with its *complete* dose history as the regimen (``simulate``
  counts doses before ``times[0]`` in the PK). This is exact, not an approximation.

  Cost: one ``simulate`` call per (visit interval x distinct history). With ``V`` visits and
  ``D`` draws that is between ``V`` calls (all draws decide alike) and ``V x D`` calls (every
  draw has its own history), each over one visit interval only, so the integrated
  time per draw is the same as for a protocol arm; the overhead is the number of calls.

Known limits: a protocol's ``until progression/resistance then ...`` switch is not
evaluated yet (the plan is expanded up to the switch; ``attrs["notes"]`` says so);
stochastic acquired resistance (``replicates > 1``) is computed for protocol arms only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from twin.errors import InputError

__all__ = ["PriorTwin", "prior_twin", "run_scenario", "save_result", "load_result", "scenario_drugs", "model_for_scenario",
           "TRAJECTORIES_FILE", "OUTCOMES_FILE"]

TRAJECTORIES_FILE = "trajectories.nc"
OUTCOMES_FILE = "outcomes.csv"
_EPS = 1e-9


# -- the twin --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PriorTwin:
    """A twin before calibration: a patient, a model and prior parameter draws.

    Attributes
    ----------
    patient : :class:`twin.Patient`.
    model : :class:`twin.model.TwinModel`.
    draws : parameter name -> array ``(n_draws,)``.
    seed : the seed the draws came from (None: given by hand).
    kind : ``"prior"`` (recorded in the results' attrs).
    """

    patient: Any
    model: Any
    draws: Mapping[str, np.ndarray]
    seed: int | None = None
    kind: str = "prior"

    @property
    def n_draws(self) -> int:
        sizes = [np.size(v) for v in self.draws.values() if np.ndim(v)]
        return int(max(sizes or [1]))


def prior_twin(patient, model, n_draws: int = 100, seed: int = 0) -> PriorTwin:
    """The prior twin of ``patient``: ``model.priors_for(patient)`` (omics-shifted priors)
    sampled ``n_draws`` times with ``seed``. When the patient has a tumour volume, the
    initial size ``N0`` is centred on its first value (log-normal, sigma 0.1), as in
    ``twin demo``."""
    from twin.model import CELL_VOLUME_MM3
    from twin.priors import sample_prior

    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise InputError(f"prior_twin: n_draws must be a whole number >= 1, received {n_draws!r}")
    priors = dict(model.priors_for(patient))
    m = patient.measurements
    if len(m) and "N0" in priors:
        vol = m[(m["observable"] == "tumor_volume") & ~m["below_lloq"].astype(bool)].sort_values("time")
        if len(vol) and float(vol["value"].iloc[0]) > 0:
            priors["N0"] = ("lognormal", {"mu": float(np.log(float(vol["value"].iloc[0]) / CELL_VOLUME_MM3)), "sigma": 0.1})
    draws = sample_prior(priors, int(n_draws), seed=seed)
    return PriorTwin(patient, model, draws, seed=seed)


def _as_twin(spec) -> PriorTwin:
    if isinstance(spec, PriorTwin):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        return PriorTwin(*spec)
    if all(hasattr(spec, a) for a in ("patient", "model", "draws")):
        return PriorTwin(spec.patient, spec.model, spec.draws, seed=getattr(spec, "seed", None), kind=getattr(spec, "kind", "posterior"))
    raise InputError(
        f"run_scenario: expected a twin (prior_twin(patient, model, n_draws, seed)) or a tuple "
        f"(patient, model, parameter draws dict); received {type(spec).__name__}"
    )


# -- drugs and a model for a scenario --------------------------------------------------------
def _protocols(arm):
    return [p for p in (arm.protocol, arm.treat, arm.background) if p is not None]


def scenario_drugs(scenario) -> list[str]:
    """Every drug named by any arm of ``scenario`` (protocols, treat, background, switches)."""
    from .protocol import _drugs_of

    out: dict[str, None] = {}
    for arm in scenario.arms:
        for p in _protocols(arm):
            for st in p.steps:
                for d in _drugs_of(st):
                    out[str(d).lower()] = None
    return list(out)


def model_for_scenario(scenario, *, pathway: str | None = None, mechanisms=()):
    """A :class:`TwinModel` that knows every drug of ``scenario``; ``pathway`` a name of
    :func:`twin.graph.load_pathway` (default: ``androgen_receptor`` when an arm gives an
    androgen-axis drug, else ``mapk_pi3k``)."""
    from twin.graph import load_pathway
    from twin.model import TwinModel

    drugs = scenario_drugs(scenario)
    if pathway is None:
        ar = {"leuprolide", "cyproterone_acetate", "abiraterone", "enzalutamide", "bicalutamide", "degarelix", "goserelin", "apalutamide", "darolutamide"}
        pathway = "androgen_receptor" if ar & set(drugs) else "mapk_pi3k"
    return TwinModel.from_graph(load_pathway(pathway), drugs=drugs, mechanisms=mechanisms)


# -- provenance ------------------------------------------------------------------------------
def _versions() -> str:
    import importlib.metadata as md

    import xarray

    import twin

    parts = [f"twin={twin.__version__}", f"numpy={np.__version__}", f"xarray={xarray.__version__}"]
    try:
        parts.append(f"torch={md.version('torch')}")
    except md.PackageNotFoundError:  # pragma: no cover
        parts.append("torch=absent")
    return ", ".join(parts)


def _sha256_file(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# -- helpers ---------------------------------------------------------------------------------
def _regimen_from_events(events) -> Any:
    from twin.regimen import Regimen

    if events is None or len(events) == 0:
        return Regimen.empty()
    ev = events.copy()
    ev["arm"] = "main"
    return Regimen.from_records(ev.to_dict("records"))


def _cumulative_dose(events, drugs, times) -> np.ndarray:
    """(time, drug) cumulative mg of doses started at or before each time."""
    out = np.zeros((len(times), len(drugs)))
    if events is None or len(events) == 0:
        return out
    for j, d in enumerate(drugs):
        e = events[events["drug"].str.lower() == d]
        if not len(e):
            continue
        t = e["time"].to_numpy(float)
        a = np.nan_to_num(e["amount"].to_numpy(float))
        order = np.argsort(t)
        t, c = t[order], np.cumsum(a[order])
        idx = np.searchsorted(t, times + _EPS, side="right") - 1
        out[:, j] = np.where(idx >= 0, c[np.clip(idx, 0, None)], 0.0)
    return out


def _on_treatment_from_table(regimen, times) -> np.ndarray:
    """Bool per time: within a dosing row's span ``[time, time + count x interval)`` (a single
    dose: ``[time, time + max(duration, 1 day))``)."""
    on = np.zeros(len(times), bool)
    for _, r in regimen.table.iterrows():
        t0 = float(r["time"])
        iv = float(r["interval"]) if np.isfinite(r["interval"]) else np.nan
        n = int(r["count"])
        span = n * iv if np.isfinite(iv) and iv > 0 else max(float(r["duration"] or 0.0), 1.0)
        on |= (times >= t0 - _EPS) & (times < t0 + span - _EPS)
    return on


def _time_grid(horizon: float, visits, time_step: float) -> np.ndarray:
    t = np.arange(0.0, horizon + _EPS, float(time_step))
    t = np.unique(np.round(np.concatenate([t, np.asarray(visits, float), [horizon]]), 9))
    return t[(t >= 0) & (t <= horizon + _EPS)]


def _take(ds, arm_dim_name: str, name: str, index: int = 0) -> np.ndarray:
    return np.asarray(ds[name].isel({arm_dim_name: index}).values, float)


# -- the runner ------------------------------------------------------------------------------
def run_scenario(
    twin,
    scenario,
    *,
    draws: int | None = None,
    seed: int | None = None,
    progress: Callable[[dict], None] | None = None,
    horizon: float | None = None,
    time_step: float = 1.0,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    scenario_path: str | os.PathLike | None = None,
):
    """Simulate every arm of ``scenario`` for every draw of ``twin``.

    Parameters
    ----------
    twin : a :class:`PriorTwin` (:func:`prior_twin`), a tuple ``(patient, model, draws)``
        or any object with ``patient``, ``model`` and ``draws`` attributes.
    scenario : a :class:`scenarios.Scenario` (or a path to a scenario TOML file).
    draws : use only the first ``draws`` draws (default: all).
    seed : recorded, and the seed of stochastic resistance (default: the scenario's seed).
    progress : called with a dict ``{"arm", "step", "steps", "time", "message"}`` after
        each protocol batch and each visit of an adaptive arm.
    horizon : [day] cut the scenario short (visits after it are dropped); default the
        scenario's horizon.
    time_step : [day] spacing of the output grid (visit times and the horizon are added).
    rtol, atol : integrator tolerances (:func:`twin.simulate.simulate`).
    scenario_path : the scenario file, for its SHA-256 (default: ``scenario.source``).

    Returns
    -------
    xarray.Dataset following the result schema of :mod:`scenarios.outcomes` (dims ``arm``,
    ``draw``, ``time``): ``tumor_volume``, ``cells_total``, ``psa`` (when the model has it),
    ``resistant_fraction`` (when it has resistant clones), ``on_treatment``,
    ``cumulative_dose`` (+ ``drug``), the compartments ``N_*``, ``dose_factor`` (adaptive
    arms: the factor in force; protocol arms: NaN), ``status`` (arm, draw; 0 = ok) and,
    with ``replicates > 1``, ``p_resistance``. Attrs: ``patient_id``, ``seed``,
    ``versions``, ``scenario``, ``scenario_sha256``, ``patient_sha256`` (JSON),
    ``twin_kind``, ``visits``, ``horizon``, ``criteria``, ``notes``.
    """
    import xarray as xr

    from twin.simulate import simulate

    from .outcomes import RESULT_VARIABLES, check_result
    from .scenario import Scenario

    if isinstance(scenario, (str, os.PathLike)):
        scenario_path = scenario_path or scenario
        scenario = Scenario.from_toml(scenario)
    tw = _as_twin(twin)
    model, patient = tw.model, tw.patient
    n_all = tw.n_draws
    n = n_all if draws is None else int(draws)
    if not 1 <= n <= n_all:
        raise InputError(f"run_scenario: draws={draws!r} but the twin has {n_all} draw(s); choose 1..{n_all}")
    params = {k: (np.asarray(v, float)[:n] if np.ndim(v) else float(v)) for k, v in tw.draws.items() if k in set(model.parameter_names)}
    seed = int(scenario.seed if seed is None else seed)
    H = float(scenario.horizon if horizon is None else horizon)
    if not H > 0:
        raise InputError(f"run_scenario: horizon must be > 0 days, received {horizon!r}")
    visits = np.array([v for v in scenario.visits if v <= H + _EPS], float)
    times = _time_grid(H, visits, time_step)
    covariates = getattr(patient, "covariates", None)
    known = set(model.drugs)
    missing = [d for d in scenario_drugs(scenario) if d not in known]
    if missing:
        raise InputError(
            f"run_scenario: the scenario gives {missing} but the model knows only {sorted(known)}; "
            "build the model with every drug of the scenario (scenarios.run.model_for_scenario(scenario))"
        )
    drugs = list(model.drugs)
    notes: list[str] = []
    arm_names = [a.name for a in scenario.arms]
    n_arms, T = len(arm_names), len(times)
    comp = [s for s in model.state_names if s.startswith("N_")]
    obs_names = [o for o in ("tumor_volume", "total_cells", "psa") if o in model.observable_names]
    shape = (n_arms, n, T)
    arrays = {o: np.full(shape, np.nan) for o in obs_names + comp}
    on_treatment = np.zeros(shape, bool)
    cum = np.zeros(shape + (len(drugs),))
    factor_arr = np.full(shape, np.nan)
    status = np.zeros((n_arms, n), np.int64)
    p_res = None
    t_start = _time.perf_counter()

    def report(**kw):
        if progress is not None:
            progress(kw)

    # protocol arms: one simulate call --------------------------------------------------
    proto = [(i, a) for i, a in enumerate(scenario.arms) if not a.adaptive]
    if proto:
        regimens = {}
        for i, a in proto:
            ex = a.protocol.expansion(covariates, start=0.0, horizon=H)
            if ex.message:
                notes.append(f"arm {a.name!r}: {ex.message} (switch conditions are not evaluated yet)")
            regimens[a.name] = _regimen_from_events(ex.regimen.events())
        need_states = scenario.replicates > 1
        ds = simulate(model, params, regimens, times, seed=seed, rtol=rtol, atol=atol, pathway_states=need_states)
        for k, (i, a) in enumerate(proto):
            for v in arrays:
                arrays[v][i] = _take(ds, "regimen", v, k)
            status[i] = np.asarray(ds["status"].isel(regimen=k).values)
            reg = regimens[a.name]
            on_treatment[i] = _on_treatment_from_table(a.protocol.expand(covariates, start=0.0, horizon=H), times)[None, :]
            cum[i] = _cumulative_dose(reg.events(), drugs, times)[None, :, :]
        if scenario.replicates > 1:
            p_res = np.full(shape, np.nan)
            try:
                from twin.resistance import acquired_resistance

                ar = acquired_resistance(ds, model, params, regimens, n_replicates=scenario.replicates, seed=seed)
                for k, (i, a) in enumerate(proto):
                    p_res[i] = np.asarray(ar["p_resistance"].isel(regimen=k).transpose("draw", "time").values, float)
            except InputError as e:
                notes.append(f"stochastic resistance not computed: {e}")
        report(arm=",".join(a.name for _, a in proto), step=1, steps=1, time=H,
               message=f"{len(proto)} protocol arm(s) x {n} draws simulated")

    # adaptive arms: visit to visit ----------------------------------------------------------
    for i, arm in ((i, a) for i, a in enumerate(scenario.arms) if a.adaptive):
        _run_adaptive(i, arm, model, params, n, times, visits, H, covariates, drugs, arrays, on_treatment, cum,
                      factor_arr, status, report, rtol=rtol, atol=atol, seed=seed)
        if p_res is not None:
            notes.append(f"arm {arm.name!r}: stochastic resistance is computed for protocol arms only (NaN here)")

    # assemble ----------------------------------------------------------------------------------
    units = dict(model.observable_units)
    units.update(model.state_units)
    coords = {"arm": np.array(arm_names, dtype=object), "draw": np.arange(n), "time": times,
              "drug": np.array(drugs, dtype=object)}
    data = {}
    rename = {"total_cells": "cells_total"}
    for v, arr in arrays.items():
        name = rename.get(v, v)
        u = RESULT_VARIABLES[name][0] if name in RESULT_VARIABLES else units.get(v, "")
        data[name] = (("arm", "draw", "time"), arr, {"units": u})
    res = [s for s in comp if s.startswith("N_R")]
    if res:
        tot = sum(arrays[s] for s in comp)
        with np.errstate(invalid="ignore", divide="ignore"):
            rf = np.clip(sum(arrays[s] for s in res) / tot, 0.0, 1.0)
        data["resistant_fraction"] = (("arm", "draw", "time"), rf, {"units": "1"})
    data["on_treatment"] = (("arm", "draw", "time"), on_treatment, {"units": "1"})
    data["cumulative_dose"] = (("arm", "draw", "time", "drug"), cum, {"units": "mg"})
    data["dose_factor"] = (("arm", "draw", "time"), factor_arr, {"units": "1", "description": "policy dose factor in force (adaptive arms)"})
    data["status"] = (("arm", "draw"), status, {"units": "1", "description": "0 ok; see twin.simulate.STATUS_CODES"})
    if p_res is not None:
        data["p_resistance"] = (("arm", "draw", "time"), p_res, {"units": "1", "description": "fraction of stochastic replicates with acquired resistance by t"})
    src = scenario_path or scenario.source
    psrc = getattr(patient, "source", None) or {}
    attrs = {
        "patient_id": str(getattr(patient, "id", "unknown")),
        "seed": seed,
        "versions": _versions(),
        "scenario": scenario.name,
        "scenario_file": str(src or ""),
        "scenario_sha256": (_sha256_file(src) if src else None) or "",
        "patient_sha256": json.dumps(psrc.get("sha256", {}) if isinstance(psrc, Mapping) else {}, sort_keys=True),
        "patient_source": str(psrc.get("path", "")) if isinstance(psrc, Mapping) else "",
        "twin_kind": tw.kind,
        "twin_seed": -1 if tw.seed is None else int(tw.seed),
        "model": repr(model),
        "visits": np.asarray(visits, float),
        "horizon": H,
        "criteria": ",".join(scenario.outcomes.criteria),
        "resistance_threshold": float(scenario.outcomes.resistance_threshold),
        "resistance_horizon": float(scenario.outcomes.resistance_horizon or H),
        "replicates": int(scenario.replicates),
        "rtol": float(rtol),
        "atol": float(atol),
        "notes": "\n".join(notes),
        "wall_time_s": round(_time.perf_counter() - t_start, 3),
    }
    ds_out = xr.Dataset(data, coords=coords, attrs=attrs)
    return check_result(ds_out)


def _run_adaptive(i, arm, model, params, n, times, visits, H, covariates, drugs, arrays, on_treatment, cum,
                  factor_arr, status, report, *, rtol, atol, seed):
    """One adaptive arm: decide at each visit per draw, integrate groups of identical history."""
    import pandas as pd

    from twin.simulate import simulate

    from .scenario import policy_doses

    policy = arm.policy
    state = policy.initial_state(n)
    bg_events = arm.background.expand(covariates, start=0.0, horizon=H).events() if arm.background is not None else None
    hist: list[list] = [[] for _ in range(n)]  # per draw: list of event DataFrames (treat doses)
    keys: list[tuple] = [() for _ in range(n)]
    y = None  # (n, n_states) at the current visit; None = model.initial_state
    state_names = list(model.state_names)
    obs_now: dict[str, np.ndarray] | None = None
    prev_t = None
    seg_bounds = list(visits) + ([H] if visits[-1] < H - _EPS else [])
    n_seg = len(seg_bounds) - 1

    def draw_events(j):
        parts = [e for e in hist[j] if len(e)]
        if bg_events is not None and len(bg_events):
            parts = [bg_events] + parts
        return pd.concat(parts, ignore_index=True) if parts else None

    # observables at the first visit (before any dose; the state there does not depend on doses)
    if visits[0] > _EPS or n_seg == 0:
        raise InputError(f"arm {arm.name!r}: the first visit must be at day 0 and the horizon after it")
    for k in range(n_seg):
        t0, t1 = float(seg_bounds[k]), float(seg_bounds[k + 1])
        if k < len(visits) and abs(visits[k] - t0) < _EPS:
            if obs_now is None:
                obs_now = _initial_observables(model, params, n, t0, t1, rtol, atol)
            delivered = {}
            if prev_t is not None:
                for d in drugs:
                    delivered[d] = np.array([_delivered(draw_events(j), d, prev_t, t0) for j in range(n)])
            observed = _observed(obs_now)
            factors, state = policy.decide(state, t0, observed, delivered=delivered or None)
            prev_t = t0
            for j in range(n):
                f = float(factors[j])
                keys[j] = keys[j] + (round(f, 12),)
                if f > 0:
                    reg = policy_doses(arm.treat, anchor=float(state.phase_start[j]), start=t0, stop=t1, factor=f,
                                       covariates=covariates)
                    hist[j].append(reg.events())
        else:  # pragma: no cover - segments start at visits by construction
            factors = state.factor
        mask_t = (times >= t0 - _EPS) & (times <= t1 + _EPS)
        seg_times = times[mask_t]
        idx_t = np.nonzero(mask_t)[0]
        groups: dict[tuple, list[int]] = {}
        for j in range(n):
            groups.setdefault(keys[j], []).append(j)
        y_next = np.full((n, len(state_names)), np.nan)
        obs_next = {o: np.full(n, np.nan) for o in obs_now}
        for key, members in groups.items():
            m = np.array(members)
            sub = {kk: (v[m] if np.ndim(v) else v) for kk, v in params.items()}
            ev = draw_events(members[0])
            reg = _regimen_from_events(ev)
            init = None if y is None else y[m]
            ds = simulate(model, sub, {arm.name: reg}, seg_times, seed=seed, rtol=rtol, atol=atol,
                          initial_state=init, pathway_states=True)
            for v in arrays:
                arrays[v][i][np.ix_(m, idx_t)] = _take(ds, "regimen", v)
            st = np.asarray(ds["status"].isel(regimen=0).values)
            status[i, m] = np.maximum(status[i, m], st)
            for s_i, s in enumerate(state_names):
                y_next[m, s_i] = _take(ds, "regimen", s)[:, -1]
            for o in obs_next:
                obs_next[o][m] = _take(ds, "regimen", o)[:, -1]
            c = _cumulative_dose(ev, drugs, seg_times)
            cum[i][np.ix_(m, idx_t)] = c[None, :, :]
        # the state in force over [t0, t1): set the interval's grid points (t1 gets the next decision)
        last = k == n_seg - 1
        fill = idx_t if last else idx_t[:-1]
        factor_arr[i][:, fill] = np.asarray(factors, float)[:, None]
        bg_on = _on_treatment_from_table(arm.background.expand(covariates, start=0.0, horizon=H), times[fill]) \
            if arm.background is not None else np.zeros(len(fill), bool)
        on_treatment[i][:, fill] = (np.asarray(factors, float) > 0)[:, None] | bg_on[None, :]
        y, obs_now = y_next, obs_next
        report(arm=arm.name, step=k + 1, steps=n_seg, time=t1,
               message=f"arm {arm.name}: visit {k + 1}/{n_seg} (day {t0:g}), {len(groups)} distinct dose histories")


def _initial_observables(model, params, n, t0, t1, rtol, atol) -> dict[str, np.ndarray]:
    """Observables at the first visit: the initial state (no dose has acted yet)."""
    from twin.regimen import Regimen
    from twin.simulate import simulate

    ds = simulate(model, params, {"untreated": Regimen.empty()}, np.array([t0, t0 + min(1e-3, (t1 - t0) / 2)]),
                  rtol=rtol, atol=atol, pathway_states=False)
    names = [o for o in ("tumor_volume", "total_cells", "psa") if o in ds.data_vars]
    names += [s for s in model.state_names if s.startswith("N_")]
    return {o: _take(ds, "regimen", o)[:, 0] for o in names}


def _observed(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a policy sees at a visit: tumor_volume, psa, total_cells and, with resistant
    clones, resistant_fraction (in canonical units)."""
    out = {o: v for o, v in values.items() if not o.startswith("N_")}
    comp = [k for k in values if k.startswith("N_")]
    res = [k for k in comp if k.startswith("N_R")]
    if res:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["resistant_fraction"] = np.clip(sum(values[k] for k in res) / sum(values[k] for k in comp), 0.0, 1.0)
    return out


def _delivered(events, drug, a, b) -> float:
    if events is None or not len(events):
        return 0.0
    e = events[(events["drug"].str.lower() == drug) & (events["time"] >= a - _EPS) & (events["time"] < b - _EPS)]
    return float(np.nan_to_num(e["amount"].to_numpy(float)).sum())


# -- saving ------------------------------------------------------------------------------------
def save_result(ds, outdir, *, visits=None) -> dict[str, Path]:
    """Write ``trajectories.nc`` (NetCDF4 via h5netcdf) and ``outcomes.csv`` (the
    :func:`scenarios.outcomes.summarize` table of :func:`standard_outcomes`) into
    ``outdir``, each atomically (a temporary file in the same folder, then ``os.replace``).
    ``visits``: progression assessment times (default: the result's ``visits`` attr)."""
    from twin._atomic import atomic_write_text

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    nc = outdir / TRAJECTORIES_FILE
    fd, tmp = tempfile.mkstemp(dir=outdir, prefix=f".{nc.name}.", suffix=".tmp")
    os.close(fd)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
        _for_netcdf(ds).to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, nc)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    table = outcome_table(ds, visits=visits)
    csv = outdir / OUTCOMES_FILE
    atomic_write_text(csv, table.to_csv(index=False))
    return {"trajectories": nc, "outcomes": csv}


def outcome_table(ds, *, visits=None):
    """``summarize(standard_outcomes(ds))`` with the result's visits and horizon."""
    from .outcomes import standard_outcomes, summarize

    return summarize(outcomes_of(ds, visits=visits))


def outcomes_of(ds, *, visits=None) -> dict:
    """:func:`standard_outcomes` at the scenario's visits (attrs ``visits``), with the
    probability of resistance at the scenario's threshold and horizon."""
    from .outcomes import probability_of_resistance, standard_outcomes, time_to_resistance

    v = visits if visits is not None else ds.attrs.get("visits")
    if v is None or np.size(v) == 0:
        v = 28.0
    out = standard_outcomes(ds, visits=np.atleast_1d(np.asarray(v, float)) if np.ndim(v) else float(v))
    if "resistant_fraction" in ds.data_vars and "resistance_threshold" in ds.attrs:
        thr = float(ds.attrs["resistance_threshold"])
        h = float(ds.attrs.get("resistance_horizon", ds["time"].values[-1]))
        ttr = time_to_resistance(ds, threshold=thr)
        out["time_to_resistance"] = ttr
        out["probability_of_resistance"] = probability_of_resistance(ttr, horizon=h)
    return out


def _for_netcdf(ds):
    """NetCDF cannot hold object-dtype coords or bool: strings become fixed str, bool stays
    (h5netcdf writes it as an enum-free int8 via xarray's encoding)."""
    out = ds.copy()
    for c in ("arm", "drug"):
        if c in out.coords:
            out = out.assign_coords({c: out[c].values.astype(str)})
    return out


def load_result(path):
    """Read a result written by :func:`save_result` (a folder or the ``.nc`` file); the
    ``arm``/``drug`` coords come back as Python str objects and ``on_treatment`` as bool."""
    import xarray as xr

    p = Path(path)
    if p.is_dir():
        p = p / TRAJECTORIES_FILE
    if not p.is_file():
        raise InputError(f"no scenario result at {str(p)!r}; run `twin simulate PATIENT SCENARIO.toml -o FOLDER` first")
    with xr.open_dataset(p, engine="h5netcdf") as f:
        ds = f.load()
    for c in ("arm", "drug"):
        if c in ds.coords:
            ds = ds.assign_coords({c: np.array([str(x) for x in ds[c].values], dtype=object)})
    if "on_treatment" in ds.data_vars and ds["on_treatment"].dtype != bool:
        ds["on_treatment"] = ds["on_treatment"].astype(bool)
    return ds
