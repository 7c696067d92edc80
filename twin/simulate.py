"""`simulate`: the one entry point that integrates a :class:`~twin.model.TwinModel`.

One call integrates every parameter draw (x patient) under every regimen. Doses are events:
for each regimen the integrator stops at every dose start, infusion end and observation
time, and never steps across one; within a segment the drug exposure is the analytic PK
(the closed-form linear PK state of :func:`twin.pk.pk_scan`, carried from event to event and
propagated within the segment: O(1) per evaluation, then Hill inhibition), which is smooth
there. The integrator is a batched, float64 Dormand–Prince 5(4) (torch) with one step size
*per member*: each member controls its own error and waits at the segment end for the
others, and finished members leave the batch, so a stiff or oscillating draw does not set
the step size of all (``_STEPPING = "shared"`` restores one step size per regimen group).
The step size and the FSAL stage are carried across stops that are observation times only;
at a PK event (dose start, infusion end) the step selection restarts from the state, so a
run split at a dose time reproduces the unsplit run. A member whose error cannot be
controlled (non-finite state, step size below ``min_step``) is marked failed, its
trajectory set to NaN, and the others go on.

Speed notes (measured, docs/benchmarks.md): the per-member steps cut the work 2-6x on
prior draws (the stiffest 1% of draws need 4-15x more steps than the median); the exposure
no longer re-sums every past dose at each stage; the PI step-size controller (``_CONTROLLER``)
was measured and not kept as the default (more steps here); one torch thread by default
(two threads were slower on the shared 2-core machine).

Gradients with respect to dose times are not supported (doses are events).
"""

from __future__ import annotations

import math
import time as _time
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError, close_matches

__all__ = ["simulate", "dopri5_fixed", "regimen_doses", "STATUS_CODES"]

STATUS_CODES = {0: "ok", 1: "step size fell below min_step (non-finite or unstable state)", 2: "max_steps reached", 3: "non-finite initial state"}

# Dormand & Prince (1980) 5(4) tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[6] + (0.0,)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4


def _stages(f, t, y, h, k1, exposures):
    """Dormand–Prince stages; returns (y5, err_vector, k7). ``exposures[i]`` is the exposure
    at ``t + c_i h`` (index 0 unused when ``k1`` is given)."""
    import torch

    ks = [k1]
    for i in range(1, 7):
        yi = y
        for j, a in enumerate(_A[i]):
            if a != 0.0:
                yi = torch.add(yi, ks[j], alpha=h * a)  # one fused kernel per term
        if i == 6:
            y5 = yi
        ks.append(f(t + _C[i] * h, yi, exposures[i]))
    err = None
    for e, k in zip(_E, ks):
        if e != 0.0:
            err = k * (h * e) if err is None else torch.add(err, k, alpha=h * e)
    return y5, err, ks[6]


def dopri5_fixed(f, y0, t0: float, t1: float, n_steps: int):
    """Fixed-step Dormand–Prince 5th order: ``f(t, y) -> dy/dt`` (torch), ``n_steps`` equal steps.
    Used to measure the convergence order of the integrator."""
    y = y0
    h = (t1 - t0) / n_steps
    t = t0
    ex = [None] * 7
    for _ in range(n_steps):
        k1 = f(t, y, None)
        y, _, _ = _stages(f, t, y, h, k1, ex)
        t = t0 + h * (_ + 1)
    return y


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------
def _normalize_parameters(model, parameters, patients):
    """-> (dict name -> np (n_patients*n_draws,), n_draws, draw coordinate, patient ids)."""
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover
        xr = None
    import pandas as pd

    coord = None
    if xr is not None and isinstance(parameters, xr.Dataset):
        ds = parameters
        if "chain" in ds.dims and "draw" in ds.dims:
            ds = ds.stack(sample=("chain", "draw")).reset_index("sample", drop=True).rename(sample="draw")
        parameters = {k: ds[k].values for k in ds.data_vars if k in set(model.parameter_names)}
    elif isinstance(parameters, pd.DataFrame):
        coord = parameters.index.to_numpy()
        parameters = {k: parameters[k].to_numpy(dtype=np.float64) for k in parameters.columns}
    elif parameters is None:
        parameters = {}
    elif not isinstance(parameters, Mapping):
        raise InputError(f"simulate: parameters must be a dict of arrays, a pandas DataFrame or an xarray Dataset; received {type(parameters).__name__}")
    names = set(model.parameter_names)
    bad = [k for k in parameters if k not in names]
    if bad:
        raise InputError(f"simulate: unknown parameter(s) {bad} for this model.{close_matches(bad[0], list(names))} (model.parameter_names lists them)")
    arrs = {k: np.asarray(v, dtype=np.float64) for k, v in parameters.items()}
    n_pat = len(patients) if patients is not None else None
    shapes = {k: v.shape for k, v in arrs.items() if v.ndim}
    if n_pat is None:
        n_draws = max([s[0] for s in shapes.values()] or [1])
        for k, s in shapes.items():
            if len(s) != 1 or s[0] not in (1, n_draws):
                raise InputError(f"simulate: parameter {k!r} has shape {s}; expected a scalar or ({n_draws},) (one value per draw)")
        flat = {k: np.broadcast_to(v.reshape(-1) if v.ndim else v, (n_draws,)).copy() for k, v in arrs.items()}
    else:
        n_draws = max([s[-1] for s in shapes.values() if len(s) == 2] or [s[0] for s in shapes.values() if len(s) == 1 and s[0] != n_pat] or [1])
        flat = {}
        for k, v in arrs.items():
            if v.ndim == 0:
                v = np.full((n_pat, n_draws), float(v))
            elif v.ndim == 1 and v.shape[0] == n_pat:
                v = np.repeat(v[:, None], n_draws, axis=1)
            elif v.ndim == 1 and v.shape[0] == n_draws:
                v = np.repeat(v[None, :], n_pat, axis=0)
            if v.shape != (n_pat, n_draws):
                raise InputError(f"simulate: parameter {k!r} has shape {v.shape}; expected ({n_pat}, {n_draws}) = (patient, draw)")
            flat[k] = v.reshape(-1)
    if coord is None or len(coord) != n_draws:
        coord = np.arange(n_draws)
    return flat, n_draws, coord


