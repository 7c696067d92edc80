"""Compiled integration of the twin (numba): the same :meth:`TwinModel.equations`, traced
into straight-line source, integrated member by member with its own adaptive step size.

Pieces shared with ``calibration``:

- :func:`pk_layout` / :func:`pk_inputs`: the drugs' target inhibitions ``I_d`` inside an
  event segment from the segment's closed-form PK state ``w`` (mode contributions, depot
  amount, infusion rate per drug; :meth:`twin.pk.PKScan.state_at`);
- :func:`segment_schedule`: a regimen's segment boundaries (every dose start and infusion
  end) and each segment's ``w``.

:class:`CompiledTwin` traces ``equations(t, y, p, u, xp)`` with every parameter of
``model.parameter_names`` symbolic (:class:`twin._codegen.SourceXP`), writes one module
(vector field + Dormand–Prince 5(4) + a loop over members) under the engine cache and
imports it, so numba compiles a model structure once per machine. ``twin.simulate`` uses
it for models without a neural residual (the residual needs torch autograd).
"""

from __future__ import annotations

import json
import math

import numpy as np

from .errors import InputError

__all__ = ["pk_layout", "pk_inputs", "segment_schedule", "CompiledTwin", "compiled_twin"]


# ----------------------------------------------------------------------------------------
# PK inputs inside a segment
# ----------------------------------------------------------------------------------------
def pk_layout(model):
    """Per drug of ``model.drugs``: ``(offset into w, constants, (ic50, hill, imax))``, and
    the length of ``w``. Constants: the disposition's ``coef`` [1/L] and ``rates`` [1/day],
    ``ka`` [1/day] (None for intravascular-only drugs) and ``k`` (number of modes)."""
    from .pk import disposition

    layout = []
    off = 0
    for d in model.drugs:
        params, pot = model.drug_pk[d]
        coef, rates = disposition(params)
        coef = [float(np.asarray(c).reshape(-1)[0]) for c in coef]
        rates = [float(np.asarray(r).reshape(-1)[0]) for r in rates]
        ka = None if params.ka is None else float(np.asarray(params.ka).reshape(-1)[0])
        const = {"coef": coef, "rates": rates, "ka": ka, "k": len(coef)}
        layout.append((off, const, (float(np.asarray(pot.ic50)), float(np.asarray(pot.hill)), float(np.asarray(pot.imax)))))
        off += len(coef) + 2
    return layout, max(off, 1)


def _phi_const(xp, l, ka, s):
    """(e^{-l s} - e^{-ka s}) / (ka - l) for constant rates (limit s e^{-l s} when equal)."""
    if abs(ka - l) <= 1e-9 * max(ka, l, 1e-300):
        return s * xp.exp(-l * s)
    return (xp.exp(-l * s) - xp.exp(-ka * s)) / (ka - l)


def _h_const(xp, l, s):
    return (1.0 - xp.exp(-l * s)) / l if l > 0 else s


def pk_inputs(layout):
    """``inputs(s, w, xp) -> [I_d]``: each drug's inhibition ``imax * C^h / (IC50^h + C^h)``
    at time ``s`` after a segment start with PK state ``w`` (elementwise, any namespace)."""

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
            if hill == 1.0:  # C / (IC50 + C): the same value, without a log, an exp and a branch
                out.append(xp.where(pos, imax * (conc / (conc + ic50)), 0.0 * conc))
                continue
            z = hill * (xp.log(xp.maximum(conc, 1e-300)) - math.log(ic50))
            out.append(xp.where(pos, imax * xp.sigmoid(z), 0.0 * conc))
        return out

    return inputs


_SCANS = None  # OrderedDict: (id(params), id(doses)) -> (params, doses, PKScan); bounded LRU
_SCANS_SIZE = 256


def _scan(params, tab, pk_scan):
    """``pk_scan(params, tab)``, reused while the same DoseTable object comes back (a scenario
    arm's dose history over several visits: O(doses) once instead of at every visit). The
    entry holds the objects, so their ids stay theirs while cached."""
    from collections import OrderedDict

    global _SCANS
    if _SCANS is None:
        _SCANS = OrderedDict()
    key = (id(params), id(tab))
    hit = _SCANS.get(key)
    if hit is not None and hit[0] is params and hit[1] is tab:
        _SCANS.move_to_end(key)
        return hit[2]
    sc = pk_scan(params, tab)
    _SCANS[key] = (params, tab, sc)
    if len(_SCANS) > _SCANS_SIZE:
        _SCANS.popitem(last=False)
    return sc


