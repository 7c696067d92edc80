"""Linear pharmacokinetics in closed form, batched, with target inhibition.

Every formula is written once against a small array namespace, so the same code runs on
numpy arrays (simulation) and on float64 torch tensors (differentiable with respect to
the PK parameters, for calibration). See ``docs/pk.md`` for the equations.

Units (canonical): time [day], amount [mg], volume [L], clearance [L/day], rate
constants [1/day], concentration [mg/L] (= µg/mL), potency IC50 [mg/L].

Shape conventions
-----------------
PK parameters (:class:`PKParams` fields) are scalars or arrays of one common
(broadcastable) *batch shape* ``S`` (typically ``(B,)``: posterior draws); ``times`` is 1-D
``(T,)``; concentrations have shape ``S + (T,)``: ``(B, T)`` for a batch, ``(T,)`` for
scalar parameters. Doses are data (numpy), never batched; gradients with respect to dose
*times* are not supported (doses are events), gradients with respect to PK parameters and
potency are.

Models
------
- disposition: 1-compartment (``q``/``v2`` ``None``) or 2-compartment (central ``v``,
  peripheral ``v2``, inter-compartmental clearance ``q``), elimination from the central
  compartment; the unit impulse response is a sum of exponentials ``sum_i c_i e^{-l_i t}``.
- inputs: IV bolus (route iv, duration 0) into the central compartment; first-order
  absorption (routes oral/sc/im/ip, duration 0) from a depot with rate ``ka`` and
  bioavailability ``f``; zero-order input (duration > 0, any route) of
  ``amount * F_route`` at constant rate into the central compartment over ``duration``
  (``F_route`` = 1 for iv, ``f`` otherwise).
- superposition over all doses (linear PK); a dose contributes nothing before its time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import numpy as np

from .errors import InputError

__all__ = [
    "PKParams",
    "Potency",
    "DoseTable",
    "Exposure",
    "ImputedDoseWarning",
    "EXTRAVASCULAR_ROUTES",
    "ROUTES",
    "SPECIES",
    "concentration",
    "disposition",
    "dose_table",
    "event_times",
    "exposure",
    "hill_inhibition",
    "nm_to_mg_per_l",
    "next_event_time",
    "pk_scan",
    "PKScan",
    "scale_pk",
]

ROUTES = ("oral", "iv", "sc", "im", "ip")
EXTRAVASCULAR_ROUTES = ("oral", "sc", "im", "ip")
#: species accepted by :func:`scale_pk`, with a typical body weight [kg] (for docs/defaults).
SPECIES = {"human": 70.0, "mouse": 0.025, "rat": 0.25, "dog": 10.0, "monkey": 5.0}

# |d*t| below which (1 - e^{-d t})/d is evaluated by its Taylor series (exact to ~1e-16,
# and with accurate autograd derivatives).
_SERIES_CUTOFF = 1e-2


class ImputedDoseWarning(UserWarning):
    """A dose amount was not recorded and the catalogue's standard dose was used."""


# ----------------------------------------------------------------------------------------
# array namespaces: the few primitives the formulas need, for numpy and torch
# ----------------------------------------------------------------------------------------
class _NumpyNS:
    name = "numpy"

    def asarray(self, x):
        return np.asarray(x, dtype=np.float64)

    exp = staticmethod(np.exp)
    expm1 = staticmethod(np.expm1)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    log = staticmethod(np.log)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def sum(self, x, axis):
        return np.sum(x, axis=axis)

    def zeros(self, shape):
        return np.zeros(shape, dtype=np.float64)

    def stack(self, xs):
        return np.stack(xs, axis=-1)

    def unstack(self, x):
        return [x[..., i] for i in range(x.shape[-1])]

    def shape(self, x):
        return np.shape(x)


