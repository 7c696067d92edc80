"""Stochastic emergence of resistance: a hybrid branching process, with closed forms.

Sensitive cells divide at a total rate ``F(t) = b_S(t) S(t)`` [divisions/day], known on a
time grid from the deterministic simulation (one row per posterior draw). Each division
produces a resistant daughter with probability ``mu``, so new resistant lineages arrive as
an inhomogeneous Poisson process of rate ``mu F(t)``. Each lineage is a linear
birth-death process (per-cell rates ``b``, ``d`` [1/day], constant per draw). The hybrid:

- below ``threshold`` cells a lineage is simulated *exactly* as a jump process (no
  diffusion or tau-leaping approximation);
- once it reaches ``threshold`` cells it is treated as established and grows
  deterministically, ``R(t) = threshold * exp((b - d) (t - T_e))``.

The output is, for every draw x replicate, the emergence time ``T_e``: the first time a
resistant lineage reaches ``threshold`` cells (``inf`` if none by the end of the grid). The
probability of resistance by ``t`` is then a fraction of replicates, with a binomial
standard error (:func:`probability_of_resistance`).

How the exact part is made cheap (see ``docs/resistance.md`` for the derivations):

1. *Thinning.* A lineage started by one cell reaches ``N = threshold`` cells with the
   gambler's-ruin probability ``q_N = (1 - r) / (1 - r^N)``, ``r = d / b`` (``-> 1 - d/b``
   as ``N -> inf``). Only those lineages matter, so arrivals are drawn from the thinned
   Poisson process of rate ``mu q_N F(t)``, by inverting its cumulative hazard on the grid.
2. *Conditioned jump chain.* Conditioned on reaching ``N`` before 0, the lineage is again a
   birth-death chain (Doob h-transform, ``h(n) = 1 - r^n``) with the same total jump rate
   ``(b + d) n`` at size ``n`` and up-probability ``p_n = p h(n+1) / h(n)``, ``p = b/(b+d)``.
3. *Level crossings.* The time to reach ``N`` is the sum over levels ``n`` of the total time
   spent at ``n``. Going down from the top level, with ``U_n`` up-jumps out of level ``n``
   (``U_n = D_{n+1} + 1`` for levels at or above the start, ``D_{n+1}`` below it), the time
   spent at ``n`` is the time until the ``U_n``-th up-jump of a Poisson process of rate
   ``(b+d) n p_n``, ``G_n / ((b+d) n p_n)`` with ``G_n ~ Gamma(U_n, 1)``; the down-jumps
   ``D_n`` made meanwhile are ``Poisson(G_n (1 - p_n) / p_n)``. Marginalising ``D``,
   ``Y_n = 2 G_n`` is noncentral chi-square with 2 degrees of freedom and noncentrality
   ``x_{n+1} Y_{n+1}`` (``x = (1-p)/p``): ``Y_n = (Z1 + sqrt(x_{n+1} Y_{n+1}))^2 + Z2^2``
   with standard normals ``Z``. This is exact, costs two normals per level and lineage
   (``threshold - 1`` levels), is pure arithmetic once the normals are drawn (so it runs
   vectorised over many draws), and never simulates individual jumps (no slowdown near
   criticality).

Preexisting resistant cells (``initial_resistant``, e.g. drawn from an omics-informed
prior) form one clone of ``R0`` cells at ``times[0]``: it reaches ``N`` with probability
``(1 - r^R0) / (1 - r^N)`` (at once if ``R0 >= N``), by the same exact sampler started at
``R0``.

Randomness: every function takes ``seed`` (an int, a :class:`numpy.random.SeedSequence`, a
:class:`numpy.random.Generator`, or one of these per draw) and never touches numpy's global
RNG state. Draw ``k`` uses its own child generator (``SeedSequence.spawn``; see
:func:`draw_seeds`), so results do not depend on how draws are batched.

Closed forms (public, for tests and users): :func:`lineage_survival_probability`,
:func:`p_resistance_at_size`, :func:`luria_delbruck_mean_mutants`,
:func:`luria_delbruck_p0`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .errors import InputError

__all__ = [
    "acquired_resistance",
    "ResistanceResult",
    "ResistanceProbability",
    "draw_seeds",
    "emergence_times",
    "sample_time_to_threshold",
    "probability_of_resistance",
    "lineage_survival_probability",
    "p_resistance_at_size",
    "luria_delbruck_mean_mutants",
    "luria_delbruck_p0",
]

SeedLike = Union[int, np.integer, np.random.SeedSequence, np.random.Generator, None]


# --------------------------------------------------------------------------- seeds


def draw_seeds(seed: SeedLike | Sequence[SeedLike], n_draws: int) -> list[np.random.Generator]:
    """One independent generator per draw.

    ``seed`` an int / ``SeedSequence``: its ``spawn(n_draws)`` children (so draw ``k`` always
    gets child ``k``, whatever the batch); a ``Generator``: ``generator.spawn(n_draws)``; a
    sequence of length ``n_draws``: one seed (int, ``SeedSequence`` or ``Generator``) per
    draw, used as given. To simulate draw ``k`` alone with the same result as in a run of
    ``n`` draws with ``seed=s``, pass ``seed=[np.random.SeedSequence(s).spawn(n)[k]]``.
    """
    if isinstance(seed, (list, tuple)):
        if len(seed) != n_draws:
            raise ValueError(f"seed: got {len(seed)} per-draw seeds for {n_draws} draws")
        return [s if isinstance(s, np.random.Generator) else np.random.default_rng(s) for s in seed]
    if isinstance(seed, np.random.Generator):
        return list(seed.spawn(n_draws))
    if seed is None:
        raise ValueError("seed is required (an int, SeedSequence or Generator): results must be reproducible")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    return [np.random.default_rng(child) for child in ss.spawn(n_draws)]


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("seed is required (an int, SeedSequence or Generator): results must be reproducible")
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- closed forms


def lineage_survival_probability(b, d, threshold=np.inf, initial=1):
    """Probability that a birth-death lineage (per-cell rates ``b``, ``d``) started by
    ``initial`` cells reaches ``threshold`` cells before dying out.

    Gambler's ruin on the embedded jump chain (up with probability ``b/(b+d)``), with
    ``r = d/b``: ``(1 - r^m) / (1 - r^N)`` for ``r != 1``, ``m / N`` for ``r = 1``. With
    ``threshold=inf`` this is the probability of indefinite survival, ``1 - r^m`` if
    ``b > d`` and 0 otherwise (for one cell: ``1 - d/b``; Kendall 1948).
    """
    b, d, N, m = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (b, d, threshold, initial)))
    out = np.empty(b.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for idx in np.ndindex(b.shape):
            out[idx] = _reach_prob(float(b[idx]), float(d[idx]), float(m[idx]), float(N[idx]))
    return out if out.ndim else float(out)


def _reach_prob(b: float, d: float, m: float, N: float) -> float:
    if m >= N:
        return 1.0
    if m <= 0 or b <= 0:
        return 0.0
    if d <= 0:
        return 1.0
    r = d / b
    if math.isinf(N):
        return -math.expm1(m * math.log(r)) if r < 1 else 0.0
    if r == 1.0:
        return m / N
    if r < 1:
        lr = math.log(r)
        return math.expm1(m * lr) / math.expm1(N * lr)
    ls = math.log(1.0 / r)  # s = 1/r < 1: (r^m - 1)/(r^N - 1) = s^(N-m) (1 - s^m)/(1 - s^N)
    return math.exp((N - m) * ls) * math.expm1(m * ls) / math.expm1(N * ls)


def luria_delbruck_mean_mutants(M, mu, N0=1.0, b=1.0, d=0.0):
    """Expected number of resistant cells when the sensitive population reaches ``M``.

    Luria & Delbrück (1943), Genetics 28:491: with deterministic exponential growth from
    ``N0`` and mutants growing at the same net rate, ``E[mutants] = mu M ln(M/N0)`` (pure
    birth, ``d = 0``; mutation probability ``mu`` per division). With death, mutations still
    occur per *division* (``b S(t)`` per day) and each arrival's lineage grows in mean as
    ``exp((b-d) t)``, giving ``mu (b / (b - d)) M ln(M / N0)``.
    """
    M, mu, N0, b, d = (np.asarray(x, dtype=float) for x in (M, mu, N0, b, d))
    out = mu * (b / (b - d)) * M * np.log(M / N0)
    return out if out.ndim else float(out)


def luria_delbruck_p0(M, mu, N0=1.0):
    """Luria-Delbrück ``p0``: probability that no mutant arose while a population grew from
    ``N0`` to ``M`` by ``M - N0`` divisions, ``exp(-mu (M - N0))`` (Luria & Delbrück 1943,
    the basis of the p0 method; every mutant survives: pure birth)."""
    out = np.exp(-np.asarray(mu, dtype=float) * (np.asarray(M, dtype=float) - np.asarray(N0, dtype=float)))
    return out if out.ndim else float(out)


def p_resistance_at_size(M, mu, b, d, *, N0=1.0, b_r=None, d_r=None, kind="surviving"):
    """Probability of resistance when the sensitive population reaches size ``M``.

    The sensitive population grows deterministically, ``S(t) = N0 exp((b-d) t)``, with
    divisions at rate ``b S(t)``; each division gives a resistant cell with probability
    ``mu``; resistant cells have rates ``b_r``, ``d_r`` (default: the same, neutral).

    ``kind="surviving"`` (what :func:`emergence_times` simulates): at least one resistant
    lineage *that survives* has arisen by then. The number of such lineages is Poisson with
    mean ``mu (b/(b-d)) (M - N0) (1 - d_r/b_r)``; for a neutral mutant the factors cancel
    exactly to ``mu (M - N0)``, so ``P = 1 - exp(-mu (M - N0))``: the Luria-Delbrück
    result holds with death too, for surviving lineages.

    ``kind="present"`` (neutral only): at least one resistant cell is *alive* at that time
    (including lineages bound to die out), as in Iwasa, Michor & Nowak (2006), Genetics
    172:2557, neutral case (alpha = 1). A lineage born ``tau`` before is alive with
    probability ``(b-d) / (b - d e^{-(b-d) tau})`` (Kendall 1948), and integrating over
    arrivals gives ``P = 1 - exp(-mu M (b/d) ln((b - d N0/M) / (b - d)))``, which for
    ``N0 << M`` is ``1 - exp(-mu M (b/d) ln(b/(b-d)))`` and for ``d -> 0`` the
    Luria-Delbrück ``1 - exp(-mu (M - N0))``.
    """
    M, mu, b, d, N0 = (np.asarray(x, dtype=float) for x in (M, mu, b, d, N0))
    if kind == "surviving":
        br = b if b_r is None else np.asarray(b_r, dtype=float)
        dr = d if d_r is None else np.asarray(d_r, dtype=float)
        surv = np.where(br > dr, 1.0 - dr / np.where(br > 0, br, 1.0), 0.0)
        mean = mu * (b / (b - d)) * (M - N0) * surv
    elif kind == "present":
        if b_r is not None or d_r is not None:
            raise ValueError('p_resistance_at_size: kind="present" is the neutral formula (b_r = b, d_r = d)')
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(d > 0, mu * M * (b / d) * np.log((b - d * N0 / M) / (b - d)), mu * (M - N0))
    else:
        raise ValueError(f'p_resistance_at_size: kind must be "surviving" or "present", got {kind!r}')
    out = -np.expm1(-mean)
    return out if out.ndim else float(out)


# --------------------------------------------------------------------------- exact sampler


def _up_probabilities(b: float, d: float, N: int) -> np.ndarray:
    """p_n, n = 0..N-1: up-probability at size n of the chain conditioned to reach N before 0."""
    n = np.arange(N, dtype=float)
    p = np.zeros(N)
    if d <= 0:
        p[1:] = 1.0
        return p
    r = d / b
    with np.errstate(divide="ignore", invalid="ignore"):
        if r == 1.0:
            p[1:] = 0.5 * (n[1:] + 1) / n[1:]
        elif r < 1:
            lr = math.log(r)
            p[1:] = (b / (b + d)) * np.expm1((n[1:] + 1) * lr) / np.expm1(n[1:] * lr)
        else:
            ls = math.log(1.0 / r)
            p[1:] = (d / (b + d)) * np.expm1((n[1:] + 1) * ls) / np.expm1(n[1:] * ls)
    return np.clip(p, 0.0, 1.0)


def _time_to_threshold(rng: np.random.Generator, b: float, d: float, N: int, start: np.ndarray) -> np.ndarray:
    """Exact first-passage times to ``N`` from sizes ``start`` (1-D int array, each < N) of
    a birth-death process conditioned to reach ``N`` before 0 (level-crossing sampler)."""
    start = np.asarray(start, dtype=np.int64)
    L = start.size
    T = np.zeros(L)
    if L == 0:
        return T
    pu = _up_probabilities(b, d, N)
    c = b + d
    down = np.zeros(L)  # down-jumps D_{n+1} from the level above into level n
    lowest = int(start.min())
    all_ones = bool((start == 1).all())
    for n in range(N - 1, 0, -1):
        up = down + 1.0 if all_ones else down + (start <= n)
        p = pu[n]
        if n < lowest and not down.any():
            break
        g = rng.standard_gamma(up)
        T += g / (c * n * p)
        if p < 1.0:
            down = rng.poisson(g * ((1.0 - p) / p)).astype(float)
        else:
            down = np.zeros(L)
    return T


def sample_time_to_threshold(b: float, d: float, threshold: int, size: int, *, seed: SeedLike, initial: int = 1) -> np.ndarray:
    """Exact samples of the time for a birth-death lineage (rates ``b``, ``d`` per cell
    [1/day]) started by ``initial`` cells to reach ``threshold`` cells, conditioned on
    reaching it (it does so with probability :func:`lineage_survival_probability`)."""
    N = _check_threshold(threshold)
    if initial >= N:
        return np.zeros(size)
    if b <= 0:
        raise ValueError("sample_time_to_threshold: b must be > 0 (with b = 0 no lineage grows)")
    rng = _rng(seed)
    if int(initial) == 1 and size > 0:
        return _first_passage_from_one(N, [float(b)], [float(d)], [rng.standard_normal((N - 1, 2, size))])
    return _time_to_threshold(rng, float(b), float(d), N, np.full(size, int(initial)))


def _check_threshold(threshold) -> int:
    N = int(round(float(threshold)))
    if N < 1 or abs(N - float(threshold)) > 1e-9:
        raise ValueError(f"threshold must be a whole number of cells >= 1, got {threshold!r}")
    return N


# --------------------------------------------------------------------------- simulation


@dataclass
class ResistanceResult:
    """Outcome of :func:`emergence_times`.

    Attributes
    ----------
    emergence_time : (n_draws, n_replicates)
        Time [day] the first resistant lineage reached ``threshold`` cells (``inf``: not by
        ``times[-1]``).
    first_arrival : (n_draws, n_replicates)
        Time of the mutation that started the first acquired lineage destined to reach
        ``threshold`` (``inf``: none by ``times[-1]``). Preexisting cells are not counted.
    expected_lineages : (n_draws,)
        Expected number of acquired lineages reaching ``threshold`` that arise over the
        grid, ``mu q_N * integral of the flux`` (Poisson mean).
    net_growth : (n_draws,)
        ``b - d`` of the resistant clone [1/day], used after establishment.
    times, threshold : the grid and the hybrid threshold used.
    """

    emergence_time: np.ndarray
    first_arrival: np.ndarray
    expected_lineages: np.ndarray
    net_growth: np.ndarray
    times: np.ndarray
    threshold: int

    @property
    def n_draws(self) -> int:
        return self.emergence_time.shape[0]

    @property
    def n_replicates(self) -> int:
        return self.emergence_time.shape[1]

    def resistant_cells(self, t=None) -> np.ndarray:
        """Deterministic resistant burden of the first established lineage,
        ``threshold * exp((b-d)(t - T_e))`` for ``t >= T_e`` and 0 before, shape
        ``(n_draws, n_replicates, n_t)`` (default ``t``: the grid). A lower bound on the
        resistant population: later lineages are not added."""
        t = self.times if t is None else np.atleast_1d(np.asarray(t, dtype=float))
        te = self.emergence_time[..., None]
        with np.errstate(invalid="ignore", over="ignore"):
            dt = t[None, None, :] - te
            out = np.where(dt >= 0, self.threshold * np.exp(self.net_growth[:, None, None] * np.where(dt >= 0, dt, 0.0)), 0.0)
        return out


@dataclass
class ResistanceProbability:
    """P(resistance by t): ``per_draw`` (n_draws, n_t) fraction of replicates, ``per_draw_se``
    its binomial standard error, ``pooled`` (n_t,) over all draws x replicates (the posterior
    predictive probability) and ``pooled_se``; ``t`` the times asked."""

    t: np.ndarray
    per_draw: np.ndarray
    per_draw_se: np.ndarray
    pooled: np.ndarray
    pooled_se: np.ndarray


def probability_of_resistance(result: ResistanceResult, t) -> ResistanceProbability:
    """P(resistance by ``t``) per draw (fraction of replicates whose emergence time is
    ``<= t``) and pooled, each with its binomial standard error ``sqrt(p (1-p) / n)``."""
    t = np.atleast_1d(np.asarray(t, dtype=float))
    hit = result.emergence_time[:, :, None] <= t[None, None, :]
    n_rep = result.n_replicates
    per = hit.mean(axis=1)
    pooled = hit.mean(axis=(0, 1))
    n_all = hit.shape[0] * n_rep
    return ResistanceProbability(
        t=t,
        per_draw=per,
        per_draw_se=np.sqrt(per * (1 - per) / n_rep),
        pooled=pooled,
        pooled_se=np.sqrt(pooled * (1 - pooled) / n_all),
    )


def _per_draw(x, n_draws: int, name: str, *, allow_2d_msg: bool = True) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 0:
        return np.full(n_draws, float(a))
    if a.ndim == 1 and a.shape[0] == n_draws:
        return a.copy()
    if a.ndim == 2 and allow_2d_msg:
        raise ValueError(
            f"{name}: time-varying rates (shape {a.shape}) are not supported; give one constant "
            f"per draw, shape ({n_draws},) or a scalar (the exact sampler needs constant rates)"
        )
    raise ValueError(f"{name}: expected a scalar or shape ({n_draws},), got shape {a.shape}")


def emergence_times(
    sensitive_division_flux,
    times,
    mu,
    birth_r,
    death_r,
    *,
    n_replicates: int,
    seed: SeedLike | Sequence[SeedLike],
    threshold: float = 1e3,
    initial_resistant=0,
    max_lineages: int = 2000,
) -> ResistanceResult:
    """Simulate when resistance emerges, for each draw x replicate.

    Parameters
    ----------
    sensitive_division_flux : (n_draws, n_times) or (n_times,)
        ``b_S(t) S(t)`` [divisions/day] of the sensitive cells on the grid (from the
        deterministic simulation); taken piecewise constant at the trapezoid mean of each
        grid interval.
    times : (n_times,) increasing grid [day].
    mu : scalar or (n_draws,)
        Probability that a division of a sensitive cell gives a resistant daughter.
    birth_r, death_r : scalar or (n_draws,)
        Per-cell birth and death rates of resistant cells [1/day], constant in time.
    n_replicates : stochastic replicates per draw.
    seed : int, SeedSequence, Generator, or one per draw (see :func:`draw_seeds`).
    threshold : lineage size (cells) at which the hybrid switches from the exact jump
        process to deterministic growth; the emergence time is when it is reached.
    initial_resistant : scalar, (n_draws,) or (n_draws, n_replicates)
        Resistant cells present at ``times[0]`` (whole numbers; e.g. drawn from a prior on
        the resistant fraction), forming one preexisting clone.
    max_lineages : safety cap on the acquired lineages simulated per replicate. Only
        lineages arriving before the best emergence time so far are simulated, which is few
        unless arrivals are very dense (then resistance is early and near-certain anyway);
        past the cap the replicate stops, its emergence time is an upper bound, and a
        ``RuntimeWarning`` says how many replicates were capped.
    """
    times = np.asarray(times, dtype=float)
    flux = np.asarray(sensitive_division_flux, dtype=float)
    if flux.ndim == 1:
        flux = flux[None, :]
    if times.ndim != 1 or times.size < 2 or np.any(np.diff(times) <= 0):
        raise ValueError("times: expected a strictly increasing 1-D grid with at least 2 points")
    if flux.ndim != 2 or flux.shape[1] != times.size:
        raise ValueError(f"sensitive_division_flux: expected shape (n_draws, {times.size}), got {flux.shape}")
    if not np.all(np.isfinite(flux)) or np.any(flux < 0):
        raise ValueError("sensitive_division_flux: must be finite and >= 0")
    n_draws = flux.shape[0]
    mu = _per_draw(mu, n_draws, "mu")
    b = _per_draw(birth_r, n_draws, "birth_r")
    d = _per_draw(death_r, n_draws, "death_r")
    if np.any(mu < 0) or np.any(mu > 1) or np.any(b < 0) or np.any(d < 0):
        raise ValueError("mu must be in [0, 1] and birth_r, death_r >= 0")
    if int(n_replicates) < 1:
        raise ValueError("n_replicates must be >= 1")
    n_rep = int(n_replicates)
    N = _check_threshold(threshold)
    r0 = np.asarray(initial_resistant, dtype=float)
    try:
        r0 = np.broadcast_to(r0 if r0.ndim != 1 else r0[:, None], (n_draws, n_rep))
    except ValueError:
        raise ValueError(f"initial_resistant: expected a scalar, ({n_draws},) or ({n_draws}, {n_rep}), got shape {r0.shape}") from None
    if np.any(r0 < 0) or np.any(r0 != np.round(r0)):
        raise ValueError("initial_resistant: must be whole numbers of cells >= 0")
    gens = draw_seeds(seed, n_draws)
    t0, t_end = float(times[0]), float(times[-1])

    emergence = np.full((n_draws, n_rep), np.inf)
    first = np.full((n_draws, n_rep), np.inf)
    # Thinned arrival hazard of acquired lineages that reach N, per draw, on the grid.
    qN = np.array([_reach_prob(b[k], d[k], 1.0, float(N)) if b[k] > 0 else 0.0 for k in range(n_draws)])
    rate = (mu * qN)[:, None] * flux
    H = np.concatenate([np.zeros((n_draws, 1)), np.cumsum(0.5 * (rate[:, 1:] + rate[:, :-1]) * np.diff(times), axis=1)], axis=1)
    H_end = H[:, -1].copy()

    # 1. Preexisting clone: one uniform per replicate, always drawn first (fixed stream layout).
    for k in range(n_draws):
        u = gens[k].random(n_rep)
        if not np.any(r0[k] > 0):
            continue
        at_once = r0[k] >= N
        emergence[k, at_once] = t0
        grow = (r0[k] > 0) & ~at_once
        if b[k] > 0 and grow.any():
            q = np.array([_reach_prob(b[k], d[k], float(m), float(N)) for m in r0[k][grow]])
            idx = np.nonzero(grow)[0][u[grow] < q]
            emergence[k, idx] = t0 + _time_to_threshold(gens[k], b[k], d[k], N, r0[k][idx].astype(np.int64))

    # 2. Acquired lineages, in rounds of arrivals (k = 4, 8, ... per replicate), synchronous
    # across draws so that the exact sampler runs vectorised over many draws at once. A
    # replicate stops once its next arrival comes after its best emergence time so far.
    active = np.broadcast_to((H_end > 0)[:, None], (n_draws, n_rep)).copy()
    E = np.zeros((n_draws, n_rep))
    n_sim = np.zeros((n_draws, n_rep), dtype=np.int64)
    k_arr = 4
    while active.any():
        batch = _FirstPassageBatch(N, b, d)
        for k in np.nonzero(active.any(axis=1))[0]:
            rng = gens[k]
            idx = np.nonzero(active[k])[0]
            e = E[k, idx, None] + np.cumsum(rng.standard_exponential((idx.size, k_arr)), axis=1)
            E[k, idx] = e[:, -1]
            valid = e < H_end[k]
            a = np.where(valid, np.interp(np.minimum(e, H_end[k]), H[k], times), np.inf)
            new_first = np.isinf(first[k, idx]) & valid[:, 0]
            first[k, idx[new_first]] = a[new_first, 0]
            cand = valid & (a < emergence[k, idx, None])
            n_sim[k, idx] += cand.sum(axis=1)
            n_c = int(cand.sum())
            z = rng.standard_normal((N - 1, 2, n_c)) if n_c else None

            def finish(T, k=k, idx=idx, a=a, cand=cand, valid=valid):
                em = np.full(a.shape, np.inf)
                em[cand] = a[cand] + T
                emergence[k, idx] = np.minimum(emergence[k, idx], em.min(axis=1))
                active[k, idx] = valid[:, -1] & (a[:, -1] < emergence[k, idx]) & (n_sim[k, idx] < max_lineages)

            batch.add(k, z, n_c, finish)
        batch.flush()
        k_arr = min(2 * k_arr, 256)
    capped = int((n_sim >= max_lineages).sum())
    if capped:
        warnings.warn(
            f"emergence_times: {capped} replicate(s) reached max_lineages={max_lineages} simulated lineages; "
            "their emergence times are upper bounds (arrivals are very dense: resistance is near-certain and early)",
            RuntimeWarning,
            stacklevel=2,
        )
    emergence[emergence > t_end] = np.inf
    return ResistanceResult(emergence, first, H_end, b - d, times, N)


# Memory budget of one vectorised first-passage batch (the standard normals it consumes).
_BATCH_BYTES = 64 * 2**20


class _FirstPassageBatch:
    """Collects, per draw, the standard normals for its new lineages and runs the exact
    first-passage sampler over many draws at once. Results do not depend on how draws are
    grouped: each draw's normals come from its own generator, the rest is arithmetic."""

    def __init__(self, N: int, b: np.ndarray, d: np.ndarray):
        self.N, self.b, self.d = N, b, d
        self.items: list = []
        self.size = 0

    def add(self, k, z, n, finish):
        self.items.append((k, z, n, finish))
        self.size += n
        if self.size * 2 * (self.N - 1) * 8 >= _BATCH_BYTES:
            self.flush()

    def flush(self):
        items, self.items, self.size = self.items, [], 0
        with_lineages = [it for it in items if it[2] > 0]
        if with_lineages:
            T = _first_passage_from_one(
                self.N,
                [self.b[k] for k, *_ in with_lineages],
                [self.d[k] for k, *_ in with_lineages],
                [z for _, z, _, _ in with_lineages],
            )
            offsets = np.cumsum([0] + [n for _, _, n, _ in with_lineages])
        for k, z, n, finish in items:
            if n == 0:
                finish(np.zeros(0))
        for j, (k, z, n, finish) in enumerate(with_lineages):
            finish(T[offsets[j] : offsets[j + 1]])


