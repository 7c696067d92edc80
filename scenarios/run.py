"""Running a scenario: every arm x every posterior (or prior) draw of one twin.

:func:`run_scenario` is the batched what-if engine behind ``twin simulate``::

    twin = prior_twin(patient, model, n_draws=100, seed=1)
    result = run_scenario(twin, Scenario.from_toml("adt.toml"))
    save_result(result, "results/")      # trajectories.nc + outcomes.csv

How the arms are simulated
--------------------------
* **Fixed protocol arms** (a plan without a switch) are expanded with the patient's
  covariates into one :class:`twin.Regimen` each, and all of them go through *one*
  :func:`twin.simulate` call (every draw under every regimen).
* **Adaptive arms** (a policy deciding at visits) and **switching arms** (a protocol with
  "until progression then switch to ...") are integrated visit to visit by one loop
  (:func:`_run_visits`) driven by a controller: at each visit the observables of every draw
  are read from its own trajectory, and the controller decides per draw --
  the policy (:meth:`scenarios.policy.Policy.decide`) for adaptive arms; for switching arms
  whether the condition of the draw's next switch holds (progression: the scenario's first
  criterion, by :func:`scenarios.outcomes.progression_known`, the definition of
  :func:`~scenarios.outcomes.time_to_progression` applied to the trajectory so far;
  resistance: resistant fraction above the scenario's threshold), in which case the draw's
  remaining treatment becomes the next line, started at that visit. Drug exposure is
  analytic PK over *all* past doses (a depot given 3 weeks ago still acts), so a draw's
  future depends on its whole dose history. Draws are therefore grouped by identical dose
  history (``controller.keys``: the sequence of decisions, or of switch times); each group
  is integrated over the next visit interval from its members' states at the previous visit,
  with its *complete* dose history as the regimen (``simulate`` counts doses before
  ``times[0]`` in the PK). This is exact, not an approximation.

  Engine (``_ENGINE``): by default (``"compiled"``, models without a neural residual) there
  is no ``simulate`` call: each visit interval of an arm is *one* call of
  :meth:`twin.compiled.CompiledTwin.solve_groups` for all draws, each draw on the segment
  schedule (PK event times and closed-form PK states) of its own dose history -- one schedule
  per distinct history, built from dose tables extended interval by interval
  (:class:`_HistoryDoses`) -- from its own state at the visit, with the step size carried
  from dose to dose and across visits (``_CARRY_STEP``; the integrator's tolerance is
  unchanged; without it the results equal the ``simulate`` path bit for bit). Fixed arms are
  one such call each. States stay numpy arrays; observables come from
  :meth:`TwinModel.observe`. The members run in parallel over numba's threads
  (``NUMBA_NUM_THREADS``). ``_ENGINE = "simulate"``: one ``simulate`` call per (visit
  interval x distinct history), the reference path (also used with a neural residual or
  ``TWIN_SIMULATE_BACKEND=torch``). Either way the integrated time per draw is that of a
  fixed arm; the cost is the ODE steps (~35 per day per draw for twice-daily oral dosing at
  rtol 1e-6), plus per visit the policy decisions and one PK scan per distinct history.
* **Stochastic acquired resistance** (``replicates > 1``; ``mutation_rate``) is computed for
  every arm after its deterministic run (one-way coupling, as
  :func:`twin.resistance.acquired_resistance`), per group of draws with one dose history;
  draw ``k`` of arm ``a`` has its own seeded generator (:func:`_p_resistance`).

Progression switches are evaluated at visits only: with a confirmed criterion (PCWG3, 21
days) a progression is known, and the switch made, at the first visit on or after its
confirmation. A switch at "toxicity" never happens (toxicity is not modelled; a note says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from twin.errors import InputError

__all__ = ["PriorTwin", "prior_twin", "run_scenario", "run_trial", "save_result", "load_result", "scenario_drugs", "model_for_scenario",
           "TRAJECTORIES_FILE", "OUTCOMES_FILE"]

TRAJECTORIES_FILE = "trajectories.nc"
OUTCOMES_FILE = "outcomes.csv"
_EPS = 1e-9

#: How arms are integrated. ``"compiled"``: every arm through :class:`twin.compiled.CompiledTwin`
#: directly -- one compiled call per arm (fixed protocols) or per arm and visit interval
#: (adaptive and switching arms: all draws in one call, each on the segment schedule of its own
#: dose history), states kept as numpy arrays, observables from :meth:`TwinModel.observe`.
#: ``"simulate"``: one :func:`twin.simulate.simulate` call per dose history and interval (the
#: reference path; always used for models with a neural residual or with
#: ``TWIN_SIMULATE_BACKEND=torch``). Module-level so tests can compare the two.
_ENGINE = "compiled"
#: compiled engine: start each PK segment with the step the previous segment's start accepted,
#: and carry it across visits (:data:`twin._codegen.SOLVER_CARRY`; ~10% fewer steps than the
#: Hairer restart of ``simulate`` under twice-daily dosing, same tolerance). False: the same
#: steps as ``simulate``.
_CARRY_STEP = True


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

    return Regimen.from_events(events, arm="main")


def _event_arrays(events):
    """``(drug (lower case), time, amount)`` numpy columns of a dose-events table (None when
    empty): filtered with numpy by :func:`_cumulative_dose` and :func:`_delivered`."""
    if events is None or len(events) == 0:
        return None
    return (events["drug"].str.lower().to_numpy(), events["time"].to_numpy(float), events["amount"].to_numpy(float))


def _cumulative_dose(events, drugs, times, *, arrays=None) -> np.ndarray:
    """(time, drug) cumulative mg of doses started at or before each time (``arrays``: the
    events' :func:`_event_arrays`, when already made)."""
    out = np.zeros((len(times), len(drugs)))
    arrays = _event_arrays(events) if arrays is None else arrays
    if arrays is None:
        return out
    dl, tt, aa = arrays
    for j, d in enumerate(drugs):
        sel = dl == d
        if not sel.any():
            continue
        t = tt[sel]
        a = np.nan_to_num(aa[sel])
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
    mutation_rate: float | None = None,
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
        the batch of fixed protocol arms and each visit of an adaptive or switching arm.
    horizon : [day] cut the scenario short (visits after it are dropped); default the
        scenario's horizon.
    time_step : [day] spacing of the output grid (visit times and the horizon are added).
    rtol, atol : integrator tolerances (:func:`twin.simulate.simulate`).
    scenario_path : the scenario file, for its SHA-256 (default: ``scenario.source``).
    mutation_rate : ``mu`` of the stochastic resistance (default: the scenario's
        ``mutation_rate``, 1e-7); used when the scenario has ``replicates > 1``.

    Returns
    -------
    xarray.Dataset following the result schema of :mod:`scenarios.outcomes` (dims ``arm``,
    ``draw``, ``time``): ``tumor_volume``, ``cells_total``, ``psa`` (when the model has it),
    ``resistant_fraction`` (when it has resistant clones), ``on_treatment``,
    ``cumulative_dose`` (+ ``drug``), the compartments ``N_*``, ``dose_factor`` (adaptive
    arms: the factor in force; protocol arms: NaN), ``treatment_line`` (0 before any switch
    of a protocol, k after its k-th switch), ``status`` (arm, draw; 0 = ok) and, with
    ``replicates > 1``, ``p_resistance`` (every arm). Attrs: ``patient_id``, ``seed``,
    ``versions``, ``scenario``, ``scenario_sha256``, ``patient_sha256`` (JSON),
    ``twin_kind``, ``visits``, ``horizon``, ``criteria``, ``progression_criterion``,
    ``mutation_rate``, ``notes``.
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
    obs_names = [o for o in ("tumor_volume", "sld", "total_cells", "psa") if o in model.observable_names]
    shape = (n_arms, n, T)
    arrays = {o: np.full(shape, np.nan) for o in obs_names + comp}
    on_treatment = np.zeros(shape, bool)
    cum = np.zeros(shape + (len(drugs),))
    factor_arr = np.full(shape, np.nan)
    line_arr = np.zeros(shape, np.int64)
    status = np.zeros((n_arms, n), np.int64)
    p_res = None
    t_start = _time.perf_counter()

    def report(**kw):
        if progress is not None:
            progress(kw)

    mu = float(scenario.mutation_rate if mutation_rate is None else mutation_rate)
    if not 0 <= mu <= 1:
        raise InputError(f"run_scenario: mutation_rate must be in [0, 1], received {mutation_rate!r}")
    reps = int(scenario.replicates)
    if reps > 1:
        p_res = np.full(shape, np.nan)
    need_states = reps > 1
    crit = _switch_criterion(scenario, model, notes) if any("progression" in a.switch_conditions for a in scenario.arms) else None
    eng = _Compiled(model, params, n, rtol=rtol, atol=atol) if _use_compiled(model) else None

    # fixed protocol arms (no switch): one simulate call ------------------------------------
    proto = [(i, a) for i, a in enumerate(scenario.arms) if not a.adaptive and not _switches(a)]
    if proto and eng is not None:
        for i, a in proto:
            ex = a.protocol.expansion(covariates, start=0.0, horizon=H)
            reg = _regimen_from_events(ex.regimen.events())
            block, st, _ = eng.integrate(np.arange(n), None, None, np.zeros(n, np.int64), [eng.schedule(reg, times[0], times[-1])], times)
            _fill(arrays, i, model, block, slice(None), slice(None))
            status[i] = np.maximum(status[i], st)
            on_treatment[i] = _on_treatment_from_table(a.protocol.expand(covariates, start=0.0, horizon=H), times)[None, :]
            cum[i] = _cumulative_dose(reg.events(), drugs, times)[None, :, :]
            if reps > 1:
                p_res[i] = _p_resistance(model, params, block, times, {(): (np.arange(n), reg)}, mu, reps, seed, i, notes, a.name)
            del block
        report(arm=",".join(a.name for _, a in proto), step=1, steps=1, time=H,
               message=f"{len(proto)} protocol arm(s) x {n} draws simulated")
    elif proto:
        regimens = {}
        for i, a in proto:
            ex = a.protocol.expansion(covariates, start=0.0, horizon=H)
            regimens[a.name] = _regimen_from_events(ex.regimen.events())
        ds = simulate(model, params, regimens, times, seed=seed, rtol=rtol, atol=atol, pathway_states=need_states)
        for k, (i, a) in enumerate(proto):
            for v in arrays:
                arrays[v][i] = _take(ds, "regimen", v, k)
            status[i] = np.asarray(ds["status"].isel(regimen=k).values)
            reg = regimens[a.name]
            on_treatment[i] = _on_treatment_from_table(a.protocol.expand(covariates, start=0.0, horizon=H), times)[None, :]
            cum[i] = _cumulative_dose(reg.events(), drugs, times)[None, :, :]
            if reps > 1:
                states = np.stack([_take(ds, "regimen", sn, k) for sn in model.state_names], axis=-1)
                p_res[i] = _p_resistance(model, params, states, times, {(): (np.arange(n), reg)}, mu, reps, seed, i, notes, a.name)
        del ds
        report(arm=",".join(a.name for _, a in proto), step=1, steps=1, time=H,
               message=f"{len(proto)} protocol arm(s) x {n} draws simulated")

    # adaptive arms and arms that switch: visit to visit ------------------------------------------
    for i, arm in enumerate(scenario.arms):
        if arm.adaptive:
            ctl = _PolicyArm(arm, n, covariates, H)
        elif _switches(arm):
            ctl = _SwitchArm(arm, n, covariates, H, scenario, crit, notes)
            if "resistance" in arm.switch_conditions and not any(c.startswith("N_R") for c in comp):
                notes.append(f"arm {arm.name!r}: the model has no resistant clone; the switch at resistance never happens")
        else:
            continue
        run = _run_visits if eng is None else _run_visits_compiled
        states = run(i, arm, ctl, model, params, n, times, visits, H, drugs, arrays, on_treatment, cum,
                     factor_arr, line_arr, status, report, rtol=rtol, atol=atol, seed=seed, keep_states=need_states, eng=eng)
        if reps > 1:
            groups: dict[tuple, list[int]] = {}
            for j in range(n):
                groups.setdefault(ctl.keys[j], []).append(j)
            regs = {key: (np.array(m), _regimen_from_events(ctl.events(key))) for key, m in groups.items()}
            p_res[i] = _p_resistance(model, params, states, times, regs, mu, reps, seed, i, notes, arm.name)

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
    data["treatment_line"] = (("arm", "draw", "time"), line_arr, {"units": "1", "description": "treatment line in force: 0 the first, k after the k-th switch of the protocol ('until progression then switch to ...')"})
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
        "mutation_rate": mu,
        "progression_criterion": "" if crit is None else crit.name,
        "rtol": float(rtol),
        "atol": float(atol),
        "notes": "\n".join(notes),
        "wall_time_s": round(_time.perf_counter() - t_start, 3),
    }
    ds_out = xr.Dataset(data, coords=coords, attrs=attrs)
    return check_result(ds_out)


