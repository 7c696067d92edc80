"""Outcomes of a scenario result: time to progression, resistance, burden, dose.

A *scenario result* is an :class:`xarray.Dataset` (the schema is below and in
``docs/outcomes.md``). Every outcome function here is vectorised over ``arm`` x ``draw``
(x ``replicate``) and returns an :class:`xarray.DataArray` with those dims and
``attrs`` ``outcome`` (its name), ``units``, ``better`` ("higher" or "lower": which
direction of the outcome is good for the patient) and, for time-to-event outcomes,
``kind = "time_to_event"`` plus the criterion that defined the event.

Time-to-event outcomes carry their censoring as non-index coordinates on the same dims:

* ``event`` (bool): the event was observed by the end of follow-up;
* ``followup`` (day): the last time at which the event was assessed (the censoring time
  when ``event`` is False);

and the value is the event time, ``+inf`` when the event was not reached by the horizon,
and ``NaN`` when it could not be assessed (a trajectory with NaN values at a visit, e.g.
a failed simulation).

Progression is assessed at *visits* only, never continuously (``visits=`` argument):
a number (an interval in days: visits at ``t0, t0 + interval, ...``), ``"all"`` (every
time point of the result) or an explicit array of times. Values between grid times are
linearly interpolated.

This module never imports matplotlib (plots live in :mod:`scenarios.plots`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from twin.errors import InputError, close_matches

__all__ = [
    # schema
    "DIM_ARM",
    "DIM_DRAW",
    "DIM_TIME",
    "DIM_REPLICATE",
    "DIM_DRUG",
    "SAMPLE_DIMS",
    "OBSERVABLE_UNITS",
    "RESULT_VARIABLES",
    "REQUIRED_ATTRS",
    "ResultSchemaError",
    "check_result",
    "build_result",
    # progression criteria
    "ProgressionCriterion",
    "RECIST_SLD",
    "RECIST_VOLUME",
    "PCWG3_PSA",
    "CRITERIA",
    "VOLUME_EQUIVALENT_INCREASE",
    "visit_times",
    "time_to_progression",
    "progression_known",
    "response_class",
    "MRECIST_CLASSES",
    "response_class_probabilities",
    # other outcomes
    "time_to_resistance",
    "probability_of_resistance",
    "burden_auc",
    "cumulative_dose_at",
    "treatment_days",
    "standard_outcomes",
    # summaries
    "kaplan_meier",
    "km_quantile",
    "summarize",
    "SUMMARY_COLUMNS",
]

# --------------------------------------------------------------------------------------
# The result schema
# --------------------------------------------------------------------------------------

DIM_ARM = "arm"  #: treatment arm (str coordinates)
DIM_DRAW = "draw"  #: posterior draw (int coordinates)
DIM_TIME = "time"  #: time since scenario start [day] (float, strictly increasing)
DIM_REPLICATE = "replicate"  #: stochastic resistance replicate (int; optional)
DIM_DRUG = "drug"  #: drug name (str), only on ``cumulative_dose``

#: The dims that index Monte-Carlo samples of one arm (pooled in summaries).
SAMPLE_DIMS = (DIM_DRAW, DIM_REPLICATE)

#: Observables and their canonical units.
OBSERVABLE_UNITS: dict[str, str] = {
    "tumor_volume": "mm3",
    "sld": "mm",
    "psa": "ng/mL",
    "ctdna": "copies/mL",
}

#: Every data variable the schema knows: name -> (units, extra dims beyond arm/draw/time,
#: description). Any subset may be present; other variables are allowed and not checked.
RESULT_VARIABLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tumor_volume": ("mm3", (), "tumour volume"),
    "sld": ("mm", (), "sum of longest diameters of target lesions (RECIST)"),
    "psa": ("ng/mL", (), "prostate-specific antigen, serum"),
    "ctdna": ("copies/mL", (), "circulating tumour DNA"),
    "cells_total": ("cells", (), "total tumour cells, all compartments"),
    "resistant_fraction": ("1", (), "fraction of cells in resistant compartments"),
    "on_treatment": ("1", (), "bool: any drug active at this time"),
    "cumulative_dose": ("mg", (DIM_DRUG,), "cumulative dose given up to this time, per drug"),
}

#: Dataset attributes every result must carry.
REQUIRED_ATTRS: tuple[str, ...] = ("patient_id", "seed", "versions")


class ResultSchemaError(InputError):
    """A scenario result does not follow the result schema; the message lists every problem."""


def check_result(ds: xr.Dataset, *, require_attrs: bool = True) -> xr.Dataset:
    """Validate a scenario result against the schema; return it unchanged.

    Checks the dims (``arm`` with str coords, ``draw`` int, ``time`` float strictly
    increasing and finite, optional ``replicate`` int), the dims and ``units`` of every
    known variable (``RESULT_VARIABLES``), that ``on_treatment`` is bool, that
    ``resistant_fraction`` lies in [0, 1], and the required dataset attrs
    (``REQUIRED_ATTRS``; skip with ``require_attrs=False``). Collects every problem, then
    raises one :class:`ResultSchemaError`.
    """
    if not isinstance(ds, xr.Dataset):
        raise ResultSchemaError(
            f"expected a scenario result as an xarray.Dataset, received {type(ds).__name__}"
        )
    problems: list[str] = []
    for d in (DIM_ARM, DIM_DRAW, DIM_TIME):
        if d not in ds.dims:
            problems.append(f"missing dim {d!r} (dims found: {sorted(map(str, ds.dims))})")
    allowed_dims = {DIM_ARM, DIM_DRAW, DIM_TIME, DIM_REPLICATE, DIM_DRUG}
    if DIM_ARM in ds.dims:
        if DIM_ARM not in ds.coords:
            problems.append("dim 'arm' has no coordinate: give each arm a name (str)")
        elif ds[DIM_ARM].dtype.kind not in "UO" or not all(isinstance(a, str) for a in ds[DIM_ARM].values.tolist()):
            problems.append(f"coordinate 'arm' must hold str names, received dtype {ds[DIM_ARM].dtype}")
        elif len(set(ds[DIM_ARM].values.tolist())) != ds.sizes[DIM_ARM]:
            problems.append(f"coordinate 'arm' has duplicate names: {ds[DIM_ARM].values.tolist()}")
    for d in (DIM_DRAW, DIM_REPLICATE):
        if d in ds.coords and ds[d].dtype.kind not in "iu":
            problems.append(f"coordinate {d!r} must be int, received dtype {ds[d].dtype}")
    if DIM_TIME in ds.dims:
        if DIM_TIME not in ds.coords:
            problems.append("dim 'time' has no coordinate: give the times in days (float)")
        else:
            t = ds[DIM_TIME].values
            if t.dtype.kind != "f":
                problems.append(f"coordinate 'time' must be float days, received dtype {t.dtype}")
            elif not np.all(np.isfinite(t)):
                problems.append("coordinate 'time' has NaN or inf values")
            elif t.size > 1 and not np.all(np.diff(t) > 0):
                problems.append("coordinate 'time' must be strictly increasing")
            if t.size == 0:
                problems.append("coordinate 'time' is empty")
    for name, (units, extra, _) in RESULT_VARIABLES.items():
        if name not in ds.data_vars:
            continue
        v = ds[name]
        dims = set(map(str, v.dims))
        need = {DIM_ARM, DIM_DRAW, DIM_TIME, *extra}
        if not need <= dims:
            problems.append(f"variable {name!r}: dims {tuple(v.dims)} lack {sorted(need - dims)}")
        other = dims - need - {DIM_REPLICATE}
        if other:
            problems.append(
                f"variable {name!r}: unexpected dims {sorted(other)} (allowed: {sorted(need | {DIM_REPLICATE})})"
            )
        got_units = v.attrs.get("units")
        if got_units is None:
            problems.append(f"variable {name!r}: attrs['units'] missing (expected {units!r})")
        elif str(got_units) != units:
            problems.append(f"variable {name!r}: units {got_units!r}, expected {units!r} (canonical units inside)")
        if name == "on_treatment":
            if v.dtype != bool:
                problems.append(f"variable 'on_treatment' must be bool, received dtype {v.dtype}")
        elif v.dtype.kind not in "fiu":
            problems.append(f"variable {name!r} must be numeric, received dtype {v.dtype}")
        if name == "resistant_fraction" and v.dtype.kind == "f":
            vals = v.values[np.isfinite(v.values)]
            if vals.size and (vals.min() < 0 or vals.max() > 1):
                problems.append(
                    f"variable 'resistant_fraction' must lie in [0, 1], found [{vals.min():g}, {vals.max():g}]"
                )
    for d in ds.dims:
        if d not in allowed_dims:
            problems.append(f"unknown dim {d!r}; the schema knows {sorted(allowed_dims)}."
                            + _suggest(str(d), allowed_dims))
    if require_attrs:
        for a in REQUIRED_ATTRS:
            if a not in ds.attrs:
                problems.append(f"dataset attrs lack {a!r} (required: {list(REQUIRED_ATTRS)})")
    if problems:
        raise ResultSchemaError(
            f"scenario result does not follow the schema ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems)
            + "\nSee docs/outcomes.md, section 'The result schema'."
        )
    return ds


def _suggest(name: str, options: Iterable[str]) -> str:
    return close_matches(name, list(options))


def build_result(
    times: Sequence[float],
    arms: Sequence[str],
    variables: Mapping[str, np.ndarray],
    *,
    n_replicates: int | None = None,
    drugs: Sequence[str] | None = None,
    patient_id: str = "synthetic",
    seed: int = 0,
    versions: str = "",
) -> xr.Dataset:
    """Assemble a schema-conforming result from plain arrays (for tests and adapters).

    Each array has shape ``(arm, draw, [replicate,] time)``, plus a trailing ``drug``
    axis for ``cumulative_dose``; units are the canonical ones of ``RESULT_VARIABLES``.
    The draw count is read from the arrays.
    """
    times = np.asarray(times, dtype=float)
    arms = [str(a) for a in arms]
    data = {}
    n_draws = None
    for name, arr in variables.items():
        if name not in RESULT_VARIABLES:
            raise ResultSchemaError(
                f"build_result: unknown variable {name!r}; known: {sorted(RESULT_VARIABLES)}"
                + _suggest(name, RESULT_VARIABLES)
            )
        arr = np.asarray(arr)
        dims = [DIM_ARM, DIM_DRAW] + ([DIM_REPLICATE] if n_replicates else []) + [DIM_TIME]
        if name == "cumulative_dose":
            dims.append(DIM_DRUG)
        if arr.ndim != len(dims):
            raise ResultSchemaError(
                f"build_result: {name!r} has shape {arr.shape}, expected dims {tuple(dims)}"
            )
        n_draws = arr.shape[1]
        data[name] = (tuple(dims), arr, {"units": RESULT_VARIABLES[name][0]})
    coords = {DIM_ARM: np.array(arms, dtype=object), DIM_TIME: times}
    if n_draws is not None:
        coords[DIM_DRAW] = np.arange(n_draws)
    if n_replicates:
        coords[DIM_REPLICATE] = np.arange(n_replicates)
    if drugs is not None:
        coords[DIM_DRUG] = np.array([str(d) for d in drugs], dtype=object)
    ds = xr.Dataset(data, coords=coords, attrs={"patient_id": patient_id, "seed": seed, "versions": versions})
    return check_result(ds)


# --------------------------------------------------------------------------------------
# Helpers: visits, interpolation, packaging outcomes
# --------------------------------------------------------------------------------------


def _variable(ds: xr.Dataset, name: str) -> xr.DataArray:
    if name not in ds.data_vars:
        raise InputError(
            f"the result has no variable {name!r}; it has {sorted(map(str, ds.data_vars))}"
            + _suggest(name, map(str, ds.data_vars))
        )
    return ds[name]


def _sample_order(da: xr.DataArray, extra: Sequence[str] = ()) -> xr.DataArray:
    """Transpose to (arm, draw, [replicate,] *extra, time)."""
    lead = [d for d in (DIM_ARM, DIM_DRAW, DIM_REPLICATE) if d in da.dims]
    return da.transpose(*lead, *extra, DIM_TIME)


def visit_times(times: np.ndarray, visits=28.0, *, start: float | None = None, horizon: float | None = None) -> np.ndarray:
    """The assessment times within the simulated range ``[start, horizon]``.

    ``visits``: a positive number (interval in days, first visit at ``start`` = the first
    simulated time unless given), ``"all"`` (every simulated time) or an array of times
    (those outside the simulated range are dropped).
    """
    times = np.asarray(times, dtype=float)
    t0 = float(times[0]) if start is None else float(start)
    t1 = float(times[-1]) if horizon is None else min(float(horizon), float(times[-1]))
    if isinstance(visits, str):
        if visits != "all":
            raise InputError(f"visits={visits!r}: expected a number of days (e.g. 28), 'all', or an array of times")
        v = times
    elif np.ndim(visits) == 0:
        step = float(visits)
        if not step > 0:
            raise InputError(f"visits={visits!r}: a visit interval must be > 0 days (e.g. visits=28)")
        v = t0 + step * np.arange(int(np.floor((t1 - t0) / step + 1e-9)) + 1)
    else:
        v = np.unique(np.asarray(visits, dtype=float))
    v = v[(v >= t0 - 1e-9) & (v <= t1 + 1e-9) & (v >= times[0] - 1e-9) & (v <= times[-1] + 1e-9)]
    if v.size == 0:
        raise InputError(f"no visit falls inside the simulated times [{times[0]:g}, {times[-1]:g}] days (visits={visits!r})")
    return v


def _interp_last(values: np.ndarray, times: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Linear interpolation along the last axis (common grid), exact on grid points."""
    new = np.asarray(new, dtype=float)
    idx = np.clip(np.searchsorted(times, new, side="right") - 1, 0, len(times) - 1)
    on = np.isclose(new, times[idx], rtol=0, atol=1e-9)
    nxt = np.minimum(idx + 1, len(times) - 1)
    span = times[nxt] - times[idx]
    w = np.where(span > 0, (new - times[idx]) / np.where(span > 0, span, 1.0), 0.0)
    w = np.where(on, 0.0, w)
    lo = values[..., idx]
    hi = values[..., nxt]
    return np.where(w == 0.0, lo, lo + w * (hi - lo))


