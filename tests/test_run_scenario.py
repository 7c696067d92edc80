"""The scenario runner (scenarios/run.py) and `twin simulate` / `twin compare`."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from scenarios import Arm, Scenario
from scenarios.scenario import OutcomeSpec
from scenarios.outcomes import check_result
from scenarios.run import load_result, prior_twin, run_scenario, save_result
from twin.model import TwinModel
from twin.regimen import Regimen
from twin.simulate import simulate

TREAT = "paclitaxel 80 mg/m2 iv over 1 hour weekly"
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def patient():
    from twin.io import read_patient

    from pathlib import Path

    p, _ = read_patient(Path(__file__).resolve().parents[1] / "docs" / "examples" / "patient-example")
    return p


@pytest.fixture(scope="module")
def small(patient):
    """A reduced model (no pathway), 6 prior draws, 5 arms over 10 weeks."""
    model = TwinModel.from_graph(None, drugs=["paclitaxel"], pathway=False)
    tw = prior_twin(patient, model, 6, seed=3)
    sc = Scenario(
        name="runner-test",
        arms=(
            Arm("continuous", protocol=TREAT),
            Arm("always", policy="continuous", treat=TREAT),
            Arm("never", policy={"rule": "hold when time >= 0 days", "initial": "hold"}, treat=TREAT),
            Arm("zhang", policy={"name": "zhang", "observable": "tumor_volume", "stop_fraction": 0.9, "restart_fraction": 1.0}, treat=TREAT),
            Arm("untreated", protocol="rest for 10 weeks"),
        ),
        horizon=70,
        visits="every 2 weeks",
        seed=5,
    )
    calls = []
    res = run_scenario(tw, sc, progress=calls.append, **TOL)
    return tw, sc, res, calls


def test_protocol_arm_equals_direct_simulate(small, patient):
    tw, sc, res, _ = small
    reg = sc.arms[0].protocol.expand(patient.covariates, start=0.0, horizon=70.0)
    direct = simulate(tw.model, tw.draws, {"continuous": reg}, res["time"].values, **TOL, pathway_states=False)
    a = res["tumor_volume"].sel(arm="continuous").values
    b = direct["tumor_volume"].isel(regimen=0).values
    # the runner's compiled engine carries the step size from dose to dose (scenarios.run.
    # _CARRY_STEP) where simulate restarts it: the same tolerance (1e-10), other steps; without
    # the carry the two are bit-identical (tests/test_run_scenario_compiled.py)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=0)


def test_always_treat_equals_protocol_and_never_equals_untreated(small):
    _, _, res, _ = small
    tv = res["tumor_volume"]
    np.testing.assert_allclose(tv.sel(arm="always").values, tv.sel(arm="continuous").values, rtol=1e-8)
    np.testing.assert_allclose(tv.sel(arm="never").values, tv.sel(arm="untreated").values, rtol=1e-8)
    cd = res["cumulative_dose"].sel(drug="paclitaxel")
    np.testing.assert_allclose(cd.sel(arm="always").values, cd.sel(arm="continuous").values)
    assert (cd.sel(arm="never").values == 0).all()
    assert res["on_treatment"].sel(arm="continuous").values[:, :-1].all()  # the plan is cut at the horizon
    assert not res["on_treatment"].sel(arm="never").values.any()


def test_per_draw_decisions_differ(small):
    _, _, res, _ = small
    f = res["dose_factor"].sel(arm="zhang").values  # (draw, time)
    assert (f == 1).any() and (f == 0).any()
    assert len({tuple(row) for row in f}) > 1  # draws with different parameters decide differently
    dose = res["cumulative_dose"].sel(arm="zhang", drug="paclitaxel").values[:, -1]
    assert len(np.unique(np.round(dose, 6))) > 1
    # a held draw is not on treatment
    on = res["on_treatment"].sel(arm="zhang").values
    assert ((f == 0) <= ~on).all()


def test_result_schema_attrs_and_progress(small):
    _, _, res, calls = small
    check_result(res)
    assert res.sizes["arm"] == 5 and res.sizes["draw"] == 6
    for k in ("patient_id", "seed", "versions", "scenario_sha256", "patient_sha256"):
        assert k in res.attrs
    assert res.attrs["seed"] == 5
    assert "torch=" in res.attrs["versions"] and "xarray=" in res.attrs["versions"]
    assert (res["status"].values == 0).all()
    arms = {c["arm"] for c in calls}
    assert {"always", "never", "zhang"} <= arms
    assert all({"step", "steps", "message"} <= set(c) for c in calls)


def test_save_load_roundtrip(small, tmp_path):
    _, _, res, _ = small
    files = save_result(res, tmp_path)
    assert files["trajectories"].name == "trajectories.nc" and files["outcomes"].is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    back = load_result(tmp_path)
    check_result(back)
    for v in res.data_vars:
        xr.testing.assert_equal(back[v], res[v])
    assert back.attrs["patient_id"] == res.attrs["patient_id"]
    import pandas as pd

    table = pd.read_csv(files["outcomes"])
    assert {"arm", "outcome", "median"} <= set(table.columns) and len(table)


def test_draws_and_bad_inputs(small):
    tw, sc, _, _ = small
    from twin.errors import InputError

    with pytest.raises(InputError, match="draws"):
        run_scenario(tw, sc, draws=100)
    other = TwinModel.from_graph(None, drugs=["leuprolide"], pathway=False)
    with pytest.raises(InputError, match="paclitaxel"):
        run_scenario((tw.patient, other, tw.draws), sc)


def test_tuple_twin_and_draw_subset(small):
    tw, sc, _, _ = small
    one = Scenario(name="s", arms=(sc.arms[0],), horizon=14, visits=[0, 7, 14])
    res = run_scenario((tw.patient, tw.model, tw.draws), one, draws=2)
    assert res.sizes["draw"] == 2 and res.attrs["seed"] == 0


# -- the command line -------------------------------------------------------------------------
def test_cli_simulate_and_compare_end_to_end(tmp_path, capsys):
    from twin.cli import main
    from scenarios.scenario import library_path
    from pathlib import Path

    patient = Path(__file__).resolve().parents[1] / "twin" / "data" / "bruchovsky" / "bruchovsky-001"
    scen = library_path("adt_continuous_vs_intermittent_vs_adaptive")
    out = tmp_path / "results"
    rc = main(["simulate", str(patient), str(scen), "-o", str(out), "--draws", "4", "--horizon", "4 weeks", "--seed", "7"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert (out / "trajectories.nc").is_file() and (out / "outcomes.csv").is_file()
    assert "continuous" in text and "adaptive" in text
    res = load_result(out)
    check_result(res)
    assert list(res["arm"].values) == ["continuous", "intermittent", "adaptive"]
    assert res.attrs["seed"] == 7 and len(res.attrs["scenario_sha256"]) == 64
    report = tmp_path / "report.html"
    assert main(["compare", str(out), "--observed", str(patient), "-o", str(report)]) == 0
    assert report.is_file() and report.read_text().startswith("<!DOCTYPE html>")


def test_cli_user_mistakes_exit_1(tmp_path, capsys):
    from twin.cli import main
    from scenarios.scenario import library_path

    scen = library_path("adt_continuous_vs_intermittent_vs_adaptive")
    assert main(["simulate", str(tmp_path / "nope"), str(scen), "-o", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["simulate", "P.twin.nc", str(scen), "-o", str(tmp_path / "o")]) == 1
    assert "twin calibrate" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenario]\nname = "x"\nhorizon = "1 year"\nvisits = "every 4 weeks"\n[[arm]]\nname = "a"\nprotocol = "leuprolide 7.5 mg im evry 4 weeks"\n')
    assert main(["simulate", "docs/examples/patient-example", str(bad), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.toml" in err and "Traceback" not in err
    assert main(["compare", str(tmp_path / "missing")]) == 1
    assert "twin simulate" in capsys.readouterr().err


# -- switching at progression ------------------------------------------------------------------
@pytest.fixture(scope="module")
def switching(patient):
    """Hand-built draws: untreated growth until progression, then docetaxel from that visit.

    Line 0 is a rest over the whole horizon (the untreated course), so each draw's progression
    visit is the RECIST-volume time to progression of the untreated arm, known in advance.
    Draw 2 barely grows (never progresses); draw 3 progresses first."""
    from scenarios.protocol import Dose, Protocol, Rest, Switch

    model = TwinModel.from_graph(None, drugs=["paclitaxel", "docetaxel"], pathway=False)
    draws = {
        "N0": np.array([1e9, 1e9, 1e9, 1e9]),
        "K": np.full(4, 1e13),
        "r_max": np.array([0.018, 0.0149, 0.0011, 0.023]),
        "d_max": np.array([0.01, 0.01, 0.001, 0.01]),
        "kill_paclitaxel": np.array([0.2, 0.002, 0.2, 0.001]),  # draws 1 and 3 resist paclitaxel
        "kill_docetaxel": np.full(4, 0.3),
    }
    H = 168.0
    sequential = Protocol((Rest(H), Switch(Dose("docetaxel", 75, "mg/m2", "iv", every=21), "progression")))
    sc = Scenario(
        name="switch-test",
        arms=(
            Arm("untreated", protocol="rest for 24 weeks"),
            Arm("rest_then_docetaxel", protocol=sequential),
            Arm("paclitaxel_then_docetaxel",
                protocol="paclitaxel 80 mg/m2 iv weekly until progression then switch to docetaxel 75 mg/m2 iv every 3 weeks"),
        ),
        horizon=H,
        visits="every 2 weeks",
        outcomes=OutcomeSpec(criteria=("recist_volume",)),
        seed=1,
    )
    res = run_scenario((patient, model, draws), sc, **TOL)
    return sc, res


def test_switch_happens_exactly_at_the_progression_visit(switching):
    from scenarios.outcomes import time_to_progression

    sc, res = switching
    visits = np.asarray(sc.visits)
    ttp = time_to_progression(res.sel(arm=["untreated"]), "recist_volume", visits=visits).sel(arm="untreated").values
    assert np.isfinite(ttp[[0, 1, 3]]).all() and ttp[3] < ttp[0] < ttp[1] < sc.horizon  # a known visit each
    assert np.isinf(ttp[2])  # draw 2 never progresses
    t = res["time"].values
    cd = res["cumulative_dose"].sel(arm="rest_then_docetaxel", drug="docetaxel").values  # (draw, time)
    line = res["treatment_line"].sel(arm="rest_then_docetaxel").values
    tv = res["tumor_volume"]
    for j in (0, 1, 3):
        assert cd[j, t < ttp[j] - 1e-9].max() == 0  # no docetaxel before the progression visit
        assert cd[j, t == ttp[j]][0] > 0  # the first dose at that visit
        assert (line[j, t < ttp[j]] == 0).all() and (line[j, t >= ttp[j]] == 1).all()
        # identical to untreated up to the switch, then treated (smaller)
        before = t <= ttp[j]
        np.testing.assert_allclose(tv.sel(arm="rest_then_docetaxel").values[j, before],
                                   tv.sel(arm="untreated").values[j, before], rtol=1e-8)
        assert tv.sel(arm="rest_then_docetaxel").values[j, -1] < tv.sel(arm="untreated").values[j, -1]
        on = res["on_treatment"].sel(arm="rest_then_docetaxel").values[j]
        assert not on[t < ttp[j] - 1e-9].any() and on[t == ttp[j]][0]
    # the draw that never progresses never switches
    assert (cd[2] == 0).all() and (line[2] == 0).all()
    np.testing.assert_allclose(tv.sel(arm="rest_then_docetaxel").values[2], tv.sel(arm="untreated").values[2], rtol=1e-8)
    assert res.attrs["progression_criterion"] == "recist_volume"


def test_switch_from_monotherapy_uses_each_draws_own_progression(switching):
    """'paclitaxel ... until progression then switch to docetaxel': each draw switches at its
    own progression under paclitaxel (outcomes' definition on its own trajectory), and stops
    paclitaxel there."""
    from scenarios.outcomes import time_to_progression

    sc, res = switching
    arm = res.sel(arm=["paclitaxel_then_docetaxel"])
    t = res["time"].values
    cd_p = arm["cumulative_dose"].sel(drug="paclitaxel").values[0]
    cd_d = arm["cumulative_dose"].sel(drug="docetaxel").values[0]
    line = arm["treatment_line"].values[0]
    switched = line[:, -1] == 1
    assert switched.any() and not switched.all()
    for j in range(res.sizes["draw"]):
        if not switched[j]:
            assert (cd_d[j] == 0).all()
            continue
        ts = t[np.argmax(line[j] == 1)]
        assert ts in sc.visits
        # progression at ts by the outcome definition on the trajectory observed so far
        upto = res.sel(arm=["paclitaxel_then_docetaxel"]).isel(draw=[j]).sel(time=slice(None, ts))
        ttp = time_to_progression(upto, "recist_volume", visits=np.asarray(sc.visits)).values.ravel()[0]
        assert ttp == ts
        assert cd_d[j, t < ts - 1e-9].max() == 0 and cd_d[j, t == ts][0] > 0
        assert cd_p[j, -1] == cd_p[j, t < ts - 1e-9][-1]  # no paclitaxel from the switch on


def test_switch_library_scenario_parses_into_lines():
    from scenarios.run import _SwitchArm
    from scenarios.scenario import library_path

    sc = Scenario.from_toml(library_path("braf_mek_combination_vs_mono_vs_sequential"))
    arm = sc.arm("dabrafenib_then_trametinib")
    ctl = _SwitchArm(arm, 2, None, sc.horizon, sc, None, [])
    assert ctl.n_lines == 2 and ctl.conditions == [None, "progression"]
    ev0 = ctl.events(())
    assert set(ev0["drug"]) == {"dabrafenib"} and ev0["time"].max() < sc.horizon
    ev1 = ctl.events((112.0,))
    assert set(ev1[ev1["time"] < 112]["drug"]) == {"dabrafenib"}
    assert set(ev1[ev1["time"] >= 112]["drug"]) == {"trametinib"} and ev1[ev1["drug"] == "trametinib"]["time"].min() == 112


# -- stochastic resistance in every arm ----------------------------------------------------------
@pytest.fixture(scope="module")
def resistant_setup(patient):
    from twin.graph import load_pathway

    model = TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["trametinib"], mechanisms=["mek_mutation"], pathway=False)
    draws = {"N0": np.full(3, 1e8), "r_max": np.array([0.3, 0.25, 0.35]), "d_max": np.full(3, 0.02),
             "K": np.full(3, 1e14), "frac_mek_mutation": np.full(3, 1e-9)}
    tram = "trametinib 2 mg oral daily"

    def scenario(replicates, mu=1e-7):
        return Scenario(
            name="resistance-test",
            arms=(
                Arm("fixed", protocol=tram),
                Arm("always", policy="continuous", treat=tram),
                Arm("zhang", policy={"name": "zhang", "observable": "tumor_volume", "stop_fraction": 0.9, "restart_fraction": 1.0}, treat=tram),
                Arm("rest_then_tram", protocol="rest for 8 weeks then switch to trametinib 2 mg oral daily at progression"),
            ),
            horizon=56, visits="every 2 weeks", seed=4, replicates=replicates, mutation_rate=mu,
            outcomes=OutcomeSpec(criteria=("recist_volume",)),
        )

    return model, draws, scenario


def test_resistance_mu_zero_equals_deterministic_and_covers_adaptive_arms(patient, resistant_setup):
    import warnings

    model, draws, scenario = resistant_setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = run_scenario((patient, model, draws), scenario(1))
        zero = run_scenario((patient, model, draws), scenario(20, mu=0.0))
    assert "p_resistance" not in det and "p_resistance" in zero
    assert (zero["p_resistance"].values == 0).all()  # every arm computed (no NaN), never resistant
    for v in det.data_vars:
        xr.testing.assert_equal(zero[v], det[v])
    assert "protocol arms only" not in zero.attrs["notes"]


def test_resistance_probability_nondecreasing_in_mu_and_seeded(patient, resistant_setup):
    import warnings

    model, draws, scenario = resistant_setup
    p_end = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mu in (0.0, 1e-12, 1e-11, 1e-10, 1e-8):
            r = run_scenario((patient, model, draws), scenario(40), mutation_rate=mu)
            p_end.append(r["p_resistance"].isel(time=-1).mean("draw").values)  # (arm,)
            if mu == 1e-10:
                again = run_scenario((patient, model, draws), scenario(40), mutation_rate=mu)
                xr.testing.assert_equal(again["p_resistance"], r["p_resistance"])
                sub = run_scenario((patient, model, draws), scenario(40), mutation_rate=mu, draws=2)
                np.testing.assert_array_equal(sub["p_resistance"].values, r["p_resistance"].values[:, :2])
                assert r.attrs["mutation_rate"] == 1e-10
    p_end = np.array(p_end)  # (mu, arm)
    assert (np.diff(p_end, axis=0) >= 0).all(), p_end
    assert (p_end[-1] > 0).all()  # every arm, adaptive and switching included
    assert (np.diff(r["p_resistance"].values, axis=-1) >= 0).all()  # a CDF in time


def test_switch_chain_lines_and_dose_reductions():
    """Two switches: line 1 starts at the first switch time, line 2 at the second; a dose
    reduction ('after' counted from the protocol start) carries into the line that gives the drug."""
    from scenarios.protocol import Dose, DoseReduction, Protocol, Switch
    from scenarios.run import _SwitchArm

    proto = Protocol((
        Dose("paclitaxel", 80, "mg", "iv", every=7),
        Switch(Dose("docetaxel", 75, "mg", "iv", every=21), "progression"),
        Switch(Dose("paclitaxel", 60, "mg", "iv", every=7), "resistance"),
        DoseReduction("paclitaxel", factor=0.5, after=100),
    ))
    sc = Scenario(name="chain", arms=(Arm("a", protocol=proto),), horizon=200, visits="every 2 weeks",
                  outcomes=OutcomeSpec(criteria=("recist_volume",)))
    ctl = _SwitchArm(sc.arms[0], 3, None, 200.0, sc, None, [])
    assert ctl.n_lines == 3 and ctl.conditions == [None, "progression", "resistance"]
    ev = ctl.events((42.0, 84.0))
    pac, doc = ev[ev["drug"] == "paclitaxel"], ev[ev["drug"] == "docetaxel"]
    assert pac[pac["time"] < 42]["time"].tolist() == [0, 7, 14, 21, 28, 35]
    assert doc["time"].tolist() == [42, 63]  # line 1 from 42 until the second switch at 84
    late = pac[pac["time"] >= 84]
    assert late["time"].min() == 84 and late["time"].max() < 200
    np.testing.assert_allclose(late[late["time"] < 100 - 1e-9]["amount"], 60.0)
    np.testing.assert_allclose(late[late["time"] >= 100]["amount"], 30.0)  # reduced from day 100
    assert ctl.events(()) is not None and set(ctl.events(())["drug"]) == {"paclitaxel"}


# -- virtual trials ----------------------------------------------------------------------------
def test_run_trial_batches_patients_and_equals_single_runs(small, patient):
    from scenarios.run import _per_patient_dosing, run_trial
    from twin.io.records import Covariates

    tw, sc, _, _ = small
    short = Scenario(name="trial", arms=(sc.arms[0], sc.arms[3]), horizon=28, visits="every 2 weeks", seed=5)
    a = prior_twin(patient, tw.model, 3, seed=11)
    b = prior_twin(patient, tw.model, 2, seed=12)
    both = run_trial([a, b], short, **TOL)
    assert [r.sizes["draw"] for r in both] == [3, 2]
    for one, twin_ in zip(both, (a, b)):
        check_result(one)
        assert one.attrs["trial_batch_size"] == 2 and one.attrs["twin_seed"] == twin_.seed
        alone = run_scenario(twin_, short, **TOL)
        np.testing.assert_allclose(one["tumor_volume"].values, alone["tumor_volume"].values, rtol=1e-7)
        np.testing.assert_array_equal(one["dose_factor"].values, alone["dose_factor"].values)
        np.testing.assert_array_equal(one["cumulative_dose"].values, alone["cumulative_dose"].values)
    # mg/m2 doses: patients with another body-surface area are not batched together
    assert _per_patient_dosing(short, Covariates(weight=70, bsa=1.8)) != _per_patient_dosing(short, Covariates(weight=70, bsa=2.0))
    assert _per_patient_dosing(short, Covariates(weight=70, bsa=1.8)) == _per_patient_dosing(short, Covariates(weight=90, bsa=1.8))