def _per_patient_dosing(scenario, covariates) -> tuple:
    """What of a patient changes the doses of ``scenario``: the weight when a dose is in
    mg/kg, the body-surface area when one is in mg/m² (None otherwise)."""
    from .protocol import Dose, DoseReduction, _flatten

    units = set()
    for arm in scenario.arms:
        for proto in _protocols(arm):
            for st in proto.steps:
                stack = list(_flatten(st))
                while stack:
                    x = stack.pop()
                    if isinstance(x, (Dose, DoseReduction)):
                        units.add(x.unit)
                    elif hasattr(x, "to"):
                        stack.append(x.to)
                    elif hasattr(x, "steps"):
                        stack.extend(x.steps)
    w = getattr(covariates, "weight", None) if "mg/kg" in units else None
    b = getattr(covariates, "bsa", None) if "mg/m2" in units else None
    return (None if w is None else float(w), None if b is None else float(b))


def run_trial(twins, scenario, *, draws: int | None = None, progress: Callable[[dict], None] | None = None, **kwargs) -> list:
    """:func:`run_scenario` for several twins (a virtual trial), batched.

    Twins that share the model and whose doses are the same (no mg/kg or mg/m² dose, or the
    same weight / body-surface area) are run together as one twin whose draws are all their
    draws, so each visit interval is one integration for all of them instead of one per
    patient (the integrator's cost per step hardly depends on the number of draws). Every
    draw is still simulated and decided on its own, so each patient's result equals its own
    :func:`run_scenario` run, except ``p_resistance`` (its replicates are seeded by the draw's
    index in the batch) and integrator round-off (each member has its own step size).

    Returns one result per twin, in order, each with that patient's provenance attrs and
    ``trial_batch_size`` (how many twins shared its run). ``draws``: the first ``draws``
    draws of every twin. Other keywords go to :func:`run_scenario`.
    """
    from .scenario import Scenario

    if isinstance(scenario, (str, os.PathLike)):
        kwargs.setdefault("scenario_path", scenario)
        scenario = Scenario.from_toml(scenario)
    tws = [_as_twin(t) for t in twins]
    if not tws:
        raise InputError("run_trial: give at least one twin")
    groups: dict[tuple, list[int]] = {}
    for k, tw in enumerate(tws):
        names = tuple(sorted(x for x in tw.draws if x in set(tw.model.parameter_names)))
        key = (id(tw.model), names, _per_patient_dosing(scenario, getattr(tw.patient, "covariates", None)))
        groups.setdefault(key, []).append(k)
    out: list = [None] * len(tws)
    for members in groups.values():
        first = tws[members[0]]
        sizes = []
        for k in members:
            n_k = tws[k].n_draws if draws is None else int(draws)
            if not 1 <= n_k <= tws[k].n_draws:
                raise InputError(f"run_trial: draws={draws!r} but twin {k} has {tws[k].n_draws} draw(s)")
            sizes.append(n_k)
        params = {}
        for name in (x for x in first.draws if x in set(first.model.parameter_names)):
            params[name] = np.concatenate([
                np.broadcast_to(np.asarray(tws[k].draws[name], float), (tws[k].n_draws,))[:n_k] for k, n_k in zip(members, sizes)
            ])
        big = PriorTwin(first.patient, first.model, params, seed=first.seed, kind=first.kind)
        res = run_scenario(big, scenario, progress=progress, **kwargs)
        offset = 0
        for k, n_k in zip(members, sizes):
            tw = tws[k]
            sub = res.isel(draw=slice(offset, offset + n_k)).assign_coords(draw=np.arange(n_k))
            offset += n_k
            psrc = getattr(tw.patient, "source", None) or {}
            sub.attrs = dict(res.attrs)
            sub.attrs.update({
                "patient_id": str(getattr(tw.patient, "id", "unknown")),
                "patient_sha256": json.dumps(psrc.get("sha256", {}) if isinstance(psrc, Mapping) else {}, sort_keys=True),
                "patient_source": str(psrc.get("path", "")) if isinstance(psrc, Mapping) else "",
                "twin_kind": tw.kind,
                "twin_seed": -1 if tw.seed is None else int(tw.seed),
                "trial_batch_size": len(members),
            })
            out[k] = sub
    return out