def _package(
    value: np.ndarray,
    template: xr.DataArray,
    *,
    name: str,
    units: str,
    better: str,
    event: np.ndarray | None = None,
    followup: np.ndarray | None = None,
    **attrs,
) -> xr.DataArray:
    dims = [d for d in template.dims if d != DIM_TIME]
    coords = {d: template.coords[d].values for d in dims if d in template.coords}
    out = xr.DataArray(value, dims=dims, coords=coords, name=name)
    out.attrs.update({"outcome": name, "units": units, "better": better, **attrs})
    if event is not None:
        out = out.assign_coords(event=(dims, np.asarray(event, dtype=bool)))
        out = out.assign_coords(followup=(dims, np.asarray(followup, dtype=float)))
        out.attrs["kind"] = "time_to_event"
    return out


def _first_event(cond: np.ndarray, assessable: np.ndarray, vt: np.ndarray, bad: np.ndarray):
    """Event time, event flag, follow-up from a (..., visit) condition array."""
    cond = cond & assessable
    event = cond.any(axis=-1)
    first = np.argmax(cond, axis=-1)
    t_event = np.where(event, vt[first], np.inf)
    last = np.where(assessable.any(axis=-1), vt[np.maximum(assessable.shape[-1] - 1 - np.argmax(assessable[..., ::-1], axis=-1), 0)], np.nan)
    followup = np.where(event, t_event, last)
    t_event = np.where(bad, np.nan, t_event)
    event = event & ~bad
    followup = np.where(bad, np.nan, followup)
    return t_event, event, followup


