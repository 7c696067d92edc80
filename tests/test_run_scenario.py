"""The scenario runner (scenarios/run.py) and `twin simulate` / `twin compare`."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from scenarios import Arm, Scenario
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
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=0)


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
