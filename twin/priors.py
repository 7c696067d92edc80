"""Sampling the plain-data priors of a :class:`~twin.model.TwinModel` with numpy.

Priors are ``name -> (distribution, params)`` with distributions ``normal(mu, sigma)``,
``lognormal(mu, sigma)`` (parameters of the log) and ``beta(alpha, beta)``. Calibration
turns the same data into PyMC variables; here they are drawn directly (prior predictive
simulation, the demo, benchmarks).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import InputError

__all__ = ["sample_prior", "prior_median"]


def _draw(rng: np.random.Generator, dist: str, par: Mapping[str, float], n: int) -> np.ndarray:
    if dist == "normal":
        return rng.normal(par["mu"], par["sigma"], n)
    if dist == "lognormal":
        return np.exp(rng.normal(par["mu"], par["sigma"], n))
    if dist == "beta":
        return rng.beta(par["alpha"], par["beta"], n)
    raise InputError(f"unknown prior distribution {dist!r}; expected normal, lognormal or beta")


def sample_prior(priors: Mapping[str, tuple[str, Mapping[str, float]]], n: int, *, seed: int | np.random.SeedSequence) -> dict[str, np.ndarray]:
    """``n`` independent draws of every parameter, reproducible from ``seed``.

    Each parameter gets its own child stream (``SeedSequence.spawn`` in sorted name order),
    so adding a parameter does not change the draws of the others.
    """
    if n < 1:
        raise InputError(f"sample_prior: n must be >= 1, received {n}")
    names = sorted(priors)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    children = ss.spawn(len(names))
    return {name: _draw(np.random.default_rng(child), *priors[name], n) for name, child in zip(names, children)}


def prior_median(priors: Mapping[str, tuple[str, Mapping[str, float]]]) -> dict[str, float]:
    """Median of every prior (exact for normal and lognormal; numerical for beta)."""
    from scipy import stats

    out = {}
    for name, (dist, par) in priors.items():
        if dist == "normal":
            out[name] = float(par["mu"])
        elif dist == "lognormal":
            out[name] = float(np.exp(par["mu"]))
        elif dist == "beta":
            out[name] = float(stats.beta(par["alpha"], par["beta"]).median())
        else:
            raise InputError(f"unknown prior distribution {dist!r}; expected normal, lognormal or beta")
    return out