# --------------------------------------------------------------------------------------
# Progression
# --------------------------------------------------------------------------------------

#: RECIST 1.1 20 % diameter increase expressed as a volume increase of a sphere:
#: 1.2**3 - 1 = 0.728 (72.8 %).
VOLUME_EQUIVALENT_INCREASE = 1.2**3 - 1


@dataclass(frozen=True)
class ProgressionCriterion:
    """A nadir-based progression rule, assessed at visits.

    Progression at visit ``k`` (time ``t_k``) when, with ``nadir`` = the smallest value
    at the visits before ``k`` (baseline included):

    * ``value >= (1 + rel_increase) * nadir`` and ``value - nadir >= abs_increase``;
    * if ``sphere_diameter_increase`` is set (volume criteria), the equivalent-sphere
      diameter ``(6 V / pi)**(1/3)`` must also exceed the nadir's by at least that many mm;
    * if ``no_decline_min_time`` > 0 and the value never fell below baseline, the visit
      must be at or after that time (PCWG3: rises in the first 12 weeks without a prior
      decline are ignored);
    * if ``confirm_after`` > 0, the same condition (same nadir) must still hold
      ``confirm_after`` days later on the simulated trajectory (PCWG3 confirmation); a
      visit whose confirmation time lies beyond the last simulated time cannot count, so
      follow-up ends at the last confirmable visit.

    The event time is the first visit at which the (confirmed) condition holds.
    """

    name: str
    variable: str
    rel_increase: float
    abs_increase: float = 0.0
    confirm_after: float = 0.0
    sphere_diameter_increase: float | None = None
    no_decline_min_time: float = 0.0
    reference: str = ""

    def __post_init__(self):
        if self.rel_increase < 0 or self.abs_increase < 0 or self.confirm_after < 0:
            raise InputError(
                f"criterion {self.name!r}: rel_increase, abs_increase and confirm_after must be >= 0"
            )


