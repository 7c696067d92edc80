"""The neural residual: a small, bounded MLP correction to the net growth rate of the clones.

The mechanistic twin (``docs/model.md``) is the model; the residual is a small, optional
term for what the mechanism misses, shared by every patient of a cohort::

    eps(t) = eps_max * tanh(MLP(u(t)))                                        [1/day]
    u      = [x_{S,i}/X_REF - 1 (chosen nodes of the sensitive clone),
              (log10 N_tot - burden_center) / burden_scale,
              I_d(t) (chosen drugs)]
    dN_c/dt = (mechanistic rate_c + eps) N_c      for every signalling clone c (S, R_k)

``|eps| <= eps_max`` always. The last layer starts at zero, so an untrained residual adds
exactly nothing. :meth:`twin.model.TwinModel.with_residual` switches it on,
:meth:`~twin.model.TwinModel.without_residual` off (the model without it is bitwise the
mechanistic model). :func:`train_residual` fits its weights across a cohort with
torchdiffeq, the mechanistic parameters held fixed.

>>> from twin.model import TwinModel
>>> m = TwinModel.from_graph(None, pathway=False, drugs=["trametinib"])
>>> res = NeuralResidual.for_model(m, seed=0)
>>> m.with_residual(res).residual is res
True

torch and torchdiffeq are needed here; ``import twin`` does not import this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ._atomic import atomic_write_bytes
from .errors import InputError, close_matches

__all__ = ["NeuralResidual", "CohortSeries", "ResidualODE", "train_residual", "cohort_loss", "FORMAT"]

FORMAT = "twin.neural_residual"
_VERSION = 1
_ACTIVATIONS = {"tanh": torch.nn.Tanh, "softplus": torch.nn.Softplus, "silu": torch.nn.SiLU}


class NeuralResidual(torch.nn.Module):
    """Bounded additive term on the net growth rate [1/day], float64.

    Parameters
    ----------
    nodes : pathway nodes of the sensitive clone used as inputs (names; ``()`` for none,
        e.g. with the reduced model ``pathway=False``).
    drugs : drugs whose exposure (target inhibition ``I_d`` in [0, 1]) is an input.
    hidden : widths of the hidden layers (default two layers of 16).
    eps_max : the bound [1/day]: the term is ``eps_max * tanh(mlp(u))``.
    burden_center, burden_scale : the burden input is ``(log10 N_tot - center) / scale``.
    activation : ``"tanh"`` (default), ``"softplus"`` or ``"silu"``.
    seed : the hidden layers are initialised from ``torch.Generator().manual_seed(seed)``
        (uniform, ±1/sqrt(fan_in), as torch's default); the last layer is zero.
    """

    def __init__(
        self,
        nodes: Sequence[str] = (),
        drugs: Sequence[str] = (),
        *,
        hidden: Sequence[int] = (16, 16),
        eps_max: float = 0.05,
        burden_center: float = 9.0,
        burden_scale: float = 3.0,
        activation: str = "tanh",
        seed: int = 0,
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise InputError(f"NeuralResidual: hidden widths must be positive integers, received {list(hidden)}")
        if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
            raise InputError(f"NeuralResidual: eps_max must be a positive number [1/day], received {eps_max!r}")
        if not (burden_scale > 0):
            raise InputError(f"NeuralResidual: burden_scale must be positive, received {burden_scale!r}")
        if activation not in _ACTIVATIONS:
            raise InputError(f"NeuralResidual: activation must be one of {sorted(_ACTIVATIONS)}, received {activation!r}.{close_matches(str(activation), list(_ACTIVATIONS))}")
        self.nodes = tuple(str(n) for n in nodes)
        self.drugs = tuple(str(d).lower() for d in drugs)
        self.hidden = hidden
        self.eps_max = float(eps_max)
        self.burden_center = float(burden_center)
        self.burden_scale = float(burden_scale)
        self.activation = activation
        self.seed = int(seed)
        widths = (self.n_inputs,) + hidden + (1,)
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(a, b, dtype=torch.float64))
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = torch.nn.Sequential(*layers)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model, *, nodes: Sequence[str] | None = None, drugs: Sequence[str] | None = None, **kw) -> "NeuralResidual":
        """A residual with every node of ``model`` (its sensitive clone) and every drug as inputs
        (or the given subsets)."""
        return cls(tuple(model.nodes) if nodes is None else nodes, tuple(model.drugs) if drugs is None else drugs, **kw)

    def reset_parameters(self, *, zero_last: bool = True) -> None:
        """Deterministic initialisation from ``self.seed``; the last layer is zero unless
        ``zero_last=False`` (then it is drawn like the others)."""
        g = torch.Generator().manual_seed(self.seed)
        lin = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for k, m in enumerate(lin):
                if k == len(lin) - 1 and zero_last:
                    m.weight.zero_()
                    m.bias.zero_()
                    continue
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) * 2 * bound - bound)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=torch.float64) * 2 * bound - bound)

    @property
    def n_inputs(self) -> int:
        return len(self.nodes) + 1 + len(self.drugs)

    # ------------------------------------------------------------------ evaluation
    def features(self, x, total_cells, exposure):
        """u (B, n_inputs) from x (B, len(nodes)) node activities, total cells (B,) and
        exposure (B, len(drugs))."""
        from .model import X_REF

        burden = (torch.log10(total_cells.clamp_min(1.0)) - self.burden_center) / self.burden_scale
        return torch.cat([x / X_REF - 1.0, burden[:, None], exposure], dim=-1)

    def forward(self, x, total_cells, exposure):
        """The term eps (B,) [1/day]: ``eps_max * tanh(mlp(u))``, ``|eps| <= eps_max``."""
        return self.eps_max * torch.tanh(self.net(self.features(x, total_cells, exposure))[:, 0])

    def bind(self, model) -> tuple:
        """Check that the residual fits ``model``; return (node columns of ``y``, drug columns
        of the exposure) as index tensors. Used by :meth:`TwinModel.with_residual`."""
        bad = [n for n in self.nodes if n not in model.nodes]
        if bad:
            raise InputError(f"NeuralResidual: input node(s) {bad} are not nodes of the model ({len(model.nodes)} nodes).{close_matches(bad[0], list(model.nodes))}")
        badd = [d for d in self.drugs if d not in model.drugs]
        if badd:
            raise InputError(f"NeuralResidual: input drug(s) {badd} are not drugs of the model {list(model.drugs)}.{close_matches(badd[0], list(model.drugs))}")
        if any(p.dtype != torch.float64 for p in self.parameters()):
            raise InputError("NeuralResidual: the weights must be float64 (the twin integrates in float64)")
        # the sensitive clone is the first signalling clone: its activities are y[:, :n_nodes]
        nodes = torch.as_tensor([model.nodes.index(n) for n in self.nodes], dtype=torch.long)
        drugs = torch.as_tensor([model.drugs.index(d) for d in self.drugs], dtype=torch.long)
        return nodes, drugs

    # ------------------------------------------------------------------ files
    def architecture(self) -> dict:
        """Plain data that rebuilds the module (without weights)."""
        return {
            "format": FORMAT, "version": _VERSION, "nodes": list(self.nodes), "drugs": list(self.drugs),
            "hidden": list(self.hidden), "eps_max": self.eps_max, "burden_center": self.burden_center,
            "burden_scale": self.burden_scale, "activation": self.activation, "seed": self.seed,
            "dtype": "float64",
        }

    @staticmethod
    def _paths(path) -> tuple[Path, Path]:
        p = Path(path)
        if p.suffix in (".pt", ".json"):
            p = p.with_suffix("")
        return p.with_name(p.name + ".pt"), p.with_name(p.name + ".json")

    def save(self, path) -> tuple[Path, Path]:
        """Write ``<path>.pt`` (the state dict, ``torch.save``) and ``<path>.json`` (the
        architecture and the SHA-256 of the weights file), each atomically. ``path`` may end
        in ``.pt`` or ``.json`` or in neither. Returns the two paths."""
        pt, js = self._paths(path)
        buf = io.BytesIO()
        torch.save({k: v.detach().clone() for k, v in self.state_dict().items()}, buf)
        data = buf.getvalue()
        arch = self.architecture()
        arch["weights_file"] = pt.name
        arch["weights_sha256"] = hashlib.sha256(data).hexdigest()
        arch["shapes"] = {k: list(v.shape) for k, v in self.state_dict().items()}
        atomic_write_bytes(pt, data)
        atomic_write_bytes(js, (json.dumps(arch, indent=2) + "\n").encode("utf-8"))
        return pt, js

    @classmethod
    def load(cls, path) -> "NeuralResidual":
        """Read what :meth:`save` wrote (``torch.load(..., weights_only=True)``); the weights
        are checked against the architecture (names, shapes, dtype) and the recorded hash."""
        pt, js = cls._paths(path)
        for f in (js, pt):
            if not f.exists():
                raise InputError(f"NeuralResidual.load: {f} does not exist (a saved residual is a pair {pt.name} + {js.name})")
        try:
            arch = json.loads(js.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"NeuralResidual.load: {js} is not valid JSON ({exc})") from None
        if not isinstance(arch, dict) or arch.get("format") != FORMAT:
            raise InputError(f"NeuralResidual.load: {js} is not a neural-residual architecture file (expected \"format\": \"{FORMAT}\")")
        if arch.get("version") != _VERSION:
            raise InputError(f"NeuralResidual.load: {js} has version {arch.get('version')!r}; this twin reads version {_VERSION}")
        try:
            res = cls(arch["nodes"], arch["drugs"], hidden=arch["hidden"], eps_max=arch["eps_max"], burden_center=arch["burden_center"],
                      burden_scale=arch["burden_scale"], activation=arch["activation"], seed=arch.get("seed", 0))
        except KeyError as exc:
            raise InputError(f"NeuralResidual.load: {js} lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"NeuralResidual.load: {js}: invalid architecture ({exc})") from None
        data = pt.read_bytes()
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 -- any unpickling failure is a bad file
            raise InputError(f"NeuralResidual.load: {pt} is not a readable torch state dict ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, Mapping):
            raise InputError(f"NeuralResidual.load: {pt} holds a {type(state).__name__}, expected a state dict")
        expected = {k: tuple(v.shape) for k, v in res.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise InputError(f"NeuralResidual.load: {pt} does not match the architecture in {js}: missing {missing}, unexpected {extra}")
        for k, shape in expected.items():
            v = state[k]
            if not isinstance(v, torch.Tensor):
                raise InputError(f"NeuralResidual.load: {pt}: {k!r} is a {type(v).__name__}, expected a tensor")
            if tuple(v.shape) != shape:
                raise InputError(
                    f"NeuralResidual.load: {pt}: weight {k!r} has shape {list(v.shape)}, but the architecture in {js} "
                    f"(inputs {res.n_inputs} = {len(res.nodes)} nodes + 1 burden + {len(res.drugs)} drugs, hidden {list(res.hidden)}) "
                    f"needs {list(shape)}; the two files do not belong together"
                )
            if v.dtype != torch.float64:
                raise InputError(f"NeuralResidual.load: {pt}: weight {k!r} is {v.dtype}, expected torch.float64")
        sha = arch.get("weights_sha256")
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise InputError(f"NeuralResidual.load: {pt} differs from the weights recorded in {js} (SHA-256 mismatch); was one of the files replaced?")
        res.load_state_dict(state)
        return res

    def extra_repr(self) -> str:
        return f"nodes={len(self.nodes)}, drugs={list(self.drugs)}, hidden={list(self.hidden)}, eps_max={self.eps_max:g}/day"


# ----------------------------------------------------------------------------------------
# cohort data
# ----------------------------------------------------------------------------------------
@dataclass
class CohortSeries:
    """One patient's training series.

    parameters : mechanistic parameters (name -> float; missing ones take the defaults).
    exposure : target inhibition of the model's drugs, ``I_d`` in [0, 1], as either
        - a function ``f(t) -> (n_drugs,)`` (t in days, smooth between ``events``), or
        - a piecewise-constant table ``(n_rows, 1 + n_drugs)``: rows ``[t_start, I_1, ...]``
          sorted by time, each holding until the next (zero before the first), or
        - ``None`` (untreated).
    times : observation times [day], strictly increasing; ``times[0]`` is the initial time
        (the state there is ``model.initial_state(parameters)``).
    log_volume : observed natural log of the tumour volume [ln mm3] at ``times``.
    events : extra times where a function exposure may jump (the integrator stops there).
    """

    parameters: Mapping[str, float]
    exposure: Any
    times: Any
    log_volume: Any
    events: Sequence[float] = ()


def _series(model, item, i) -> tuple:
    if isinstance(item, CohortSeries):
        s = item
    elif isinstance(item, Mapping):
        s = CohortSeries(**item)
    elif isinstance(item, (tuple, list)) and len(item) in (4, 5):
        s = CohortSeries(*item)
    else:
        raise InputError(f"train_residual: cohort_data[{i}] must be a CohortSeries or a (parameters, exposure, times, log_volume) tuple")
    times = np.asarray(s.times, dtype=np.float64).ravel()
    obs = np.asarray(s.log_volume, dtype=np.float64).ravel()
    if times.size < 2 or not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
        raise InputError(f"train_residual: cohort_data[{i}].times must be >= 2 strictly increasing finite days")
    if obs.shape != times.shape or not np.all(np.isfinite(obs)):
        raise InputError(f"train_residual: cohort_data[{i}].log_volume must be {times.size} finite values (one per time), received shape {obs.shape}")
    nd = len(model.drugs)
    ex = s.exposure
    breaks = np.asarray(list(s.events), dtype=np.float64)
    if ex is None:
        table = np.zeros((1, 1 + nd))
        table[0, 0] = -math.inf
        ex = table
    if not callable(ex):
        table = np.asarray(ex, dtype=np.float64)
        if table.ndim != 2 or table.shape[1] != 1 + nd or np.any(np.diff(table[:, 0]) <= 0):
            raise InputError(
                f"train_residual: cohort_data[{i}].exposure table must have shape (n_rows, {1 + nd}) = [t_start, "
                f"{', '.join('I_' + d for d in model.drugs)}] with increasing t_start; received shape {table.shape}"
            )
        breaks = np.concatenate([breaks, table[np.isfinite(table[:, 0]), 0]])
    bad = [k for k in s.parameters if k not in model.parameter_names]
    if bad:
        raise InputError(f"train_residual: cohort_data[{i}] has unknown parameter(s) {bad}.{close_matches(bad[0], list(model.parameter_names))}")
    params = {k: float(v) for k, v in s.parameters.items()}
    return {"parameters": params, "exposure": ex, "times": times, "obs": obs, "breaks": breaks}


def _exposure_at(ex, t: float, nd: int) -> np.ndarray:
    if callable(ex):
        return np.asarray(ex(t), dtype=np.float64).reshape(nd)
    k = int(np.searchsorted(ex[:, 0], t, side="right")) - 1
    return np.zeros(nd) if k < 0 else ex[k, 1:]


class ResidualODE(torch.nn.Module):
    """``f(t, y)`` for torchdiffeq: the model's vector field with fixed mechanistic
    parameters ``p`` and an exposure provider ``exposure(t) -> (B, n_drugs)``; the residual is
    its only submodule (so ``odeint_adjoint`` differentiates with respect to its weights)."""

    def __init__(self, model, p, exposure: Callable | None = None):
        super().__init__()
        if model.residual is None:
            raise InputError("ResidualODE: the model has no residual; use model.with_residual(residual)")
        self.residual = model.residual
        self.model = model
        self.p = p
        self.exposure = exposure

    def forward(self, t, y):
        return self.model.vector_field(t, y, self.p, None if self.exposure is None else self.exposure(t))


def _forward(model, batch, *, method, adjoint, rtol, atol, options):
    """Predicted ln V at every observation of ``batch`` (a list of prepared series) -> (pred, obs)
    tensors. Each member runs on its own clock s = t - times[0] (the model is autonomous given
    the exposure), so members with different time grids integrate together."""
    from torchdiffeq import odeint, odeint_adjoint

    from .model import CELL_VOLUME_MM3

    B, nd = len(batch), len(model.drugs)
    keys = sorted({k for s in batch for k in s["parameters"]})
    defaults = model.default_values()
    p = model.parameter_tensors({k: torch.as_tensor([s["parameters"].get(k, defaults[k]) for s in batch], dtype=torch.float64) for k in keys}, batch=B, stacked=True)
    with torch.no_grad():
        y = model.initial_state(p)
    t0 = np.array([s["times"][0] for s in batch])
    rel_obs = [s["times"] - s["times"][0] for s in batch]
    rel_breaks = [s["breaks"] - s["times"][0] for s in batch]
    horizon = max(r[-1] for r in rel_obs)
    stops = np.unique(np.concatenate(rel_obs + [b[(b > 0) & (b < horizon)] for b in rel_breaks]))
    C, N = len(model.clones), len(model.nodes)
    sl = slice(C * N, C * N + len(model.compartments))
    preds: list[list] = [[] for _ in range(B)]
    fn_members = [b for b, s in enumerate(batch) if callable(s["exposure"])]

    def log_v(yy, b):
        return torch.log(yy[b, sl].sum() * CELL_VOLUME_MM3)

    for b in range(B):
        if rel_obs[b][0] == 0.0:
            preds[b].append(log_v(y, b))
    for a, c in zip(stops[:-1], stops[1:]):
        seg = torch.as_tensor(np.stack([_exposure_at(s["exposure"], t0[b] + a, nd) for b, s in enumerate(batch)]) if nd else np.zeros((B, 0)))

        def ex(t, seg=seg):
            if not fn_members:
                return seg
            e = seg.clone()
            tf = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
            for b in fn_members:
                e[b] = torch.as_tensor(_exposure_at(batch[b]["exposure"], t0[b] + tf, nd))
            return e

        func = ResidualODE(model, p, ex if nd else None)
        tt = torch.as_tensor([a, c], dtype=torch.float64)
        if adjoint:
            y = odeint_adjoint(func, y, tt, rtol=rtol, atol=atol, method=method, options=options, adjoint_params=tuple(model.residual.parameters()))[-1]
        else:
            y = odeint(func, y, tt, rtol=rtol, atol=atol, method=method, options=options)[-1]
        for b in range(B):
            if np.any(rel_obs[b] == c):
                preds[b].append(log_v(y, b))
    pred = torch.stack([v for b in range(B) for v in preds[b]])
    obs = torch.as_tensor(np.concatenate([s["obs"] for s in batch]))
    return pred, obs


def cohort_loss(model, cohort_data, *, method: str = "dopri5", adjoint: bool = False, rtol: float = 1e-7, atol: float = 1e-9, options=None):
    """Mean squared error of ln tumour volume over every observation of ``cohort_data``
    (a 0-d tensor, differentiable with respect to ``model.residual``'s weights)."""
    prepared = [_series(model, it, i) for i, it in enumerate(cohort_data)]
    pred, obs = _forward(model, prepared, method=method, adjoint=adjoint, rtol=rtol, atol=atol, options=options)
    return torch.mean((pred - obs) ** 2)


def train_residual(
    model,
    cohort_data,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    method: str = "dopri5",
    adjoint: bool = False,
    residual: NeuralResidual | None = None,
    batch_size: int | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: Mapping | None = None,
    callback: Callable[[int, float], Any] | None = None,
    **residual_kw,
) -> tuple[NeuralResidual, list[float]]:
    """Fit a :class:`NeuralResidual` across a cohort; the mechanistic parameters stay fixed.

    Each epoch shuffles the series (``numpy`` generator seeded by ``seed``) into batches of
    ``batch_size`` (default: the whole cohort), integrates each batch with
    ``torchdiffeq.odeint`` (``adjoint=True``: ``odeint_adjoint``, memory independent of the
    number of steps) from one stop to the next (observation times, table rows, ``events``),
    and takes one Adam step (learning rate ``lr``) on the mean squared error of ln tumour
    volume. ``residual`` continues training an existing residual (it is modified in place);
    otherwise ``NeuralResidual.for_model(model, seed=seed, **residual_kw)``.
    ``callback(epoch, loss)`` is called after each epoch; returning ``True`` stops.

    Returns ``(residual, history)``: ``history[e]`` is the mean batch loss of epoch ``e``
    (each batch's loss evaluated before its step).
    """
    if epochs < 0 or lr <= 0:
        raise InputError(f"train_residual: epochs must be >= 0 and lr > 0, received epochs={epochs!r}, lr={lr!r}")
    if residual is None:
        residual = NeuralResidual.for_model(model, seed=seed, **residual_kw)
    elif residual_kw:
        raise InputError(f"train_residual: {sorted(residual_kw)} apply only when a new residual is built (residual=None)")
    m = model.without_residual().with_residual(residual)
    prepared = [_series(m, it, i) for i, it in enumerate(cohort_data)]
    if not prepared:
        raise InputError("train_residual: cohort_data is empty")
    bs = len(prepared) if batch_size is None else max(1, int(batch_size))
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(residual.parameters(), lr=lr)
    history: list[float] = []
    residual.train()
    for epoch in range(int(epochs)):
        order = rng.permutation(len(prepared)) if bs < len(prepared) else np.arange(len(prepared))
        losses = []
        for k in range(0, len(order), bs):
            batch = [prepared[j] for j in order[k:k + bs]]
            opt.zero_grad()
            pred, obs = _forward(m, batch, method=method, adjoint=adjoint, rtol=rtol, atol=atol, options=options)
            loss = torch.mean((pred - obs) ** 2)
            if not torch.isfinite(loss):
                raise InputError(f"train_residual: the loss is not finite at epoch {epoch} (check the cohort data and parameters; lower lr)")
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
        if callback is not None and callback(epoch, history[-1]) is True:
            break
    residual.eval()
    return residual, history