def _switches(arm) -> bool:
    """True when ``arm`` is a protocol arm with a :class:`~scenarios.protocol.Switch`."""
    return not arm.adaptive and bool(arm.switch_conditions)


def _switch_criterion(scenario, model, notes):
    """The progression criterion of switches: the first of the scenario's criteria whose
    variable is simulated (``recist_sld`` falls back to ``recist_volume`` without ``sld``)."""
    from .outcomes import CRITERIA

    simulated = set(model.observable_names)
    for name in scenario.outcomes.criteria:
        c = CRITERIA[name]
        if c.variable in simulated:
            return c
        if name == "recist_sld" and "tumor_volume" in simulated:
            notes.append("switch at progression: the model simulates no sld; RECIST 1.1 is assessed on the tumour volume (recist_volume)")
            return CRITERIA["recist_volume"]
    raise InputError(
        f"run_scenario: an arm switches at progression but none of the criteria {list(scenario.outcomes.criteria)} "
        f"can be assessed: the model simulates {sorted(simulated)}; name a criterion on one of them in [outcomes] criteria"
    )


_LAZY = object()  # _PolicyArm._events: a history's table not built yet


def _pd_concat(parts):
    import pandas as pd

    return pd.concat(parts, ignore_index=True)


class _PolicyArm:
    """Visit controller of an adaptive arm: the policy decides per draw at each visit.

    ``keys[j]`` identifies draw ``j``'s dose history (the sequence of decisions, with the
    anchor of each treatment period); draws with equal keys have identical doses."""

    def __init__(self, arm, n, covariates, H):
        self.arm, self.n, self.cov, self.H = arm, n, covariates, H
        self.policy = arm.policy
        self.state = self.policy.initial_state(n)
        bg = arm.background.expand(covariates, start=0.0, horizon=H).events() if arm.background is not None else None
        self.keys: list[tuple] = [() for _ in range(n)]
        self._events: dict[tuple, Any] = {(): bg if bg is not None and len(bg) else None}
        self._doses: dict[tuple, Any] = {}
        self._bg_reg = arm.background.expand(covariates, start=0.0, horizon=H) if arm.background is not None else None
        self.prev_t = None
        self.factors = np.ones(n)
        #: key -> (parent key, the doses this key adds over its interval: events or None)
        self.chunks: dict[tuple, tuple] = {}
        self._arrays: dict[tuple, Any] = {}  # key -> _event_arrays of its events (keys in use)
        self._chunk_arrays: dict[int, tuple] = {}  # id(chunk events) -> (events, arrays)

    def events(self, key):
        """The dose events of history ``key`` (its parent's followed by its interval's; the
        concatenated table is built when first asked for)."""
        ev = self._events[key]
        if ev is _LAZY:
            parent, new = self.chunks[key]
            parts = [e for e in (self.events(parent), new) if e is not None and len(e)]
            ev = self._events[key] = _pd_concat(parts) if parts else None
        return ev

    def arrays(self, key):
        """:func:`_event_arrays` of ``events(key)``: the parent's arrays followed by the chunk's
        (the key's table is their concatenation, in that order), so a visit costs O(its
        doses), not O(the whole history); remembered until :meth:`keep_arrays`."""
        if key in self._arrays:
            return self._arrays[key]
        link = self.chunks.get(key)
        if link is not None and link[0] in self._arrays:
            pa, new = self._arrays[link[0]], link[1]
            na = None
            if new is not None:
                hit = self._chunk_arrays.get(id(new))
                if hit is None or hit[0] is not new:
                    hit = self._chunk_arrays[id(new)] = (new, _event_arrays(new))
                na = hit[1]
            arr = pa if na is None else na if pa is None else tuple(np.concatenate([x, y]) for x, y in zip(pa, na))
        else:
            arr = _event_arrays(self.events(key))
        self._arrays[key] = arr
        return arr

    def keep_arrays(self, keys):
        """Forget the arrays of the keys not in ``keys``."""
        self._arrays = {k: v for k, v in self._arrays.items() if k in keys}

    def visit(self, t0, t1, observed, history, drugs):
        from .scenario import policy_doses

        delivered = {}
        if self.prev_t is not None:
            per_key = {}
            for key in set(self.keys):
                arr = self.arrays(key)
                per_key[key] = [_delivered(None, d, self.prev_t, t0, arrays=arr) for d in drugs]
            self.keep_arrays(per_key)  # the parents of this visit's histories
            for k_d, d in enumerate(drugs):
                delivered[d] = np.array([per_key[self.keys[j]][k_d] for j in range(self.n)])
        factors, self.state = self.policy.decide(self.state, t0, observed, delivered=delivered or None)
        self.prev_t = t0
        self.factors = np.asarray(factors, float)
        anchors = np.asarray(self.state.phase_start, float)
        for j in range(self.n):
            f = round(float(self.factors[j]), 12)
            anchor = round(float(anchors[j]), 9) if f > 0 else None
            key = self.keys[j] + ((f, anchor),)
            if key not in self._events:
                new = None
                if f > 0:
                    dk = (anchor, t0, t1, f)
                    if dk not in self._doses:
                        self._doses[dk] = policy_doses(self.arm.treat, anchor=anchor, start=t0, stop=t1, factor=f,
                                                       covariates=self.cov).events()
                    new = self._doses[dk]
                self._events[key] = _LAZY  # built by events(key) when asked for
                self.chunks[key] = (self.keys[j], new if new is not None and len(new) else None)
            self.keys[j] = key

    def factor(self):
        return self.factors

    def line(self):
        return np.zeros(self.n, np.int64)

    def on_treatment(self, times_fill):
        bg_on = _on_treatment_from_table(self._bg_reg, times_fill) if self._bg_reg is not None else np.zeros(len(times_fill), bool)
        return (self.factors > 0)[:, None] | bg_on[None, :]