def _normalize_regimens(regimens):
    from .regimen import Regimen

    if isinstance(regimens, Regimen):
        regimens = [regimens]
    out = []
    if isinstance(regimens, Mapping):
        for name, r in regimens.items():
            if not isinstance(r, Regimen):
                raise InputError(f"simulate: regimens[{name!r}] must be a Regimen, received {type(r).__name__}")
            arms = r.arms
            if len(arms) > 1:
                raise InputError(f"simulate: regimens[{name!r}] has several arms {arms}; fix: pass one Regimen per arm (regimen.for_arm(arm))")
            out.append((str(name), r))
        return out
    for i, r in enumerate(regimens):
        if not isinstance(r, Regimen):
            raise InputError(f"simulate: regimens[{i}] must be a Regimen, received {type(r).__name__}")
        arms = r.arms or [f"untreated_{i}" if len(regimens) > 1 else "untreated"]
        for a in arms:
            name = a
            while name in {n for n, _ in out}:
                name = f"{name}_{i}"
            out.append((name, r.for_arm(a) if r.arms else r))
    if not out:
        raise InputError("simulate: give at least one regimen (Regimen.empty() for no treatment)")
    return out


def regimen_doses(model, regimen) -> tuple[dict, list[str]]:
    """The dose tables the simulator uses for ``regimen`` under ``model``: drug ->
    :class:`twin.pk.DoseTable` (doses without an amount get the catalogue's standard dose;
    zero amounts dropped), and the notes saying what was filled in. Shared with calibration."""
    ex = _Exposure(model, regimen)
    return dict(ex.doses), list(ex.notes)


_DOSE_CACHE = None  # OrderedDict: regimen content + model drugs -> (doses, notes); bounded LRU
_DOSE_CACHE_SIZE = 512


def _regimen_key(model, regimen):
    """A content key of a regimen's table (numpy bytes of its columns) and the model's drugs."""
    import hashlib

    t = regimen.table
    h = hashlib.sha1()
    for c in ("drug", "route"):
        h.update("\x1f".join(map(str, t[c].tolist())).encode())
    for c in ("time", "amount", "duration", "interval", "count"):
        h.update(np.ascontiguousarray(t[c].to_numpy(dtype=np.float64)).tobytes())
    h.update(repr((model.drugs, tuple(sorted((d, repr(v)) for d, v in model.drug_pk.items())))).encode())
    return h.hexdigest()


