"""Arm comparison, virtual trials, predictive checks and plots, against known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from scenarios import compare as cp
from scenarios import outcomes as oc
from scenarios.outcomes import build_result


def _tte(a, b, horizon=np.inf, name="ttp"):
    """A time-to-event outcome with arms A, B from raw event times, censored at horizon."""
    vals = np.stack([np.asarray(a, float), np.asarray(b, float)])
    event = vals <= horizon
    da = xr.DataArray(np.where(event, vals, np.inf), dims=("arm", "draw"),
                      coords={"arm": ["A", "B"], "draw": np.arange(vals.shape[1])}, name=name)
    da = da.assign_coords(event=(("arm", "draw"), event),
                          followup=(("arm", "draw"), np.where(event, vals, horizon)))
    da.attrs.update(outcome=name, units="day", better="higher", kind="time_to_event")
    return da


# ----------------------------------------------------------------------------- P(A beats B)


def test_a_always_better_gives_one():
    b = np.random.default_rng(0).exponential(50, 500)
    r = cp.prob_beats(_tte(b + 10, b), "A", "B")
    assert r["p_a_better"] == 1.0 and r["mcse"] == 0.0 and r["n_pairs"] == 500
    assert cp.prob_beats(_tte(b + 10, b), "B", "A")["p_a_better"] == 0.0


def test_iid_draws_give_one_half_within_mc_error():
    rng = np.random.default_rng(1)
    r = cp.prob_beats(_tte(rng.exponential(50, 4000), rng.exponential(50, 4000)), "A", "B")
    assert abs(r["p_a_better"] - 0.5) < 4 * r["mcse"]
    assert r["mcse"] == pytest.approx(0.5 / np.sqrt(4000), rel=0.05)


@pytest.mark.parametrize("pairing", ["draw", "all"])
def test_exponential_rates_give_lambda_ratio(pairing):
    # T_A ~ Exp(rate 1/100), T_B ~ Exp(rate 1/50): P(T_A > T_B) = lB / (lA + lB) = 2/3
    rng = np.random.default_rng(2)
    n = 20000 if pairing == "draw" else 1500
    r = cp.prob_beats(_tte(rng.exponential(100, n), rng.exponential(50, n)), "A", "B", pairing=pairing)
    assert abs(r["p_a_better"] - 2 / 3) < 4 * r["mcse"]
    assert r["mcse"] < 0.02


def test_censoring_at_a_horizon_is_counted_correctly():
    # With censoring at H: A strictly better iff T_B < T_A and T_B <= H, probability
    # lB / (lA + lB) * (1 - exp(-(lA + lB) H)); undetermined iff both exceed H:
    # exp(-(lA + lB) H); P(A better) = strictly + half of undetermined.
    rng = np.random.default_rng(3)
    la, lb, h, n = 1 / 100, 1 / 50, 60.0, 40000
    r = cp.prob_beats(_tte(rng.exponential(1 / la, n), rng.exponential(1 / lb, n), horizon=h), "A", "B")
    und = np.exp(-(la + lb) * h)
    strict = lb / (la + lb) * (1 - und)
    se = np.sqrt(0.25 / n)
    assert abs(r["p_undetermined"] - und) < 4 * se
    assert abs(r["p_a_strictly"] - strict) < 4 * se
    assert r["p_a_better"] == pytest.approx(r["p_a_strictly"] + 0.5 * (r["p_tie"] + r["p_undetermined"]))
    assert r["p_a_strictly"] + r["p_b_strictly"] + r["p_tie"] + r["p_undetermined"] == pytest.approx(1.0)


def test_pair_rules_by_hand():
    # A event at 30 vs B censored at 60 -> B better; A censored at 60 vs B event at 60 -> A
    # better; both censored -> undetermined; both events at 40 -> tie.
    ab, bb, tie, und = cp.pair_scores(
        np.array([30, np.inf, np.inf, 40]), np.array([1, 0, 0, 1], bool), np.array([30, 60, 60, 40.0]),
        np.array([np.inf, 60, np.inf, 40]), np.array([0, 1, 0, 1], bool), np.array([60, 60, 60, 40.0]),
    )
    assert bb.tolist() == [True, False, False, False]
    assert ab.tolist() == [False, True, False, False]
    assert und.tolist() == [False, False, True, False]
    assert tie.tolist() == [False, False, False, True]


def test_lower_is_better_outcomes_and_compare_table():
    t = np.arange(0, 51.0)
    vol = np.stack([np.full((5, t.size), 100.0), np.full((5, t.size), 200.0)])
    dose = np.zeros((2, 5, t.size, 2))
    dose[0, ..., 0] = 10 * t[None, :]
    dose[1, ..., 0] = 20 * t[None, :]
    ds = build_result(t, ["A", "B"], {"tumor_volume": vol, "cumulative_dose": dose}, drugs=["x", "y"])
    auc = oc.burden_auc(ds)
    assert cp.prob_beats(auc, "A", "B")["p_a_better"] == 1.0  # less burden is better
    table = cp.compare_arms({"auc": auc, "dose": oc.cumulative_dose_at(ds)}, "A", "B")
    assert list(table.columns) == list(cp.COMPARE_COLUMNS)
    got = table.set_index("outcome")["p_a_better"]
    assert got["auc_tumor_volume"] == 1.0 and got["cumulative_dose[x]"] == 1.0
    assert got["cumulative_dose[y]"] == 0.5 and table.set_index("outcome").loc["cumulative_dose[y]", "p_tie"] == 1.0


def test_prob_beats_errors():
    da = _tte([1, 2], [3, 4])
    with pytest.raises(oc.InputError, match="Did you mean 'A'"):
        cp.prob_beats(da, "a", "B")
    with pytest.raises(oc.InputError, match="pairing"):
        cp.prob_beats(da, "A", "B", pairing="none")


# ----------------------------------------------------------------------------- virtual trial


def test_virtual_trial_km_equals_hand_product_limit():
    # one draw per patient -> each patient's value is fixed. Arm A durations 2, 3, 3+, 5, 6+, 8:
    # S = 5/6, 2/3, 4/9, 0 at 2, 3, 5, 8 (hand product-limit).
    durations = [2, 3, 3, 5, 6, 8]
    events = [1, 1, 0, 1, 0, 1]
    per = {}
    for i, (d, e) in enumerate(zip(durations, events)):
        da = _tte([d], [d + 100])
        if not e:
            da = da.copy(data=np.array([[np.inf], [d + 100.0]]))
            da = da.assign_coords(event=(("arm", "draw"), np.array([[False], [True]])))
        per[f"p{i}"] = da
    for sample in ("draw", "median"):
        trial = cp.virtual_trial(per, sample=sample, random_seed=0)
        sf = trial.fitters["A"].survival_function_at_times([2, 3, 5, 8]).to_numpy()
        np.testing.assert_allclose(sf, [5 / 6, 2 / 3, 4 / 9, 0.0])
        assert trial.median_survival()["A"] == 5.0
        assert len(trial.table) == 12
    assert trial.logrank["p_value"] < 0.01  # B lasts 100 days longer in every patient
    assert trial.logrank["test"].startswith("log-rank")


def test_virtual_trial_draw_sampling_is_seeded_and_paired():
    rng = np.random.default_rng(4)
    per = {f"p{i}": _tte(rng.exponential(100, 50), rng.exponential(100, 50), horizon=365) for i in range(30)}
    t1 = cp.virtual_trial(per, random_seed=7)
    t2 = cp.virtual_trial(per, random_seed=7)
    pd.testing.assert_frame_equal(t1.table, t2.table)
    assert 0 <= t1.logrank["p_value"] <= 1


# ----------------------------------------------------------------------------- CRPS, coverage


def test_crps_sample_matches_normal_closed_form():
    # CRPS(N(mu, s), y) = s [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)], z = (y - mu) / s
    mu, s, n = 1.0, 2.0, 20000
    x = np.random.default_rng(5).normal(mu, s, n)
    for y in (0.5, 3.0, -4.0):
        z = (y - mu) / s
        exact = s * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
        mc_err = np.std(np.abs(x - y)) / np.sqrt(n) + np.std(x) / np.sqrt(n)
        assert cp.crps_sample(x, y) == pytest.approx(exact, abs=4 * mc_err)
    assert cp.crps_sample(np.array([2.0]), 5.0) == pytest.approx(3.0)  # point mass: |x - y|


def _calibrated_result(n_times=400, n_draws=2000, sigma=0.3, seed=6):
    rng = np.random.default_rng(seed)
    t = np.arange(0, float(n_times))
    m = 10 * np.exp(0.002 * t)
    psa = m[None, :] * np.exp(sigma * rng.standard_normal((n_draws, n_times)))
    ds = build_result(t, ["actual"], {"psa": psa[None]})
    obs_t = t[5::1]
    observed = pd.DataFrame({"time": obs_t, "observable": "psa",
                             "value": m[5:] * np.exp(sigma * rng.standard_normal(obs_t.size)), "censored": False})
    return ds, observed, m


def test_coverage_of_a_calibrated_predictive_is_ninety_percent():
    ds, observed, _ = _calibrated_result()
    chk = cp.predictive_check(ds, observed, arm="actual", cutoff=200.0)
    n = len(chk.visits)
    assert abs(chk.visits["covered"].mean() - 0.9) < 3 * np.sqrt(0.09 / n)
    s = chk.summary.set_index("split")
    assert set(s.index) == {"fit", "held-out"}
    assert s.loc["fit", "n"] == (observed["time"] <= 200).sum()
    # median |log(pred/obs)| of a log-normal error: median |N(0, 0.3)| = 0.3 * 0.674
    assert s.loc["fit", "median_abs_log_error"] == pytest.approx(0.3 * 0.6745, rel=0.2)


def test_observation_noise_and_censored_visits():
    t = np.arange(0, 100.0)
    ds = build_result(t, ["actual"], {"psa": np.full((1, 3000, t.size), 5.0)})
    rng = np.random.default_rng(8)
    obs = pd.DataFrame({"time": t[1:], "observable": "psa", "value": 5.0 * np.exp(0.2 * rng.standard_normal(99)),
                        "censored": False})
    latent = cp.predictive_check(ds, obs, arm="actual", cutoff=50)
    assert latent.visits["covered"].mean() < 0.05  # latent trajectory has no spread
    noisy = cp.predictive_check(ds, obs, arm="actual", cutoff=50, log_sigma={"psa": 0.2}, random_seed=1)
    assert abs(noisy.visits["covered"].mean() - 0.9) < 0.1
    # Patient measurement format: value NaN, below_lloq with lloq; outside the range dropped
    pat = pd.DataFrame({"time": [10.0, 20.0, 500.0], "observable": "psa", "value": [5.0, np.nan, 4.0],
                        "lloq": [np.nan, 6.0, np.nan], "below_lloq": [False, True, False]})
    chk = cp.predictive_check(ds, pat, arm="actual", cutoff=50)
    row = chk.visits.set_index("time").loc[20.0]
    assert row["censored"] and row["value"] == 6.0 and row["covered"] and np.isnan(row["crps"])
    assert chk.summary["n_dropped"].iloc[0] == 1


# ----------------------------------------------------------------------------- plots


def _plot_result():
    t = np.arange(0, 120.0)
    rng = np.random.default_rng(9)
    psa = 10 * np.exp(-0.02 * t[None, :] + 0.001 * rng.uniform(10, 30, (40, 1)) * t[None, :])
    rf = 1 / (1 + np.exp(-0.05 * (t[None, :] - rng.uniform(40, 200, (40, 1)))))
    return build_result(t, ["A", "B"], {"psa": np.stack([psa, psa * 1.2]), "resistant_fraction": np.stack([rf, rf])})


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_return_figures_and_save_pngs(tmp_path):
    from matplotlib.figure import Figure

    from scenarios import plots

    ds = _plot_result()
    observed = pd.DataFrame({"time": [0.0, 28, 56, 84], "observable": "psa", "value": [10, 7, 5, 0.1],
                             "censored": [False, False, False, True]})
    ttr = oc.time_to_resistance(ds)
    per = {f"p{i}": ttr for i in range(5)}
    figs = {
        "traj": plots.plot_trajectories(ds, "psa", observed=observed),
        "rf": plots.plot_resistant_fraction(ds),
        "km_patient": plots.plot_km(ttr),
        "km_trial": plots.plot_km(cp.virtual_trial(per, random_seed=0)),
        "table": plots.plot_outcome_table(oc.summarize(oc.standard_outcomes(ds))),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        out = plots.save_png(fig, tmp_path / "sub" / f"{name}.png")
        assert _is_png(out), name
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(f"{n}.png" for n in figs)  # no temp files left
    ax = figs["traj"].axes[0]
    assert ax.get_yscale() == "log" and "psa [ng/mL]" in ax.get_ylabel()


def test_plot_errors():
    from scenarios import plots

    with pytest.raises(oc.InputError, match="no variable 'sld'"):
        plots.plot_trajectories(_plot_result(), "sld")
    with pytest.raises(oc.InputError, match="VirtualTrial"):
        plots.plot_km("nope")
