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
from dataclasses import dataclass
from typing import Callable

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


# array namespaces: the one set lives in twin._xp (twin's vector field is written against it)
from twin._xp import NUMPY, pytensor_namespace, torch_namespace  # noqa: E402


class _LazyPytensor:
    def __getattr__(self, name):
        return getattr(pytensor_namespace(), name)


PYTENSOR = _LazyPytensor()


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


_INFIX = {"Add": "+", "Mul": "*", "Sub": "-", "TrueDiv": "/", "GT": ">", "GE": ">=", "LT": "<", "LE": "<=", "EQ": "==", "NEQ": "!="}
_CALL = {"Exp": "math.exp", "Log": "math.log", "Log1p": "math.log1p", "Expm1": "math.expm1", "Sqrt": "math.sqrt",
         "Tanh": "math.tanh", "Abs": "abs", "Sigmoid": "_sigmoid", "Softplus": "_softplus", "Maximum": "max",
         "ScalarMaximum": "max", "Minimum": "min", "ScalarMinimum": "min", "Cos": "math.cos", "Sin": "math.sin"}


def _expression(op_name: str, args: list[str]) -> str | None:
    """Python source of one scalar op applied to ``args`` (None: not a known op)."""
    if op_name in _INFIX:
        return "(" + f" {_INFIX[op_name]} ".join(args) + ")"
    if op_name in _CALL:
        return f"{_CALL[op_name]}({', '.join(args)})"
    if op_name == "Neg":
        return f"(-{args[0]})"
    if op_name == "Sqr":
        return f"({args[0]} * {args[0]})"
    if op_name == "Pow":
        return f"({args[0]} ** {args[1]})"
    if op_name == "Reciprocal":
        return f"(1.0 / {args[0]})"
    if op_name == "Switch":
        return f"({args[1]} if {args[0]} else {args[2]})"
    if op_name in ("Identity", "Cast"):
        return f"(1.0 * {args[0]})" if op_name == "Cast" else args[0]
    if op_name == "Second":
        return args[1]
    if op_name == "AND":
        return f"({args[0]} and {args[1]})"
    if op_name == "OR":
        return f"({args[0]} or {args[1]})"
    return None


def _codegen(inputs, outputs, fname: str):
    """Source of a function ``fname(t, s, y, th, w, *outs)`` computing 0-d graph outputs.

    ``outputs``: list of (0-d variable, target expression such as ``"of[0]"``). Each
    scalar op becomes a Python expression (``math.exp``, ``+``, ...), so the source is
    self-contained and numba can cache it on disk; an op without a translation uses
    PyTensor's own numba implementation (then the module is not cacheable).
    Returns ``(source, env)`` with ``env`` the non-translatable ops (empty when pure).
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
    env = {}
    lines = []
    seen: dict[str, str] = {}
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
        k = next(counter)
        args = [ref(i) for i in node.inputs]
        expr = _expression(type(op.scalar_op).__name__, args)
        if expr is None:
            scalar_node = op.scalar_op.make_node(*[get_scalar_type(dtype=i.dtype)() for i in node.inputs])
            env[f"_op{k}"] = numba_funcify(op.scalar_op, node=scalar_node)
            expr = f"_op{k}({', '.join(args)})"
        if expr in seen:  # common subexpression (every expression is pure): computed once
            names[node.outputs[0]] = seen[expr]
            continue
        names[node.outputs[0]] = seen[expr] = f"v{k}"
        lines.append(f"    v{k} = {expr}")
    for (_, target), o in zip(outputs, fg.outputs):
        lines.append(f"    {target} = {ref(o)}")
    targets = list(dict.fromkeys(tg.split("[")[0] for _, tg in outputs))
    src = f"@numba.njit(cache=_CACHE)\ndef {fname}(t, s, y, th, w, {', '.join(targets)}):\n" + "\n".join(lines or ["    pass"]) + "\n"
    return src, env


from twin._codegen import cache_dir, load_module, module_source  # noqa: E402,F401  (shared with twin.compiled)

class CompiledODE:
    """Numba kernels for one :class:`ODEModel`: vector field, Jacobians and solvers.

    The kernels are generated as the source of one module, written to :func:`cache_dir`
    under the hash of its text and imported from there, so numba's on-disk cache makes a
    second process (a test run, a cohort worker, the CLI) skip compilation.
    """

    def __init__(self, model: ODEModel):
        self.model = model
        n, p = model.n_states, model.n_params
        P = p + n
        self.n, self.p, self.P = n, p, P
        inputs, dy, jy, jt = _symbolic(model)
        fused_outputs = [(d, f"of[{i}]") for i, d in enumerate(dy)]
        fused_outputs += [(jy[i][k], f"ojy[{i}, {k}]") for i in range(n) for k in range(n)]
        fused_outputs += [(jt[i][j], f"ojt[{i}, {j}]") for i in range(n) for j in range(p)]
        fused_src, env1 = _codegen(inputs, fused_outputs, "fused_f_jac")
        rhs_src, env2 = _codegen(inputs, [(d, f"of[{i}]") for i, d in enumerate(dy)], "rhs_only")
        env = {**{f"fused_{k}": v for k, v in env1.items()}, **{f"rhs_{k}": v for k, v in env2.items()}}
        if env:  # keep the two kernels' op names apart
            for k in env1:
                fused_src = fused_src.replace(f"{k}(", f"fused_{k}(")
            for k in env2:
                rhs_src = rhs_src.replace(f"{k}(", f"rhs_{k}(")
        self.source = module_source(fused_src + "\n\n" + rhs_src + "\n", n, p, cache=True)
        self.cacheable = not env
        mod = load_module(self.source, env)
        self.module = mod
        self.fused, self.rhs_nb = mod.fused_f_jac, mod.rhs_only
        self.fused_src, self.rhs_src = fused_src, rhs_src
        self._solve_sens, self._solve_plain = mod.solve_sens, mod.solve_plain
        self.solve_with_sens = mod.solve_with_sens

    # -- python-level helpers -------------------------------------------------------------
    def solve(self, theta, y0, schedule: Schedule, *, rtol=1e-8, atol=1e-10, max_steps=100_000, sensitivities=True):
        """States ``Y (T, n)`` at the observation times (and ``S (T, n, p+n)``, stats)."""
        th = np.ascontiguousarray(theta, dtype=np.float64)
        y0 = np.ascontiguousarray(y0, dtype=np.float64)
        if sensitivities:
            Y, S, status, nsteps, nfev = self.solve_with_sens(th, y0, schedule.boundaries, schedule.w, schedule.obs_times, float(rtol), float(atol), int(max_steps))
            return Y, S, {"status": int(status), "steps": int(nsteps), "nfev": int(nfev)}
        out, status, nsteps, nfev = self._solve_plain(th, y0.copy(), schedule.boundaries, schedule.w, schedule.obs_times, float(rtol), float(atol), int(max_steps), 1e-2, 1e-14)
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
