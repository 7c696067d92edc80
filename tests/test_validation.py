"""Held-out validation (calibration.validation): metric functions, baselines, and a 1-patient smoke run."""

import json
import math

import numpy as np
import pytest

from calibration.validation import (
    abs_log_error,
    balanced_accuracy,
    crps_log,
    interval_hits,
    lv_fit,
    lv_simulate,
    lvcf_samples,
    mrecist,
    roc_auc,
)


def test_abs_log_error_is_symmetric_in_ratio():
    assert abs_log_error(2.0, 1.0) == pytest.approx(math.log(2))
    assert abs_log_error(0.5, 1.0) == pytest.approx(math.log(2))
    np.testing.assert_allclose(abs_log_error([1, 10], [1, 1]), [0, math.log(10)])


def test_interval_hits_uses_central_quantiles():
    s = np.arange(1, 1001, dtype=float)[:, None] * np.ones((1, 3))  # 3 points, same sample
    hits = interval_hits(s, [25.0, 500.0, 990.0], 0.90)
    assert hits.tolist() == [False, True, False]


def test_crps_log_matches_closed_form_for_a_point_mass_and_is_zero_at_the_truth():
    # a sample all equal to x: CRPS = |log x - log y|
    assert float(crps_log(np.full(50, 2.0), 1.0)) == pytest.approx(math.log(2))
    assert float(crps_log(np.full(50, 3.0), 3.0)) == pytest.approx(0.0)
    # standard normal in log space: CRPS(0) = (sqrt(2) - 1) / sqrt(pi)
    z = np.exp(np.random.default_rng(0).standard_normal(20000))
    assert float(crps_log(z, 1.0)) == pytest.approx((math.sqrt(2) - 1) / math.sqrt(math.pi), rel=0.03)


def test_roc_auc_mann_whitney_with_ties_and_degenerate_cases():
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    s, y = [0.9, 0.4, 0.3, 0.5, 0.95], [1, 1, 0, 0, 0]
    # positives 0.9 beats 0.3,0.5 (2); 0.4 beats 0.3 (1) -> 3 / 6
    assert roc_auc(s, y) == pytest.approx(0.5)
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    assert roc_auc([np.nan, 0.9, 0.1], [0, 1, 0]) == 1.0


def test_mrecist_classes_follow_gao_2015():
    t = np.array([0, 5, 10, 15, 20, 25.0])
    assert mrecist(t, [100, 60, 2, 1, 1, 1]) == "CR"
    assert mrecist(t, [100, 80, 45, 40, 40, 40]) == "PR"
    assert mrecist(t, [100, 100, 105, 110, 110, 110]) == "SD"
    assert mrecist(t, [100, 130, 160, 200, 250, 300]) == "PD"
    assert mrecist([0, 3, 7], [100, 50, 20]) == "NA"  # nothing past day 10
    assert mrecist(t, [0, 1, 2, 3, 4, 5]) == "NA"  # no baseline volume


def test_balanced_accuracy_is_the_mean_recall_over_true_classes():
    assert balanced_accuracy(["PD", "PD", "PD", "SD"], ["PD", "PD", "PD", "PD"]) == pytest.approx(0.5)
    assert balanced_accuracy(["PD", "SD"], ["PD", "SD"]) == 1.0


def test_lvcf_samples_centre_on_the_last_value():
    s = lvcf_samples([10.0, 5.0, 2.5], 200)
    assert np.median(s) == pytest.approx(math.log(2.5), abs=1e-9)
    assert s.min() == pytest.approx(math.log(2.5) - math.log(4), abs=0.05)
    assert np.all(lvcf_samples([3.0], 10) == math.log(3.0))


def test_lotka_volterra_fit_recovers_a_synthetic_on_off_cycle():
    segs = [(0.0, 200.0, 1.0), (200.0, 400.0, 0.0)]
    truth = np.log([10.0, 0.01, 0.03, 0.01, 0.05, 100.0])
    t = np.linspace(0, 400, 21)
    S, R = lv_simulate(truth, segs, t, 0.0)
    y = S + R
    assert y[0] == pytest.approx(10.01)
    assert y[10] < y[0] and y[-1] > y[10]  # falls on treatment, regrows off
    fit = lv_fit(t, y, segs, n_starts=3, seed=0)
    assert fit["ok"]
    S2, R2 = lv_simulate(fit["theta"], segs, t, fit["t0"])
    np.testing.assert_allclose(np.log(S2 + R2), np.log(y), atol=0.05)