class _Exposure:
    """Analytic PK -> inhibition (n_times, n_drugs) of one regimen, doses up to a segment start."""

    def __init__(self, model, regimen):
        from collections import OrderedDict

        from . import pk

        global _DOSE_CACHE
        self.pk = pk
        self.model = model
        if _DOSE_CACHE is None:
            _DOSE_CACHE = OrderedDict()
        key = _regimen_key(model, regimen) if len(regimen) else None
        hit = _DOSE_CACHE.get(key) if key is not None else None
        if hit is not None:
            _DOSE_CACHE.move_to_end(key)
            self.doses, self.notes = dict(hit[0]), list(hit[1])
            return
        self._build(model, regimen)
        if key is not None:
            _DOSE_CACHE[key] = (dict(self.doses), list(self.notes))
            if len(_DOSE_CACHE) > _DOSE_CACHE_SIZE:
                _DOSE_CACHE.popitem(last=False)

    def _build(self, model, regimen):
        from . import pk
        from .drugs import lookup_drug

        self.notes = []
        present = sorted(regimen.table["drug"].str.lower().unique()) if len(regimen) else []
        unknown = [d for d in present if d not in model.drugs]
        if unknown:
            raise InputError(
                f"simulate: the regimen doses {unknown} but the model knows only {list(model.drugs)}; "
                f"fix: TwinModel.from_graph(..., drugs=[...]) with every drug of the regimens.{close_matches(unknown[0], list(model.drugs))}"
            )
        self.doses = {}
        for d in model.drugs:
            if d not in present:
                continue
            sub = regimen.table[regimen.table["drug"].str.lower() == d].copy()
            sub["drug"] = d
            from .regimen import Regimen

            reg = Regimen(sub)
            cat = lookup_drug(d)
            fill = cat.pk.standard_dose_mg if (cat is not None and cat.pk is not None) else None
            table, n = pk.dose_table(reg, d, fill_amount=fill)
            if n:
                self.notes.append(f"{d}: {n} dose(s) without an amount were given the standard dose {fill:g} mg")
            keep = table.amount > 0
            self.doses[d] = pk.DoseTable(table.time[keep], table.amount[keep], table.route[keep], table.duration[keep])

    def event_times(self) -> np.ndarray:
        ts = [self.pk.event_times(t) for t in self.doses.values() if len(t)]
        return np.unique(np.concatenate(ts)) if ts else np.zeros(0)

    def _scans(self):
        """One closed-form PK scan per dosed drug (built once per regimen, O(doses))."""
        sc = self.__dict__.get("_scan_cache")
        if sc is None:
            sc = []
            for j, d in enumerate(self.model.drugs):
                tab = self.doses.get(d)
                if tab is None or not len(tab):
                    continue
                params, pot = self.model.drug_pk[d]
                sc.append((j, self.pk.pk_scan(params, tab), pot))
            self._scan_cache = sc
        return sc

    def segment(self, a: float):
        """A function times -> (T, n_drugs) inhibition, using the doses given at or before ``a``,
        for times in ``[a, next PK event]``.

        The PK state (mode contributions, depot amount, infusion rate) of every drug is carried
        from event to event by :func:`twin.pk.pk_scan` (once per regimen) and propagated in
        closed form within the segment: O(1) per evaluation instead of a superposition over
        every past dose. Equal to :meth:`segment_superposition` up to rounding (tested to 1e-12).
        """
        pk = self.pk
        parts = []
        for j, scan, pot in self._scans():
            seg = scan.segment(a)
            if seg is not None:
                parts.append((j, seg, pot))
        nd = len(self.model.drugs)

        def at(times):
            times = np.asarray(times, dtype=np.float64)
            out = np.zeros((len(times), nd))
            for j, seg, pot in parts:
                out[:, j] = pk.hill_inhibition(seg(times), pot.ic50, pot.hill, pot.imax)
            return out

        return at, bool(parts)

    def segment_superposition(self, a: float):
        """Reference for :meth:`segment`: :func:`twin.pk.concentration` of the doses given at or
        before ``a`` (O(doses) per call)."""
        pk = self.pk
        parts = []
        for j, d in enumerate(self.model.drugs):
            tab = self.doses.get(d)
            if tab is None:
                continue
            k = int(np.searchsorted(tab.time, a, side="right"))
            if k == 0:
                continue
            sub = pk.DoseTable(tab.time[:k], tab.amount[:k], tab.route[:k], tab.duration[:k])
            params, pot = self.model.drug_pk[d]
            parts.append((j, sub, params, pot))
        nd = len(self.model.drugs)

        def at(times):
            times = np.asarray(times, dtype=np.float64)
            out = np.zeros((len(times), nd))
            for j, sub, params, pot in parts:
                c = pk.concentration(params, sub, times)
                out[:, j] = pk.hill_inhibition(c, pot.ic50, pot.hill, pot.imax)
            return out

        return at, bool(parts)


# ----------------------------------------------------------------------------------------
# the batched adaptive integrator (one regimen group)
# ----------------------------------------------------------------------------------------
#: step-size controller: "PI" (Hairer & Wanner's PI controller of DOPRI5, beta = 0.04) or "I"
#: (the elementary controller, fac = 0.9 err^-1/5). Module-level so benchmarks can compare.
_CONTROLLER = "I"
#: carry the step size and the last stage (FSAL) across stops that are observation times only
#: (no PK event): the exposure is smooth there, so a stop needs no restart.
_CARRY_ACROSS_OBSERVATIONS = True
_PI_BETA = 0.04
_PI_ALPHA = 0.2 - 0.75 * _PI_BETA


def _group_setup(y0, times, exposure: _Exposure):
    """What both integrators start from: observation grid, PK event times inside it, all
    stops, output buffers and the members whose initial state is not finite (status 3)."""
    import torch

    B, n = y0.shape
    t_obs = np.asarray(times, dtype=np.float64)
    t0, t_end = float(t_obs[0]), float(t_obs[-1])
    ev = exposure.event_times()
    ev = ev[(ev > t0) & (ev < t_end)]
    pk_events = set(float(x) for x in ev)
    stops = np.unique(np.concatenate([t_obs, ev]))
    obs_index = {float(t): i for i, t in enumerate(t_obs)}
    out = np.full((B, len(t_obs), n), np.nan)
    status = np.zeros(B, dtype=np.int64)
    messages = [""] * B
    y = y0.clone()
    bad0 = ~torch.isfinite(y).all(-1)
    for b in torch.nonzero(bad0).flatten().tolist():
        status[b], messages[b] = 3, "non-finite initial state (check N0, K and the resistant fractions)"
    return t_obs, t0, t_end, pk_events, stops, obs_index, out, status, messages, y, bad0