class _TorchNS:
    name = "torch"

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device

    def asarray(self, x):
        t = self.torch
        if isinstance(x, t.Tensor):
            return x.to(dtype=t.float64, device=self.device)
        return t.as_tensor(np.asarray(x, dtype=np.float64), dtype=t.float64, device=self.device)

    def exp(self, x):
        return self.torch.exp(x)

    def expm1(self, x):
        return self.torch.expm1(x)

    def sqrt(self, x):
        return self.torch.sqrt(x)

    def abs(self, x):
        return self.torch.abs(x)

    def log(self, x):
        return self.torch.log(x)

    def _t(self, x):
        return x if isinstance(x, self.torch.Tensor) else self.asarray(x)

    def where(self, c, a, b):
        c = c if isinstance(c, self.torch.Tensor) else self.torch.as_tensor(np.asarray(c), device=self.device)
        return self.torch.where(c, self._t(a), self._t(b))

    def minimum(self, a, b):
        return self.torch.minimum(self._t(a), self._t(b))

    def sum(self, x, axis):
        return self.torch.sum(x, dim=axis)

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float64, device=self.device)

    def stack(self, xs):
        return self.torch.stack(xs, dim=-1)

    def unstack(self, x):
        return list(self.torch.unbind(x, dim=-1))

    def shape(self, x):
        return tuple(x.shape) if isinstance(x, self.torch.Tensor) else np.shape(x)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _namespace(*values):
    for v in values:
        if _is_torch(v):
            return _TorchNS(v.device)
    return _NumpyNS()


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PKParams:
    """Linear PK parameters (scalars, numpy arrays or torch tensors of one batch shape).

    Attributes
    ----------
    cl : clearance from the central compartment [L/day].
    v : central volume [L].
    q : inter-compartmental clearance [L/day]; ``None`` for a 1-compartment model.
    v2 : peripheral volume [L]; ``None`` for a 1-compartment model.
    ka : first-order absorption rate [1/day] (needed for extravascular bolus doses).
    f : bioavailability of extravascular doses (oral, sc, im, ip); iv doses use 1.
    """

    cl: Any
    v: Any
    q: Any = None
    v2: Any = None
    ka: Any = None
    f: Any = 1.0

    def __post_init__(self):
        if (self.q is None) != (self.v2 is None):
            raise InputError("PKParams: give both q and v2 (2-compartment) or neither (1-compartment)")
        for name in ("cl", "v", "q", "v2", "ka", "f"):
            val = getattr(self, name)
            if val is None or _is_torch(val):
                continue
            arr = np.asarray(val, dtype=np.float64)
            bad = ~np.isfinite(arr) | (arr < 0) if name in ("cl", "q") else ~np.isfinite(arr) | (arr <= 0)
            if np.any(bad):
                raise InputError(
                    f"PKParams.{name}: expected finite {'non-negative' if name in ('cl', 'q') else 'positive'} values, "
                    f"received {arr[bad].ravel()[:3].tolist()}; fix: check units ({_UNITS[name]})"
                )

    @property
    def n_compartments(self) -> int:
        return 1 if self.q is None else 2

    @property
    def batch_shape(self) -> tuple[int, ...]:
        shapes = [tuple(np.shape(v)) if not _is_torch(v) else tuple(v.shape) for v in self._values() if v is not None]
        return tuple(np.broadcast_shapes(*shapes)) if shapes else ()

    def _values(self):
        return [getattr(self, f.name) for f in fields(self)]

    def to_torch(self, *, requires_grad: bool = False, device=None) -> "PKParams":
        """The same parameters as float64 torch tensors (leaf tensors when ``requires_grad``)."""
        import torch

        def conv(x):
            if x is None:
                return None
            t = torch.as_tensor(np.asarray(x, dtype=np.float64) if not _is_torch(x) else x, dtype=torch.float64, device=device)
            return t.detach().clone().requires_grad_(requires_grad) if requires_grad else t

        return PKParams(**{f.name: conv(getattr(self, f.name)) for f in fields(self)})


_UNITS = {"cl": "L/day", "v": "L", "q": "L/day", "v2": "L", "ka": "1/day", "f": "fraction, 0 < f <= 1"}


@dataclass(frozen=True)
class Potency:
    """Hill potency on the total plasma concentration.

    Attributes
    ----------
    ic50 : concentration of half-maximal inhibition [mg/L] (use :func:`nm_to_mg_per_l`).
    hill : Hill coefficient (steepness), > 0.
    imax : maximal inhibition, in (0, 1].
    """

    ic50: Any
    hill: Any = 1.0
    imax: Any = 1.0

    def __post_init__(self):
        for name in ("ic50", "hill", "imax"):
            val = getattr(self, name)
            if _is_torch(val):
                continue
            arr = np.asarray(val, dtype=np.float64)
            bad = ~np.isfinite(arr) | (arr <= 0) | ((arr > 1) if name == "imax" else False)
            if np.any(bad):
                raise InputError(f"Potency.{name}: expected finite positive values{' <= 1' if name == 'imax' else ''}, received {arr[bad].ravel()[:3].tolist()}")


def nm_to_mg_per_l(value_nm, molar_mass_g_per_mol):
    """Convert a molar concentration [nM] to a mass concentration [mg/L]: nM * g/mol * 1e-6."""
    return np.asarray(value_nm, dtype=np.float64) * float(molar_mass_g_per_mol) * 1e-6


# ----------------------------------------------------------------------------------------
# closed-form building blocks (namespace-generic)
# ----------------------------------------------------------------------------------------
def _h(ns, d, t):
    """(1 - e^{-d t}) / d for d >= 0, t >= 0, with the limit t at d = 0 (series near 0)."""
    x = d * t
    small = x < _SERIES_CUTOFF
    d_safe = ns.where(small, 1.0, d)
    direct = -ns.expm1(-d_safe * t) / d_safe
    # t * sum_{n>=0} (-x)^n / (n+1)!  (Horner, to x^6: error < x^7/8! < 3e-19 relative)
    series = t * (1.0 - x / 2.0 * (1.0 - x / 3.0 * (1.0 - x / 4.0 * (1.0 - x / 5.0 * (1.0 - x / 6.0 * (1.0 - x / 7.0))))))
    return ns.where(small, series, direct)