def segment_schedule(model, layout, n_w: int, regimen, t0: float, t_end: float, *, doses: dict | None = None):
    """``(boundaries, w, notes)`` of ``regimen`` on ``[t0, t_end]``: a boundary at every PK
    event inside, each segment's PK state (doses before ``t0`` included). ``doses``: the
    regimen's dose tables when already built (drug -> DoseTable)."""
    from .pk import pk_scan
    from .simulate import regimen_doses

    if t_end <= t0:
        t_end = t0 + 1.0
    if doses is not None:
        notes = []
    else:
        doses, notes = regimen_doses(model, regimen) if len(regimen) else ({}, [])
    ev = [t0, t_end]
    scans = {}
    for d, tab in doses.items():
        if len(tab):
            scans[d] = _scan(model.drug_pk[d][0], tab, pk_scan)
            e = scans[d].events
            ev.extend(e[(e > t0) & (e < t_end)].tolist())
    b = np.unique(np.asarray(ev, dtype=np.float64))
    starts = b[:-1]
    w = np.zeros((len(starts), n_w))
    for j, d in enumerate(model.drugs):
        if d not in scans:
            continue
        off, c, _ = layout[j]
        st = scans[d].state_at(starts)
        k = c["k"]
        for i in range(k):
            w[:, off + i] = st["modes"][i]
        if st["depot"] is not None:
            w[:, off + k] = st["depot"]
        if st["rate"] is not None:
            w[:, off + k + 1] = st["rate"]
    return b, w, notes


# ----------------------------------------------------------------------------------------
# the compiled integrator
# ----------------------------------------------------------------------------------------
_MEMBERS = """
@numba.njit(cache=_CACHE)
def solve_members(TH, Y0, boundaries, wseg, obs_times, rtol, atol, max_steps, min_step):
    B = TH.shape[0]
    T = obs_times.shape[0]
    out = np.empty((B, T, N))
    status = np.zeros(B, dtype=np.int64)
    steps = np.zeros(B, dtype=np.int64)
    for b in range(B):
        o, st, ns, nf = solve_plain(prep(TH[b]), Y0[b].copy(), boundaries, wseg, obs_times, rtol, atol, max_steps, 1e-2, min_step)
        for it in range(T):
            for i in range(N):
                out[b, it, i] = o[it, i]
        status[b] = st
        steps[b] = ns
    return out, status, steps
"""


_GROUPS = """
@numba.njit(cache=_CACHE, parallel=True)
def solve_groups(TH, Y0, H0, member_sched, b_off, w_off, B_all, W_all, obs_times, rtol, atol, max_steps, min_step, carry):
    B = TH.shape[0]
    T = obs_times.shape[0]
    out = np.empty((B, T, N))
    status = np.zeros(B, dtype=np.int64)
    steps = np.zeros(B, dtype=np.int64)
    h_out = np.zeros(B)
    for b in numba.prange(B):
        g = member_sched[b]
        bnd = B_all[b_off[g]:b_off[g + 1]]
        ws = W_all[w_off[g]:w_off[g + 1]]
        o, st, ns, nf, hf = solve_carry(prep(TH[b]), Y0[b].copy(), bnd, ws, obs_times, rtol, atol, max_steps, H0[b], min_step, carry)
        for it in range(T):
            for i in range(N):
                out[b, it, i] = o[it, i]
        status[b] = st
        steps[b] = ns
        h_out[b] = hf
    return out, status, steps, h_out
"""


