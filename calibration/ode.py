"""The twin's vector field, compiled for calibration, and a patient's event schedule.

:func:`twin_ode` turns a :class:`twin.model.TwinModel` into a :class:`calibration._engine.ODEModel`
whose right-hand side *is* :meth:`TwinModel.equations` (the same definition
:func:`twin.simulate.simulate` evaluates with torch) and whose inputs are the drugs' target
inhibitions computed from the closed-form PK state carried from event to event
(:meth:`twin.pk.PKScan.state_at`). :func:`arm_schedule` builds the solver's segments
(every dose start and infusion end) and segment constants for one treatment arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from twin.errors import InputError

from twin.compiled import pk_inputs, pk_layout, segment_schedule

from ._engine import CompiledODE, ODEModel, Schedule

__all__ = ["TwinODE", "twin_ode", "arm_schedule", "y0_only_parameters"]


def y0_only_parameters(model) -> tuple[str, ...]:
    """Parameters that enter only the initial state (not the vector field)."""
    return ("N0",) + tuple(n for n in model.parameter_names if n.startswith("frac_"))


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
    layout, n_w = pk_layout(model)
    inputs = pk_inputs(layout)

    def rhs(t, y, th, u, xp):
        p = dict(fx)
        p.update(zip(theta_names, th))
        return model.equations(t, y, p, u, xp)

    ode = ODEModel(rhs=rhs, inputs=inputs, n_states=len(model.state_names), n_params=len(theta_names), n_w=n_w, name=f"twin-{len(model.state_names)}x{len(theta_names)}")
    return TwinODE(model, theta_names, fx, ode, layout)


def arm_schedule(tode: TwinODE, regimen, obs_times, *, t0: float, t_end: float | None = None) -> tuple[Schedule, list[str]]:
    """Segments of one arm from ``t0`` to ``t_end`` (default: the last observation): a
    boundary at every PK event (dose start, infusion end) inside, with each segment's PK
    state as its constants (:func:`twin.compiled.segment_schedule`). Returns (schedule,
    notes about filled-in doses)."""
    obs = np.asarray(obs_times, dtype=np.float64)
    t_end = float(obs[-1]) if t_end is None else float(t_end)
    b, w, notes = segment_schedule(tode.model, tode.layout, tode.ode.n_w, regimen, float(t0), t_end)
    return Schedule(b, w, obs), notes