def _integrate_group(model, p, y0, times, exposure: _Exposure, *, rtol, atol, min_step, max_steps):
    import torch

    B, n = y0.shape
    t_obs, t0, t_end, pk_events, stops, obs_index, out, status, messages, y, bad0 = _group_setup(y0, times, exposure)
    active = ~bad0
    all_active = not bool(bad0.any())
    out[:, 0] = y.numpy()
    nd = len(model.drugs)
    zeros = torch.zeros((B, nd), dtype=torch.float64)
    steps = 0
    pi = _CONTROLLER == "PI"
    inv_sqrt_n = 1.0 / math.sqrt(n)

    def f(t, yy, ex):
        return model.vector_field(t, yy, p, zeros if ex is None else ex)

    def fail(mask, code, msg):
        nonlocal active, all_active
        for b in torch.nonzero(mask & active).flatten().tolist():
            status[b], messages[b] = code, msg
        active = active & ~mask
        all_active = False

    k1 = None
    h_carry = None
    err_old = 1e-4
    for a, bnd in zip(stops[:-1], stops[1:]):
        a, bnd = float(a), float(bnd)
        at, dosed = exposure.segment(a)

        def ex_at(ts):
            if not dosed:
                return [None] * len(ts)
            e = torch.as_tensor(at(ts), dtype=torch.float64)
            return [e[i][None, :].expand(B, nd) for i in range(len(ts))]

        t = a
        restart = not (_CARRY_ACROSS_OBSERVATIONS and h_carry is not None and a not in pk_events)
        if restart:
            k1 = f(t, y, ex_at([t])[0])
            # initial step (Hairer, Norsett & Wanner II.4, first estimate), min over members
            sc = atol + rtol * y.abs()
            d0 = torch.sqrt(((y / sc) ** 2).mean(-1))
            d1 = torch.sqrt(((k1 / sc) ** 2).mean(-1))
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
            h0 = h0[active & torch.isfinite(h0)]
            h = float(h0.min()) if h0.numel() else (bnd - a)
            h = max(h, min_step)
            err_old = 1e-4
        else:  # an observation-only stop: the same smooth problem goes on
            h = h_carry
        y_abs = y.abs()
        rejected = False
        while t < bnd and (all_active or bool(active.any())):
            rest = bnd - t
            last = t + 1.01 * h >= bnd - 1e-12 * max(1.0, abs(bnd))
            hs = rest if last else h
            exs = ex_at([t + c * hs for c in _C])
            y5, err, k7 = _stages(f, t, y, hs, k1, exs)
            y5_abs = y5.abs()
            sc = torch.maximum(y_abs, y5_abs).mul_(rtol).add_(atol)
            en = torch.linalg.vector_norm(err.div_(sc), dim=-1).mul_(inv_sqrt_n)
            ok = torch.isfinite(en) & torch.isfinite(y5.sum(-1))
            en = torch.where(ok, en, torch.full_like(en, math.inf))
            emax = float(en.max()) if all_active else (float(en[active].max()) if bool(active.any()) else 0.0)
            steps += 1
            if steps > max_steps:
                fail(torch.ones(B, dtype=torch.bool), 2, f"max_steps={max_steps} reached at t={t:g} day; increase max_steps or loosen rtol")
                break
            if emax <= 1.0:
                if all_active:
                    y, k1, y_abs = y5, k7, y5_abs
                else:
                    y = torch.where(active[:, None], y5, y)
                    k1 = torch.where(active[:, None], k7, k1)
                    y_abs = y.abs()
                t = bnd if last else t + hs
                if emax == 0:
                    fac = 10.0
                elif pi:
                    fac = min(10.0, max(0.2, 0.9 * emax ** -_PI_ALPHA * err_old ** _PI_BETA))
                else:
                    fac = min(10.0, max(0.2, 0.9 * emax ** -0.2))
                if rejected:
                    fac = min(fac, 1.0)
                err_old = max(emax, 1e-4)
                h_new = hs * fac
                h = max(h_new, h) if (last and hs < h) else h_new  # a truncated last step says little
                rejected = False
            else:
                if hs <= min_step * (1 + 1e-12):
                    fail(en > 1.0, 1, f"step size fell below min_step={min_step:g} day at t={t:g} day (non-finite or unstable state); check the parameters")
                    continue
                exp_ = _PI_ALPHA if pi else 0.2
                fac = 0.2 if not math.isfinite(emax) else min(1.0, max(0.2, 0.9 * emax ** -exp_))
                h = max(hs * fac, min_step)
                rejected = True
        h_carry = h
        if bnd in obs_index:
            out[:, obs_index[bnd]] = y.detach().numpy()
        if not (all_active or bool(active.any())):
            break
    out[status != 0] = np.nan
    return out, status, messages, steps