RECIST_SLD = ProgressionCriterion(
    name="recist_sld",
    variable="sld",
    rel_increase=0.20,
    abs_increase=5.0,
    reference="Eisenhauer et al. 2009, Eur J Cancer 45:228-247 (RECIST 1.1)",
)
RECIST_VOLUME = ProgressionCriterion(
    name="recist_volume",
    variable="tumor_volume",
    rel_increase=VOLUME_EQUIVALENT_INCREASE,
    abs_increase=0.0,
    sphere_diameter_increase=None,
    reference="RECIST 1.1 20% diameter rule as a sphere volume: 1.2**3 - 1 = 72.8%",
)
PCWG3_PSA = ProgressionCriterion(
    name="pcwg3_psa",
    variable="psa",
    rel_increase=0.25,
    abs_increase=2.0,
    confirm_after=21.0,
    no_decline_min_time=84.0,
    reference="Scher et al. 2016, J Clin Oncol 34:1402-1418 (PCWG3)",
)

#: Criteria by name.
CRITERIA: dict[str, ProgressionCriterion] = {c.name: c for c in (RECIST_SLD, RECIST_VOLUME, PCWG3_PSA)}


def _criterion(criterion, overrides) -> ProgressionCriterion:
    if isinstance(criterion, ProgressionCriterion):
        c = criterion
    elif isinstance(criterion, str) and criterion in CRITERIA:
        c = CRITERIA[criterion]
    else:
        raise InputError(
            f"criterion={criterion!r}: expected one of {sorted(CRITERIA)} or a ProgressionCriterion"
            + (_suggest(criterion, CRITERIA) if isinstance(criterion, str) else "")
        )
    fields = {f.name for f in dataclasses.fields(ProgressionCriterion)}
    unknown = set(overrides) - fields
    if unknown:
        raise InputError(f"unknown criterion option(s) {sorted(unknown)}; options: {sorted(fields - {'name'})}")
    return dataclasses.replace(c, **overrides) if overrides else c


