"""Outcomes of scenario results, checked against hand-computed values.

Each progression test builds a trajectory whose answer is worked out in the comments
(nadir rule, absolute-increase rule, visit-only assessment, PCWG3 confirmation), so a
failure points at one clause of the criterion.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from scenarios import outcomes as oc
from scenarios.outcomes import ResultSchemaError, build_result


def _result_from_visits(values, times=(0, 28, 56, 84, 112), variable="sld"):
    """One arm, one draw per row of ``values``; the result grid is the visit grid."""
    v = np.atleast_2d(np.asarray(values, float))
    return build_result(times, ["A"], {variable: v[None, :, :]})


# ----------------------------------------------------------------------------- schema


def test_build_result_passes_check():
    t = np.arange(0, 10.0)
    ds = build_result(t, ["A", "B"], {"sld": np.ones((2, 3, 10)), "on_treatment": np.ones((2, 3, 10), bool)})
    assert oc.check_result(ds) is ds
    assert ds["sld"].attrs["units"] == "mm"


def test_check_result_lists_every_problem():
    t = np.arange(0, 5.0)
    ds = xr.Dataset(
        {
            "sld": (("arm", "draw", "time"), np.ones((1, 2, 5)), {"units": "cm"}),
            "psa": (("arm", "draw", "time"), np.ones((1, 2, 5))),
            "on_treatment": (("arm", "draw", "time"), np.ones((1, 2, 5))),
            "resistant_fraction": (("arm", "draw", "time"), np.full((1, 2, 5), 1.5), {"units": "1"}),
        },
        coords={"arm": ["A"], "draw": [0, 1], "time": t[::-1].copy()},
    )
    with pytest.raises(ResultSchemaError) as err:
        oc.check_result(ds)
    msg = str(err.value)
    for needle in ("units 'cm', expected 'mm'", "'psa': attrs['units'] missing", "'on_treatment' must be bool",
                   "strictly increasing", "[0, 1]", "lack 'patient_id'", "docs/outcomes.md"):
        assert needle in msg, needle
    assert isinstance(err.value, ValueError)  # InputError is a ValueError


def test_check_result_rejects_non_dataset_and_missing_dims():
    with pytest.raises(ResultSchemaError, match="xarray.Dataset"):
        oc.check_result(np.zeros(3))
    ds = xr.Dataset({"sld": (("draw", "time"), np.ones((2, 3)), {"units": "mm"})},
                    coords={"draw": [0, 1], "time": [0.0, 1.0, 2.0]}, attrs={"patient_id": "p", "seed": 1, "versions": ""})
    with pytest.raises(ResultSchemaError, match="missing dim 'arm'"):
        oc.check_result(ds)


def test_import_outcomes_and_compare_do_not_import_matplotlib():
    code = "import sys, scenarios.outcomes, scenarios.compare, scenarios.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- RECIST 1.1 on SLD


def test_recist_nadir_rule():
    # visits 0..112: 50, 40, 30, 35, 37. Nadir before day 112 is 30 (day 56):
    # 37 >= 1.2 * 30 = 36 and 37 - 30 = 7 >= 5 -> progression at day 112.
    # Day 84: 35 < 36 -> no. Relative to baseline (50) there would be none.
    ds = _result_from_visits([50, 40, 30, 35, 37])
    ttp = oc.time_to_progression(ds, "recist_sld", visits="all")
    assert float(ttp.sel(arm="A", draw=0)) == 112.0
    assert bool(ttp["event"].sel(arm="A", draw=0))


def test_recist_absolute_increase_rule():
    # small lesions: 10, 8, 9.8, 12, 13.1. Nadir 8 from day 28.
    # day 56: 9.8 >= 9.6 (+22.5 %) but only +1.8 mm -> no; day 84: +50 % but +4 mm -> no;
    # day 112: +63.75 % and +5.1 mm -> progression.
    ds = _result_from_visits([10, 8, 9.8, 12, 13.1])
    assert float(oc.time_to_progression(ds, visits="all").item()) == 112.0
    # with the absolute rule switched off, day 56 already counts
    assert float(oc.time_to_progression(ds, visits="all", abs_increase=0.0).item()) == 56.0


def test_recist_baseline_is_part_of_the_nadir_and_no_progression_at_baseline():
    # no shrinkage: 50, 55, 61 -> day 56: 61 >= 60 and +11 mm -> 56 (nadir = baseline 50)
    ds = _result_from_visits([50, 55, 61], times=(0, 28, 56))
    assert float(oc.time_to_progression(ds, visits="all").item()) == 56.0


def test_not_reached_is_inf_and_censored_at_last_visit():
    ds = _result_from_visits([50, 45, 44, 46, 47])
    ttp = oc.time_to_progression(ds, visits="all")
    assert np.isinf(ttp.item()) and not bool(ttp["event"].item())
    assert float(ttp["followup"].item()) == 112.0


def test_progression_is_assessed_at_visits_only():
    # flat 50 mm until day 20, then +0.45 mm/day: reaches 60 mm (= +20 %, +10 mm) at
    # t = 20 + 10/0.45 = 42.2 days. Daily assessment: first day >= 42.2 is 43.
    # Every 28 days (0, 28, 56, ...): day 28 has 53.6 mm -> no; day 56 has 66.2 -> 56.
    t = np.arange(0, 141.0)
    sld = np.where(t <= 20, 50.0, 50.0 + 0.45 * (t - 20))
    ds = build_result(t, ["A"], {"sld": sld[None, None, :]})
    assert float(oc.time_to_progression(ds, visits="all").item()) == 43.0
    assert float(oc.time_to_progression(ds).item()) == 56.0  # default: every 28 days
    assert float(oc.time_to_progression(ds, visits=[0, 30, 45, 100]).item()) == 45.0
    # visits need not lie on the grid: day 42.5 interpolates to 60.125 mm -> progression
    assert float(oc.time_to_progression(ds, visits=[0, 42.5]).item()) == 42.5


def test_vectorised_over_arms_and_draws():
    cases = np.array([[50, 40, 30, 35, 37], [10, 8, 9.8, 12, 13.1], [50, 45, 44, 46, 47]], float)
    arr = np.stack([cases, cases[::-1]])  # arm B has the draws reversed
    ds = build_result((0, 28, 56, 84, 112), ["A", "B"], {"sld": arr})
    ttp = oc.time_to_progression(ds, visits="all")
    assert ttp.dims == ("arm", "draw")
    np.testing.assert_array_equal(ttp.sel(arm="A").values, [112, 112, np.inf])
    np.testing.assert_array_equal(ttp.sel(arm="B").values, [np.inf, 112, 112])
    assert ttp.attrs["units"] == "day" and ttp.attrs["better"] == "higher"


def test_nan_trajectory_is_not_assessable():
    ds = _result_from_visits([50, np.nan, 30, 35, 37])
    ttp = oc.time_to_progression(ds, visits="all")
    assert np.isnan(ttp.item()) and not bool(ttp["event"].item())


def test_unknown_criterion_and_option_errors():
    ds = _result_from_visits([50, 40, 30, 35, 37])
    with pytest.raises(oc.InputError, match="recist_sld"):
        oc.time_to_progression(ds, "recist_sdl")
    with pytest.raises(oc.InputError, match="unknown criterion option"):
        oc.time_to_progression(ds, rel_increse=0.3)
    with pytest.raises(oc.InputError, match="no variable 'psa'"):
        oc.time_to_progression(ds, "pcwg3_psa")


# ----------------------------------------------------------------------------- volume


def test_volume_equivalent_threshold():
    assert oc.VOLUME_EQUIVALENT_INCREASE == pytest.approx(0.728)
    # 100, 80 (nadir), 138, 139, 200: 1.728 * 80 = 138.24 -> 138 no, 139 yes (day 84)
    ds = _result_from_visits([100, 80, 138, 139, 200], variable="tumor_volume")
    assert float(oc.time_to_progression(ds, "recist_volume", visits="all").item()) == 84.0
    # adding a 5 mm equivalent-sphere-diameter rule: d(80) = 5.35 mm, needs d >= 10.35 mm,
    # i.e. V >= pi/6 * 10.35^3 = 580 mm3 -> never reached here
    with_d = oc.time_to_progression(ds, "recist_volume", visits="all", sphere_diameter_increase=5.0)
    assert np.isinf(with_d.item())


# ----------------------------------------------------------------------------- PCWG3 PSA


def _psa_result(knots_t, knots_v, horizon=300):
    t = np.arange(0, horizon + 1.0)
    psa = np.interp(t, knots_t, knots_v)
    return build_result(t, ["A"], {"psa": psa[None, None, :]})


def test_pcwg3_confirmation_21_days_later():
    # 20 -> 4 ng/mL by day 56, flat, a spike to 7 at day 112 falling to 4.5 by 126, flat to
    # 160, then rising to 10 at day 196 and 30 at day 300. Visits every 28 days.
    # Day 112: 7 >= 1.25 * 4 and +3 ng/mL, but day 133 has 4.5 < 5 -> not confirmed.
    # Day 168: 5.72 (+1.72 ng/mL) -> no. Day 196: 10 (+6), day 217: 14.0 -> confirmed: 196.
    ds = _psa_result([0, 56, 84, 112, 126, 160, 196, 300], [20, 4, 4, 7, 4.5, 4.5, 10, 30])
    ttp = oc.time_to_progression(ds, "pcwg3_psa")
    assert float(ttp.item()) == 196.0
    unconfirmed = oc.time_to_progression(ds, "pcwg3_psa", confirm_after=0.0)
    assert float(unconfirmed.item()) == 112.0


def test_pcwg3_no_decline_rise_counts_from_week_12():
    # PSA 10 + 0.1 t never declines: day 28 (12.8, +28 %, +2.8) would qualify but rises in
    # the first 12 weeks without a decline are ignored -> first qualifying visit is day 84.
    t = np.arange(0, 200.0)
    ds = build_result(t, ["A"], {"psa": (10 + 0.1 * t)[None, None, :]})
    assert float(oc.time_to_progression(ds, "pcwg3_psa").item()) == 84.0
    assert float(oc.time_to_progression(ds, "pcwg3_psa", no_decline_min_time=0.0).item()) == 28.0


def test_pcwg3_confirmation_beyond_horizon_is_censored():
    # rise detected at day 280 but day 301 is past the end (300): not an event; follow-up
    # ends at the last confirmable visit, 252 (252 + 21 = 273 <= 300; 280 + 21 > 300).
    ds = _psa_result([0, 56, 260, 280, 300], [20, 4, 4, 10, 12])
    ttp = oc.time_to_progression(ds, "pcwg3_psa")
    assert np.isinf(ttp.item()) and not bool(ttp["event"].item())
    assert float(ttp["followup"].item()) == 252.0


# ----------------------------------------------------------------------------- resistance


def _logistic_result(t50s, k=0.1, horizon=365.0, n_arms=1):
    t = np.arange(0, horizon + 1.0)
    t50 = np.asarray(t50s, float)[:, None]
    rf = 1.0 / (1.0 + np.exp(-k * (t[None, :] - t50)))
    arr = np.broadcast_to(rf, (n_arms,) + rf.shape).copy()
    return build_result(t, [f"arm{i}" for i in range(n_arms)], {"resistant_fraction": arr})


def test_time_to_resistance_matches_analytic_crossing_on_the_grid():
    # f(t) = 1 / (1 + exp(-k (t - t50))) exceeds 0.5 just after t50; on a daily grid the
    # first time is ceil(t50) (t50 not an integer). Threshold 0.8: t50 + ln(4) / k.
    ds = _logistic_result([50.5, 100.3, 400.0])
    ttr = oc.time_to_resistance(ds)
    np.testing.assert_array_equal(ttr.sel(arm="arm0").values, [51, 101, np.inf])
    np.testing.assert_array_equal(ttr["event"].sel(arm="arm0").values, [True, True, False])
    t80 = oc.time_to_resistance(ds, threshold=0.8)
    expected = np.ceil(np.array([50.5, 100.3]) + np.log(4) / 0.1)
    np.testing.assert_array_equal(t80.sel(arm="arm0").values[:2], expected)
    weekly = oc.time_to_resistance(ds, visits=7.0)
    np.testing.assert_array_equal(weekly.sel(arm="arm0").values[:2], [56, 105])


def test_probability_of_resistance_by_horizon():
    ds = _logistic_result([50.5, 100.3, 400.0, 250.2], n_arms=2)
    p = oc.probability_of_resistance(ds, horizon=200.0)
    np.testing.assert_allclose(p.values, [0.5, 0.5])
    np.testing.assert_allclose(p["mcse"].values, np.sqrt(0.25 / 4))
    p_end = oc.probability_of_resistance(ds)
    np.testing.assert_allclose(p_end.values, [0.75, 0.75])


def test_resistance_with_replicates():
    t = np.arange(0, 101.0)
    rf = np.zeros((1, 2, 3, t.size))
    rf[0, 0, 0, 40:] = 0.9  # one of 6 samples resistant from day 40
    ds = build_result(t, ["A"], {"resistant_fraction": rf}, n_replicates=3)
    ttr = oc.time_to_resistance(ds)
    assert ttr.dims == ("arm", "draw", "replicate")
    assert float(ttr.sel(arm="A", draw=0, replicate=0)) == 40.0
    assert float(oc.probability_of_resistance(ds).sel(arm="A")) == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------- burden, dose, treatment


def test_burden_auc_trapezoid_is_exact_for_linear_burden():
    t = np.arange(0, 101.0)
    v = 100 + 2.0 * t  # AUC to T: 100 T + T^2
    ds = build_result(t, ["A"], {"tumor_volume": v[None, None, :]})
    assert float(oc.burden_auc(ds).item()) == pytest.approx(100 * 100 + 100**2)
    assert float(oc.burden_auc(ds, horizon=50.5).item()) == pytest.approx(100 * 50.5 + 50.5**2)
    assert oc.burden_auc(ds).attrs["units"] == "mm3*day"


def test_cumulative_dose_and_treatment_days():
    t = np.arange(0, 101.0)
    on = t < 56  # daily treatment days 0..55 -> 56 days
    dose = np.stack([100.0 * np.minimum(t + 1, 56), np.zeros_like(t)], axis=-1)  # 100 mg/day, taken at t
    ds = build_result(t, ["A"], {"on_treatment": on[None, None, :], "cumulative_dose": dose[None, None]},
                      drugs=["abiraterone", "docetaxel"])
    assert float(oc.treatment_days(ds).item()) == 56.0
    assert float(oc.treatment_days(ds, horizon=30).item()) == 30.0
    cd = oc.cumulative_dose_at(ds, horizon=29.5)  # last grid time <= 29.5 is day 29: 3000 mg
    assert float(cd.sel(arm="A", draw=0, drug="abiraterone")) == 3000.0
    assert float(oc.cumulative_dose_at(ds).sel(arm="A", draw=0, drug="abiraterone")) == 5600.0
    table = oc.summarize(cd)
    assert set(table["outcome"]) == {"cumulative_dose[abiraterone]", "cumulative_dose[docetaxel]"}


# ----------------------------------------------------------------------------- response class


def test_mrecist_response_classes():
    t = np.array([0, 3.5, 7, 10.5, 14, 17.5, 21])
    vols = np.array([
        [100, 50, 10, 3, 2, 1, 1],  # BR -99, BAR -76 -> mCR
        [100, 80, 60, 45, 45, 45, 45],  # BR -55, BAR -40 -> mPR
        [100, 100, 100, 100, 100, 100, 100],  # 0, 0 -> mSD
        [100, 110, 130, 150, 170, 190, 210],  # growth -> mPD
    ], float)
    ds = build_result(t, ["A"], {"tumor_volume": vols[None]})
    rc = oc.response_class(ds, visits="all")
    assert rc.sel(arm="A").values.tolist() == ["mCR", "mPR", "mSD", "mPD"]
    np.testing.assert_allclose(rc["best_response"].sel(arm="A").values[:3], [-99, -55, 0])
    np.testing.assert_allclose(rc["best_avg_response"].sel(arm="A", draw=1), -40.0)
    probs = oc.response_class_probabilities(rc)
    assert probs.set_index("class").loc["mCR", "probability"] == 0.25


# ----------------------------------------------------------------------------- KM and summaries


def test_kaplan_meier_hand_example():
    # durations 2, 3, 3+, 5, 6+, 8 (+ = censored):
    # S(2) = 5/6; S(3) = 5/6 * 4/5 = 2/3; S(5) = 2/3 * 2/3 = 4/9; S(8) = 0
    t, s = oc.kaplan_meier([2, 3, 3, 5, 6, 8], [1, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(t, [2, 3, 5, 8])
    np.testing.assert_allclose(s, [5 / 6, 2 / 3, 4 / 9, 0.0])
    assert oc.km_quantile([2, 3, 3, 5, 6, 8], [1, 1, 0, 1, 0, 1], 0.5) == 5.0
    assert oc.km_quantile([2, 3, 3], [0, 0, 1], 0.5) == 3.0
    assert np.isinf(oc.km_quantile([2, 3, 3], [0, 1, 0], 0.9))


def test_summarize_uses_km_when_censored_and_quantiles_otherwise():
    ds = _logistic_result([10.5, 20.5, 30.5, 40.5, 500, 600], horizon=100.0, n_arms=1)
    ttr = oc.time_to_resistance(ds)
    row = oc.summarize(ttr).iloc[0]
    # samples: 11, 21, 31, 41, censored 100, censored 100 -> S after 31 = 1/2 -> median 31
    assert row["median"] == 31.0 and row["n_events"] == 4 and "Kaplan-Meier" in row["method"]
    assert np.isinf(row["q95"])
    assert list(oc.summarize(ttr).columns) == list(oc.SUMMARY_COLUMNS)
    ds2 = _logistic_result([10.5, 20.5, 30.5], horizon=100.0)
    row2 = oc.summarize(oc.time_to_resistance(ds2)).iloc[0]
    assert row2["median"] == 21.0 and "empirical" in row2["method"]


def test_standard_outcomes_and_summary_table():
    t = np.arange(0, 201.0)
    rng = np.random.default_rng(1)
    n = 20
    sld = 50 * np.exp(-0.01 * t[None, :] + 0.0002 * rng.uniform(0.5, 1.5, (n, 1)) * t[None, :] ** 1.5)
    rf = 1 / (1 + np.exp(-0.05 * (t[None, :] - rng.uniform(80, 300, (n, 1)))))
    ds = build_result(t, ["A", "B"], {"sld": np.stack([sld, sld * 1.1]), "resistant_fraction": np.stack([rf, rf]),
                                      "on_treatment": np.ones((2, n, t.size), bool)})
    outs = oc.standard_outcomes(ds)
    assert {"ttp_recist_sld", "time_to_resistance", "probability_of_resistance", "auc_sld", "treatment_days"} <= set(outs)
    table = oc.summarize(outs)
    assert set(table["arm"]) == {"A", "B"}
    assert (table.loc[table["outcome"] == "treatment_days", "median"] == 200.0).all()


# ----------------------------------------------------------------------------- progression known so far


def test_progression_known_agrees_with_time_to_progression():
    """At each visit, progression_known on the trajectory observed so far is True exactly from
    the time-to-progression visit on (criteria without confirmation), so a runner switching at
    the first visit where it is known switches at the outcome's event time."""
    rng = np.random.default_rng(0)
    times = np.arange(0.0, 113.0)
    visits = np.arange(0.0, 113.0, 28.0)
    y = 50.0 * np.exp(np.cumsum(rng.normal(0.0, 0.04, (40, times.size)), axis=1))
    ds = build_result(times, ["A"], {"sld": y[None]})
    ttp = oc.time_to_progression(ds, "recist_sld", visits=visits).values[0]
    assert np.isfinite(ttp).any() and np.isinf(ttp).any()
    for t in visits:
        keep = times <= t
        known = oc.progression_known(y[:, keep], times[keep], visits, "recist_sld")
        np.testing.assert_array_equal(known, ttp <= t)


def test_progression_known_waits_for_pcwg3_confirmation():
    # PSA nadir 5 at day 28, 8 at day 56 (>= 25 % and >= 2 above the nadir), still 8 at 77:
    # the event is day 56 (time_to_progression), known once day 56 + 21 = 77 is observed.
    times = np.array([0.0, 28, 56, 77, 84])
    psa = np.array([[10.0, 5, 8, 8, 8]])
    vis = np.array([0.0, 28, 56, 84])
    assert not oc.progression_known(psa[:, :3], times[:3], vis, "pcwg3_psa")
    assert oc.progression_known(psa[:, :4], times[:4], vis, "pcwg3_psa")
    ds = build_result(times, ["A"], {"psa": psa[None]})
    assert float(oc.time_to_progression(ds, "pcwg3_psa", visits=np.array([0.0, 28, 56, 84])).values.ravel()[0]) == 56
    # a single visit (the baseline) knows nothing; NaN rows never progress
    assert not oc.progression_known(psa[:, :1], times[:1], vis, "pcwg3_psa").any()
    assert not oc.progression_known(np.array([[10.0, np.nan, 30, 30, 30]]), times, vis, "recist_volume").any()