class _SwitchArm:
    """Visit controller of a protocol arm with switches ("until progression then switch to
    ..."): each draw follows its own path. Line 0 is the plan before the first switch; at
    each visit a draw still before its last line is checked for the condition of its next
    switch, on its own simulated trajectory so far; when it holds, the draw's remaining
    treatment is replaced by the next line, started at that visit.

    ``keys[j]``: the tuple of draw ``j``'s switch times (equal keys, identical doses)."""

    def __init__(self, arm, n, covariates, H, scenario, criterion, notes):
        from .protocol import DoseReduction, Switch, _flatten

        self.arm, self.n, self.cov, self.H = arm, n, covariates, H
        self.criterion = criterion
        self.threshold = float(scenario.outcomes.resistance_threshold)
        self.visits = np.asarray(scenario.visits, float)
        flat = [s for st in arm.protocol.steps for s in _flatten(st)]
        self.reductions = [s for s in flat if isinstance(s, DoseReduction)]
        self.lines: list[list] = [[]]
        self.conditions: list[str | None] = [None]  # conditions[m]: what starts line m
        for st in flat:
            if isinstance(st, DoseReduction):
                continue
            if isinstance(st, Switch):
                self.lines.append([st.to])
                self.conditions.append(st.at)
            else:
                self.lines[-1].append(st)
        for c in set(self.conditions[1:]):
            if c == "toxicity":
                notes.append(f"arm {arm.name!r}: toxicity is not modelled; the switch at toxicity never happens")
        self.keys: list[tuple] = [() for _ in range(n)]
        self.n_lines = len(self.lines)
        self._lines: dict[tuple[int, float], Any] = {}
        self._events: dict[tuple, Any] = {}

    def _line(self, m: int, start: float):
        """The Regimen of line ``m`` started at ``start`` (cut at the horizon)."""
        from .protocol import DoseReduction, Protocol

        k = (m, round(start, 9))
        if k not in self._lines:
            if m == 0:
                reg = self.arm.protocol.expansion(self.cov, start=0.0, horizon=self.H).regimen
            elif start >= self.H - _EPS:
                from twin.regimen import Regimen

                reg = Regimen.empty()
            else:
                steps = list(self.lines[m])
                given = {d for st in steps for d in _drugs(st)}
                for r in self.reductions:  # 'after' counts from the protocol's start
                    if r.drug in given:
                        steps.append(DoseReduction(r.drug, factor=r.factor, amount=r.amount, unit=r.unit,
                                                   after=max(0.0, r.after - start)))
                reg = Protocol(tuple(steps), drugs=self.arm.protocol.drugs).expand(self.cov, start=start, horizon=self.H)
            self._lines[k] = reg
        return self._lines[k]

    def _windows(self, key):
        starts = (0.0,) + tuple(key)
        ends = tuple(key) + (np.inf,)
        return [(m, a, b) for m, (a, b) in enumerate(zip(starts, ends))]

    def events(self, key):
        import pandas as pd

        if key not in self._events:
            parts = []
            for m, a, b in self._windows(key):
                ev = self._line(m, a).events()
                if len(ev):
                    ev = ev[(ev["time"] >= a - _EPS) & (ev["time"] < b - _EPS)]
                if len(ev):
                    parts.append(ev)
            self._events[key] = pd.concat(parts, ignore_index=True) if parts else None
        return self._events[key]

    def visit(self, t0, t1, observed, history, drugs):
        line = np.array([len(k) for k in self.keys])
        todo = np.nonzero(line < self.n_lines - 1)[0]
        if not len(todo):
            return
        switch = np.zeros(self.n, bool)
        by_start: dict[tuple[float, int], list[int]] = {}
        for j in todo:
            by_start.setdefault(((self.keys[j][-1] if self.keys[j] else 0.0), int(line[j])), []).append(j)
        for (s0, m), members in by_start.items():
            cond = self.conditions[m + 1]
            m_idx = np.array(members)
            if cond == "progression":
                c = self.criterion
                times, values = history(c.variable)
                keep = times >= s0 - _EPS
                vt = self.visits[(self.visits >= s0 - _EPS) & (self.visits <= t0 + _EPS)] - s0
                if len(vt) >= 2:
                    from .outcomes import progression_known

                    switch[m_idx] = progression_known(values[m_idx][:, keep], times[keep] - s0, vt, c)
            elif cond == "resistance":
                rf = observed.get("resistant_fraction")
                if rf is not None:
                    with np.errstate(invalid="ignore"):
                        switch[m_idx] = np.asarray(rf, float)[m_idx] > self.threshold
        for j in np.nonzero(switch)[0]:
            self.keys[j] = self.keys[j] + (float(t0),)

    def factor(self):
        return np.full(self.n, np.nan)

    def line(self):
        return np.array([len(k) for k in self.keys], np.int64)

    def on_treatment(self, times_fill):
        out = np.zeros((self.n, len(times_fill)), bool)
        rows: dict[tuple, np.ndarray] = {}
        for j, key in enumerate(self.keys):
            if key not in rows:
                on = np.zeros(len(times_fill), bool)
                for m, a, b in self._windows(key):
                    inside = (times_fill >= a - _EPS) & (times_fill < b - _EPS)
                    if inside.any():
                        on |= _on_treatment_from_table(self._line(m, a), times_fill) & inside
                rows[key] = on
            out[j] = rows[key]
        return out