class CompiledTwin:
    """Numba kernels of one model structure: the vector field with every parameter as an
    input (``th`` in ``model.parameter_names`` order), a per-member DP5(4) loop."""

    def __init__(self, model):
        from ._codegen import SourceXP, load_module, module_source, trace

        if model.residual is not None:
            raise InputError("CompiledTwin: a model with a neural residual is integrated with torch (twin.simulate does so)")
        self.model = model
        self.layout, self.n_w = pk_layout(model)
        names = model.parameter_names
        n = len(model.state_names)
        tape, args = trace({"y": n, "th": len(names), "w": self.n_w})
        xp = SourceXP(tape)
        s = _Sym_s(tape)
        u = pk_inputs(self.layout)(s, args["w"], xp)
        p = dict(zip(names, args["th"]))
        dy = model.equations(None, args["y"], p, u, xp)
        from ._codegen import _src

        lines, prep, n_derived = _hoist_parameter_lines(tape.lines, len(names)) if _HOIST else (list(tape.lines), [], 0)
        body = lines + [f"    dy[{i}] = {_src(v)}" for i, v in enumerate(dy)]
        src = "@numba.njit(cache=_CACHE)\ndef rhs_only(t, s, y, th, w, dy):\n" + "\n".join(body or ["    pass"]) + "\n"
        src += ("\n\n@numba.njit(cache=_CACHE)\ndef prep(th):\n"
                f"    out = np.empty({len(names) + n_derived})\n    for i in range({len(names)}):\n        out[i] = th[i]\n"
                + "".join(line + "\n" for line in prep) + "    return out\n")
        self.n_derived = n_derived
        from ._codegen import SOLVER_CARRY

        extra = _MEMBERS + SOLVER_CARRY.format(name="solve_carry", aug="aug_plain") + _GROUPS
        self.source = module_source(src, n, len(names), cache=True, sensitivities=False, extra=extra)
        self.module = load_module(self.source)
        self.n = n

    def solve(self, theta, y0, boundaries, w, obs_times, *, rtol=1e-6, atol=1e-9, max_steps=1_000_000, min_step=1e-8):
        """States ``(B, T, n)`` at ``obs_times`` for parameter rows ``theta (B, p)`` and
        initial states ``y0 (B, n)``; status ``(B,)`` (0 ok, 1 max steps, 2 step underflow
        or non-finite state) and steps ``(B,)``."""
        TH = np.ascontiguousarray(theta, dtype=np.float64)
        Y0 = np.ascontiguousarray(y0, dtype=np.float64)
        return self.module.solve_members(TH, Y0, np.ascontiguousarray(boundaries, dtype=np.float64), np.ascontiguousarray(w, dtype=np.float64),
                                         np.ascontiguousarray(obs_times, dtype=np.float64), float(rtol), float(atol), int(max_steps), float(min_step))


    def solve_groups(self, theta, y0, schedules, member_schedule, obs_times, *, h_first=None, carry=True, rtol=1e-6, atol=1e-9,
                     max_steps=1_000_000, min_step=1e-8):
        """Like :meth:`solve`, each member ``b`` on its own segment schedule
        ``schedules[member_schedule[b]]`` (a ``(boundaries, w)`` pair of
        :func:`segment_schedule`), all in one compiled call (members in parallel over numba's
        threads, ``NUMBA_NUM_THREADS``). ``carry``: start each segment with the step the
        previous segment's start accepted (:data:`twin._codegen.SOLVER_CARRY`; False: the
        Hairer restart of :meth:`solve`, the same steps); ``h_first`` ``(B,)``: each member's
        carried step from a previous call (0 or None: estimate). Returns states
        ``(B, T, n)``, status ``(B,)`` (0 ok, 1 max steps, 2 step underflow or non-finite
        state), steps ``(B,)`` and the carried steps ``(B,)`` for the next call."""
        TH = np.ascontiguousarray(theta, dtype=np.float64)
        Y0 = np.ascontiguousarray(y0, dtype=np.float64)
        B = TH.shape[0]
        H0 = np.zeros(B) if h_first is None else np.ascontiguousarray(h_first, dtype=np.float64)
        nb = np.array([len(b) for b, _ in schedules], dtype=np.int64)
        b_off = np.concatenate([[0], np.cumsum(nb)]).astype(np.int64)
        w_off = np.concatenate([[0], np.cumsum(nb - 1)]).astype(np.int64)
        B_all = np.ascontiguousarray(np.concatenate([np.asarray(b, dtype=np.float64) for b, _ in schedules]))
        W_all = np.ascontiguousarray(np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1, self.n_w) for _, w in schedules]))
        ms = np.ascontiguousarray(member_schedule, dtype=np.int64)
        return self.module.solve_groups(TH, Y0, H0, ms, b_off, w_off, B_all, W_all, np.ascontiguousarray(obs_times, dtype=np.float64),
                                        float(rtol), float(atol), int(max_steps), float(min_step), bool(carry))


def _hoist_parameter_lines(lines, n_params):
    """Split traced lines into those of the vector field and those that depend on the
    parameters ``th`` only (e.g. ``_sigmoid(th[11])``, a node's capacity): the latter move to
    ``prep(th)``, computed once per member, whose result (``th`` followed by the derived
    values) the vector field receives as ``th``; there each hoisted value is read back as
    ``th[n_params + j]``. The same expressions in the same order: bit-identical values."""
    import re

    ref = re.compile(r"(?<![\w.])(v\d+|th\[\d+\]|y\[\d+\]|w\[\d+\]|t|s)(?![\w\[])")
    param_only: set[str] = set()
    rhs, prep = [], []
    for line in lines:
        name, expr = line.strip().split(" = ", 1)
        refs = ref.findall(expr)
        if refs and all(r.startswith("th[") or r in param_only for r in refs):
            k = n_params + len(param_only)
            param_only.add(name)
            prep += [line, f"    out[{k}] = {name}"]
            rhs.append(f"    {name} = th[{k}]")
        else:
            rhs.append(line)
    return rhs, prep, len(param_only)


def _Sym_s(tape):
    from ._codegen import Sym

    return Sym("s", tape)


_CACHE: dict[str, CompiledTwin] = {}
#: move parameter-only expressions of the vector field into ``prep(th)`` (once per member);
#: False generates the vector field as traced (benchmarks compare the two; same values)
_HOIST = True


def compiled_twin(model) -> CompiledTwin:
    """The :class:`CompiledTwin` of ``model``'s structure (cached in the process by spec)."""
    key = json.dumps(model.spec(), sort_keys=True, default=str) + ("" if _HOIST else "|unhoisted")
    ct = _CACHE.get(key)
    if ct is None:
        ct = CompiledTwin(model)
        _CACHE[key] = ct
    return ct
