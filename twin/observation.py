"""Observation and error models: what a twin predicts for each observable, and the
likelihood of a measured value given that prediction (values below the LLOQ censored).

Observation functions (from total tumour cells ``N``):

* ``tumor_volume`` [mm³] = ``N`` × 1e-6 mm³/cell (1e9 cells ≈ 1 cm³);
* ``sld`` [mm]: the diameter of a sphere of that volume, ``(6 V / π)^(1/3)`` — a single
  spherical lesion stands for the sum of longest diameters (RECIST target lesions);
* ``ctdna`` [copies/mL] = ``shed`` × ``N`` / 1e9: shedding proportional to burden at the
  quasi-steady state of release and clearance (half-life ≈ 2 h, Diehl et al. 2008 Nat Med
  14:985), ``shed`` in copies/mL per 1e9 cells;
* ``psa`` [ng/mL] is a model state (production by AR-active cells, first-order clearance).

Error models (``f`` = prediction, ``y`` = observation):

* ``lognormal(sigma)``: ``log y ~ Normal(log f, sigma)`` (proportional error on the log scale);
* ``proportional(b)``: ``y ~ Normal(f, b f)``;
* ``additive(a)``: ``y ~ Normal(f, a)``;
* ``combined(a, b)``: ``y ~ Normal(f, sqrt(a² + (b f)²))``.

A value below the lower limit of quantification contributes ``log P(Y < LLOQ)`` (Beal 2001,
method M3), never its (unknown) value. Every function accepts numpy arrays or torch tensors
(float64) and returns the same kind, so the likelihood is differentiable in torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["ErrorModel", "observe_from_cells", "CELL_VOLUME_MM3", "ERROR_MODELS"]

CELL_VOLUME_MM3 = 1e-6
ERROR_MODELS = ("lognormal", "proportional", "additive", "combined")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _is_torch(*xs) -> bool:
    return any(type(x).__module__.startswith("torch") for x in xs)


def _lib(*xs):
    if _is_torch(*xs):
        import torch

        return torch, torch.special.log_ndtr
    from scipy.special import log_ndtr

    return np, log_ndtr


def observe_from_cells(cells, observable: str, *, shed: float = 1.0):
    """Prediction of ``observable`` from total tumour cells (numpy or torch)."""
    xp, _ = _lib(cells)
    volume = cells * CELL_VOLUME_MM3
    if observable == "tumor_volume":
        return volume
    if observable == "sld":
        return (6.0 * volume / math.pi) ** (1.0 / 3.0)
    if observable == "ctdna":
        return shed * cells / 1e9
    if observable == "total_cells":
        return cells
    raise InputError(f"no observation function for {observable!r} from cells; expected tumor_volume, sld, ctdna or total_cells (psa is a model state)")


@dataclass(frozen=True)
class ErrorModel:
    """A residual error model; ``kind`` in ``ERROR_MODELS``; ``a`` additive SD (observable's
    unit), ``b`` proportional SD (fraction), ``sigma`` SD on the log scale."""

    kind: str = "lognormal"
    sigma: float | None = None
    a: float | None = None
    b: float | None = None

    def __post_init__(self):
        need = {"lognormal": ("sigma",), "proportional": ("b",), "additive": ("a",), "combined": ("a", "b")}
        if self.kind not in need:
            raise InputError(f"unknown error model {self.kind!r}; expected one of {ERROR_MODELS}")
        missing = [k for k in need[self.kind] if getattr(self, k) is None]
        if missing:
            raise InputError(f"error model {self.kind!r} needs {', '.join(missing)} (e.g. ErrorModel('{self.kind}', {missing[0]}=0.1))")

    def _loc_scale(self, pred, sigma=None, a=None, b=None):
        """(location, scale, log_scale?) of the Normal on the scale where it is Normal."""
        xp, _ = _lib(pred)
        sigma = self.sigma if sigma is None else sigma
        a = self.a if a is None else a
        b = self.b if b is None else b
        if self.kind == "lognormal":
            return xp.log(pred), sigma + 0.0 * pred
        if self.kind == "proportional":
            return pred, b * pred
        if self.kind == "additive":
            return pred, a + 0.0 * pred
        return pred, xp.sqrt(a * a + (b * pred) ** 2)

    def loglik(self, pred, obs, *, lloq=None, censored=None, sigma=None, a=None, b=None):
        """Sum of log-likelihood terms; censored entries contribute ``log P(Y < lloq)``.

        ``pred``, ``obs``, ``lloq``, ``censored`` broadcast together; ``obs`` may be NaN where
        censored. ``sigma``, ``a``, ``b`` override the model's values (e.g. a sampled sigma).
        """
        return self.pointwise(pred, obs, lloq=lloq, censored=censored, sigma=sigma, a=a, b=b).sum()

    def pointwise(self, pred, obs, *, lloq=None, censored=None, sigma=None, a=None, b=None):
        """Per-observation log-likelihood (same shape as ``pred``)."""
        xp, log_ndtr = _lib(pred, obs)
        loc, scale = self._loc_scale(pred, sigma, a, b)
        if censored is None:
            censored = xp.zeros_like(pred, dtype=bool) if xp is np else xp.zeros_like(pred, dtype=xp.bool)
        if xp is not np:
            import torch

            obs = torch.as_tensor(obs, dtype=pred.dtype)
            censored = torch.as_tensor(censored, dtype=torch.bool)
            lloq = None if lloq is None else torch.as_tensor(lloq, dtype=pred.dtype)
        else:
            obs = np.asarray(obs, dtype=float)
            censored = np.asarray(censored, dtype=bool)
            lloq = None if lloq is None else np.asarray(lloq, dtype=float)
        if self.kind == "lognormal":
            safe_obs = xp.where(censored, xp.ones_like(obs), obs)
            z = (xp.log(safe_obs) - loc) / scale
            dens = -0.5 * z * z - xp.log(scale) - _LOG_SQRT_2PI - xp.log(safe_obs)
        else:
            safe_obs = xp.where(censored, xp.zeros_like(obs), obs)
            z = (safe_obs - loc) / scale
            dens = -0.5 * z * z - xp.log(scale) - _LOG_SQRT_2PI
        if lloq is None:
            if bool(censored.any()):
                raise InputError("censored observations need their lloq")
            return dens
        safe_lloq = xp.where(censored, lloq, xp.ones_like(lloq))
        limit = xp.log(safe_lloq) if self.kind == "lognormal" else safe_lloq
        cens = log_ndtr((limit - loc) / scale)
        return xp.where(censored, cens, dens)