def _progression_condition(y: np.ndarray, times: np.ndarray, vt: np.ndarray, c: ProgressionCriterion):
    """The core of :func:`time_to_progression`: ``(cond, assessable, bad)`` for values ``y``
    (..., time) on ``times`` assessed at visits ``vt`` (the first visit is the baseline)."""
    v = _interp_last(y, times, vt)  # (..., K)
    bad = ~np.isfinite(v).all(axis=-1)
    # nadir before each visit (baseline included); no reference at the baseline visit
    run_min = np.minimum.accumulate(np.where(np.isfinite(v), v, np.inf), axis=-1)
    nadir = np.concatenate([np.full(v.shape[:-1] + (1,), np.nan), run_min[..., :-1]], axis=-1)

    def holds(x, nad):
        with np.errstate(invalid="ignore"):
            ok = (x >= (1.0 + c.rel_increase) * nad) & (x - nad >= c.abs_increase)
            if c.sphere_diameter_increase is not None:
                d = np.cbrt(6.0 * np.maximum(x, 0.0) / np.pi)
                dn = np.cbrt(6.0 * np.maximum(nad, 0.0) / np.pi)
                ok &= d - dn >= c.sphere_diameter_increase
        return ok & np.isfinite(nad)

    cond = holds(v, nadir)
    if c.no_decline_min_time > 0:
        declined = run_min < v[..., :1]  # fell below baseline at or before this visit
        declined_before = np.concatenate([np.zeros(v.shape[:-1] + (1,), bool), declined[..., :-1]], axis=-1)
        cond &= declined_before | (vt >= c.no_decline_min_time - 1e-9)
    assessable = np.ones(v.shape, dtype=bool)
    if c.confirm_after > 0:
        tc = vt + c.confirm_after
        confirmable = tc <= times[-1] + 1e-9
        vc = _interp_last(y, times, np.minimum(tc, times[-1]))
        cond &= holds(vc, nadir) & confirmable
        assessable = np.broadcast_to(confirmable, v.shape)
        bad = bad | ~np.isfinite(vc[..., confirmable]).all(axis=-1)
    return cond, assessable, bad


def progression_known(
    values,
    times,
    visits,
    criterion: str | ProgressionCriterion = "recist_sld",
    **overrides,
) -> np.ndarray:
    """Whether a progression is *known* by the last time of ``times``, per row of ``values``.

    The same definition as :func:`time_to_progression` (same criterion, nadir, PCWG3 rules
    and confirmation), applied to a trajectory observed only up to ``times[-1]``:
    ``values`` (..., time) on ``times``, assessed at ``visits`` (an array of times; the
    first is the baseline). A confirmed criterion (PCWG3: 21 days) counts only once its
    confirmation time has been reached, so with visits every 4 weeks a PSA progression at
    visit ``k`` becomes known at visit ``k + 1``. Rows with a non-finite value at a visit
    are never progressed. Used by the scenario runner to switch treatment at progression.
    """
    c = _criterion(criterion, overrides)
    times = np.asarray(times, dtype=float)
    y = np.asarray(values, dtype=float)
    vt = np.asarray(visits, dtype=float)
    vt = vt[(vt >= times[0] - 1e-9) & (vt <= times[-1] + 1e-9)]
    if vt.size < 2:
        return np.zeros(y.shape[:-1], dtype=bool)
    cond, assessable, bad = _progression_condition(y, times, vt, c)
    return (cond & assessable).any(axis=-1) & ~bad


def time_to_progression(
    result: xr.Dataset,
    criterion: str | ProgressionCriterion = "recist_sld",
    *,
    visits=28.0,
    start: float | None = None,
    horizon: float | None = None,
    **overrides,
) -> xr.DataArray:
    """Time to progression [day] per arm x draw (x replicate), assessed at visits.

    ``criterion``: ``"recist_sld"`` (RECIST 1.1 on ``sld``: >= 20 % and >= 5 mm above the
    nadir), ``"recist_volume"`` (on ``tumor_volume``: >= 72.8 % above the nadir, the sphere
    volume equivalent of 20 % in diameter), ``"pcwg3_psa"`` (>= 25 % and >= 2 ng/mL above
    the nadir, confirmed 21 days later; rises without a prior decline count from week 12),
    or a :class:`ProgressionCriterion`. Keyword ``overrides`` replace criterion fields,
    e.g. ``rel_increase=0.3`` or ``confirm_after=28``.

    Returns a DataArray (event time; ``inf`` = not reached; ``NaN`` = not assessable)
    with coords ``event`` and ``followup`` (see the module docstring).
    """
    c = _criterion(criterion, overrides)
    da = _sample_order(_variable(result, c.variable))
    times = da[DIM_TIME].values.astype(float)
    vt = visit_times(times, visits, start=start, horizon=horizon)
    cond, assessable, bad = _progression_condition(np.asarray(da.values, dtype=float), times, vt, c)
    t_event, event, followup = _first_event(cond, assessable, vt, bad)
    return _package(
        t_event, da, name=f"ttp_{c.name}", units="day", better="higher", event=event, followup=followup,
        criterion=c.name, variable=c.variable, rel_increase=c.rel_increase, abs_increase=c.abs_increase,
        confirm_after=c.confirm_after, reference=c.reference,
        visits=str(visits) if np.ndim(visits) == 0 else "explicit",
    )


#: mRECIST classes of Gao et al. 2015, best first, with (BestResponse, BestAvgResponse)
#: upper bounds in percent (strict "<"), as implemented in Xeva.
MRECIST_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("mCR", -95.0, -40.0),
    ("mPR", -50.0, -20.0),
    ("mSD", 35.0, 30.0),
)