#: "member": every member has its own step size and time within a segment (members wait at
#: the segment end; finished members are dropped from the batch): the stiffest draw no
#: longer sets the step of all. "shared": one step size per regimen group (the largest
#: member error drives it). Module-level so benchmarks can compare.
_STEPPING = "member"
#: compact the batch when fewer than this fraction of its members still run.
_COMPACT_BELOW = 0.7


def _member_stages(f, ts, y, h, k1, exposures):
    """Dormand–Prince stages with one step size per member: ``h`` (M, 1); ``ts[i]`` (M,) the
    members' times ``t + c_i h`` and ``exposures[i]`` (M, n_drugs) the exposure there.
    Returns (y5, err_vector, k7)."""
    import torch

    ks = [k1]
    y5 = None
    for i in range(1, 7):
        acc = None
        for j, a in enumerate(_A[i]):
            if a != 0.0:
                acc = ks[j] * a if acc is None else torch.add(acc, ks[j], alpha=a)
        yi = torch.addcmul(y, h, acc)
        if i == 6:
            y5 = yi
        ks.append(f(ts[i], yi, exposures[i]))
    err = None
    for e, k in zip(_E, ks):
        if e != 0.0:
            err = k * e if err is None else torch.add(err, k, alpha=e)
    return y5, err.mul_(h), ks[6]