def _first_passage_from_one(N: int, bs, ds, zs) -> np.ndarray:
    """Exact first-passage times to N from 1 cell (conditioned on reaching N), for groups of
    lineages with rates (bs[g], ds[g]) and standard normals zs[g] of shape (N-1, 2, L_g).

    With G_n ~ Gamma(D_{n+1} + 1) and D_{n+1} ~ Poisson(x_{n+1} G_{n+1}), Y_n = 2 G_n is
    noncentral chi-square with 2 degrees of freedom and noncentrality x_{n+1} Y_{n+1}:
    Y_n = (Z1 + sqrt(x_{n+1} Y_{n+1}))^2 + Z2^2. The time is sum_n G_n / ((b+d) n p_n)."""
    sizes = [z.shape[2] for z in zs]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    Z = np.concatenate(zs, axis=2) if len(zs) > 1 else zs[0]
    L = Z.shape[2]
    # per-group tables over levels 0..N: x_n = (1 - p_n)/p_n and w_n = 1 / (2 (b+d) n p_n)
    xt = np.zeros((N + 1, len(sizes)))
    wt = np.zeros((N + 1, len(sizes)))
    n = np.arange(1, N, dtype=float)
    for g, (b, d) in enumerate(zip(bs, ds)):
        p = _up_probabilities(float(b), float(d), N)[1:]
        xt[1:N, g] = (1.0 - p) / p
        wt[1:N, g] = 0.5 / ((b + d) * n * p)
    single = len(sizes) == 1
    Y = np.zeros(L)
    T = np.zeros(L)
    a = np.empty(L)
    for j, lev in enumerate(range(N - 1, 0, -1)):
        x = xt[lev + 1, 0] if single else xt[lev + 1][owner]
        w = wt[lev, 0] if single else wt[lev][owner]
        np.multiply(Y, x, out=a)
        np.sqrt(a, out=a)
        a += Z[j, 0]
        np.multiply(a, a, out=Y)
        z2 = Z[j, 1]
        Y += z2 * z2
        np.multiply(Y, w, out=a)
        T += a
    return T