def response_class(
    result: xr.Dataset,
    *,
    variable: str = "tumor_volume",
    visits=3.5,
    min_time: float = 10.0,
    horizon: float | None = None,
    classes: Sequence[tuple[str, float, float]] = MRECIST_CLASSES,
) -> xr.DataArray:
    """mRECIST-style PDX response class (Gao et al. 2015) per arm x draw (x replicate).

    At visits ``t_k`` (default twice weekly, as caliper measurements in Gao 2015):
    ``dV_k = 100 (V_k - V_0) / V_0``; BestResponse = min of ``dV_k`` over ``t_k >= min_time``;
    BestAvgResponse = min over ``t_k >= min_time`` of the running mean of ``dV`` from the
    first visit to ``k``. Class: mCR if BR < -95 and BAR < -40; mPR if BR < -50 and
    BAR < -20; mSD if BR < 35 and BAR < 30; else mPD. Returns str labels with coords
    ``best_response`` and ``best_avg_response`` [%].
    """
    da = _sample_order(_variable(result, variable))
    times = da[DIM_TIME].values.astype(float)
    vt = visit_times(times, visits, horizon=horizon)
    v = _interp_last(np.asarray(da.values, float), times, vt)
    with np.errstate(divide="ignore", invalid="ignore"):
        dv = 100.0 * (v - v[..., :1]) / v[..., :1]
    run_mean = np.cumsum(dv, axis=-1) / np.arange(1, dv.shape[-1] + 1)
    late = vt >= min_time - 1e-9
    if not late.any():
        raise InputError(f"response_class: no visit at or after min_time={min_time} days (last visit {vt[-1]:g})")
    br = dv[..., late].min(axis=-1)
    bar = run_mean[..., late].min(axis=-1)
    label = np.full(br.shape, "mPD", dtype=object)
    assigned = np.zeros(br.shape, bool)
    for name, b1, b2 in classes:
        hit = (br < b1) & (bar < b2) & ~assigned
        label[hit] = name
        assigned |= hit
    nan = ~(np.isfinite(br) & np.isfinite(bar))
    label[nan] = "NA"
    out = _package(label, da, name="response_class", units="", better="n/a", criterion="mRECIST (Gao 2015)")
    dims = out.dims
    return out.assign_coords(best_response=(dims, br), best_avg_response=(dims, bar))


def response_class_probabilities(classes: xr.DataArray) -> pd.DataFrame:
    """Share of draws (x replicates) in each response class, per arm (tidy table)."""
    rows = []
    labels = [c[0] for c in MRECIST_CLASSES] + ["mPD", "NA"]
    for arm in classes[DIM_ARM].values:
        vals = np.asarray(classes.sel({DIM_ARM: arm}).values).ravel()
        for lab in labels:
            rows.append({"arm": str(arm), "class": lab, "probability": float(np.mean(vals == lab)), "n": vals.size})
    df = pd.DataFrame(rows)
    return df[(df["class"] != "NA") | (df["probability"] > 0)].reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Resistance, burden, dose, treatment time
# --------------------------------------------------------------------------------------


def time_to_resistance(
    result: xr.Dataset,
    *,
    threshold: float = 0.5,
    visits="all",
    horizon: float | None = None,
) -> xr.DataArray:
    """First time [day] at which ``resistant_fraction > threshold`` (default 0.5).

    Assessed at ``visits`` (default every simulated time point). ``inf`` = not reached by
    the horizon; coords ``event`` and ``followup``.
    """
    if not 0 < threshold < 1:
        raise InputError(f"threshold={threshold!r}: a resistant fraction threshold lies in (0, 1), e.g. 0.5")
    da = _sample_order(_variable(result, "resistant_fraction"))
    times = da[DIM_TIME].values.astype(float)
    vt = visit_times(times, visits, horizon=horizon)
    v = _interp_last(np.asarray(da.values, float), times, vt)
    bad = ~np.isfinite(v).all(axis=-1)
    t_event, event, followup = _first_event(v > threshold, np.ones(v.shape, bool), vt, bad)
    return _package(
        t_event, da, name="time_to_resistance", units="day", better="higher", event=event,
        followup=followup, threshold=threshold,
    )


def probability_of_resistance(
    result: xr.Dataset | xr.DataArray,
    *,
    horizon: float | None = None,
    threshold: float = 0.5,
) -> xr.DataArray:
    """P(resistant fraction exceeds ``threshold`` by ``horizon``) per arm.

    The mean over draws (x replicates) of the event indicator; accepts a result or a
    :func:`time_to_resistance` DataArray. Coord ``mcse`` is the Monte-Carlo standard error
    ``sqrt(p (1 - p) / n)`` (independent samples assumed).
    """
    ttr = result if isinstance(result, xr.DataArray) else time_to_resistance(result, threshold=threshold, horizon=horizon)
    h = np.inf if horizon is None else float(horizon)
    hit = (ttr <= h) & ttr["event"]
    sdims = [d for d in SAMPLE_DIMS if d in ttr.dims]
    n = int(np.prod([ttr.sizes[d] for d in sdims]))
    p = hit.astype(float).mean(sdims)
    p = p.drop_vars([c for c in p.coords if c not in p.dims])
    p = p.assign_coords(mcse=(p.dims, np.sqrt(p.values * (1 - p.values) / n)))
    p.name = "probability_of_resistance"
    p.attrs = {"outcome": "probability_of_resistance", "units": "1", "better": "lower",
               "horizon": "end" if horizon is None else h, "threshold": ttr.attrs.get("threshold", threshold), "n": n}
    return p