def _phi(ns, a, b, t):
    """(e^{-a t} - e^{-b t}) / (b - a), symmetric in a, b; limit t e^{-a t} when a = b.

    Written as e^{-min(a,b) t} * h(|b - a|, t): no overflow and no cancellation for any
    a, b >= 0 (the Bateman function's ka -> k limit).
    """
    return ns.exp(-ns.minimum(a, b) * t) * _h(ns, ns.abs(b - a), t)


def _disposition(ns, p: PKParams):
    """[(c_i, l_i)] of the unit impulse response sum_i c_i e^{-l_i t} [1/L, 1/day]."""
    cl, v = ns.asarray(p.cl), ns.asarray(p.v)
    k10 = cl / v
    if p.q is None:
        return [(1.0 / v, k10)]
    q, v2 = ns.asarray(p.q), ns.asarray(p.v2)
    k12, k21 = q / v, q / v2
    x = k10 + k12 - k21
    # alpha - beta = sqrt((k10 + k12 + k21)^2 - 4 k10 k21) = sqrt(x^2 + 4 k12 k21): no cancellation
    disc = ns.sqrt(x * x + 4.0 * k12 * k21)
    alpha = (k10 + k12 + k21 + disc) / 2.0
    beta = ns.where(alpha > 0, k10 * k21 / ns.where(alpha > 0, alpha, 1.0), 0.0)
    # alpha - k21 = (disc + x)/2 and k21 - beta = (disc - x)/2; compute the one that would
    # cancel as 2 k12 k21 / (disc + |x|)
    ax = ns.abs(x)
    big = (disc + ax) / 2.0
    small = ns.where(disc + ax > 0, 2.0 * k12 * k21 / ns.where(disc + ax > 0, disc + ax, 1.0), 0.0)
    a_minus_k21 = ns.where(x >= 0, big, small)
    k21_minus_b = ns.where(x >= 0, small, big)
    disc_safe = ns.where(disc > 0, disc, 1.0)
    ca = ns.where(disc > 0, a_minus_k21 / (v * disc_safe), 1.0 / v)
    cb = ns.where(disc > 0, k21_minus_b / (v * disc_safe), 0.0)
    return [(ca, alpha), (cb, beta)]


def disposition(params: PKParams):
    """Coefficients and rates of the unit impulse response: ``C(t) = D * sum c_i e^{-l_i t}``.

    Returns ``(coefficients [1/L], rates [1/day])`` as two lists (one entry per
    compartment), each entry of the parameters' batch shape; for 2 compartments the rates
    are (alpha, beta), alpha >= beta.
    """
    ns = _namespace(*params._values())
    terms = _disposition(ns, params)
    return [c for c, _ in terms], [r for _, r in terms]


# ----------------------------------------------------------------------------------------
# doses
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoseTable:
    """Administrations of one drug (data, numpy): one entry per dose.

    Attributes
    ----------
    time : dose (start) times [day], shape (N,).
    amount : amounts [mg], finite, shape (N,).
    route : routes (``ROUTES``), shape (N,).
    duration : input durations [day] (0 = bolus), shape (N,).
    """

    time: np.ndarray
    amount: np.ndarray
    route: np.ndarray
    duration: np.ndarray

    def __post_init__(self):
        t = np.atleast_1d(np.asarray(self.time, dtype=np.float64))
        a = np.atleast_1d(np.asarray(self.amount, dtype=np.float64))
        r = np.atleast_1d(np.asarray(self.route, dtype=object))
        d = np.atleast_1d(np.asarray(self.duration, dtype=np.float64))
        n = len(t)
        a, r, d = (np.broadcast_to(x, (n,)).copy() for x in (a, r, d))
        if not np.all(np.isfinite(t)):
            raise InputError("DoseTable: dose times must be finite numbers [day]")
        if np.any(np.isnan(a)):
            raise InputError(
                "DoseTable: some amounts are NaN (not recorded); fix: use twin.pk.exposure(), which replaces them "
                "with the catalogue's standard dose and flags it, or fill the amounts [mg]"
            )
        if np.any(~np.isfinite(a) | (a < 0)):
            raise InputError(f"DoseTable: amounts must be finite and >= 0 [mg], received {a[~np.isfinite(a) | (a < 0)][:3].tolist()}")
        if np.any(~np.isfinite(d) | (d < 0)):
            raise InputError("DoseTable: durations must be finite and >= 0 [day] (0 = bolus)")
        bad = sorted({str(x) for x in r if x not in ROUTES})
        if bad:
            raise InputError(f"DoseTable: unknown route(s) {bad}; expected one of {list(ROUTES)}")
        object.__setattr__(self, "time", t)
        object.__setattr__(self, "amount", a)
        object.__setattr__(self, "route", r)
        object.__setattr__(self, "duration", d)

    def __len__(self) -> int:
        return len(self.time)

    @property
    def extravascular(self) -> np.ndarray:
        return np.isin(self.route, EXTRAVASCULAR_ROUTES)

    @classmethod
    def single(cls, time: float = 0.0, amount: float = 1.0, route: str = "iv", duration: float = 0.0) -> "DoseTable":
        """One dose."""
        return cls(np.array([time]), np.array([amount]), np.array([route], dtype=object), np.array([duration]))

    @classmethod
    def repeated(cls, amount: float, interval: float, count: int, *, start: float = 0.0, route: str = "oral", duration: float = 0.0) -> "DoseTable":
        """``count`` equal doses every ``interval`` days from ``start``."""
        t = start + interval * np.arange(int(count), dtype=np.float64)
        return cls(t, np.full(len(t), float(amount)), np.full(len(t), route, dtype=object), np.full(len(t), float(duration)))