def _drugs(step) -> list[str]:
    from .protocol import _drugs_of

    return [str(d).lower() for d in _drugs_of(step)]


def _run_visits(i, arm, ctl, model, params, n, times, visits, H, drugs, arrays, on_treatment, cum,
                factor_arr, line_arr, status, report, *, rtol, atol, seed, keep_states=False, eng=None):
    """One arm integrated visit to visit. At each visit the controller ``ctl`` (a policy, or
    the switches of a protocol) decides per draw from that draw's own simulated observables;
    draws with identical dose history (``ctl.keys``) are integrated together over the next
    visit interval from their states at the visit, with their complete dose history as the
    regimen (``simulate`` counts doses before ``times[0]`` in the PK): exact.

    Returns the states ``(n, time, state)`` when ``keep_states`` (else None)."""
    from twin.simulate import simulate

    y = None  # (n, n_states) at the current visit; None = model.initial_state
    state_names = list(model.state_names)
    states_all = np.full((n, len(times), len(state_names)), np.nan) if keep_states else None
    obs_now: dict[str, np.ndarray] | None = None
    seg_bounds = list(visits) + ([H] if visits[-1] < H - _EPS else [])
    n_seg = len(seg_bounds) - 1
    if visits[0] > _EPS or n_seg == 0:
        raise InputError(f"arm {arm.name!r}: the first visit must be at day 0 and the horizon after it")
    for k in range(n_seg):
        t0, t1 = float(seg_bounds[k]), float(seg_bounds[k + 1])
        if obs_now is None:
            obs_now = _initial_observables(model, params, n, t0, t1, rtol, atol)
        i0 = int(np.searchsorted(times, t0 - _EPS))

        def history(var, _i0=i0):
            return times[: _i0 + 1], arrays[var][i][:, : _i0 + 1]

        if k < len(visits) and abs(visits[k] - t0) < _EPS:
            ctl.visit(t0, t1, _observed(obs_now), history, drugs)
        mask_t = (times >= t0 - _EPS) & (times <= t1 + _EPS)
        seg_times = times[mask_t]
        idx_t = np.nonzero(mask_t)[0]
        groups: dict[tuple, list[int]] = {}
        for j in range(n):
            groups.setdefault(ctl.keys[j], []).append(j)
        y_next = np.full((n, len(state_names)), np.nan)
        obs_next = {o: np.full(n, np.nan) for o in obs_now}
        for key, members in groups.items():
            m = np.array(members)
            sub = {kk: (v[m] if np.ndim(v) else v) for kk, v in params.items()}
            ev = ctl.events(key)
            reg = _regimen_from_events(ev)
            init = None if y is None else y[m]
            ds = simulate(model, sub, {arm.name: reg}, seg_times, seed=seed, rtol=rtol, atol=atol,
                          initial_state=init, pathway_states=True)
            for v in arrays:
                arrays[v][i][np.ix_(m, idx_t)] = _take(ds, "regimen", v)
            st = np.asarray(ds["status"].isel(regimen=0).values)
            status[i, m] = np.maximum(status[i, m], st)
            block = np.stack([_take(ds, "regimen", s) for s in state_names], axis=-1)  # (members, T, S)
            y_next[m] = block[:, -1, :]
            if states_all is not None:
                states_all[np.ix_(m, idx_t)] = block
            for o in obs_next:
                obs_next[o][m] = _take(ds, "regimen", o)[:, -1]
            c = _cumulative_dose(ev, drugs, seg_times)
            cum[i][np.ix_(m, idx_t)] = c[None, :, :]
        # the state in force over [t0, t1): set the interval's grid points (t1 gets the next decision)
        last = k == n_seg - 1
        fill = idx_t if last else idx_t[:-1]
        factor_arr[i][:, fill] = np.asarray(ctl.factor(), float)[:, None]
        line_arr[i][:, fill] = ctl.line()[:, None]
        on_treatment[i][:, fill] = ctl.on_treatment(times[fill])
        y, obs_now = y_next, obs_next
        report(arm=arm.name, step=k + 1, steps=n_seg, time=t1,
               message=f"arm {arm.name}: visit {k + 1}/{n_seg} (day {t0:g}), {len(groups)} distinct dose histories")
    return states_all


def _use_compiled(model) -> bool:
    if _ENGINE != "compiled":
        return False
    from twin.simulate import backend_for

    return backend_for(model) == "numba"