def _trim_to_horizon(da: xr.DataArray, horizon):
    times = da[DIM_TIME].values.astype(float)
    if horizon is None or horizon >= times[-1]:
        return np.asarray(da.values, float), times
    if horizon <= times[0]:
        raise InputError(f"horizon={horizon} is not after the first simulated time {times[0]:g}")
    keep = times < horizon - 1e-9
    t = np.append(times[keep], float(horizon))
    y = np.asarray(da.values, float)
    return np.concatenate([y[..., keep], _interp_last(y, times, np.array([float(horizon)]))], axis=-1), t


def burden_auc(result: xr.Dataset, *, variable: str | None = None, horizon: float | None = None) -> xr.DataArray:
    """Area under the tumour-burden curve (trapezoid rule) from the first time to ``horizon``.

    ``variable`` defaults to ``tumor_volume``, else ``cells_total``, else ``sld``. Units are
    the variable's units times day.
    """
    if variable is None:
        variable = next((v for v in ("tumor_volume", "cells_total", "sld") if v in result.data_vars), "tumor_volume")
    da = _sample_order(_variable(result, variable))
    y, t = _trim_to_horizon(da, horizon)
    auc = np.trapezoid(y, t, axis=-1) if hasattr(np, "trapezoid") else np.trapz(y, t, axis=-1)
    return _package(auc, da, name=f"auc_{variable}", units=f"{da.attrs.get('units', '')}*day", better="lower",
                    variable=variable)


def cumulative_dose_at(result: xr.Dataset, *, horizon: float | None = None) -> xr.DataArray:
    """Cumulative dose [mg] per drug given up to ``horizon`` (the last time <= horizon)."""
    da = _variable(result, "cumulative_dose")
    lead = [d for d in (DIM_ARM, DIM_DRAW, DIM_REPLICATE, DIM_DRUG) if d in da.dims]
    da = da.transpose(*lead, DIM_TIME)
    times = da[DIM_TIME].values.astype(float)
    h = times[-1] if horizon is None else float(horizon)
    idx = np.searchsorted(times, h + 1e-9, side="right") - 1
    if idx < 0:
        raise InputError(f"horizon={horizon} is before the first simulated time {times[0]:g}")
    return _package(np.asarray(da.values[..., idx], float), da, name="cumulative_dose", units="mg", better="lower",
                    horizon=float(times[idx]))


def treatment_days(result: xr.Dataset, *, horizon: float | None = None) -> xr.DataArray:
    """Days on treatment up to ``horizon``: sum over grid intervals ``[t_i, t_i+1)`` of
    ``on_treatment(t_i) * (t_i+1 - t_i)`` (the state at a grid time holds until the next)."""
    da = _sample_order(_variable(result, "on_treatment"))
    times = da[DIM_TIME].values.astype(float)
    h = times[-1] if horizon is None else min(float(horizon), times[-1])
    edges = np.minimum(np.append(times[1:], times[-1]), h)
    dt = np.clip(edges - times, 0.0, None)
    days = (np.asarray(da.values, float) * dt).sum(axis=-1)
    return _package(days, da, name="treatment_days", units="day", better="lower")


def standard_outcomes(result: xr.Dataset, *, visits=28.0, horizon: float | None = None) -> dict[str, xr.DataArray]:
    """Every outcome the result's variables allow, with default definitions, by name."""
    out: dict[str, xr.DataArray] = {}
    for crit in CRITERIA.values():
        if crit.variable in result.data_vars:
            da = time_to_progression(result, crit, visits=visits, horizon=horizon)
            out[da.name] = da
    if "resistant_fraction" in result.data_vars:
        out["time_to_resistance"] = time_to_resistance(result, horizon=horizon)
        out["probability_of_resistance"] = probability_of_resistance(out["time_to_resistance"], horizon=horizon)
    if any(v in result.data_vars for v in ("tumor_volume", "cells_total", "sld")):
        a = burden_auc(result, horizon=horizon)
        out[a.name] = a
    if "cumulative_dose" in result.data_vars:
        out["cumulative_dose"] = cumulative_dose_at(result, horizon=horizon)
    if "on_treatment" in result.data_vars:
        out["treatment_days"] = treatment_days(result, horizon=horizon)
    return out


# --------------------------------------------------------------------------------------
# Kaplan-Meier and summaries
# --------------------------------------------------------------------------------------