def _select(regimen, *, arm: str | None, drug: str | None) -> "Any":
    ev = regimen.events()
    if arm is None:
        arms = sorted(ev["arm"].unique()) if len(ev) else []
        if len(arms) > 1:
            raise InputError(f"the regimen has several arms {arms}; fix: pass arm=... (one of them)")
    else:
        ev = ev[ev["arm"] == arm]
    if drug is not None:
        ev = ev[ev["drug"] == drug]
    return ev


def dose_table(regimen, drug: str, *, arm: str | None = None, fill_amount: float | None = None) -> tuple[DoseTable, int]:
    """The doses of ``drug`` in ``regimen`` (one arm) and the number of NaN amounts filled.

    NaN amounts (not recorded) are replaced by ``fill_amount`` when given (the caller
    must report it, as :func:`exposure` does); otherwise they raise :class:`InputError`.
    """
    ev = _select(regimen, arm=arm, drug=drug)
    amount = ev["amount"].to_numpy(dtype=np.float64).copy()
    missing = np.isnan(amount)
    n_missing = int(missing.sum())
    if n_missing:
        if fill_amount is None:
            raise InputError(
                f"{n_missing} dose(s) of {drug!r} have no recorded amount; fix: record the amounts [mg], "
                "or give a standard dose (twin.pk.exposure uses the catalogue's standard_dose_mg and flags it)"
            )
        amount[missing] = float(fill_amount)
    table = DoseTable(ev["time"].to_numpy(dtype=np.float64), amount, ev["route"].to_numpy(dtype=object), ev["duration"].to_numpy(dtype=np.float64))
    return _expand_depots(table, drug), n_missing


def _expand_depots(table: "DoseTable", drug: str) -> "DoseTable":
    """Multi-interval depots as consecutive unit depots: for a drug whose catalogue entry has
    ``depot_unit_mg`` (e.g. leuprolide 7.5 mg = 1-month depot), an extravascular bolus of
    n x that amount (n >= 2, rounded) releases like n unit depots given every
    ``standard_interval_day`` (a 22.5 mg 3-month depot = 7.5 mg at days 0, 28, 56). The
    catalogue's single absorption rate describes the unit depot only; without this a
    3-month depot would release within one month."""
    from .drugs import lookup_drug

    cat = lookup_drug(drug)
    unit = getattr(getattr(cat, "pk", None), "depot_unit_mg", None)
    interval = getattr(getattr(cat, "pk", None), "standard_interval_day", None)
    if not unit or not interval or not len(table):
        return table
    n = np.rint(table.amount / unit)
    multi = table.extravascular & (table.duration <= 0) & (n >= 2) & (np.abs(table.amount - n * unit) <= 0.05 * n * unit)
    if not multi.any():
        return table
    reps = np.where(multi, n, 1).astype(np.int64)
    idx = np.repeat(np.arange(len(table)), reps)
    k = np.concatenate([np.arange(r) for r in reps])
    time = table.time[idx] + k * float(interval)
    amount = np.where(multi[idx], table.amount[idx] / reps[idx], table.amount[idx])
    order = np.argsort(time, kind="stable")
    return DoseTable(time[order], amount[order], table.route[idx][order], table.duration[idx][order])


# ----------------------------------------------------------------------------------------
# concentration
# ----------------------------------------------------------------------------------------
def _expand(x, ns, ndim_extra: int):
    x = ns.asarray(x)
    shape = ns.shape(x)
    return x.reshape(tuple(shape) + (1,) * ndim_extra)


def _event_inputs(doses: DoseTable):
    """Data-only bookkeeping of the event grid (numpy).

    Returns the sorted unique event times ``e`` (dose starts and zero-order input ends) and,
    per event, the central bolus amount, the extravascular bolus amount and the zero-order
    input rates (iv and extravascular) active on ``[e_j, e_{j+1})``.
    """
    t, a, d, ev = doses.time, doses.amount, doses.duration, doses.extravascular
    zo = d > 0
    ends = t[zo] + d[zo]
    e = np.unique(np.concatenate([t, ends]))
    n = len(e)
    i0 = np.searchsorted(e, t)
    bolus_central = np.zeros(n)
    bolus_depot = np.zeros(n)
    np.add.at(bolus_central, i0[~zo & ~ev], a[~zo & ~ev])
    np.add.at(bolus_depot, i0[~zo & ev], a[~zo & ev])
    rates = []
    for sel in (zo & ~ev, zo & ev):
        r = np.zeros(n + 1)
        cnt = np.zeros(n + 1, dtype=np.int64)
        j0, j1 = i0[sel], np.searchsorted(e, t[sel] + d[sel])
        np.add.at(r, j0, a[sel] / d[sel])
        np.add.at(r, j1, -a[sel] / d[sel])
        np.add.at(cnt, j0, 1)
        np.add.at(cnt, j1, -1)
        r, cnt = np.cumsum(r)[:n], np.cumsum(cnt)[:n]
        rates.append(np.where(cnt > 0, r, 0.0))  # exact zero when no input is active
    return e, bolus_central, bolus_depot, rates[0], rates[1]