def _integrate_group_member(model, p, y0, times, exposure: _Exposure, *, rtol, atol, min_step, max_steps):
    """The batched Dormand–Prince 5(4) with per-member step sizes (see ``_STEPPING``)."""
    import torch

    B, n = y0.shape
    t_obs, t0, t_end, pk_events, stops, obs_index, out, status, messages, y, bad0 = _group_setup(y0, times, exposure)
    alive = ~bad0
    out[:, 0] = y.numpy()
    nd = len(model.drugs)
    f64 = torch.float64
    k1_all = torch.zeros_like(y)
    h_all = torch.zeros(B, dtype=f64)
    eo_all = torch.full((B,), 1e-4, dtype=f64)
    have_h = False
    steps = 0
    member_steps = 0
    per_member = np.zeros(B, dtype=np.int64)
    pi = _CONTROLLER == "PI"
    expo_acc = _PI_ALPHA if pi else 0.2
    inv_sqrt_n = 1.0 / math.sqrt(n)
    cs = np.asarray(_C)[:, None]
    all_ids = torch.arange(B)

    def fail_ids(ids, code, msg):
        for b in ids.tolist():
            status[b], messages[b] = code, msg
        alive[ids] = False

    for a, bnd in zip(stops[:-1], stops[1:]):
        a, bnd = float(a), float(bnd)
        at, dosed = exposure.segment(a)
        restart = not (_CARRY_ACROSS_OBSERVATIONS and have_h and a not in pk_events)
        ids = all_ids if bool(alive.all()) else torch.nonzero(alive).flatten()
        if ids.numel() == 0:
            break
        full = ids.numel() == B
        pc = p if full else {k: v[ids] for k, v in p.items()}
        M = ids.numel()
        zeros = torch.zeros((M, nd), dtype=f64)

        def f(t, yy, ex, pc=pc, zeros=zeros):
            return model.vector_field(t, yy, pc, zeros if ex is None else ex)

        def ex_members(tt):  # (S, M) numpy times -> list of S (M, nd) tensors
            if not dosed:
                return [None] * tt.shape[0]
            e = torch.as_tensor(at(tt.reshape(-1)), dtype=f64).reshape(tt.shape[0], tt.shape[1], nd)
            return list(e.unbind(0))

        yc = y if full else y[ids]
        ids_np = ids.numpy()
        tc = np.full(M, a)
        if restart:
            k1c = f(torch.as_tensor(tc), yc, ex_members(tc[None, :])[0])
            # initial step (Hairer, Norsett & Wanner II.4, first estimate), per member
            sc = atol + rtol * yc.abs()
            d0 = torch.sqrt(((yc / sc) ** 2).mean(-1))
            d1 = torch.sqrt(((k1c / sc) ** 2).mean(-1))
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
            h0 = torch.where(torch.isfinite(h0), h0, torch.full_like(h0, min_step))
            hc = h0.clamp_min(min_step).numpy().copy()
            eo = np.full(M, 1e-4)
        else:
            k1c = k1_all if full else k1_all[ids]
            hc = h_all[ids].numpy().copy()
            eo = eo_all[ids].numpy().copy()
        yabs = yc.abs()
        rej = np.zeros(M, dtype=bool)
        eps = 1e-12 * max(1.0, abs(bnd))

        def write_back(sel_local):
            """Copy the compacted members ``sel_local`` back to the group arrays."""
            g = ids[sel_local]
            y.index_copy_(0, g, yc[sel_local])
            k1_all.index_copy_(0, g, k1c[sel_local])
            h_all[g] = torch.as_tensor(hc[sel_local.numpy()])
            eo_all[g] = torch.as_tensor(eo[sel_local.numpy()])

        while True:
            running = tc < bnd
            nrun = int(running.sum())
            if nrun == 0:
                break
            if nrun < _COMPACT_BELOW * M:
                keep = torch.as_tensor(running)
                done = torch.nonzero(~keep).flatten()
                write_back(done)
                kidx = torch.nonzero(keep).flatten()
                ids = ids[kidx]
                ids_np = ids.numpy()
                pc = {k: v[kidx] for k, v in pc.items()}
                M = ids.numel()
                zeros = torch.zeros((M, nd), dtype=f64)

                def f(t, yy, ex, pc=pc, zeros=zeros):
                    return model.vector_field(t, yy, pc, zeros if ex is None else ex)

                kn = kidx.numpy()
                yc, k1c, yabs = yc[kidx], k1c[kidx], yabs[kidx]
                tc, hc, eo, rej, running = tc[kn], hc[kn], eo[kn], rej[kn], running[kn]
            rest = bnd - tc
            last = tc + 1.01 * hc >= bnd - eps
            hs = np.where(running, np.where(last, rest, hc), 0.0)
            tt = tc[None, :] + cs * hs[None, :]  # (7, M) stage times
            exs = ex_members(tt)
            ht = torch.as_tensor(hs)[:, None]
            y5, err, k7 = _member_stages(f, torch.as_tensor(tt).unbind(0), yc, ht, k1c, exs)
            y5abs = y5.abs()
            sc = torch.maximum(yabs, y5abs).mul_(rtol).add_(atol)
            en_t = torch.linalg.vector_norm(err.div_(sc), dim=-1).mul_(inv_sqrt_n)
            ok = torch.isfinite(en_t) & torch.isfinite(y5.sum(-1))
            en = torch.where(ok, en_t, torch.full_like(en_t, math.inf)).numpy()
            en = np.where(running, en, 0.0)
            steps += 1
            member_steps += nrun
            per_member[ids_np[running]] += 1
            if steps > max_steps:
                g = ids[torch.as_tensor(running)]
                fail_ids(g, 2, f"max_steps={max_steps} reached at t={a:g}..{bnd:g} day; increase max_steps or loosen rtol")
                tc = np.full(M, bnd)
                break
            acc = en <= 1.0
            stuck = running & ~acc & (hs <= min_step * (1 + 1e-12))
            if stuck.any():
                g = ids[torch.as_tensor(stuck)]
                fail_ids(g, 1, f"step size fell below min_step={min_step:g} day at t<={bnd:g} day (non-finite or unstable state); check the parameters")
                tc = np.where(stuck, bnd, tc)  # out of the race; its trajectory becomes NaN
                running = running & ~stuck
            upd = acc & running
            if upd.all():
                yc, k1c, yabs = y5, k7, y5abs
            elif upd.any():
                m_t = torch.as_tensor(upd)[:, None]
                yc = torch.where(m_t, y5, yc)
                k1c = torch.where(m_t, k7, k1c)
                yabs = torch.where(m_t, y5abs, yabs)
            tc = np.where(upd, np.where(last, bnd, tc + hs), tc)
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                ep = np.maximum(en, 1e-300)
                if pi:
                    fa = 0.9 * ep ** -_PI_ALPHA * eo ** _PI_BETA
                else:
                    fa = 0.9 * ep ** -0.2
                fa = np.where(en == 0, 10.0, np.clip(fa, 0.2, 10.0))
                fa = np.where(rej, np.minimum(fa, 1.0), fa)
                fr = np.where(np.isfinite(en), np.clip(0.9 * ep ** -expo_acc, 0.2, 1.0), 0.2)
            h_acc = hs * fa
            h_acc = np.where(last & (hs < hc), np.maximum(h_acc, hc), h_acc)
            hc = np.where(running, np.where(acc, h_acc, np.maximum(hs * fr, min_step)), hc)
            eo = np.where(upd, np.maximum(en, 1e-4), eo)
            rej = np.where(running, ~acc, rej)
        write_back(torch.arange(M))
        have_h = True
        if bnd in obs_index:
            out[:, obs_index[bnd]] = y.numpy()
        if not bool(alive.any()):
            break
    out[status != 0] = np.nan
    q = np.percentile(per_member, [50, 99, 100]) if B else np.zeros(3)
    return out, status, messages, (f"{steps} iterations; steps per member mean {member_steps / max(B, 1):.0f}, "
                                   f"median {q[0]:.0f}, 99th percentile {q[1]:.0f}, max {q[2]:.0f} (member {int(np.argmax(per_member)) if B else -1})")