def _states(result, model, regimen) -> np.ndarray:
    """(n_draws, n_times, n_states) from a simulate() result for one regimen."""
    missing = [n for n in model.state_names if n not in result]
    if missing:
        raise InputError(
            f"acquired_resistance: the result lacks states {missing[:3]}...; "
            "fix: simulate(..., pathway_states=True) so the division rates can be recomputed"
        )
    sub = result.sel(regimen=regimen)
    return np.stack([sub[n].transpose("draw", "time").values for n in model.state_names], axis=-1)


def clone_rates_along(model, y, parameters, regimen, times):
    """Per-cell division and loss rates ``(D, T, C)`` of every signalling clone along
    simulated states ``y (D, T, S)`` under ``regimen`` (exposure from the closed-form PK at
    ``times``); ``parameters`` name -> value or per-draw array ``(D,)``."""
    from . import pk

    D, T, _ = y.shape
    expo = np.zeros((T, len(model.drugs)))
    if len(regimen):
        ex = pk.exposure(regimen, times=times, warn=False)
        for j, d in enumerate(model.drugs):
            if d in ex.inhibition:
                expo[:, j] = np.asarray(ex.inhibition[d], dtype=float)
    pars = {k: (np.repeat(np.asarray(v, float), T) if np.ndim(v) else np.full(D * T, float(v))) for k, v in parameters.items()}
    division, loss = model.clone_rates(y.reshape(D * T, -1), pars, np.tile(expo, (D, 1)))
    return division.numpy().reshape(D, T, -1), loss.numpy().reshape(D, T, -1)


