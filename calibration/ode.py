"""The twin's vector field, compiled for calibration, and a patient's event schedule.

:func:`twin_ode` turns a :class:`twin.model.TwinModel` into a :class:`calibration._engine.ODEModel`
whose right-hand side *is* :meth:`TwinModel.equations` (the same definition
:func:`twin.simulate.simulate` evaluates with torch) and whose inputs are the drugs' target
inhibitions computed from the closed-form PK state carried from event to event
(:meth:`twin.pk.PKScan.state_at`). :func:`arm_schedule` builds the solver's segments
(every dose start and infusion end) and segment constants for one treatment arm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from twin.errors import InputError

from ._engine import CompiledODE, ODEModel, Schedule

__all__ = ["TwinODE", "twin_ode", "arm_schedule", "y0_only_parameters"]


def y0_only_parameters(model) -> tuple[str, ...]:
    """Parameters that enter only the initial state (not the vector field)."""
    return ("N0",) + tuple(n for n in model.parameter_names if n.startswith("frac_"))


def _drug_layout(model):
    """Per drug: (offset into w, PK constants dict, potency) — the w layout is fixed per model."""
    from twin.pk import disposition

    layout = []
    off = 0
    for d in model.drugs:
        params, pot = model.drug_pk[d]
        coef, rates = disposition(params)
        coef = [float(np.asarray(c).reshape(-1)[0]) for c in coef]
        rates = [float(np.asarray(r).reshape(-1)[0]) for r in rates]
        ka = None if params.ka is None else float(np.asarray(params.ka).reshape(-1)[0])
        k = len(coef)
        const = {"coef": coef, "rates": rates, "ka": ka, "k": k}
        layout.append((off, const, (float(np.asarray(pot.ic50)), float(np.asarray(pot.hill)), float(np.asarray(pot.imax)))))
        off += k + 2
    return layout, off


def _phi_const(xp, l, ka, s):
    """(e^{-l s} - e^{-ka s}) / (ka - l) for constant rates (limit s e^{-l s} when equal)."""
    if abs(ka - l) <= 1e-9 * max(ka, l, 1e-300):
        return s * xp.exp(-l * s)
    return (xp.exp(-l * s) - xp.exp(-ka * s)) / (ka - l)


def _h_const(xp, l, s):
    return (1.0 - xp.exp(-l * s)) / l if l > 0 else s


@dataclass(frozen=True, eq=False)
class TwinODE:
    """A TwinModel with a chosen set of estimated vector-field parameters ``theta``; the
    others are held at ``fixed`` values (constants in the compiled code)."""

    model: object
    theta_names: tuple[str, ...]
    fixed: Mapping[str, float]
    ode: ODEModel
    layout: list = field(repr=False)

    def params(self, theta) -> dict:
        p = dict(self.fixed)
        p.update(zip(self.theta_names, theta))
        return p

    def compiled(self) -> CompiledODE:
        c = self.__dict__.get("_compiled")
        if c is None:
            c = CompiledODE(self.ode)
            object.__setattr__(self, "_compiled", c)
        return c


def twin_ode(model, theta_names: Sequence[str], fixed: Mapping[str, float]) -> TwinODE:
    """The engine model of ``model``: ``rhs`` = :meth:`TwinModel.equations` with ``theta``
    = ``theta_names`` (in order) and every other parameter at ``fixed`` (defaults filled in)."""
    names = set(model.parameter_names)
    bad = [n for n in theta_names if n not in names]
    if bad:
        raise InputError(f"twin_ode: unknown parameter(s) {bad}; the model has {sorted(names)}")
    fx = dict(model.default_values())
    fx.update({k: float(v) for k, v in fixed.items()})
    for n in theta_names:
        fx.pop(n, None)
    theta_names = tuple(theta_names)
    layout, n_w = _drug_layout(model)

    def rhs(t, y, th, u, xp):
        p = dict(fx)
        p.update(zip(theta_names, th))
        return model.equations(t, y, p, u, xp)

    def inputs(s, w, xp):
        out = []
        for off, c, (ic50, hill, imax) in layout:
            k = c["k"]
            conc = 0.0
            for i in range(k):
                term = w[off + i] * xp.exp(-c["rates"][i] * s)
                if c["ka"] is not None:
                    term = term + w[off + k] * (c["ka"] * c["coef"][i]) * _phi_const(xp, c["rates"][i], c["ka"], s)
                term = term + w[off + k + 1] * c["coef"][i] * _h_const(xp, c["rates"][i], s)
                conc = conc + term
            pos = conc > 1e-300
            z = hill * (xp.log(xp.maximum(conc, 1e-300)) - math.log(ic50))
            out.append(xp.where(pos, imax * xp.sigmoid(z), 0.0 * conc))
        return out

    ode = ODEModel(rhs=rhs, inputs=inputs, n_states=len(model.state_names), n_params=len(theta_names), n_w=max(n_w, 1), name=f"twin-{len(model.state_names)}x{len(theta_names)}")
    return TwinODE(model, theta_names, fx, ode, layout)


def arm_schedule(tode: TwinODE, regimen, obs_times, *, t0: float, t_end: float | None = None) -> tuple[Schedule, list[str]]:
    """Segments of one arm from ``t0`` to ``t_end`` (default: the last observation): a
    boundary at every PK event (dose start, infusion end) inside, with each segment's PK
    state as its constants. Returns (schedule, notes about filled-in doses)."""
    from twin.pk import event_times as _events
    from twin.pk import pk_scan
    from twin.simulate import regimen_doses

    model = tode.model
    obs = np.asarray(obs_times, dtype=np.float64)
    t_end = float(obs[-1]) if t_end is None else float(t_end)
    if t_end <= t0:
        t_end = t0 + 1.0
    doses, notes = regimen_doses(model, regimen)
    ev = [t0, t_end]
    scans = {}
    for d, tab in doses.items():
        if len(tab):
            scans[d] = pk_scan(model.drug_pk[d][0], tab)
            e = scans[d].events
            ev.extend(e[(e > t0) & (e < t_end)].tolist())
    b = np.unique(np.asarray(ev, dtype=np.float64))
    starts = b[:-1]
    n_w = tode.ode.n_w
    w = np.zeros((len(starts), n_w))
    for j, d in enumerate(model.drugs):
        off, c, _ = tode.layout[j]
        if d not in scans:
            continue
        st = scans[d].state_at(starts)
        k = c["k"]
        for i in range(k):
            w[:, off + i] = st["modes"][i]
        if st["depot"] is not None:
            w[:, off + k] = st["depot"]
        if st["rate"] is not None:
            w[:, off + k + 1] = st["rate"]
    return Schedule(b, w, obs), notes