#: "numba" integrates models without a neural residual with :mod:`twin.compiled` (one
#: compiled DP5(4) per member, the same equations); "torch" always uses the batched torch
#: integrator. Environment variable ``TWIN_SIMULATE_BACKEND`` overrides.
_BACKEND = "numba"


def backend_for(model) -> str:
    import os

    b = os.environ.get("TWIN_SIMULATE_BACKEND", _BACKEND)
    return "torch" if (b == "torch" or model.residual is not None) else "numba"


def _integrate_compiled(model, p, y0, times, reg, *, rtol, atol, min_step, max_steps, doses=None):
    """Same contract as the torch integrators, via :class:`twin.compiled.CompiledTwin`."""
    from .compiled import compiled_twin, segment_schedule

    ct = compiled_twin(model)
    theta = np.stack([p[n].detach().cpu().numpy() for n in model.parameter_names], axis=-1)
    y0 = y0.detach().cpu().numpy() if hasattr(y0, "detach") else np.asarray(y0, dtype=np.float64)
    B = y0.shape[0]
    bad0 = ~np.isfinite(y0).all(axis=-1)
    b, w, _ = segment_schedule(model, ct.layout, ct.n_w, reg, float(times[0]), float(times[-1]), doses=doses)
    out, st, steps = ct.solve(theta, np.where(bad0[:, None], 0.0, y0), b, w, times, rtol=rtol, atol=atol, max_steps=max_steps, min_step=min_step)
    status = np.zeros(B, dtype=np.int64)
    messages = np.full(B, "", dtype=object)
    status[st == 1], status[st == 2], status[bad0] = 2, 1, 3
    for k in range(B):
        if status[k]:
            messages[k] = STATUS_CODES[int(status[k])]
            out[k, :] = np.nan
    q = np.percentile(steps, [50, 99]) if B else (0, 0)
    summary = f"compiled, steps per member mean {steps.mean() if B else 0:.0f}, median {q[0]:.0f}, 99th percentile {q[1]:.0f}, max {steps.max() if B else 0}"
    return out, status, messages, summary


def _run_groups(model, p, y0_all, times, regs, rtol, atol, min_step, max_steps, res, status, msgs, notes, nsteps):
    import torch

    with torch.no_grad():
        for r, (name, reg) in enumerate(regs):
            ex = _Exposure(model, reg)
            notes += [f"{name}: {x}" for x in ex.notes]
            if backend_for(model) == "numba":
                out, st, m, steps = _integrate_compiled(model, p, y0_all[r], times, reg, rtol=rtol, atol=atol, min_step=min_step, max_steps=max_steps, doses=ex.doses)
                res[r], status[r], msgs[r] = out, st, m
                nsteps.append(steps)
                continue
            integrate = _integrate_group_member if _STEPPING == "member" else _integrate_group
            out, st, m, steps = integrate(model, p, y0_all[r], times, ex, rtol=rtol, atol=atol, min_step=min_step, max_steps=max_steps)
            res[r], status[r], msgs[r] = out, st, m
            nsteps.append(steps)


# ----------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------
def simulate(
    model,
    parameters,
    regimens,
    times,
    *,
    patients: Sequence[str] | None = None,
    seed: int | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    initial_state=None,
    min_step: float = 1e-8,
    max_steps: int = 1_000_000,
    num_threads: int | None = None,
    pathway_states: bool = True,
):
    """Integrate ``model`` for every draw (x patient) under every regimen.

    Parameters
    ----------
    model : :class:`~twin.model.TwinModel`.
    parameters : dict name -> array ``(n_draws,)`` (or scalar), a pandas DataFrame (one
        row per draw) or an xarray Dataset (``draw``, or ``chain`` x ``draw`` which are
        stacked); with ``patients``, arrays ``(n_patients, n_draws)``. Parameters not given
        take ``model.default_values()``.
    regimens : a Regimen, a list of Regimens (one regimen per arm) or a dict name -> Regimen.
    times : sorted observation times [day]; the first one is the start of the simulation
        (doses before it still contribute to the PK after it).
    patients : optional patient ids (adds a leading ``patient`` dim).
    seed : recorded only (this deterministic simulation draws no random numbers).
    rtol, atol : tolerances of the adaptive Dormand–Prince 5(4) (each member's RMS scaled
        error per step; a small state can carry a relative global error ~100 x rtol).
    initial_state : optional states at ``times[0]``: ``(n_states,)``, ``(n_members, n_states)``
        or ``(n_regimens, n_members, n_states)``; default ``model.initial_state``.
    min_step : a member still failing the error test at this step size [day] is marked failed.
    max_steps : budget of batched steps (iterations) per regimen group (the members still
        running then fail).
    pathway_states : ``False`` leaves the pathway activities ``x_*`` out of the result
        (they are still integrated): much smaller results for large virtual trials.
    num_threads : torch threads during the run (default: 1 for small batches, where thread
        synchronisation dominates; restored afterwards).

    Returns
    -------
    xarray.Dataset with dims ``([patient,] regimen, draw, time)``: one variable per state
    and observable (units in ``attrs``), ``status`` (0 ok; see ``attrs["codes"]``) and
    ``status_message``.
    """
    import torch

    t_start = _time.perf_counter()
    times = np.asarray(times, dtype=np.float64).ravel()
    if times.size < 1 or not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
        raise InputError("simulate: times must be a non-empty, strictly increasing 1-D array of finite days")
    for name, v in (("rtol", rtol), ("atol", atol), ("min_step", min_step)):
        if not (isinstance(v, (int, float)) and v > 0):
            raise InputError(f"simulate: {name} must be a positive number, received {v!r}")
    flat, n_draws, draw_coord = _normalize_parameters(model, parameters, patients)
    regs = _normalize_regimens(regimens)
    n_pat = len(patients) if patients is not None else 1
    B = n_pat * n_draws
    p = model.parameter_tensors({k: torch.as_tensor(v) for k, v in flat.items()}, batch=B, stacked=True)
    old_threads = torch.get_num_threads()
    # tiny batched kernels are dominated by thread synchronisation: one thread unless big
    torch.set_num_threads(int(num_threads) if num_threads else (1 if B * len(model.state_names) < 2_000_000 else old_threads))
    try:
        return _simulate(model, p, regs, times, initial_state, B, n_pat, n_draws, draw_coord, patients, seed, rtol, atol, min_step, max_steps, t_start, pathway_states)
    finally:
        torch.set_num_threads(old_threads)