class _Compiled:
    """The compiled integrator of one run: the draws' parameter rows and initial states
    (computed once, as :func:`twin.simulate.simulate` does), segment schedules of regimens,
    and one call of :meth:`twin.compiled.CompiledTwin.solve_groups` per integration."""

    def __init__(self, model, params, n, *, rtol, atol, min_step=1e-8, max_steps=1_000_000):
        import torch

        from twin.compiled import compiled_twin

        self.model, self.ct = model, compiled_twin(model)
        self.rtol, self.atol, self.min_step, self.max_steps = float(rtol), float(atol), float(min_step), int(max_steps)
        flat = {k: np.broadcast_to(np.asarray(v, np.float64), (n,)).copy() for k, v in params.items()}
        with torch.no_grad():
            p = model.parameter_tensors({k: torch.as_tensor(v) for k, v in flat.items()}, batch=n, stacked=True)
            self.theta = np.stack([p[nm].detach().cpu().numpy() for nm in model.parameter_names], axis=-1)
            self.y0 = model.initial_state(p).detach().cpu().numpy()

    def doses(self, regimen) -> dict:
        """drug -> :class:`twin.pk.DoseTable` of ``regimen``, as ``simulate`` builds them."""
        from twin.simulate import regimen_doses

        return regimen_doses(self.model, regimen)[0] if len(regimen) else {}

    def schedule(self, regimen, t0, t1, *, doses=None):
        """``(boundaries, w)`` of ``regimen`` (or of the dose tables ``doses``) on ``[t0, t1]``
        (doses before ``t0`` included)."""
        from twin.compiled import segment_schedule

        doses = self.doses(regimen) if doses is None else doses
        b, w, _ = segment_schedule(self.model, self.ct.layout, self.ct.n_w, regimen, float(t0), float(t1), doses=doses)
        return b, w

    def integrate(self, rows, y0, h_first, member_schedule, schedules, obs_times):
        """States ``(M, T, S)`` at ``obs_times`` of the draws ``rows`` from ``y0`` (None: the
        initial state), status ``(M,)`` (:data:`twin.simulate.STATUS_CODES`; a failed
        member's states are NaN) and the carried step sizes ``(M,)``."""
        rows = np.asarray(rows, np.int64)
        y0 = self.y0[rows] if y0 is None else np.asarray(y0, np.float64)
        bad0 = ~np.isfinite(y0).all(axis=-1)
        out, st, _, h = self.ct.solve_groups(self.theta[rows], np.where(bad0[:, None], 0.0, y0), schedules, member_schedule, obs_times,
                                             h_first=h_first, carry=_CARRY_STEP, rtol=self.rtol, atol=self.atol,
                                             max_steps=self.max_steps, min_step=self.min_step)
        status = np.zeros(len(rows), np.int64)
        status[st == 1], status[st == 2], status[bad0] = 2, 1, 3
        if status.any():
            out[status != 0] = np.nan
        return out, status, h


def _merge_doses(parent: dict, chunk: dict) -> dict | None:
    """The dose tables of a history ``parent`` followed by ``chunk`` (doses given after all of
    the parent's), per drug the concatenation: what :func:`twin.simulate.regimen_doses` builds
    from the concatenated events. None when a drug's chunk does not start after its parent."""
    from twin.pk import DoseTable

    out = dict(parent)
    for d, tab in chunk.items():
        old = out.get(d)
        if old is None or not len(old):
            out[d] = tab
        elif not len(tab):
            continue
        elif old.time[-1] < tab.time[0]:
            out[d] = DoseTable(np.concatenate([old.time, tab.time]), np.concatenate([old.amount, tab.amount]),
                               np.concatenate([old.route, tab.route]), np.concatenate([old.duration, tab.duration]))
        else:
            return None
    return out


class _HistoryDoses:
    """Dose tables per dose history (``ctl.keys``) of a visit-to-visit arm. A policy arm's
    new history is its parent's plus the doses of one interval (``ctl.chunks``): its tables
    are the parent's extended by that interval's tables (built once per distinct interval
    dosing), not rebuilt from the whole history at every visit."""

    def __init__(self, eng, ctl):
        self.eng, self.ctl = eng, ctl
        self.by_key: dict[tuple, dict] = {}
        self.by_chunk: dict[int, tuple] = {}
        #: key -> drug -> (time of the history's last PK event, PK state just after it)
        self.end: dict[tuple, dict] = {}
        self.consts: dict[str, tuple] = {}  # drug -> _pk_consts

    def __call__(self, key) -> dict:
        d = self.by_key.get(key)
        if d is not None:
            return d
        link = getattr(self.ctl, "chunks", {}).get(key)
        if link is not None and link[0] in self.by_key:
            parent, ev = link
            if ev is None:
                d = self.by_key[parent]
            else:
                d = _merge_doses(self.by_key[parent], self.chunk(ev))
        if d is None:
            d = self.eng.doses(_regimen_from_events(self.ctl.events(key)))
        self.by_key[key] = d
        return d

    def chunk(self, ev) -> dict:
        """The dose tables of one interval's dose events ``ev`` (built once per distinct chunk)."""
        hit = self.by_chunk.get(id(ev))
        if hit is None or hit[0] is not ev:
            hit = self.by_chunk[id(ev)] = (ev, self.eng.doses(_regimen_from_events(ev)))
        return hit[1]

    def keep(self, keys):
        """Forget the histories not in ``keys`` (those no draw follows any more)."""
        self.by_key = {k: v for k, v in self.by_key.items() if k in keys}
        self.end = {k: v for k, v in self.end.items() if k in keys}

    def schedule(self, key, t0, t1):
        """``(boundaries, w)`` of history ``key`` on ``[t0, t1]``: from its parent's PK state
        after the parent's last dose event, propagated in closed form, plus the scan of the
        doses of this interval (the PK is linear: the superposition of the two), when the
        parent's state is known and its doses all precede ``t0`` and the chunk's; otherwise
        :meth:`_Compiled.schedule` of the whole history (an O(doses) scan). Same schedule up
        to rounding (``_SPLIT_SCHEDULE = False``: always the whole history)."""
        out = self._split(key, t0, t1) if _SPLIT_SCHEDULE else None
        if out is None:
            doses = self(key)
            out = self.eng.schedule(None, t0, t1, doses=doses)
            self.end[key] = self._end_state(doses)
        return out

    def _pk(self, d):
        return self.eng.model.drug_pk[d][0]

    def _consts(self, d):
        c = self.consts.get(d)
        if c is None:
            c = self.consts[d] = _pk_consts(self._pk(d))
        return c

    def _end_state(self, doses):
        """drug -> (time of the last PK event, {modes, depot, rate} just after it) of the dose tables."""
        from twin.compiled import _scan
        from twin.pk import pk_scan

        out = {}
        for d, tab in doses.items():
            if len(tab):
                sc = _scan(self._pk(d), tab, pk_scan)
                e = float(sc.events[-1])
                out[d] = (e, _pk_state(sc.state_at(np.array([e]))))
        return out

    def _split(self, key, t0, t1):
        from twin.compiled import _scan
        from twin.pk import pk_scan

        link = getattr(self.ctl, "chunks", {}).get(key)
        if link is None or link[0] not in self.end:
            return None
        parent, ev = link
        pend = self.end[parent]
        chunk = {} if ev is None else self.chunk(ev)
        if any(e > t0 + 1e-12 for e, _ in pend.values()):
            return None
        scans = {d: _scan(self._pk(d), tab, pk_scan) for d, tab in chunk.items() if len(tab)}
        for d, sc in scans.items():
            if d in pend and sc.events[0] < pend[d][0]:
                return None
        eng = self.eng
        t_end = t1 if t1 > t0 else t0 + 1.0
        evs = [t0, t_end]
        for sc in scans.values():
            e = sc.events
            evs.extend(e[(e > t0) & (e < t_end)].tolist())
        b = np.unique(np.asarray(evs, dtype=np.float64))
        starts = b[:-1]
        w = np.zeros((len(starts), eng.ct.n_w))
        end = {}
        for j, d in enumerate(eng.model.drugs):
            if d not in scans and d not in pend:
                continue
            off, c, _ = eng.ct.layout[j]
            k = c["k"]
            st = _pk_zero(k, len(starts))
            e_new = -np.inf
            if d in pend:
                e_new = pend[d][0]
                st = _pk_add(st, _pk_propagate(self._consts(d), pend[d][1], starts - pend[d][0]))
            if d in scans:
                st = _pk_add(st, _pk_state(scans[d].state_at(starts)))
                e_new = max(e_new, float(scans[d].events[-1]))
            for i in range(k):
                w[:, off + i] = st["modes"][i]
            if st["depot"] is not None:
                w[:, off + k] = st["depot"]
            if st["rate"] is not None:
                w[:, off + k + 1] = st["rate"]
            at = np.array([e_new])
            es = _pk_zero(k, 1)
            if d in pend:
                es = _pk_add(es, _pk_propagate(self._consts(d), pend[d][1], at - pend[d][0]))
            if d in scans:
                es = _pk_add(es, _pk_state(scans[d].state_at(at)))
            end[d] = (e_new, es)
        self.end[key] = end
        return b, w