def kaplan_meier(durations, events) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit estimate: distinct event times ``t_j`` and ``S(t_j)``.

    ``S(t) = prod_{t_j <= t} (1 - d_j / n_j)`` with ``d_j`` events at ``t_j`` and ``n_j``
    at risk just before ``t_j`` (censored at ``t_j`` counted at risk, the usual convention).
    """
    d = np.asarray(durations, float).ravel()
    e = np.asarray(events, bool).ravel()
    ok = np.isfinite(d)
    d, e = d[ok], e[ok]
    te = np.unique(d[e])
    if te.size == 0:
        return te, te.astype(float)
    n_at_risk = (d[None, :] >= te[:, None]).sum(axis=1)
    n_events = (e[None, :] & (d[None, :] == te[:, None])).sum(axis=1)
    return te, np.cumprod(1.0 - n_events / n_at_risk)


def km_quantile(durations, events, q: float) -> float:
    """Time by which a fraction ``q`` has had the event: first ``t`` with ``S(t) <= 1 - q``
    (``inf`` if the curve never gets there, i.e. not reached)."""
    t, s = kaplan_meier(durations, events)
    hit = np.nonzero(s <= 1.0 - q + 1e-12)[0]
    return float(t[hit[0]]) if hit.size else float("inf")


#: Columns of :func:`summarize`.
SUMMARY_COLUMNS = ("arm", "outcome", "median", "q05", "q95", "units", "n", "n_events", "method")


def _summ_rows(da: xr.DataArray) -> list[dict]:
    name = da.attrs.get("outcome", da.name or "outcome")
    units = da.attrs.get("units", "")
    sdims = [d for d in SAMPLE_DIMS if d in da.dims]
    other = [d for d in da.dims if d not in sdims and d != DIM_ARM]
    rows = []
    if other:  # e.g. cumulative dose per drug: one row per label
        stacked = da.stack(_label=other)
        for i in range(stacked.sizes["_label"]):
            sub = stacked.isel(_label=i)
            lab = ",".join(str(sub[o].values) for o in other)
            sub = sub.drop_vars([c for c in sub.coords if c in ("_label", *other)])
            sub.attrs = dict(da.attrs, outcome=f"{name}[{lab}]")
            rows.extend(_summ_rows(sub))
        return rows
    arms = da[DIM_ARM].values if DIM_ARM in da.dims else [None]
    for arm in arms:
        sub = da.sel({DIM_ARM: arm}) if arm is not None else da
        vals = np.asarray(sub.values)
        if vals.dtype.kind not in "fiub":
            raise InputError(f"summarize: outcome {name!r} is not numeric (dtype {vals.dtype}); "
                             "use response_class_probabilities for response classes")
        vals = vals.astype(float).ravel()
        row = {"arm": str(arm) if arm is not None else "", "outcome": name, "units": units, "n": vals.size}
        if not sdims:  # already a per-arm number (e.g. a probability)
            mcse = float(np.asarray(sub["mcse"].values)) if "mcse" in sub.coords else np.nan
            v = float(vals[0])
            lo, hi = (v - 1.645 * mcse, v + 1.645 * mcse) if np.isfinite(mcse) else (np.nan, np.nan)
            if units == "1":
                lo, hi = max(lo, 0.0), min(hi, 1.0)
            row.update(median=v, q05=lo, q95=hi, n=int(da.attrs.get("n", 1)), n_events=pd.NA,
                       method="mean over samples; interval +/-1.645 MCSE")
        elif "event" in sub.coords:
            ev = np.asarray(sub["event"].values, bool).ravel()
            fu = np.asarray(sub["followup"].values, float).ravel()
            dur = np.where(ev, vals, fu)
            ok = np.isfinite(dur)
            n_ok = int(ok.sum())
            row["n"] = n_ok
            row["n_events"] = int(ev[ok].sum())
            if n_ok == 0:
                row.update(median=np.nan, q05=np.nan, q95=np.nan, method="not assessable")
            elif ev[ok].all():
                q = np.quantile(vals[ok], [0.5, 0.05, 0.95])
                row.update(median=q[0], q05=q[1], q95=q[2], method="empirical quantiles (no censoring)")
            else:
                row.update(
                    median=km_quantile(dur[ok], ev[ok], 0.5),
                    q05=km_quantile(dur[ok], ev[ok], 0.05),
                    q95=km_quantile(dur[ok], ev[ok], 0.95),
                    method="Kaplan-Meier over samples (censored; inf = not reached)",
                )
            if n_ok < vals.size:
                row["method"] += f"; {vals.size - n_ok} not assessable (NaN) dropped"
        else:
            ok = np.isfinite(vals)
            q = np.quantile(vals[ok], [0.5, 0.05, 0.95]) if ok.any() else [np.nan] * 3
            row.update(median=q[0], q05=q[1], q95=q[2], n=int(ok.sum()), n_events=pd.NA,
                       method="empirical quantiles")
        rows.append(row)
    return rows


def outcome_list(outcomes) -> list:
    """Outcomes as a list of DataArrays, from one DataArray, a mapping or an iterable."""
    if isinstance(outcomes, xr.DataArray):
        return [outcomes]
    if isinstance(outcomes, Mapping):
        return list(outcomes.values())
    return list(outcomes)


def summarize(outcomes: xr.DataArray | Iterable[xr.DataArray] | Mapping[str, xr.DataArray]) -> pd.DataFrame:
    """Posterior median and 90 % interval per arm and outcome, as a tidy table.

    Columns: ``arm, outcome, median, q05, q95, units, n, n_events, method``. Samples are
    pooled over ``draw`` (x ``replicate``). For time-to-event outcomes with censoring
    (not reached by the horizon) median and quantiles come from the Kaplan-Meier curve over
    samples (``inf`` where the curve does not reach the quantile) and ``method`` says so;
    without censoring they are the empirical quantiles. Outcomes with an extra dim (e.g.
    ``drug``) give one row per label, named ``outcome[label]``.
    """
    items = outcome_list(outcomes)
    rows: list[dict] = []
    for da in items:
        if da.dtype.kind in "OU":  # response classes: not summarised here
            continue
        rows.extend(_summ_rows(da))
    df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    df["n_events"] = df["n_events"].astype("Int64")
    return df