def _simulate(model, p, regs, times, initial_state, B, n_pat, n_draws, draw_coord, patients, seed, rtol, atol, min_step, max_steps, t_start, pathway_states):
    import torch
    import xarray as xr

    if initial_state is None:
        with torch.no_grad():
            y0_all = [model.initial_state(p)] * len(regs)
    else:
        arr = np.asarray(initial_state, dtype=np.float64)
        ns = len(model.state_names)
        if arr.shape[-1] != ns:
            raise InputError(f"simulate: initial_state has {arr.shape[-1]} states, the model has {ns}")
        arr = np.broadcast_to(arr if arr.ndim == 3 else arr.reshape((1,) * (3 - arr.ndim) + arr.shape), (len(regs), B, ns))
        y0_all = [torch.as_tensor(arr[r].copy()) for r in range(len(regs))]
    states = list(model.state_names)
    res = np.empty((len(regs), B, len(times), len(states)))
    status = np.zeros((len(regs), B), dtype=np.int64)
    msgs = np.empty((len(regs), B), dtype=object)
    notes, nsteps = [], []
    _run_groups(model, p, y0_all, times, regs, rtol, atol, min_step, max_steps, res, status, msgs, notes, nsteps)
    # -> dataset

    shape = (len(regs), n_pat, n_draws, len(times))
    dims = ("patient", "regimen", "draw", "time") if patients is not None else ("regimen", "draw", "time")

    def arrange(a):  # (R, B, T) -> dims
        a = a.reshape(shape)
        return np.moveaxis(a, 1, 0) if patients is not None else a[:, 0]

    coords = {"regimen": [n for n, _ in regs], "draw": draw_coord, "time": times}
    if patients is not None:
        coords["patient"] = list(patients)
    data = {}
    units = model.state_units
    for i, s in enumerate(states):
        if s.startswith("x_") and not pathway_states:
            continue
        data[s] = (dims, arrange(res[..., i]), {"units": units[s]})
    obs = model.observe(res)
    for k, v in obs.items():
        if k not in data:
            data[k] = (dims, arrange(v), {"units": model.observable_units[k]})
    sdims = dims[:-1]

    def arrange2(a):
        a = a.reshape(shape[:-1])
        return np.moveaxis(a, 1, 0) if patients is not None else a[:, 0]

    data["status"] = (sdims, arrange2(status), {"codes": "; ".join(f"{k}: {v}" for k, v in STATUS_CODES.items())})
    data["status_message"] = (sdims, arrange2(msgs).astype(str), {})
    failed = [f"{coords['regimen'][r]} member {b}: {msgs[r, b]}" for r in range(len(regs)) for b in range(B) if status[r, b]]
    data["status"][2]["message"] = "all draws ok" if not failed else f"{len(failed)} failed: " + " | ".join(failed[:20])
    attrs = {
        "model": repr(model),
        "growth": model.growth,
        "rtol": rtol,
        "atol": atol,
        "seed": -1 if seed is None else int(seed),
        "integrator": (("compiled (numba) Dormand-Prince 5(4), float64, one step size per member" if backend_for(model) == "numba" else "batched Dormand-Prince 5(4), float64, "
                       + ("one step size per member" if _STEPPING == "member" else "one step size per regimen group"))
                       + ", stops at every dose start, infusion end and observation time"),
        "steps": ", ".join(f"{n}: {s}" for (n, _), s in zip(regs, nsteps)),
        "wall_time_s": round(_time.perf_counter() - t_start, 3),
        "notes": " | ".join(notes),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)