def concentration(params: PKParams, doses: DoseTable, times):
    """Central (plasma) concentration [mg/L] at ``times`` [day] after ``doses``.

    Parameters
    ----------
    params : :class:`PKParams` of batch shape ``S`` (numpy or torch float64; torch
        inputs give a torch result differentiable with respect to them).
    doses : :class:`DoseTable` (any number of doses, any mix of routes).
    times : 1-D array of times [day] (any order; a time before a dose gets nothing from it;
        at a bolus time the bolus is included, C is right-continuous).

    Returns
    -------
    Array of shape ``S + (T,)``, same library as ``params``.

    Notes
    -----
    Exact superposition, computed as a scan over the E distinct event times (dose starts,
    input ends): the state (contribution of each exponential mode to C, depot amount,
    zero-order input rate) is propagated in closed form from one event to the next, then
    every output time is evaluated from the last event at or before it. Cost O(B (E + T)),
    not O(B N T). :func:`pk_scan` exposes the scan (reused across many evaluations).
    """
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1:
        raise InputError(f"concentration: times must be 1-D (T,), received shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise InputError("concentration: times must be finite [day]")
    if not isinstance(doses, DoseTable):
        raise InputError(f"concentration: doses must be a twin.pk.DoseTable, received {type(doses).__name__}; fix: use twin.pk.dose_table(regimen, drug)")
    if len(doses) == 0 or len(t) == 0:
        ns = _namespace(*params._values())
        return ns.zeros(tuple(params.batch_shape) + (len(t),))
    return pk_scan(params, doses).concentration(t)


class PKScan:
    """The closed-form linear PK state of one drug after each event of a dose table.

    Built by :func:`pk_scan`. ``events`` (E,) are the sorted dose starts and input ends;
    after applying the inputs at ``events[j]`` the state is: the contribution ``m_i`` of each
    exponential mode ``i`` of the disposition to C [mg/L], the depot amount ``a`` [mg] and the
    zero-order input rate ``r`` [mg/day] active until the next event (each of the parameters'
    batch shape ``S``). Between events the state propagates in closed form::

        m_i(e_j + s) = m_i e^{-l_i s} + a ka c_i phi(l_i, ka, s) + r c_i h(l_i, s),   a(e_j + s) = a e^{-ka s}

    so the concentration at any time costs O(1) (not O(number of doses)) once the scan is built.
    """

    def __init__(self, ns, events, terms, hist_m, hist_a, hist_r, ka1):
        self.ns = ns
        self.events = events
        self.terms = terms
        self._m = [ns.stack(h) for h in hist_m]  # S + (E,)
        self._a = ns.stack(hist_a) if hist_a is not None else None
        self._r = ns.stack(hist_r) if hist_r is not None else None
        self._ka1 = ka1
        self._e1 = [(_expand(c, ns, 1), _expand(lam, ns, 1)) for c, lam in terms]

    def _eval(self, jc, s, valid):
        """C at offsets ``s`` (T,) after events ``jc`` (T,) (``valid``: False -> 0)."""
        ns = self.ns
        idx = jc if ns.name == "numpy" else ns.torch.as_tensor(jc, device=ns.device)
        s = ns.asarray(s)
        a_t = self._a[..., idx] if self._a is not None else None
        r_t = self._r[..., idx] if self._r is not None else None
        ka1 = self._ka1
        out = 0.0
        for (c1, l1), hm in zip(self._e1, self._m):
            v = hm[..., idx] * ns.exp(-l1 * s)
            if a_t is not None:
                v = v + a_t * ka1 * c1 * _phi(ns, l1, ka1, s)
            if r_t is not None:
                v = v + r_t * c1 * _h(ns, l1, s)
            out = out + v
        return out * ns.asarray(valid.astype(np.float64))

    def concentration(self, times):
        """Central concentration [mg/L] at ``times`` (1-D, any order): ``S + (T,)``; equals
        :func:`concentration` of the scanned doses."""
        t = np.asarray(times, dtype=np.float64)
        j = np.searchsorted(self.events, t, side="right") - 1
        valid = j >= 0
        jc = np.where(valid, j, 0)
        return self._eval(jc, np.where(valid, t - self.events[jc], 0.0), valid)

    def state_at(self, times) -> dict:
        """The closed-form PK state at ``times`` (1-D, numpy parameters only), from the doses
        given at or before each time: ``modes`` (list, one (T,) array per exponential mode:
        its contribution to C [mg/L]), ``depot`` (T,) [mg] or None, ``rate`` (T,) [mg/day] or
        None, and the constants ``coef``, ``rates`` (the modes' c_i [1/L] and l_i [1/day]) and
        ``ka``. From a state at time b the concentration at b + s until the next event is
        ``sum_i m_i e^{-l_i s} + depot ka c_i phi(l_i, ka, s) + rate c_i h(l_i, s)``
        (:meth:`segment`); calibration uses these as segment constants."""
        ns = self.ns
        if ns.name != "numpy":
            raise InputError("PKScan.state_at: numpy PK parameters only")
        t = np.asarray(times, dtype=np.float64)
        j = np.searchsorted(self.events, t, side="right") - 1
        valid = (j >= 0).astype(np.float64)
        jc = np.where(j >= 0, j, 0)
        s = np.where(j >= 0, t - self.events[jc], 0.0)
        a_t = self._a[..., jc] if self._a is not None else None
        r_t = self._r[..., jc] if self._r is not None else None
        modes = []
        for (c1, l1), hm in zip(self._e1, self._m):
            v = hm[..., jc] * np.exp(-l1 * s)
            if a_t is not None:
                v = v + a_t * self._ka1 * c1 * _phi(ns, l1, self._ka1, s)
            if r_t is not None:
                v = v + r_t * c1 * _h(ns, l1, s)
            modes.append(v * valid)
        depot = a_t * np.exp(-self._ka1 * s) * valid if a_t is not None else None
        rate = r_t * valid if r_t is not None else None
        coef = [float(np.asarray(c).reshape(-1)[0]) for c, _ in self.terms]
        rates = [float(np.asarray(l).reshape(-1)[0]) for _, l in self.terms]
        ka = float(np.asarray(self._ka1).reshape(-1)[0]) if self._ka1 is not None else None
        return {"modes": modes, "depot": depot, "rate": rate, "coef": coef, "rates": rates, "ka": ka}

    def segment(self, start: float):
        """``times -> C`` [mg/L] of the doses given at or before ``start``, for times in
        ``[start, next event]`` (an ODE segment): propagated in closed form from the last
        event at or before ``start``, O(1) per time. Equals :func:`concentration` of the doses
        with ``time <= start`` for those times (up to rounding). Returns ``None`` when no dose
        was given at or before ``start``."""
        j = int(np.searchsorted(self.events, float(start), side="right")) - 1
        if j < 0:
            return None
        e = float(self.events[j])
        one = np.ones(1, dtype=bool)

        def at(times):
            t = np.asarray(times, dtype=np.float64)
            n = t.shape[0]
            return self._eval(np.full(n, j), t - e, np.broadcast_to(one, (n,)))

        return at


def pk_scan(params: PKParams, doses: DoseTable) -> PKScan:
    """Scan ``doses`` once (O(events)) and return a :class:`PKScan`, whose
    :meth:`~PKScan.concentration` and :meth:`~PKScan.segment` evaluate the exact
    superposition at any time in O(1). ``concentration(params, doses, t)`` is
    ``pk_scan(params, doses).concentration(t)``."""
    ns = _namespace(*params._values())
    if not isinstance(doses, DoseTable):
        raise InputError(f"pk_scan: doses must be a twin.pk.DoseTable, received {type(doses).__name__}")
    if len(doses) == 0:
        raise InputError("pk_scan: the dose table is empty")
    batch = tuple(params.batch_shape)
    e, b_central, b_depot, r_iv, r_ev = _event_inputs(doses)
    has_depot = bool(np.any(b_depot != 0))
    if np.any((doses.duration == 0) & doses.extravascular) and params.ka is None:
        raise InputError("concentration: extravascular bolus doses (oral/sc/im/ip, duration 0) need PKParams.ka [1/day]")
    terms = _disposition(ns, params)
    f = ns.asarray(params.f)
    ka = ns.asarray(params.ka) if params.ka is not None else None
    zero = ns.zeros(batch)

    # step propagators for every inter-event interval, vectorised: shape S + (E-1,)
    n_ev = len(e)
    dts = ns.asarray(np.diff(e))
    any_rate = bool(np.any(r_iv != 0) or np.any(r_ev != 0))
    ka1 = _expand(ka, ns, 1) if ka is not None else None
    steps = []
    for c, lam in terms:
        c1, l1 = _expand(c, ns, 1), _expand(lam, ns, 1)
        g = ns.unstack(ns.exp(-l1 * dts)) if n_ev > 1 else []
        gd = ns.unstack(ka1 * c1 * _phi(ns, l1, ka1, dts)) if has_depot and n_ev > 1 else None
        gr = ns.unstack(c1 * _h(ns, l1, dts)) if any_rate and n_ev > 1 else None
        steps.append((g, gd, gr))
    ga = ns.unstack(ns.exp(-ka1 * dts)) if has_depot and n_ev > 1 else None

    # scan over events: state after applying the inputs at e_j
    m = [zero for _ in terms]
    a = zero
    hist_m = [[] for _ in terms]
    hist_a, hist_r = [], []
    r_prev = None
    for j in range(n_ev):
        if j > 0:
            k = j - 1
            nxt = []
            for (g, gd, gr), mi in zip(steps, m):
                v = mi * g[k]
                if has_depot:
                    v = v + a * gd[k]
                if r_prev is not None:
                    v = v + r_prev * gr[k]
                nxt.append(v)
            m = nxt
            if has_depot:
                a = a * ga[k]
        if b_central[j] != 0:
            m = [mi + float(b_central[j]) * c for (c, _), mi in zip(terms, m)]
        if b_depot[j] != 0:
            a = a + float(b_depot[j]) * f
        r_prev = None
        if r_iv[j] != 0 or r_ev[j] != 0:
            r_prev = zero + float(r_iv[j]) + float(r_ev[j]) * f
        for i, mi in enumerate(m):
            hist_m[i].append(mi)
        hist_a.append(a)
        hist_r.append(zero if r_prev is None else r_prev)
    return PKScan(ns, e, terms, hist_m, hist_a if has_depot else None, hist_r if any_rate else None, ka1)


def hill_inhibition(c, ic50, hill=1.0, imax=1.0):
    """Target inhibition ``I = imax * C^h / (IC50^h + C^h)`` (0 at C = 0).

    ``c`` and ``ic50`` in the same unit (mg/L); arguments broadcast (put the batch axis of
    a batched potency first and add a trailing axis for time: ``ic50[..., None]``).
    Evaluated as ``imax * sigmoid(h * (log C - log IC50))``: stable for any C >= 0 and
    differentiable (numpy or torch).
    """
    ns = _namespace(c, ic50, hill, imax)
    c = ns.asarray(c)
    ic50, hill, imax = ns.asarray(ic50), ns.asarray(hill), ns.asarray(imax)
    pos = c > 0
    z = hill * (ns.log(ns.where(pos, c, 1.0)) - ns.log(ic50))
    e = ns.exp(-ns.abs(z))
    sig = ns.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return imax * ns.where(pos, sig, 0.0)


# ----------------------------------------------------------------------------------------
# event times
# ----------------------------------------------------------------------------------------
def event_times(regimen, *, arm: str | None = None, drug: str | None = None, start: float = -math.inf, stop: float = math.inf) -> np.ndarray:
    """Sorted unique times [day] where the PK input changes: dose starts and input ends.

    An ODE integrator steps to each of these (``start <= t <= stop``) so that no dose or
    infusion end falls inside an integration step. ``regimen`` may be a ``Regimen`` (one
    arm, or pass ``arm``) or a :class:`DoseTable`.
    """
    if isinstance(regimen, DoseTable):
        t0, dur = regimen.time, regimen.duration
    else:
        ev = _select(regimen, arm=arm, drug=drug)
        t0, dur = ev["time"].to_numpy(dtype=np.float64), ev["duration"].to_numpy(dtype=np.float64)
    ends = (t0 + dur)[dur > 0]
    allt = np.unique(np.concatenate([t0, ends]))
    return allt[(allt >= start) & (allt <= stop)]


def next_event_time(events, t: float, *, strict: bool = True) -> float:
    """The first event time after ``t`` (``> t``; ``>= t`` when ``strict=False``), or ``inf``.

    ``events`` is an array from :func:`event_times`, a ``Regimen`` (single arm) or a
    :class:`DoseTable`.
    """
    arr = events if isinstance(events, np.ndarray) else event_times(events)
    arr = np.sort(np.asarray(arr, dtype=np.float64))
    i = np.searchsorted(arr, t, side="right" if strict else "left")
    return float(arr[i]) if i < len(arr) else math.inf


# ----------------------------------------------------------------------------------------
# allometric scaling (PDX / mouse exposure)
# ----------------------------------------------------------------------------------------
def scale_pk(params: PKParams, weight_kg, species: str = "mouse", *, reference_weight_kg: float = 70.0, cl_exponent: float = 0.75, v_exponent: float = 1.0) -> PKParams:
    """Scale human PK to a subject of body weight ``weight_kg`` by simple allometry.

    ``CL, Q ∝ W^0.75`` and ``V, V2 ∝ W^1`` relative to the 70 kg reference adult;
    ``ka`` and ``f`` are kept. This is the documented default rule for PDX (mouse)
    exposure when no mouse PK is known; it is a rough prior (rodent clearance often
    differs from allometric predictions by a factor of 2-10, see docs/pk.md), and measured
    mouse PK should replace it where available.

    Parameters
    ----------
    weight_kg : body weight [kg] (scalar or array broadcastable with the parameters).
    species : one of ``SPECIES`` (recorded for validation; the rule is the same).
    """
    if species not in SPECIES:
        from .errors import close_matches

        raise InputError(f"scale_pk: unknown species {species!r}; expected one of {sorted(SPECIES)}." + close_matches(species, list(SPECIES)))
    w = weight_kg if _is_torch(weight_kg) else np.asarray(weight_kg, dtype=np.float64)
    if not _is_torch(w) and np.any(~np.isfinite(w) | (w <= 0)):
        raise InputError(f"scale_pk: weight_kg must be positive [kg], received {weight_kg!r}")
    r = w / reference_weight_kg
    fc, fv = r ** cl_exponent, r ** v_exponent
    return replace(
        params,
        cl=params.cl * fc,
        v=params.v * fv,
        q=None if params.q is None else params.q * fc,
        v2=None if params.v2 is None else params.v2 * fv,
    )


# ----------------------------------------------------------------------------------------
# exposure of a regimen
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exposure:
    """Per-drug concentration and target inhibition of one regimen arm.

    Attributes
    ----------
    times : (T,) [day].
    concentration : drug -> array ``S + (T,)`` [mg/L].
    inhibition : drug -> array ``S + (T,)`` in [0, imax] (absent for a drug without potency).
    imputed : drug -> number of doses whose NaN amount was replaced by the standard dose.
    notes : human-readable notes (every imputation is listed here; never silent).
    """

    times: np.ndarray
    concentration: dict
    inhibition: dict
    imputed: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def drugs(self) -> list[str]:
        return list(self.concentration)

    @property
    def any_imputed(self) -> bool:
        return any(n > 0 for n in self.imputed.values())


def _resolve(drug: str, value):
    """(PKParams, Potency | None, standard dose | None) for one drug."""
    from .drugs import DrugPK, lookup_drug

    cat = lookup_drug(drug)
    cat_pk = cat.pk if cat is not None else None
    std = cat_pk.standard_dose_mg if cat_pk is not None else None
    if value is None:
        if cat_pk is None:
            raise InputError(f"exposure: drug {drug!r} has no PK in twin's catalogue; fix: pass drug_params={{{drug!r}: (PKParams(...), Potency(...))}}")
        return cat_pk.params(), cat_pk.potency(), std
    if isinstance(value, DrugPK):
        return value.params(), value.potency(), value.standard_dose_mg
    if isinstance(value, PKParams):
        return value, (cat_pk.potency() if cat_pk is not None else None), std
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], PKParams):
        return value[0], value[1], std
    raise InputError(f"exposure: drug_params[{drug!r}] must be a PKParams, a (PKParams, Potency) pair or a DrugPK; received {type(value).__name__}")


