"""Compiled ODE log-density gradients from ONE definition of the vector field.

Design (see ``docs/calibration-engine.md`` for the measurements behind it)
-----------------------------------------------------------------------
1. The model author writes the vector field once, elementwise, against an array
   namespace ``xp``::

       def rhs(t, y, theta, u, xp):      # y, theta, u: sequences of arrays / scalars
           ...
           return [dy0, dy1, ...]

   and the time-varying inputs inside one event segment (e.g. drug concentration from
   analytic PK, propagated in closed form from the last dose)::

       def inputs(s, w, xp):             # s = time since the segment start, w = segment constants
           return [u0, ...]

   The same two functions run with ``xp = NUMPY`` (arrays of any batch shape),
   ``xp = torch_namespace()`` (float64 tensors) and ``xp = PYTENSOR`` (symbolic).
2. :class:`CompiledODE` evaluates them symbolically on 0-d PyTensor scalars, derives
   ``df/dy`` and ``df/dtheta`` by reverse-mode ``pytensor.grad`` (one per output; n is
   small), simplifies the graph with PyTensor's rewrites, and then *generates straight-line
   scalar numba code* from it: every node is a PyTensor scalar op whose numba
   implementation comes from ``pytensor.link.numba.dispatch.numba_funcify``. The result
   writes ``f``, ``J_y`` and ``J_theta`` into preallocated arrays (~tens of ns per call;
   compiling the FunctionGraph as a whole with ``numba_funcify`` works too but costs
   ~1.3 µs per call because it allocates its outputs and indexes 1-element arrays).
3. A numba-compiled adaptive Dormand–Prince 5(4) solver integrates states plus forward
   sensitivities ``dy/d(theta, y0)`` segment by segment (segments end at every event
   time, e.g. every dose, and the solver stops exactly at every observation time). The
   local error control covers the sensitivities too (as CVODES' ``errconS``), so the
   gradient is as accurate as the states.
4. :class:`ODESolveOp` wraps the solver as a PyTensor Op with outputs
   ``(Y[T, n], dY/dq[T, n, P])`` with ``q = (theta, y0)``, ``P = p + n``; its ``L_op``
   contracts the output gradient with the sensitivities. A ``numba_funcify`` is
   registered for the Op, so nutpie's numba backend (and ``mode="NUMBA"``) compile the
   whole log-density + gradient without Python callbacks; the C/Python backends call the
   same numba solver from ``perform``.

Limitations (first version): event segments carry input constants ``w`` that do not
depend on the estimated parameters (PK parameters are data, not estimated); no state
jumps at events yet; second derivatives are not implemented (NUTS does not need them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numba
import numpy as np

__all__ = [
    "NUMPY",
    "PYTENSOR",
    "torch_namespace",
    "Schedule",
    "ODEModel",
    "CompiledODE",
    "ODESolveOp",
]


# ----------------------------------------------------------------------------------------
# array namespaces: the few elementwise primitives a vector field may use
# ----------------------------------------------------------------------------------------
class _NumpyXP:
    name = "numpy"
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)

    @staticmethod
    def where(c, a, b):
        return np.where(c, a, b)

    @staticmethod
    def sigmoid(x):
        e = np.exp(-np.abs(x))
        return np.where(np.asarray(x) >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class _TorchXP:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.exp, self.log, self.sqrt, self.abs = torch.exp, torch.log, torch.sqrt, torch.abs
        self.sigmoid = torch.sigmoid

    def _t(self, x, like=None):
        t = self.torch
        if isinstance(x, t.Tensor):
            return x
        return t.as_tensor(x, dtype=t.float64, device=None if like is None else like.device)

    def maximum(self, a, b):
        return self.torch.maximum(self._t(a), self._t(b))

    def minimum(self, a, b):
        return self.torch.minimum(self._t(a), self._t(b))

    def where(self, c, a, b):
        return self.torch.where(self._t(c), self._t(a), self._t(b))


class _PytensorXP:
    name = "pytensor"

    def __init__(self):
        import pytensor.tensor as pt

        self.pt = pt
        self.exp, self.log, self.sqrt, self.abs = pt.exp, pt.log, pt.sqrt, pt.abs
        self.maximum, self.minimum, self.sigmoid = pt.maximum, pt.minimum, pt.sigmoid

    def where(self, c, a, b):
        return self.pt.where(c, a, b)


NUMPY = _NumpyXP()
PYTENSOR = _PytensorXP()


def torch_namespace():
    """The torch namespace (imports torch on first use)."""
    return _TorchXP()


# ----------------------------------------------------------------------------------------
# model definition and event schedule (data)
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ODEModel:
    """One definition of an ODE model.

    rhs(t, y, theta, u, xp) -> list of n derivatives; inputs(s, w, xp) -> list of the
    inputs ``u`` at time ``s`` after the start of an event segment whose constants are
    ``w`` (length ``n_w``).
    """

    rhs: Callable
    inputs: Callable
    n_states: int
    n_params: int
    n_w: int
    name: str = "ode"


@dataclass(frozen=True)
class Schedule:
    """Where the solver stops and what the inputs are between stops (all numpy, data).

    boundaries : (E+1,) increasing segment boundaries [day]; events (doses) at boundaries.
    w : (E, n_w) input constants of each segment (e.g. PK state just after the dose).
    obs_times : (T,) non-decreasing observation times within [boundaries[0], boundaries[-1]].
    """

    boundaries: np.ndarray
    w: np.ndarray
    obs_times: np.ndarray

    def __post_init__(self):
        b = np.ascontiguousarray(self.boundaries, dtype=np.float64)
        w = np.ascontiguousarray(np.atleast_2d(self.w), dtype=np.float64)
        o = np.ascontiguousarray(self.obs_times, dtype=np.float64)
        if b.ndim != 1 or len(b) < 2 or np.any(np.diff(b) <= 0):
            raise ValueError("Schedule: boundaries must be 1-D, strictly increasing, length >= 2")
        if w.shape[0] != len(b) - 1:
            raise ValueError(f"Schedule: w needs one row per segment ({len(b) - 1}), got {w.shape[0]}")
        if np.any(np.diff(o) < 0) or o[0] < b[0] or o[-1] > b[-1]:
            raise ValueError("Schedule: obs_times must be sorted and inside [boundaries[0], boundaries[-1]]")
        object.__setattr__(self, "boundaries", b)
        object.__setattr__(self, "w", w)
        object.__setattr__(self, "obs_times", o)


# ----------------------------------------------------------------------------------------
# symbolic derivation + scalar numba code generation
# ----------------------------------------------------------------------------------------
def _symbolic(model: ODEModel):
    import pytensor
    import pytensor.tensor as pt

    n, p, m = model.n_states, model.n_params, model.n_w
    t, s = pt.dscalar("t"), pt.dscalar("s")
    y = [pt.dscalar(f"y{i}") for i in range(n)]
    th = [pt.dscalar(f"th{j}") for j in range(p)]
    w = [pt.dscalar(f"w{k}") for k in range(m)]
    u = model.inputs(s, w, PYTENSOR)
    dy = [pt.as_tensor_variable(d).astype("float64") for d in model.rhs(t, y, th, u, PYTENSOR)]
    if len(dy) != n:
        raise ValueError(f"{model.name}: rhs returned {len(dy)} derivatives, expected n_states={n}")
    jy, jt = [], []
    for d in dy:
        g = pytensor.grad(d, y + th, disconnected_inputs="ignore", return_disconnected="zero")
        jy.append(g[:n])
        jt.append(g[n:])
    inputs = [(t, "t"), (s, "s")] + [(v, f"y[{i}]") for i, v in enumerate(y)] + [(v, f"th[{j}]") for j, v in enumerate(th)] + [(v, f"w[{k}]") for k, v in enumerate(w)]
    return inputs, dy, jy, jt


def _codegen(inputs, outputs, fname: str):
    """njit function ``fname(t, s, y, th, w, *outs)`` computing 0-d graph outputs.

    ``outputs``: list of (0-d variable, target expression such as ``"of[0]"``).
    """
    from pytensor.graph.basic import Constant
    from pytensor.graph.fg import FunctionGraph
    from pytensor.graph.rewriting.utils import rewrite_graph
    from pytensor.link.numba.dispatch import numba_funcify
    from pytensor.scalar import get_scalar_type
    from pytensor.tensor.elemwise import DimShuffle, Elemwise

    in_vars = [v for v, _ in inputs]
    outs = rewrite_graph([o for o, _ in outputs], include=("canonicalize", "stabilize", "specialize"))
    fg = FunctionGraph(in_vars, list(outs), clone=False)
    names = {v: name for v, name in inputs}
    env = {"math": math, "np": np}
    lines = []
    counter = itertools.count()

    def ref(v):
        if isinstance(v, Constant):
            val = np.asarray(v.data).item()
            return repr(bool(val)) if isinstance(val, bool) else f"{float(val)!r}" if isinstance(val, float) else repr(val)
        return names[v]

    for node in fg.toposort():
        op = node.op
        if isinstance(op, DimShuffle) and node.inputs[0].ndim == 0 and node.outputs[0].ndim == 0:
            names[node.outputs[0]] = ref(node.inputs[0])
            continue
        if not isinstance(op, Elemwise) or any(i.ndim != 0 for i in node.inputs) or len(node.outputs) != 1:
            raise NotImplementedError(
                f"vector field must be elementwise on scalars; got {op} on ndim {[i.ndim for i in node.inputs]}"
            )
        scalar_node = op.scalar_op.make_node(*[get_scalar_type(dtype=i.dtype)() for i in node.inputs])
        k = next(counter)
        env[f"_op{k}"] = numba_funcify(op.scalar_op, node=scalar_node)
        names[node.outputs[0]] = f"v{k}"
        lines.append(f"    v{k} = _op{k}({', '.join(ref(i) for i in node.inputs)})")
    for (_, target), o in zip(outputs, fg.outputs):
        lines.append(f"    {target} = {ref(o)}")
    targets = list(dict.fromkeys(tg.split("[")[0] for _, tg in outputs))
    src = f"def {fname}(t, s, y, th, w, {', '.join(targets)}):\n" + "\n".join(lines or ["    pass"]) + "\n"
    exec(compile(src, f"<twin-engine {fname}>", "exec"), env)
    return numba.njit(env[fname], cache=False), src


# Dormand–Prince 5(4) tableau (Hairer, Nørsett & Wanner; FSAL)
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_A = np.zeros((7, 7))
_A[1, :1] = [1 / 5]
_A[2, :2] = [3 / 40, 9 / 40]
_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


def _make_solver(aug_rhs, n_aug: int):
    """njit adaptive DP5(4) over segments; ``aug_rhs(t, s, z, th, w, dz)``."""
    C, A, E = _C, _A, _E

    @numba.njit(cache=False)
    def solve(th, z0, boundaries, wseg, obs_times, rtol, atol, max_steps, h_init):
        T = obs_times.shape[0]
        out = np.full((T, n_aug), np.nan)
        z = z0.copy()
        K = np.zeros((7, n_aug))
        znew = np.empty(n_aug)
        ztmp = np.empty(n_aug)
        nseg = boundaries.shape[0] - 1
        io = 0
        while io < T and obs_times[io] <= boundaries[0]:
            out[io, :] = z
            io += 1
        h = h_init
        nsteps = 0
        nfev = 0
        for k in range(nseg):
            t0 = boundaries[k]
            t1 = boundaries[k + 1]
            w = wseg[k]
            t = t0
            aug_rhs(t, 0.0, z, th, w, K[0])
            nfev += 1
            while True:
                target = t1
                if io < T and obs_times[io] < t1:
                    target = obs_times[io]
                # integrate t -> target
                while t < target:
                    if nsteps >= max_steps:
                        return out, 1, nsteps, nfev
                    hs = h
                    last = False
                    if t + hs >= target - 1e-12 * max(1.0, abs(target)):
                        hs = target - t
                        last = True
                    for st in range(1, 7):
                        for i in range(n_aug):
                            acc = 0.0
                            for j in range(st):
                                acc += A[st, j] * K[j, i]
                            ztmp[i] = z[i] + hs * acc
                        tt = t + C[st] * hs
                        if st == 6:
                            tt = t + hs
                            for i in range(n_aug):
                                znew[i] = ztmp[i]
                        aug_rhs(tt, tt - t0, ztmp, th, w, K[st])
                    nfev += 6
                    err = 0.0
                    for i in range(n_aug):
                        e = 0.0
                        for j in range(7):
                            e += E[j] * K[j, i]
                        sc = atol + rtol * max(abs(z[i]), abs(znew[i]))
                        q = hs * e / sc
                        err += q * q
                    err = math.sqrt(err / n_aug)
                    nsteps += 1
                    if not math.isfinite(err):
                        if hs < 1e-12:
                            return out, 2, nsteps, nfev
                        h = hs * 0.2
                        continue
                    if err <= 1.0:
                        fac = 5.0 if err == 0.0 else min(5.0, max(0.2, 0.9 * err ** -0.2))
                        t = target if last else t + hs
                        for i in range(n_aug):
                            z[i] = znew[i]
                            K[0, i] = K[6, i]
                        if not last or fac < 1.0:
                            h = hs * fac
                        else:
                            h = max(h, hs * fac)
                    else:
                        h = hs * max(0.2, 0.9 * err ** -0.2)
                if target < t1:
                    while io < T and obs_times[io] <= target:
                        out[io, :] = z
                        io += 1
                else:
                    while io < T and obs_times[io] <= t1:
                        out[io, :] = z
                        io += 1
                    break
        return out, 0, nsteps, nfev

    return solve


class CompiledODE:
    """Numba kernels for one :class:`ODEModel`: vector field, Jacobians and solvers."""

    def __init__(self, model: ODEModel):
        self.model = model
        n, p = model.n_states, model.n_params
        P = p + n
        self.n, self.p, self.P = n, p, P
        inputs, dy, jy, jt = _symbolic(model)
        fused_outputs = [(d, f"of[{i}]") for i, d in enumerate(dy)]
        fused_outputs += [(jy[i][k], f"ojy[{i}, {k}]") for i in range(n) for k in range(n)]
        fused_outputs += [(jt[i][j], f"ojt[{i}, {j}]") for i in range(n) for j in range(p)]
        self.fused, self.fused_src = _codegen(inputs, fused_outputs, "fused_f_jac")
        self.rhs_nb, self.rhs_src = _codegen(inputs, [(d, f"of[{i}]") for i, d in enumerate(dy)], "rhs_only")
        fused, rhs_nb = self.fused, self.rhs_nb

        @numba.njit(cache=False)
        def aug_sens(t, s, z, th, w, dz):
            f = np.empty(n)
            jy_ = np.empty((n, n))
            jt_ = np.empty((n, p))
            fused(t, s, z[:n], th, w, f, jy_, jt_)
            for i in range(n):
                dz[i] = f[i]
            # S[k, q] stored at z[n + k * P + q]
            for i in range(n):
                for q in range(P):
                    acc = jt_[i, q] if q < p else 0.0
                    for k in range(n):
                        acc += jy_[i, k] * z[n + k * P + q]
                    dz[n + i * P + q] = acc

        @numba.njit(cache=False)
        def aug_plain(t, s, z, th, w, dz):
            rhs_nb(t, s, z, th, w, dz)

        self._solve_sens = _make_solver(aug_sens, n + n * P)
        self._solve_plain = _make_solver(aug_plain, n)
        solve_sens = self._solve_sens

        @numba.njit(cache=False)
        def solve_with_sens(th, y0, boundaries, wseg, obs_times, rtol, atol, max_steps):
            z0 = np.zeros(n + n * P)
            for i in range(n):
                z0[i] = y0[i]
                z0[n + i * P + p + i] = 1.0
            out, status, nsteps, nfev = solve_sens(th, z0, boundaries, wseg, obs_times, rtol, atol, max_steps, 1e-2)
            T = obs_times.shape[0]
            Y = np.empty((T, n))
            S = np.empty((T, n, P))
            for it in range(T):
                for i in range(n):
                    Y[it, i] = out[it, i]
                    for q in range(P):
                        S[it, i, q] = out[it, n + i * P + q]
            if status != 0:
                Y[:] = np.nan
                S[:] = np.nan
            return Y, S, status, nsteps, nfev

        self.solve_with_sens = solve_with_sens

    # -- python-level helpers -------------------------------------------------------------
    def solve(self, theta, y0, schedule: Schedule, *, rtol=1e-8, atol=1e-10, max_steps=100_000, sensitivities=True):
        """States ``Y (T, n)`` at the observation times (and ``S (T, n, p+n)``, stats)."""
        th = np.ascontiguousarray(theta, dtype=np.float64)
        y0 = np.ascontiguousarray(y0, dtype=np.float64)
        if sensitivities:
            Y, S, status, nsteps, nfev = self.solve_with_sens(th, y0, schedule.boundaries, schedule.w, schedule.obs_times, float(rtol), float(atol), int(max_steps))
            return Y, S, {"status": int(status), "steps": int(nsteps), "nfev": int(nfev)}
        out, status, nsteps, nfev = self._solve_plain(th, y0.copy(), schedule.boundaries, schedule.w, schedule.obs_times, float(rtol), float(atol), int(max_steps), 1e-2)
        return out, None, {"status": int(status), "steps": int(nsteps), "nfev": int(nfev)}

    def op(self, schedule: Schedule, *, rtol=1e-8, atol=1e-10, max_steps=100_000) -> "ODESolveOp":
        return ODESolveOp(self, schedule, rtol=rtol, atol=atol, max_steps=max_steps)


# ----------------------------------------------------------------------------------------
# PyTensor Op
# ----------------------------------------------------------------------------------------
from pytensor.graph.basic import Apply  # noqa: E402
from pytensor.graph.op import Op  # noqa: E402
from pytensor.link.numba.dispatch import numba_funcify  # noqa: E402

_REGISTRY: dict[int, tuple] = {}
_KEYS = itertools.count()


class ODESolveOp(Op):
    """``(theta[p], y0[n]) -> (Y[T, n], dY/d(theta, y0)[T, n, p+n])`` for one schedule.

    The gradient uses the forward sensitivities (second output); differentiating through
    the sensitivities themselves is not supported.
    """

    __props__ = ("key",)

    def __init__(self, compiled: CompiledODE, schedule: Schedule, *, rtol=1e-8, atol=1e-10, max_steps=100_000):
        self.key = next(_KEYS)
        self.compiled = compiled
        self.schedule = schedule
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), int(max_steps)
        _REGISTRY[self.key] = (compiled, schedule, self.rtol, self.atol, self.max_steps)

    def make_node(self, theta, y0):
        import pytensor.tensor as pt

        theta = pt.as_tensor_variable(theta).astype("float64")
        y0 = pt.as_tensor_variable(y0).astype("float64")
        T, n, P = len(self.schedule.obs_times), self.compiled.n, self.compiled.P
        outs = [pt.tensor(dtype="float64", shape=(T, n)), pt.tensor(dtype="float64", shape=(T, n, P))]
        return Apply(self, [theta, y0], outs)

    def perform(self, node, inputs, output_storage):
        th, y0 = inputs
        sc = self.schedule
        Y, S, status, _, _ = self.compiled.solve_with_sens(
            np.ascontiguousarray(th, dtype=np.float64), np.ascontiguousarray(y0, dtype=np.float64),
            sc.boundaries, sc.w, sc.obs_times, self.rtol, self.atol, self.max_steps,
        )
        output_storage[0][0] = Y
        output_storage[1][0] = S

    def infer_shape(self, fgraph, node, shapes):
        T, n, P = len(self.schedule.obs_times), self.compiled.n, self.compiled.P
        return [(T, n), (T, n, P)]

    def L_op(self, inputs, outputs, output_grads):
        import pytensor.tensor as pt
        from pytensor.gradient import DisconnectedType

        gY, gS = output_grads
        if not isinstance(gS.type, DisconnectedType):
            raise NotImplementedError("ODESolveOp: gradients through the sensitivities (second derivatives) are not implemented")
        p = self.compiled.p
        if isinstance(gY.type, DisconnectedType):
            return [pt.zeros_like(inputs[0]), pt.zeros_like(inputs[1])]
        S = outputs[1]
        g = pt.tensordot(gY, S, axes=[[0, 1], [0, 1]])
        return [g[:p], g[p:]]

    def connection_pattern(self, node):
        return [[True, True], [True, True]]


@numba_funcify.register(ODESolveOp)
def _numba_funcify_ode_solve(op, node=None, **kwargs):
    solver = op.compiled.solve_with_sens
    sc = op.schedule
    boundaries, wseg, obs = sc.boundaries, sc.w, sc.obs_times
    rtol, atol, max_steps = op.rtol, op.atol, op.max_steps

    @numba.njit(cache=False)
    def ode_solve(theta, y0):
        Y, S, status, nsteps, nfev = solver(theta, y0, boundaries, wseg, obs, rtol, atol, max_steps)
        return Y, S

    return ode_solve
