"""calibrate(): one vector field with simulate, exact log-density, gradients, censoring,
posterior recovery, the twin file, the CLI, updates and cohort integration."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

warnings.filterwarnings("ignore", message=".*BLAS.*")

from calibration.calibrate import build_model, calibrate, default_model  # noqa: E402
from calibration.synthetic import synthetic_patient  # noqa: E402
from twin.errors import InputError  # noqa: E402
from twin.model import TwinModel  # noqa: E402
from twin.regimen import Regimen  # noqa: E402

TRUTH = {"r_max": 0.08, "d_max": 0.02, "K": 5e10, "N0": 2e8, "kill_docetaxel": 3.0}
FREE = ("r_max", "K", "kill_docetaxel", "N0")
TIMES = np.arange(0.0, 85.0, 4.0)
LLOQ = 45.0
#: priors of the recovery tests, centred on the population values (the slow test draws its
#: truths from them: simulation-based calibration)
PRIORS = {
    "r_max": ("lognormal", {"mu": float(np.log(0.08)), "sigma": 0.3}),
    "K": ("lognormal", {"mu": float(np.log(5e10)), "sigma": 0.5}),
    "kill_docetaxel": ("lognormal", {"mu": float(np.log(3.0)), "sigma": 0.4}),
}


def chemo_model():
    return TwinModel.from_graph(None, drugs=["docetaxel"], pathway=False)


def chemo_regimen():
    """docetaxel 75 mg/m2 ~ 140 mg IV over 1 hour every 3 weeks, 3 cycles."""
    return Regimen(pd.DataFrame({"arm": "main", "drug": "docetaxel", "time": [14.0], "amount": [140.0], "route": "iv",
                                 "duration": [1 / 24], "interval": [21.0], "count": [3], "note": None}))


@pytest.fixture(scope="module")
def chemo_patient():
    m = chemo_model()
    return synthetic_patient(m, TRUTH, chemo_regimen(), TIMES, sigma=0.1, seed=3, lloq=LLOQ, patient_id="syn-chemo")


def _fixed():
    return {"d_max": TRUTH["d_max"]}


# ----------------------------------------------------------------------------------------
def test_engine_and_simulate_integrate_the_same_vector_field():
    """The compiled engine and twin.simulate evaluate TwinModel.equations: same trajectories to 1e-8."""
    from calibration.ode import arm_schedule, twin_ode
    from twin._xp import NUMPY
    from twin.datasets import load_patient_example
    from twin.simulate import simulate

    p = load_patient_example()
    m = default_model(p)
    theta = ("r_max", "d_max", "K", "blunt_resistant", "psa_prod", "psa_clear")
    vals = m.default_values() | {"frac_resistant": 1e-3, "r_max": 0.05}
    tode = twin_ode(m, theta, {k: v for k, v in vals.items() if k not in theta})
    obs = p.series("psa")["time"].to_numpy()[:4]
    sched, _ = arm_schedule(tode, p.history.for_arm("main"), obs, t0=0.0)
    y0 = np.array([float(v) for v in m.initial_state_values(vals, NUMPY)])
    Y, _, info = tode.compiled().solve(np.array([vals[k] for k in theta]), y0, sched, rtol=1e-12, atol=1e-14, sensitivities=False)
    assert info["status"] == 0
    res = simulate(m, {k: np.array([v]) for k, v in vals.items()}, {"main": Regimen(p.history.for_arm("main").table)}, obs, rtol=1e-12, atol=1e-14)
    Z = np.stack([res[s].values[0, 0] for s in m.state_names], -1)
    assert m.effect_delay and np.all(Y[1:, m.state_names.index("E_leuprolide")] > 0)  # the effect compartments are exercised
    # E_<drug> start at exactly 0; the on/off rate switch is a kink each solver crosses in its own
    # steps, so at rtol 1e-12 the two agree to ~1e-8 there (6e-9 measured), not to rtol
    np.testing.assert_allclose(Z, Y, rtol=1e-8, atol=1e-14)


def test_log_density_equals_hand_computed_scipy_value(chemo_patient):
    """PyMC log-density (priors + log-normal likelihood + censored term) = scipy.stats sum."""
    from twin.simulate import simulate

    m = chemo_model()
    bm = build_model(chemo_patient, m, free=FREE, fixed=_fixed(), rtol=1e-10, atol=1e-12)
    point_c = {"r_max": 0.07, "K": 4e10, "kill_docetaxel": 2.5, "N0": 1.8e8, "sigma_tumor_volume": 0.15}
    pm_point = {}
    for rv in bm.pmodel.free_RVs:
        vv = bm.pmodel.rvs_to_values[rv]
        tr = bm.pmodel.rvs_to_transforms.get(rv)
        name = "N0" if rv.name == "N0_arm" else rv.name
        val = np.asarray([point_c[name]]) if rv.name == "N0_arm" else np.asarray(point_c[name])
        pm_point[vv.name] = tr.forward(val, *rv.owner.inputs).eval() if tr is not None else val
    lp = float(bm.pmodel.compile_logp(jacobian=False)(pm_point))

    pri = m.priors_for(chemo_patient)
    want = 0.0
    for n in ("r_max", "K", "kill_docetaxel"):
        mu, sd = pri[n][1]["mu"], pri[n][1]["sigma"]
        want += stats.lognorm(s=sd, scale=math.exp(mu)).logpdf(point_c[n])
    v0 = chemo_patient.series("tumor_volume")["value"].dropna().iloc[0]
    want += stats.lognorm(s=0.5, scale=v0 / 1e-6).logpdf(point_c["N0"])  # N0 centred on the first volume
    want += stats.halfnorm(scale=1.0).logpdf(point_c["sigma_tumor_volume"])
    params = {k: np.array([v]) for k, v in (point_c | _fixed()).items() if k in m.parameter_names}
    res = simulate(m, params, {"main": Regimen(chemo_patient.history.table)}, TIMES, rtol=1e-11, atol=1e-12)
    pred = res["tumor_volume"].values[0, 0]
    s = chemo_patient.series("tumor_volume")
    sig = point_c["sigma_tumor_volume"]
    for _, r in s.iterrows():
        mu = math.log(pred[np.searchsorted(TIMES, r["time"])])
        if r["below_lloq"]:
            want += stats.norm.logcdf((math.log(r["lloq"]) - mu) / sig)
        else:
            want += stats.lognorm(s=sig, scale=math.exp(mu)).logpdf(r["value"])
    assert s["below_lloq"].any()  # the censored branch is exercised
    assert lp == pytest.approx(want, abs=1e-6)


def test_gradient_matches_central_finite_differences(chemo_patient):
    from pymc.blocking import DictToArrayBijection

    bm = build_model(chemo_patient, chemo_model(), free=FREE, fixed=_fixed(), rtol=1e-10, atol=1e-12)
    pm_model = bm.pmodel
    ip = pm_model.initial_point()
    x0 = DictToArrayBijection.map({v.name: ip[v.name] for v in pm_model.value_vars})
    rng = np.random.default_rng(0)
    x = x0.data + 0.1 * rng.standard_normal(x0.data.size)
    f = pm_model.logp_dlogp_function(ravel_inputs=True)
    f.set_extra_values({})
    from pymc.blocking import RaveledVars

    lp, g = f(RaveledVars(x, x0.point_map_info))
    fd = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = 1e-5
        fd[i] = (f(RaveledVars(x + e, x0.point_map_info))[0] - f(RaveledVars(x - e, x0.point_map_info))[0]) / 2e-5
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)


def test_a_value_below_lloq_enters_as_a_censored_term():
    """Adding one censored visit changes the log-density by exactly log Phi((log LLOQ - mu)/sigma)."""
    m = chemo_model()
    pat = synthetic_patient(m, TRUTH, chemo_regimen(), TIMES, sigma=0.1, seed=3, patient_id="c")
    pat_c = synthetic_patient(m, TRUTH, chemo_regimen(), TIMES, sigma=0.1, seed=3, lloq=LLOQ, patient_id="c")
    ncens = int(pat_c.measurements["below_lloq"].sum())
    assert ncens >= 1
    keep = ~pat_c.measurements["below_lloq"].to_numpy()
    import dataclasses

    only_unc = dataclasses.replace(pat_c, measurements=pat_c.measurements[keep].reset_index(drop=True))
    bm_all = build_model(pat_c, m, free=FREE, fixed=_fixed(), rtol=1e-10, atol=1e-12)
    bm_unc = build_model(only_unc, m, free=FREE, fixed=_fixed(), rtol=1e-10, atol=1e-12)
    names = [n for n in bm_all.obs_names if n.startswith("cens_")]
    assert names and all(bm_all.obs_names[n][2] == "censored" for n in names)
    pt = bm_all.pmodel.initial_point()
    diff = float(bm_all.pmodel.compile_logp()(pt)) - float(bm_unc.pmodel.compile_logp()(pt))
    # the censored term at the initial point, by hand
    from calibration._engine import NUMPY

    sig = float(np.exp(pt["sigma_tumor_volume_log__"]))
    fixed = bm_all.tode.fixed
    p = dict(fixed) | {n: float(np.exp(pt[f"{n}_log__"])) for n in ("r_max", "K", "kill_docetaxel")}
    p["N0"] = float(np.exp(pt["N0_arm_log__"][0]))
    y0 = np.array([float(v) for v in m.initial_state_values(p, NUMPY)])
    Y, _, _ = bm_all.tode.compiled().solve(np.array([p[n] for n in bm_all.tode.theta_names]), y0, bm_all.schedules[0], rtol=1e-10, atol=1e-12, sensitivities=False)
    cens = pat_c.measurements["below_lloq"].to_numpy()
    mu = np.log(Y[cens, 0] * 1e-6)
    want = stats.norm.logcdf((np.log(LLOQ) - mu) / sig).sum()
    assert diff == pytest.approx(want, rel=1e-7)
    assert pat.measurements["value"].notna().all()  # same data without the LLOQ is all observed


def test_posterior_recovery_on_a_synthetic_patient_fast(chemo_patient):
    """Fast version of the slow 20-patient recovery test: NUTS, truth inside the 94% intervals."""
    import arviz as az

    tw = calibrate(chemo_patient, chemo_model(), method="nuts", draws=300, tune=300, chains=2, seed=11, free=FREE, fixed=_fixed(), priors=PRIORS, progress=False)
    d = tw.diagnostics
    assert d["divergences"] == 0 and d["rhat_max"] < 1.1  # short chains; the slow test asks <= 1.01
    hdi = az.hdi(tw.idata.posterior, hdi_prob=0.94)
    for n in ("r_max", "K", "kill_docetaxel", "N0"):
        lo, hi = (float(x) for x in np.ravel(hdi[n].values))
        assert lo <= TRUTH[n] <= hi, (n, lo, TRUTH[n], hi)
    assert set(tw.idata.groups()) >= {"posterior", "posterior_predictive", "observed_data", "constant_data", "sample_stats"}


def test_map_laplace_on_the_bundled_prostate_patient_and_the_file_round_trip(tmp_path):
    from twin.datasets import load_patient_example
    from twin.twin import Twin

    p = load_patient_example()
    tw = calibrate(p, method="map", draws=100, chains=2, seed=0, progress=False)
    d = tw.diagnostics
    assert d["passed"], d["messages"]
    assert d["map_converged"] and d["laplace_clipped"] == 0
    assert 0.75 <= d["ppc_coverage90"] <= 1.0
    assert tw.draws["r_max"].shape == (200,) and np.all(tw.draws["N0"] == 1e9)  # PSA only: N0 held
    path = tw.save(tmp_path / "p.twin.nc")
    back = Twin.load(path)
    for v in tw.idata.posterior.data_vars:
        np.testing.assert_array_equal(back.idata.posterior[v].values, tw.idata.posterior[v].values)
    assert back.diagnostics == tw.diagnostics and back.model.spec() == tw.model.spec()


def test_calibration_refuses_pathway_models_and_data_it_cannot_predict(chemo_patient):
    from twin.graph import load_pathway

    with pytest.raises(InputError, match="reduced model"):
        build_model(chemo_patient, TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["docetaxel"]))
    import dataclasses

    only_weight = dataclasses.replace(chemo_patient, measurements=chemo_patient.measurements.assign(observable="body_weight"))
    with pytest.raises(InputError, match="no measurement the model can predict"):
        build_model(only_weight, chemo_model())
    with pytest.raises(InputError, match="method must be one of"):
        calibrate(chemo_patient, chemo_model(), method="hmc")


def test_cli_calibrate_writes_a_twin_and_prints_the_summary(tmp_path, capsys):
    from twin.cli import main
    from twin.datasets import load_patient_example
    from twin.io import save_patient
    from twin.twin import Twin

    folder = save_patient(load_patient_example(), tmp_path / "patient")
    out = tmp_path / "p.twin.nc"
    rc = main(["calibrate", str(folder), "-o", str(out), "--method", "map", "--draws", "50", "--chains", "1", "-q"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "Diagnostics PASSED" in text and "r_max" in text and "1/day" in text
    assert Twin.load(out).n_draws == 50
    rc = main(["calibrate", str(folder), "-o", str(tmp_path / "x.csv"), "--method", "map"])
    assert rc == 1 and "must end in .nc" in capsys.readouterr().err


def test_update_with_new_visits_agrees_with_a_full_recalibration_fast(chemo_patient):
    """Fast version: reweight + warm-started NUTS vs NUTS from scratch on all visits."""
    import dataclasses

    from calibration.update import update_twin

    m = chemo_model()
    early = dataclasses.replace(chemo_patient, measurements=chemo_patient.measurements[chemo_patient.measurements["time"] <= 56].reset_index(drop=True))
    kw = dict(free=FREE, fixed=_fixed(), progress=False)
    old = calibrate(early, m, method="nuts", draws=300, tune=300, chains=2, seed=1, **kw)
    new = update_twin(old, chemo_patient, draws=300, chains=2, tune=150, seed=2)
    full = calibrate(chemo_patient, m, method="nuts", draws=300, tune=300, chains=2, seed=3, **kw)
    u = new.diagnostics["update"]
    assert u["new_observations"] == int((chemo_patient.measurements["time"] > 56).sum())
    assert 1.0 <= u["importance_ess"] <= u["particles"]
    for n in ("r_max", "K", "kill_docetaxel"):
        a, b = new.draws[n], full.draws[n]
        assert abs(np.median(np.log(a)) - np.median(np.log(b))) < 0.5 * np.std(np.log(b)) + 1e-3, n
    with pytest.raises(InputError, match="only adds visits"):
        update_twin(new, early)


def test_cohort_calibration_with_the_real_calibrate(tmp_path):
    """calibrate_cohort runs calibrate (map) per patient; a rerun skips them."""
    from calibration.cohort import calibrate_cohort

    m = chemo_model()
    pats = [synthetic_patient(m, TRUTH | {"r_max": r}, chemo_regimen(), TIMES, sigma=0.1, seed=i, patient_id=f"syn-{i}") for i, r in enumerate((0.07, 0.09))]
    run = calibrate_cohort(pats, m, tmp_path, method="map", draws=20, chains=1, seed=5, scheduler="sync", progress=False, free=list(FREE), fixed=_fixed())
    assert len(run.ok) == 2 and not run.failed
    twins = {t.patient.id: t for t in run.twins()}
    assert np.median(twins["syn-0"].draws["r_max"]) < np.median(twins["syn-1"].draws["r_max"])
    again = calibrate_cohort(pats, m, tmp_path, method="map", draws=20, chains=1, seed=5, scheduler="sync", progress=False, free=list(FREE), fixed=_fixed())
    assert len(again.skipped) == 2 and not again.computed


def test_hierarchical_cohort_pools_growth_rates(tmp_path):
    """Partial pooling: population median of r_max between the patients' values; per-patient
    twins cut from the joint posterior; outputs and a rerun skip like the one-by-one mode."""
    from calibration.cohort import calibrate_cohort
    from twin.twin import Twin

    m = chemo_model()
    rs = (0.06, 0.08, 0.10)
    pats = [synthetic_patient(m, TRUTH | {"r_max": r}, chemo_regimen(), TIMES, sigma=0.1, seed=20 + i, patient_id=f"h-{i}") for i, r in enumerate(rs)]
    kw = dict(method="map", draws=50, chains=1, seed=1, scheduler="sync", progress=False, hierarchical=True, free=list(FREE), fixed=_fixed(), pooled=("r_max", "K"))
    run = calibrate_cohort(pats, m, tmp_path, **kw)
    assert sorted(run.computed) == ["h-0", "h-1", "h-2"]
    pop = pd.read_csv(tmp_path / "population.csv", index_col=0)
    assert rs[0] < pop.loc["r_max", "population_median"] < rs[-1]
    meds = [np.median(Twin.load(tmp_path / f"{p.id}.twin.nc").draws["r_max"]) for p in pats]
    assert meds[0] < meds[1] < meds[2]
    for r, med in zip(rs, meds):
        assert abs(med - r) / r < 0.15
    again = calibrate_cohort(pats, m, tmp_path, **kw)
    assert len(again.skipped) == 3 and not again.computed


def test_a_calibrated_twin_file_drives_twin_simulate_and_train_residual(tmp_path, capsys):
    """CLI: `twin simulate TWIN.nc SCENARIO` simulates the posterior draws (new drugs get
    their defaults); `twin train-residual FOLDER` fits and saves a residual from twin files."""
    from twin.cli import main
    from twin.residual import NeuralResidual

    m = chemo_model()
    folder = tmp_path / "twins"
    for i, r in enumerate((0.07, 0.09)):
        pat = synthetic_patient(m, TRUTH | {"r_max": r}, chemo_regimen(), TIMES, sigma=0.1, seed=40 + i, patient_id=f"s-{i}")
        calibrate(pat, m, method="map", draws=10, chains=1, seed=i, free=FREE, fixed=_fixed(), progress=False).save(folder / f"s-{i}.twin.nc")
    scen = "scenarios/library/braf_mek_combination_vs_mono_vs_sequential.toml"
    rc = main(["simulate", str(folder / "s-0.twin.nc"), scen, "-o", str(tmp_path / "res"), "--draws", "4", "--horizon", "14"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "posterior draws (map)" in out and (tmp_path / "res" / "trajectories.nc").is_file()
    rc = main(["train-residual", str(folder), "-o", str(tmp_path / "res.pt"), "--epochs", "2", "-q"])
    assert rc == 0
    res = NeuralResidual.load(tmp_path / "res.pt")
    assert res.drugs == ("docetaxel",)


def test_a_model_with_a_fixed_neural_residual_calibrates_on_the_same_equations():
    """The engine unrolls the residual's MLP (fixed weights) into the compiled vector field:
    its trajectories equal twin.simulate's torch path with the residual (1e-9)."""
    from calibration._engine import NUMPY
    from twin.residual import NeuralResidual
    from twin.simulate import simulate

    m = chemo_model()
    res = NeuralResidual.for_model(m, seed=1, hidden=(4,))
    res.reset_parameters(zero_last=False)  # a non-zero residual
    mr = m.with_residual(res)
    pat = synthetic_patient(m, TRUTH, chemo_regimen(), TIMES, sigma=0.1, seed=3, patient_id="r")
    bm = build_model(pat, mr, free=FREE, fixed=_fixed(), rtol=1e-10, atol=1e-12)
    assert np.isfinite(bm.pmodel.compile_logp()(bm.pmodel.initial_point()))
    vals = mr.default_values() | TRUTH
    y0 = np.array([float(v) for v in mr.initial_state_values(vals, NUMPY)])
    Y, _, _ = bm.tode.compiled().solve(np.array([vals[n] for n in bm.tode.theta_names]), y0, bm.schedules[0], rtol=1e-11, atol=1e-12, sensitivities=False)
    r = simulate(mr, {k: np.array([v]) for k, v in vals.items()}, {"main": Regimen(pat.history.table)}, TIMES, rtol=1e-11, atol=1e-12)
    assert "batched" in r.attrs["integrator"]  # a residual model runs on torch
    base = simulate(m, {k: np.array([v]) for k, v in vals.items() if k in m.parameter_names}, {"main": Regimen(pat.history.table)}, TIMES, rtol=1e-11, atol=1e-12)
    assert np.max(np.abs(r["N_S"].values[0, 0] - base["N_S"].values[0, 0]) / base["N_S"].values[0, 0]) > 1e-3  # the residual matters
    np.testing.assert_allclose(Y[:, 0], r["N_S"].values[0, 0], rtol=1e-9)