def test_one_patient_smoke_run(tmp_path):
    from calibration.validation import run_validation

    s = run_validation(tmp_path, datasets=("bruchovsky",), quick=True, n_workers=1, max_patients=1, n_draws=30, log=lambda *a: None)
    b = s["bruchovsky"]
    assert b["n_splits"] == 1 and b["n_patients"] == 1
    assert b["n_points"] > 0 and np.isfinite(b["twin_med_abslogerr"]) and 0 <= b["twin_cov90"] <= 1
    assert (tmp_path / "bruchovsky.csv").exists() and (tmp_path / "bruchovsky_points.csv").exists()
    assert (tmp_path / "bruchovsky.png").exists()
    assert s["bench_line"].startswith("BENCH validation bruchovsky_err_ratio=")
    # resumable: a second call runs nothing and gives the same summary
    s2 = run_validation(tmp_path, datasets=("bruchovsky",), quick=True, n_workers=1, max_patients=1, n_draws=30, log=lambda *a: None)
    assert json.dumps(s2["bruchovsky"], sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# -- the page (docs/validation.md) and the residual variant ------------------------------------

def _fake_bruchovsky_results(work, pids, rng):
    """Per-split files as bruchovsky_split writes them, with made-up numbers (real patient ids)."""
    from calibration.validation import _bruchovsky_prepare

    (work / "bruchovsky").mkdir(parents=True)
    for pid in pids:
        for k in (2, 3):
            d = _bruchovsky_prepare(pid, k)
            row = {"patient": pid, "cycle": k, "relapse": pid == pids[0], "status": "ok", "error": "", "drugs_removed": "", "n_test_censored": 0,
                   "calibrate_s": 10.0 + k, "forecast_s": 1.0, "wall_s": 15.0, "twin_fit_cov90": 0.9, "twin_diag_passed": True,
                   "p_resistant_end": float(rng.uniform()), "frac_resistant_end_median": float(rng.uniform()), "lv_frac_resistant_end": float(rng.uniform())}
            pts = []
            for t, v in zip(d["tst"]["time"], d["tst"]["value"]):
                pt = {"patient": pid, "cycle": k, "time": float(t), "obs": float(v), "horizon": float(t) - d["t_split"]}
                for m in ("twin", "lv", "lvcf"):
                    pt |= {f"{m}_pred": float(v) * float(np.exp(rng.normal())), f"{m}_abslogerr": float(abs(rng.normal())),
                           f"{m}_in90": bool(rng.uniform() < 0.8), f"{m}_crps": float(abs(rng.normal()))}
                pts.append(pt)
            (work / "bruchovsky" / f"{pid}_k{k}.json").write_text(json.dumps({"row": row, "points": pts, "curve": {}}))


def test_the_page_is_written_whole_and_ends_with_the_bench_line(tmp_path):
    from calibration.validation import GOALS, TEMPLATE, summarize

    rng = np.random.default_rng(0)
    work = tmp_path / "_work"
    _fake_bruchovsky_results(work, ["bruchovsky-001", "bruchovsky-002"], rng)
    (work / "runs.json").write_text(json.dumps([{"started_utc": "2026-01-01T00:00:00+00:00", "wall_s": 60.0, "command": "run_validation.py --quick",
                                                 "options": {"datasets": ["bruchovsky"], "quick": True, "n_workers": 1, "seed": 0, "n_draws": 200},
                                                 "n_tasks": 4, "n_run": 4, "cpu_count": 2}]))
    page = tmp_path / "page.md"
    s = summarize(tmp_path, datasets=("bruchovsky",), page=page, log=lambda *a: None)
    text = page.read_text()
    lines = text.rstrip("\n").splitlines()
    assert lines[-1] == s["bench_line"] and lines[-1].startswith("BENCH validation bruchovsky_err_ratio=")
    assert "{{" not in text and "}}" not in text  # every placeholder filled
    assert "run_validation.py --quick" in text and "2 patients" in text  # the run made, not a typed one
    assert "`r_max`" in text and "`psa_clear`" in text  # the model table comes from the model
    assert f"{s['bruchovsky']['twin_med_abslogerr']:.3f}" in text and len(GOALS) == 5
    assert "twin loses" in text or "twin beats" in text
    # the template holds no result: no decimal number, no multi-digit number except citation years
    import re

    body = re.sub(r"<!--.*?-->", "", TEMPLATE.read_text(), flags=re.S)
    nums = set(re.findall(r"\d+\.\d+|\b\d{2,}\b", body)) - {"2015", "2017"}
    assert not nums, f"numbers typed into the page template: {sorted(nums)}"


def test_fill_template_refuses_a_missing_value():
    from calibration.validation import fill_template

    assert fill_template("a {{x}} {{ y.z }}", {"x": 1, "y": {"z": "b"}}) == "a 1 b"
    with pytest.raises(KeyError):
        fill_template("{{missing}}", {})


def test_the_residual_is_trained_on_no_point_of_any_forecast_window(tmp_path):
    """train_bruchovsky_residual hands training only PSA up to the end of cycle 1; every split
    (patient, k >= 2) forecasts (end of cycle k-1, end of cycle k]: no overlap, for every patient."""
    from twin.residual import NeuralResidual

    from calibration.validation import (_bruchovsky_prepare, _residual_task_done, _twin_dir, bruchovsky_tasks,
                                        train_bruchovsky_residual)

    tasks = bruchovsky_tasks()
    pids = sorted({p for p, _ in tasks})
    work = tmp_path / "_work"
    _twin_dir(work).mkdir(parents=True)
    for pid in pids:
        (_twin_dir(work) / f"{pid}.twin.nc").write_text("")  # stands for the saved cycle-1 twin
    handed = []

    def fake_fit(model, series, **kw):
        handed.extend(series)
        return NeuralResidual.for_model(model, hidden=kw["hidden"], eps_max=kw["eps_max"]), [1.0, 0.5]

    man = train_bruchovsky_residual(work, pids, _fit=fake_fit, _medians=lambda pid: {"r_max": 0.05}, log=lambda *a: None)
    assert handed and {s["patient"] for s in handed} <= set(pids)
    windows = {}
    for pid, k in tasks:
        d = _bruchovsky_prepare(pid, k)
        windows.setdefault(pid, []).append((d["t_split"], d["t_end"]))
    n = 0
    for s in handed:
        t = np.asarray(s["times"])
        assert s["parameters"] == {"r_max": 0.05}
        cut = _bruchovsky_prepare(s["patient"], 2)["t_split"]  # end of cycle 1
        assert s["t_cut"] == cut and np.all(t <= cut)
        for lo, hi in windows[s["patient"]]:
            assert not np.any((t > lo) & (t <= hi)), f"{s['patient']}: a training PSA lies in the forecast window ({lo}, {hi}]"
        n += len(t)
    assert n == sum(g["n_points"] for g in man["groups"].values())
    # one residual per drug set with enough patients, saved with its hash; a split is done only with that hash
    for g, info in man["groups"].items():
        assert (work / "bruchovsky_residual" / info["file"]).exists() and len(info["patients"]) >= 5
    assert not _residual_task_done(work, tasks[0], man)
    # a second call reuses the manifest (no training)
    again = train_bruchovsky_residual(work, pids, _fit=lambda *a, **k: pytest.fail("retrained"), log=lambda *a: None)
    assert again == man


def test_run_selection_keeps_the_kinds_a_run_did_not_touch():
    """A pdxe-only run's page keeps the prostate results: the run's selection restricts only
    the kinds it ran."""
    from calibration.validation import _RunSelection

    sel = _RunSelection({("pdxe", "X-1__a")}, {"pdxe"})
    assert ("pdxe", "X-1__a") in sel and ("pdxe", "X-2__a") not in sel
    assert ("bruchovsky", "101_k2") in sel and ("bruchovsky_res", "101_k2") in sel and ("pdxe_combo", "X-9") in sel