#: :meth:`_HistoryDoses.schedule`: a policy arm's history scheduled from its parent's PK state
#: plus the interval's doses (False: scan the whole history at every visit; same up to rounding)
_SPLIT_SCHEDULE = True


def _pk_state(st) -> dict:
    """The ``modes``, ``depot`` and ``rate`` of :meth:`twin.pk.PKScan.state_at` (arrays)."""
    return {"modes": [np.asarray(m, float) for m in st["modes"]],
            "depot": None if st["depot"] is None else np.asarray(st["depot"], float),
            "rate": None if st["rate"] is None else np.asarray(st["rate"], float)}


def _pk_zero(k, n) -> dict:
    return {"modes": [np.zeros(n) for _ in range(k)], "depot": None, "rate": None}


def _pk_add(a, b) -> dict:
    def add(x, y):
        return y if x is None else x if y is None else x + y

    return {"modes": [x + y for x, y in zip(a["modes"], b["modes"])], "depot": add(a["depot"], b["depot"]), "rate": add(a["rate"], b["rate"])}


def _pk_consts(params) -> tuple:
    """``(ns, [(c_i, l_i)], ka)`` of a drug's PK parameters (floats; ka None without a depot)."""
    from twin.pk import _disposition, _namespace

    ns = _namespace(*params._values())
    terms = [(float(np.asarray(c).reshape(-1)[0]), float(np.asarray(lam).reshape(-1)[0])) for c, lam in _disposition(ns, params)]
    ka = None if params.ka is None else float(np.asarray(params.ka).reshape(-1)[0])
    return ns, terms, ka


def _pk_propagate(consts, st, dt) -> dict:
    """The PK state ``st`` (just after a drug's last dose event) ``dt`` days later, in closed
    form as :meth:`twin.pk.PKScan.state_at` propagates from an event: modes
    ``m e^{-l dt} + depot ka c phi(l, ka, dt) + rate c h(l, dt)``, depot ``a e^{-ka dt}``,
    rate unchanged. ``consts``: :func:`_pk_consts`."""
    from twin.pk import _h, _phi

    ns, terms, ka = consts
    dt = np.asarray(dt, float)
    a, r = st["depot"], st["rate"]
    modes = []
    for (c, lam), m in zip(terms, st["modes"]):
        v = m * np.exp(-lam * dt)
        if a is not None:
            v = v + a * ka * c * np.asarray(_phi(ns, np.float64(lam), np.float64(ka), dt), float)
        if r is not None:
            v = v + r * c * np.asarray(_h(ns, np.float64(lam), dt), float)
        modes.append(v)
    return {"modes": modes, "depot": None if a is None else a * np.exp(-ka * dt), "rate": r}


def _fill(arrays, i, model, block, members, idx_t):
    """Write the states ``block (members, T, S)`` into the result arrays of arm ``i``
    (observables by :meth:`TwinModel.observe`, compartments by name)."""
    names = list(model.state_names)
    obs = model.observe(block)
    for v, arr in arrays.items():
        val = obs[v] if v in obs else block[..., names.index(v)]
        if isinstance(members, slice) and isinstance(idx_t, slice):
            arr[i][members, idx_t] = val
        else:
            arr[i][np.ix_(members, idx_t)] = val