def acquired_resistance(
    result,
    model,
    parameters,
    regimens,
    *,
    mu: float | np.ndarray = 1e-7,
    resistant_clone: str | None = None,
    n_replicates: int = 100,
    seed: SeedLike = 0,
    threshold: float = 1e3,
):
    """Stochastic emergence of *acquired* resistance on top of a deterministic twin run.

    For each regimen and draw, the sensitive clone's division flux ``b_S(t) S(t)`` is
    recomputed from the simulated states (:meth:`TwinModel.clone_rates`, with the regimen's
    analytic exposure), and :func:`emergence_times` draws new resistant lineages at rate
    ``mu x flux``, each followed exactly while small and deterministically beyond
    ``threshold`` cells. The resistant lineages' per-cell birth and death rates are the
    time averages of the resistant clone's rates over the run (or of the sensitive clone
    without drug effect when the model has no resistant clone) — an approximation, since
    :func:`emergence_times` takes constant rates. One-way coupling: emerging lineages do not
    feed back on the deterministic run (see ``docs/resistance.md``).

    Parameters
    ----------
    result : the ``xarray.Dataset`` of :func:`twin.simulate.simulate` with pathway states.
    model, parameters : the model and the per-draw parameters given to ``simulate``.
    regimens : dict name -> Regimen, the same as given to ``simulate``.
    mu : probability per sensitive division of a resistant daughter (scalar or per draw).
    resistant_clone : which resistant clone's rates the new lineages take (default: the first).
    n_replicates, seed, threshold : see :func:`emergence_times`.

    Returns
    -------
    xarray.Dataset with dims (regimen, draw, replicate): ``emergence_time`` [day] (inf: none),
    and (regimen, draw, time): ``p_resistance`` (fraction of replicates resistant by t),
    plus ``p_resistance_pooled`` (regimen, time) with its binomial standard error.
    """
    import xarray as xr


    times = np.asarray(result["time"].values, dtype=float)
    names = [str(r) for r in result["regimen"].values]
    if isinstance(regimens, dict):
        regs = {str(k): v for k, v in regimens.items()}
    else:
        raise InputError("acquired_resistance: regimens must be the dict name -> Regimen given to simulate")
    clones = list(model.clones)
    c_res = clones.index(resistant_clone) if resistant_clone else (1 if len(clones) > 1 else 0)
    root = np.random.SeedSequence(seed) if not isinstance(seed, np.random.SeedSequence) else seed
    seeds = root.spawn(len(names))
    emergence, p_draw, p_pool, p_se = [], [], [], []
    for name, ss in zip(names, seeds):
        y = _states(result, model, name)  # (D, T, S)
        D, T, _ = y.shape
        reg = regs[name]
        params = {k: np.asarray(v, dtype=float).reshape(-1) if np.ndim(v) else v for k, v in parameters.items()}
        division, loss = clone_rates_along(model, y, params, reg, times)
        sens = y[:, :, model.state_names.index("N_S")]
        flux = np.nan_to_num(division[:, :, 0] * sens, nan=0.0)
        b_r = np.nanmean(division[:, :, c_res], axis=1)
        d_r = np.nanmean(loss[:, :, c_res], axis=1)
        res = emergence_times(flux, times, mu, b_r, d_r, n_replicates=n_replicates, seed=ss, threshold=threshold)
        emergence.append(res.emergence_time)
        p_draw.append((res.emergence_time[:, :, None] <= times[None, None, :]).mean(axis=1))
        hit = (res.emergence_time[:, :, None] <= times[None, None, :]).reshape(-1, T)
        p = hit.mean(axis=0)
        p_pool.append(p)
        p_se.append(np.sqrt(p * (1 - p) / hit.shape[0]))
    draw = result["draw"].values
    return xr.Dataset(
        {
            "emergence_time": (("regimen", "draw", "replicate"), np.stack(emergence), {"units": "day", "description": "first resistant lineage reaches the threshold (inf: not by the horizon)"}),
            "p_resistance": (("regimen", "draw", "time"), np.stack(p_draw), {"units": "1", "description": "fraction of replicates with acquired resistance by t"}),
            "p_resistance_pooled": (("regimen", "time"), np.stack(p_pool), {"units": "1"}),
            "p_resistance_se": (("regimen", "time"), np.stack(p_se), {"units": "1", "description": "binomial standard error of the pooled probability"}),
        },
        coords={"regimen": names, "draw": draw, "time": times, "replicate": np.arange(n_replicates)},
        attrs={"mu": str(mu), "threshold": float(threshold), "seed": str(seed), "n_replicates": int(n_replicates),
               "resistant_rates": "time averages of the resistant clone's division and loss rates over the run"},
    )
