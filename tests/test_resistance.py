"""Stochastic emergence of resistance (twin.resistance) against closed forms.

Statistical checks use fixed seeds and a tolerance of at least 3-4 standard errors; the
``slow`` versions use bigger samples and tighter tolerances (``make test-slow``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

import twin.resistance as res
from twin.resistance import (
    draw_seeds,
    emergence_times,
    lineage_survival_probability,
    luria_delbruck_mean_mutants,
    luria_delbruck_p0,
    p_resistance_at_size,
    probability_of_resistance,
    sample_time_to_threshold,
)


# ----------------------------------------------------------------------- helpers


def brute_force_first_passage(b, d, N, n, seed, start=1):
    """Plain Gillespie of a birth-death process (every jump simulated) until it hits 0 or N.
    Returns the hitting times of N of those that hit N, and the fraction that did."""
    rng = np.random.default_rng(seed)
    times, hits, total = [], 0, 0
    while len(times) < n:
        m = 4 * n
        z = np.full(m, start)
        t = np.zeros(m)
        alive = np.ones(m, dtype=bool)
        while alive.any():
            i = np.nonzero(alive)[0]
            t[i] += rng.exponential(1.0 / ((b + d) * z[i]))
            z[i] += np.where(rng.random(i.size) < b / (b + d), 1, -1)
            alive[i] = (z[i] > 0) & (z[i] < N)
        total += m
        hits += int((z == N).sum())
        times.extend(t[z == N])
    return np.array(times[:n]), hits / total


def exact_mean_time(b, d, N):
    """E[time from 1 to N | N reached], from the expected level-crossing counts:
    E[U_n] = 1 + x_{n+1} E[U_{n+1}], E[time at n] = E[U_n] / ((b+d) n p_n)."""
    p = res._up_probabilities(b, d, N)
    mean, U = 0.0, 1.0
    for n in range(N - 1, 0, -1):
        mean += U / ((b + d) * n * p[n])
        U = 1.0 + (1.0 - p[n]) / p[n] * U
    return mean


def assert_close(observed, expected, se, k=4.0, what=""):
    assert abs(observed - expected) <= k * se + 1e-12, f"{what}: observed {observed:.5g}, expected {expected:.5g} (se {se:.3g})"


# ----------------------------------------------------------------------- closed forms


def test_survival_probability_closed_form():
    assert lineage_survival_probability(1.0, 0.25) == pytest.approx(0.75)  # 1 - d/b
    assert lineage_survival_probability(1.0, 0.25, initial=2) == pytest.approx(1 - 0.25**2)
    assert lineage_survival_probability(1.0, 1.0) == 0.0
    assert lineage_survival_probability(0.5, 1.0) == 0.0
    assert lineage_survival_probability(1.0, 0.0) == 1.0
    assert lineage_survival_probability(1.0, 1.0, threshold=10) == pytest.approx(0.1)  # critical: m/N
    assert lineage_survival_probability(1.0, 0.5, threshold=1000) == pytest.approx(0.5)
    # gambler's ruin, subcritical: (r^m - 1)/(r^N - 1), r = d/b = 2
    assert lineage_survival_probability(0.5, 1.0, threshold=6, initial=2) == pytest.approx((2**2 - 1) / (2**6 - 1))
    # vectorised
    np.testing.assert_allclose(lineage_survival_probability(np.array([1.0, 2.0]), 0.5), [0.5, 0.75])


@pytest.mark.parametrize("b,d,N,start", [(1.0, 0.6, 12, 1), (1.0, 1.0, 8, 1), (0.5, 1.0, 6, 1), (1.0, 0.7, 12, 4)])
def test_survival_probability_matches_jump_chain(b, d, N, start):
    _, frac = brute_force_first_passage(b, d, N, 1500, seed=11, start=start)
    p = lineage_survival_probability(b, d, threshold=N, initial=start)
    # the brute force runs at least 6000 lineages
    n_tot = max(6000, int(1500 / max(p, 1e-9)))
    assert_close(frac, p, math.sqrt(p * (1 - p) / n_tot), what="P(reach N)")


def test_luria_delbruck_and_iwasa_forms():
    M, mu = 1e6, 1e-6
    assert luria_delbruck_p0(M, mu) == pytest.approx(math.exp(-mu * (M - 1)))
    assert luria_delbruck_mean_mutants(M, mu) == pytest.approx(mu * M * math.log(M))
    # surviving lineages: the neutral formula reduces exactly to Luria-Delbrueck p0
    for b, d in [(1.0, 0.0), (1.0, 0.5), (0.3, 0.29)]:
        assert p_resistance_at_size(M, mu, b, d) == pytest.approx(1 - luria_delbruck_p0(M, mu), rel=1e-12)
    # non-neutral: mean mu (b/(b-d)) (M - N0) (1 - d_r/b_r)
    got = p_resistance_at_size(M, mu, 1.0, 0.5, b_r=0.8, d_r=0.6, N0=10)
    assert got == pytest.approx(1 - math.exp(-mu * 2.0 * (M - 10) * 0.25))
    # Iwasa-Michor-Nowak (present cells), neutral: 1 - exp(-mu M (b/d) ln(b/(b-d))) for N0 << M
    b, d = 1.0, 0.5
    assert p_resistance_at_size(1e9, 1e-9, b, d, kind="present") == pytest.approx(1 - math.exp(-1.0 * (b / d) * math.log(b / (b - d))), rel=1e-6)
    # ... tends to Luria-Delbrueck as d -> 0, and is above the "surviving" probability
    assert p_resistance_at_size(M, mu, 1.0, 1e-9, kind="present") == pytest.approx(1 - luria_delbruck_p0(M, mu), rel=1e-6)
    assert p_resistance_at_size(M, mu, 1.0, 0.9, kind="present") > p_resistance_at_size(M, mu, 1.0, 0.9)


def test_iwasa_present_formula_equals_its_integral():
    """kind="present": mean = int_0^T mu b S(s) P(lineage of age T-s alive) ds (Kendall)."""
    b, d, N0, M, mu = 0.7, 0.4, 5.0, 2e4, 3e-5
    lam = b - d
    T = math.log(M / N0) / lam
    alive = lambda tau: lam / (b - d * math.exp(-lam * tau))  # noqa: E731
    mean, _ = integrate.quad(lambda s: mu * b * N0 * math.exp(lam * s) * alive(T - s), 0, T, limit=200)
    assert p_resistance_at_size(M, mu, b, d, N0=N0, kind="present") == pytest.approx(-math.expm1(-mean), rel=1e-8)


def test_luria_delbruck_mean_equals_its_integral():
    b, d, N0, M, mu = 0.9, 0.3, 3.0, 5e4, 1e-5
    lam = b - d
    T = math.log(M / N0) / lam
    mean, _ = integrate.quad(lambda s: mu * b * N0 * math.exp(lam * s) * math.exp(lam * (T - s)), 0, T)
    assert luria_delbruck_mean_mutants(M, mu, N0=N0, b=b, d=d) == pytest.approx(mean, rel=1e-8)


# ----------------------------------------------------------------------- exact sampler


@pytest.mark.parametrize("b,d,N", [(1.0, 0.5, 20), (1.0, 0.9, 15), (1.0, 1.0, 10), (0.5, 1.0, 6), (2.0, 0.0, 30)])
def test_time_to_threshold_mean_is_exact(b, d, N):
    t = sample_time_to_threshold(b, d, N, 40_000, seed=3)
    assert_close(t.mean(), exact_mean_time(b, d, N), t.std() / math.sqrt(t.size), what="E[T_N]")


def test_time_to_threshold_yule_closed_form():
    """d = 0: T_N is a sum of independent Exp(b n), n = 1..N-1 (Yule)."""
    b, N = 0.5, 50
    t = sample_time_to_threshold(b, 0.0, N, 40_000, seed=4)
    n = np.arange(1, N)
    mean, var = (1 / (b * n)).sum(), (1 / (b * n) ** 2).sum()
    assert_close(t.mean(), mean, math.sqrt(var / t.size), what="Yule mean")
    assert t.var() == pytest.approx(var, rel=0.05)


@pytest.mark.parametrize("b,d,N,start", [(1.0, 0.6, 15, 1), (1.0, 1.0, 8, 1), (1.0, 0.7, 12, 4)])
def test_time_to_threshold_distribution_matches_gillespie(b, d, N, start):
    brute, _ = brute_force_first_passage(b, d, N, 3000, seed=21, start=start)
    ours = sample_time_to_threshold(b, d, N, 3000, seed=22, initial=start)
    assert stats.ks_2samp(brute, ours).pvalue > 1e-3


# ----------------------------------------------------------------------- emergence: Poisson arrivals


def constant_flux_setup(F=2.0, t1=50.0, tail=150.0):
    times = np.concatenate([np.linspace(0, t1, 51), np.linspace(t1 + 1e-6, t1 + tail, 20)])
    flux = np.where(times <= t1, F, 0.0)
    return times, flux


def _check_constant_flux(n_draws, n_rep, k):
    mu, b, d = 0.01, 1.0, 0.5
    times, flux = constant_flux_setup()
    result = emergence_times(np.tile(flux, (n_draws, 1)), times, mu, b, d, n_replicates=n_rep, seed=7)
    H = mu * np.trapezoid(flux, times) * (1 - d / b)  # (1 - r^N) correction is 1e-301 here
    np.testing.assert_allclose(result.expected_lineages, H, rtol=1e-12)
    n = n_draws * n_rep
    p_none = math.exp(-H)
    # the number of surviving lineages is Poisson(H): P(none) = exp(-H) ...
    assert_close(np.isinf(result.first_arrival).mean(), p_none, math.sqrt(p_none * (1 - p_none) / n), k, "P(no lineage)")
    # ... and, with a long flux-free tail, every surviving lineage reaches the threshold
    assert_close(np.isinf(result.emergence_time).mean(), p_none, math.sqrt(p_none * (1 - p_none) / n), k, "P(no resistance)")
    # arrivals by t: P = 1 - exp(-mu q F t)
    for t in (10.0, 25.0):
        p = -math.expm1(-mu * 2.0 * t * (1 - d / b))
        assert_close((result.first_arrival <= t).mean(), p, math.sqrt(p * (1 - p) / n), k, f"P(arrival by {t})")
    assert np.all(result.emergence_time[np.isfinite(result.emergence_time)] >= result.first_arrival[np.isfinite(result.emergence_time)])


def test_constant_flux_no_resistance_is_poisson():
    _check_constant_flux(n_draws=20, n_rep=200, k=4.0)


@pytest.mark.slow
def test_constant_flux_no_resistance_is_poisson_large():
    _check_constant_flux(n_draws=100, n_rep=1000, k=3.0)


def test_single_lineage_survival_probability_in_simulation():
    """A preexisting single resistant cell and mu = 0: P(resistance ever) = 1 - d/b."""
    b, d = 1.0, 0.7
    times = np.linspace(0, 200, 11)
    result = emergence_times(np.zeros((10, times.size)), times, 0.0, b, d, n_replicates=400, seed=5, initial_resistant=1)
    p = 1 - d / b
    assert_close(np.isfinite(result.emergence_time).mean(), p, math.sqrt(p * (1 - p) / 4000), what="survival")


def _check_exponential_growth(n_draws, n_rep, k, b=0.5, d=0.2, b_r=None, d_r=None):
    """Sensitive cells grow from N0 as N0 e^{(b-d)t}; P(surviving resistant lineage by the
    time S reaches M) against the closed form (Iwasa et al. 2006 / Luria-Delbrueck)."""
    N0, M, mu = 10.0, 1e6, 8e-7
    lam = b - d
    t_M = math.log(M / N0) / lam
    times = np.linspace(0, t_M, 3001)
    flux = b * N0 * np.exp(lam * times)
    br = b if b_r is None else b_r
    dr = d if d_r is None else d_r
    result = emergence_times(np.tile(flux, (n_draws, 1)), times, mu, br, dr, n_replicates=n_rep, seed=9)
    p = p_resistance_at_size(M, mu, b, d, N0=N0, b_r=b_r, d_r=d_r)
    n = n_draws * n_rep
    assert_close((result.first_arrival <= t_M).mean(), p, math.sqrt(p * (1 - p) / n), k, "P(resistance at size M)")
    return result


def test_exponential_growth_matches_iwasa_formula():
    _check_exponential_growth(n_draws=10, n_rep=400, k=4.0)


def test_exponential_growth_non_neutral_resistant_clone():
    _check_exponential_growth(n_draws=10, n_rep=400, k=4.0, b_r=0.4, d_r=0.3)


@pytest.mark.slow
def test_exponential_growth_matches_iwasa_formula_large():
    _check_exponential_growth(n_draws=50, n_rep=2000, k=3.0)
    _check_exponential_growth(n_draws=50, n_rep=2000, k=3.0, b_r=0.4, d_r=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("b,d,N,start", [(1.0, 0.6, 25, 1), (1.0, 0.95, 20, 1), (1.0, 0.8, 20, 6)])
def test_time_to_threshold_distribution_matches_gillespie_large(b, d, N, start):
    brute, _ = brute_force_first_passage(b, d, N, 30_000, seed=31, start=start)
    ours = sample_time_to_threshold(b, d, N, 30_000, seed=32, initial=start)
    assert stats.ks_2samp(brute, ours).pvalue > 1e-3
    if start == 1:
        assert_close(ours.mean(), exact_mean_time(b, d, N), ours.std() / math.sqrt(ours.size), 3.0, "E[T_N]")


def test_emergence_time_is_arrival_plus_exact_passage_time():
    """With a single, early burst of arrivals the emergence-time distribution is the
    first-passage law shifted by the arrival time: compare with the exact mean."""
    b, d, N = 1.0, 0.5, 50
    times = np.array([0.0, 1e-3, 2e-3, 100.0])
    flux = np.array([60.0, 60.0, 0.0, 0.0])
    # hazard 0.045 in [0, 2e-3]: mostly <= 1 lineage, emergence = arrival (~0) + T_N
    result = emergence_times(np.tile(flux, (20, 1)), times, 1.0, b, d, n_replicates=2000, seed=13, threshold=N)
    assert result.expected_lineages[0] == pytest.approx(60 * 1.5e-3 * 0.5)
    et = result.emergence_time[np.isfinite(result.emergence_time)]
    assert et.size > 0
    assert_close(et.mean(), exact_mean_time(b, d, N), et.std() / math.sqrt(et.size) + 1e-3, what="E[T_e]")


# ----------------------------------------------------------------------- edge cases and seeds


def _scenario(n_draws=6):
    times = np.linspace(0, 730, 731)
    rng = np.random.default_rng(0)
    flux = 0.05 * 1e7 * np.exp(-rng.uniform(0.0, 0.01, n_draws)[:, None] * times)
    b = rng.uniform(0.04, 0.08, n_draws)
    d = rng.uniform(0.01, 0.03, n_draws)
    return flux, times, b, d


def test_mu_zero_is_never_resistant():
    flux, times, b, d = _scenario()
    result = emergence_times(flux, times, 0.0, b, d, n_replicates=50, seed=1)
    assert np.all(np.isinf(result.emergence_time)) and np.all(np.isinf(result.first_arrival))
    assert np.all(result.expected_lineages == 0)
    assert np.all(probability_of_resistance(result, 730).pooled == 0)


def test_same_seed_same_result_different_seed_different():
    flux, times, b, d = _scenario()
    kw = dict(n_replicates=40, threshold=200)
    r1 = emergence_times(flux, times, 1e-7, b, d, seed=123, **kw)
    r2 = emergence_times(flux, times, 1e-7, b, d, seed=123, **kw)
    r3 = emergence_times(flux, times, 1e-7, b, d, seed=124, **kw)
    np.testing.assert_array_equal(r1.emergence_time, r2.emergence_time)
    np.testing.assert_array_equal(r1.first_arrival, r2.first_arrival)
    assert np.isfinite(r1.emergence_time).any()
    assert not np.array_equal(r1.emergence_time, r3.emergence_time)
    # a Generator seed works and leaves the global numpy state alone
    state = np.random.get_state()[1].copy()
    emergence_times(flux, times, 1e-7, b, d, seed=np.random.default_rng(5), **kw)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_draws_together_or_one_by_one_identical(monkeypatch):
    flux, times, b, d = _scenario(5)
    r0 = np.array([0, 3, 0, 50, 2000])
    kw = dict(n_replicates=30, threshold=300)
    together = emergence_times(flux, times, 1e-7, b, d, seed=99, initial_resistant=r0, **kw)
    children = np.random.SeedSequence(99).spawn(5)
    # a tiny batch budget changes how draws are grouped in the vectorised sampler
    monkeypatch.setattr(res, "_BATCH_BYTES", 1)
    for k in range(5):
        one = emergence_times(flux[k], times, 1e-7, b[k], d[k], seed=[children[k]], initial_resistant=r0[k], **kw)
        np.testing.assert_array_equal(one.emergence_time[0], together.emergence_time[k])
        np.testing.assert_array_equal(one.first_arrival[0], together.first_arrival[k])
    assert len(draw_seeds(99, 5)) == 5
    assert np.all(together.emergence_time[4] == 0.0)  # 2000 preexisting cells >= threshold


def test_preexisting_clone_reaches_threshold_with_gamblers_ruin_probability():
    b, d, m, N = 1.0, 0.9, 5, 100
    times = np.linspace(0, 2000, 5)
    result = emergence_times(np.zeros((8, 5)), times, 0.0, b, d, n_replicates=500, seed=17, threshold=N, initial_resistant=m)
    p = lineage_survival_probability(b, d, threshold=N, initial=m)
    assert_close(np.isfinite(result.emergence_time).mean(), p, math.sqrt(p * (1 - p) / 4000), what="P(reach N from m)")


def test_probability_of_resistance_and_burden():
    flux, times, b, d = _scenario()
    result = emergence_times(flux, times, 3e-7, b, d, n_replicates=60, seed=2, threshold=100)
    pr = probability_of_resistance(result, [100.0, 365.0, 730.0])
    assert pr.per_draw.shape == (6, 3) and pr.pooled.shape == (3,)
    assert np.all(np.diff(pr.per_draw, axis=1) >= 0)
    np.testing.assert_allclose(pr.pooled, pr.per_draw.mean(axis=0))
    np.testing.assert_allclose(pr.per_draw_se, np.sqrt(pr.per_draw * (1 - pr.per_draw) / 60))
    np.testing.assert_allclose(pr.pooled_se, np.sqrt(pr.pooled * (1 - pr.pooled) / 360))
    R = result.resistant_cells([0.0, 730.0])
    assert R.shape == (6, 60, 2)
    te = result.emergence_time
    fin = np.isfinite(te)
    assert fin.any()
    expected = 100 * np.exp((b - d)[:, None] * (730.0 - te))
    np.testing.assert_allclose(R[..., 1][fin], expected[fin])
    assert np.all(R[..., 1][~fin] == 0)


def test_input_validation():
    flux, times, b, d = _scenario(3)
    with pytest.raises(ValueError, match="time-varying"):
        emergence_times(flux, times, 1e-7, np.tile(b[:, None], (1, times.size)), d, n_replicates=2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        emergence_times(flux, times, 1e-7, b, d, n_replicates=2, seed=None)
    with pytest.raises(ValueError, match="shape"):
        emergence_times(flux[:, :-1], times, 1e-7, b, d, n_replicates=2, seed=1)
    with pytest.raises(ValueError, match="threshold"):
        emergence_times(flux, times, 1e-7, b, d, n_replicates=2, seed=1, threshold=10.5)
    with pytest.raises(ValueError, match="initial_resistant"):
        emergence_times(flux, times, 1e-7, b, d, n_replicates=2, seed=1, initial_resistant=0.5)


def test_dense_arrivals_are_capped_with_a_warning():
    times = np.linspace(0, 100, 101)
    flux = np.full((2, times.size), 1e4)
    with pytest.warns(RuntimeWarning, match="max_lineages"):
        result = emergence_times(flux, times, 1e-2, 1.0, 0.5, n_replicates=5, seed=3, max_lineages=20)
    assert np.all(np.isfinite(result.emergence_time))


def test_acquired_resistance_on_a_twin_run_is_reproducible_and_drug_dependent():
    """Coupled to a deterministic twin run: a drug that shrinks the sensitive clone lowers the
    division flux, so acquired resistance is less likely than untreated at the same horizon;
    mu = 0 never gives resistance; the same seed gives the same answer."""
    import warnings

    from twin.graph import load_pathway
    from twin.model import TwinModel
    from twin.regimen import Regimen
    from twin.resistance import acquired_resistance
    from twin.simulate import simulate

    model = TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["trametinib"], mechanisms=["mek_mutation"], pathway=False)
    params = {"N0": np.full(3, 1e8), "r_max": np.full(3, 0.3), "d_max": np.full(3, 0.02), "K": np.full(3, 1e14), "frac_mek_mutation": np.full(3, 1e-9)}
    regs = {"untreated": Regimen.empty(), "trametinib": Regimen.from_records([{"drug": "trametinib", "time": 0.0, "amount": 2.0, "route": "oral", "interval": 1.0, "count": 60}])}
    times = np.arange(0.0, 61.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = simulate(model, params, regs, times)
    a = acquired_resistance(res, model, params, regs, mu=1e-11, n_replicates=200, seed=3, threshold=100)
    b = acquired_resistance(res, model, params, regs, mu=1e-11, n_replicates=200, seed=3, threshold=100)
    np.testing.assert_array_equal(a["emergence_time"].values, b["emergence_time"].values)
    p_end = a["p_resistance_pooled"].isel(time=-1)
    assert float(p_end.sel(regimen="untreated")) > float(p_end.sel(regimen="trametinib"))
    assert float(p_end.sel(regimen="untreated")) > 0.05
    zero = acquired_resistance(res, model, params, regs, mu=0.0, n_replicates=20, seed=3, threshold=100)
    assert float(zero["p_resistance_pooled"].max()) == 0.0
    assert (np.diff(a["p_resistance_pooled"].values, axis=-1) >= 0).all()  # a CDF in time