def _run_visits_compiled(i, arm, ctl, model, params, n, times, visits, H, drugs, arrays, on_treatment, cum,
                         factor_arr, line_arr, status, report, *, rtol, atol, seed, keep_states=False, eng=None):
    """:func:`_run_visits` with the compiled engine ``eng`` (:class:`_Compiled`): at each
    visit interval, one segment schedule per distinct dose history (its complete doses, as
    ``simulate`` would use) and one compiled call for all draws, each from its own state at
    the visit; step sizes carried across visits (``_CARRY_STEP``). Same results as the
    ``simulate`` path (bit for bit without ``_CARRY_STEP``, within the integrator's
    tolerance with it)."""
    state_names = list(model.state_names)
    states_all = np.full((n, len(times), len(state_names)), np.nan) if keep_states else None
    seg_bounds = list(visits) + ([H] if visits[-1] < H - _EPS else [])
    n_seg = len(seg_bounds) - 1
    if visits[0] > _EPS or n_seg == 0:
        raise InputError(f"arm {arm.name!r}: the first visit must be at day 0 and the horizon after it")
    y = eng.y0.copy()  # (n, S) at the current visit
    h_carry = np.zeros(n)
    obs_names = [o for o in ("tumor_volume", "total_cells", "psa") if o in model.observable_names]
    comp = [s for s in state_names if s.startswith("N_")]
    rows = np.arange(n)

    def observables(states):
        ob = model.observe(states)
        out = {o: np.asarray(ob[o], float) for o in obs_names}
        out.update({c: states[:, state_names.index(c)] for c in comp})
        return out

    obs_now = observables(y)
    hist_doses = _HistoryDoses(eng, ctl)
    for k in range(n_seg):
        t0, t1 = float(seg_bounds[k]), float(seg_bounds[k + 1])
        i0 = int(np.searchsorted(times, t0 - _EPS))

        def history(var, _i0=i0):
            return times[: _i0 + 1], arrays[var][i][:, : _i0 + 1]

        if k < len(visits) and abs(visits[k] - t0) < _EPS:
            ctl.visit(t0, t1, _observed(obs_now), history, drugs)
        mask_t = (times >= t0 - _EPS) & (times <= t1 + _EPS)
        seg_times = times[mask_t]
        idx_t = np.nonzero(mask_t)[0]
        keys: dict[tuple, int] = {}
        member_sched = np.empty(n, np.int64)
        for j in range(n):
            member_sched[j] = keys.setdefault(ctl.keys[j], len(keys))
        schedules = [hist_doses.schedule(key, seg_times[0], seg_times[-1]) for key in keys]
        hist_doses.keep(keys)
        key_arrays = getattr(ctl, "arrays", None)
        # a history's dose table is only needed without its arrays (a policy arm has them: its
        # tables, concatenations over the whole history, are then never built)
        events = [ctl.events(key) if key_arrays is None else None for key in keys]
        ev_arrays = [None if key_arrays is None else key_arrays(key) for key in keys]
        if key_arrays is not None:
            ctl.keep_arrays(keys)
        block, st, h_carry = eng.integrate(rows, y, h_carry, member_sched, schedules, seg_times)
        _fill(arrays, i, model, block, rows, idx_t)
        status[i] = np.maximum(status[i], st)
        if states_all is not None:
            states_all[:, idx_t] = block
        for g, ev in enumerate(events):
            m = np.nonzero(member_sched == g)[0]
            cum[i][np.ix_(m, idx_t)] = _cumulative_dose(ev, drugs, seg_times, arrays=ev_arrays[g])[None, :, :]
        y = block[:, -1, :].copy()
        # the state in force over [t0, t1): set the interval's grid points (t1 gets the next decision)
        last = k == n_seg - 1
        fill = idx_t if last else idx_t[:-1]
        factor_arr[i][:, fill] = np.asarray(ctl.factor(), float)[:, None]
        line_arr[i][:, fill] = ctl.line()[:, None]
        on_treatment[i][:, fill] = ctl.on_treatment(times[fill])
        obs_now = observables(y)
        del block
        report(arm=arm.name, step=k + 1, steps=n_seg, time=t1,
               message=f"arm {arm.name}: visit {k + 1}/{n_seg} (day {t0:g}), {len(keys)} distinct dose histories")
    return states_all


def _p_resistance(model, params, states, times, groups, mu, n_rep, seed, arm_index, notes, arm_name) -> np.ndarray:
    """Stochastic acquired resistance of one arm: ``p_resistance`` (draw, time).

    The computation of :func:`twin.resistance.acquired_resistance` (the sensitive clone's
    division flux from the simulated states and the regimen's analytic exposure; resistant
    lineages with the time-averaged rates of the resistant clone; ``n_rep`` replicates per
    draw), for every group of draws sharing one regimen (``groups``: key -> (members,
    Regimen)): protocol arms have one group, adaptive and switching arms one per distinct dose
    history. Draw ``k`` of arm ``a`` always uses the generator
    ``SeedSequence(seed).spawn(a + 1)[a].spawn(k + 1)[k]``, so a draw's replicates depend on
    neither the grouping nor the number of draws.
    """
    from twin.resistance import clone_rates_along, emergence_times

    n, T, _ = states.shape
    out = np.full((n, T), np.nan)
    clones = list(model.clones)
    c_res = 1 if len(clones) > 1 else 0
    root = np.random.SeedSequence(int(seed))
    i_s = model.state_names.index("N_S")
    for members, reg in groups.values():
        y = states[members]  # (D, T, S)
        D = len(members)
        ok = np.isfinite(y).all(axis=(1, 2))
        if not ok.any():
            continue
        y, mem = y[ok], members[ok]
        D = len(mem)
        division, loss = clone_rates_along(model, y, {k: (np.asarray(v, float)[mem] if np.ndim(v) else v) for k, v in params.items()}, reg, times)
        flux = np.nan_to_num(division[:, :, 0] * y[:, :, i_s], nan=0.0)
        b_r = np.nanmean(division[:, :, c_res], axis=1)
        d_r = np.nanmean(loss[:, :, c_res], axis=1)
        seeds = [np.random.SeedSequence(root.entropy, spawn_key=(int(arm_index), int(k))) for k in mem]
        try:
            res = emergence_times(np.clip(flux, 0.0, None), times, mu, b_r, d_r, n_replicates=n_rep, seed=seeds)
        except ValueError as e:
            notes.append(f"arm {arm_name!r}: stochastic resistance not computed for {D} draw(s): {e}")
            continue
        out[mem] = (res.emergence_time[:, :, None] <= times[None, None, :]).mean(axis=1)
    return out


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


def _delivered(events, drug, a, b, *, arrays=None) -> float:
    """mg of ``drug`` started in ``[a, b)`` (``arrays``: the events' :func:`_event_arrays`)."""
    arrays = _event_arrays(events) if arrays is None else arrays
    if arrays is None:
        return 0.0
    dl, t, amt = arrays
    sel = (dl == drug) & (t >= a - _EPS) & (t < b - _EPS)
    return float(np.nan_to_num(amt[sel]).sum())


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
    """``summarize`` of the standard outcomes with the result's visits and horizon."""
    from .outcomes import summarize

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