def exposure(regimen, drug_params: Mapping[str, Any] | None = None, times=None, *, arm: str | None = None, standard_doses: Mapping[str, float] | None = None, warn: bool = True) -> Exposure:
    """Concentration [mg/L] and target inhibition of every drug of one regimen arm.

    Parameters
    ----------
    regimen : ``Regimen`` (pass ``arm`` when it has several arms).
    drug_params : drug name -> ``PKParams``, ``(PKParams, Potency)`` or ``DrugPK``;
        drugs not given use the catalogue (``twin.drugs.lookup_drug(name).pk``).
        Batched parameters give batched results (shape ``S + (T,)``).
    times : 1-D times [day].
    standard_doses : drug -> amount [mg] used for NaN (not recorded) amounts, overriding
        the catalogue's ``standard_dose_mg`` (e.g. a mouse dose for PDX arms).
    warn : also emit an :class:`ImputedDoseWarning` when amounts are imputed (the
        returned ``imputed`` counts and ``notes`` are always filled).

    Drugs whose amounts are NaN and that have no standard dose raise :class:`InputError`.
    """
    if times is None:
        raise InputError("exposure: times [day] are required (1-D array)")
    t = np.asarray(times, dtype=np.float64)
    drug_params = dict(drug_params or {})
    standard_doses = dict(standard_doses or {})
    ev = _select(regimen, arm=arm, drug=None)
    conc, inhib, imputed, notes = {}, {}, {}, []
    for drug in sorted(ev["drug"].unique()):
        params, potency, std = _resolve(drug, drug_params.get(drug))
        std = standard_doses.get(drug, std)
        source = "given standard dose" if drug in standard_doses else "catalogue standard_dose_mg"
        n_nan = int(np.isnan(ev.loc[ev["drug"] == drug, "amount"].to_numpy(dtype=np.float64)).sum())
        if n_nan and std is None:
            raise InputError(
                f"exposure: {n_nan} dose(s) of {drug!r} have no recorded amount and the drug has no standard dose; "
                f"fix: record the amounts, or pass standard_doses={{{drug!r}: AMOUNT_MG}}"
            )
        doses, n = dose_table(regimen, drug, arm=arm, fill_amount=std)
        imputed[drug] = n
        if n:
            msg = f"{drug}: {n} dose(s) without a recorded amount were given the standard dose {std:g} mg ({source})"
            notes.append(msg)
            if warn:
                warnings.warn(msg, ImputedDoseWarning, stacklevel=2)
        c = concentration(params, doses, t)
        conc[drug] = c
        if potency is not None:
            ns = _namespace(c, potency.ic50, potency.hill, potency.imax)
            inhib[drug] = hill_inhibition(c, _expand(potency.ic50, ns, 1), _expand(potency.hill, ns, 1), _expand(potency.imax, ns, 1))
        else:
            notes.append(f"{drug}: no potency (IC50) known; inhibition not computed")
    return Exposure(times=t, concentration=conc, inhibition=inhib, imputed=imputed, notes=tuple(notes))
