"""PDXE combination arms predicted from the monotherapies (calibration.validation_combo, kind ``pdxe_combo``)."""

import json

import numpy as np
import pytest

from calibration.validation_combo import COMBO_SETTINGS, bliss_log_ratio, combo_components, pdxe_combo_candidates, pdxe_combo_tasks

# the single-agent split of an existing kind (its twin is calibrated on untreated + two of these arms)
PDXE_KEY = ("X-1004", "ribociclib", ("untreated", "ribociclib", "binimetinib", "buparlisib"))


def test_existing_fingerprints_do_not_change():
    from calibration.validation import model_fingerprint

    # computed with calibration/validation.py BEFORE the pdxe_combo kind was added: adding it (and
    # COMBO_SETTINGS) must not make the finished pdxe / bruchovsky splits stale
    assert model_fingerprint("pdxe", PDXE_KEY) == "ca19197927c0a411"
    assert model_fingerprint("bruchovsky", ("bruchovsky-001", 2)) == "398698743c96d833"
    assert model_fingerprint("bruchovsky_twin", ("bruchovsky-001",)) == "398698743c96d833"


def test_combo_fingerprint_depends_on_combo_settings(monkeypatch):
    import calibration.validation_combo as vc
    from calibration.validation import model_fingerprint

    key = pdxe_combo_tasks(1)[0]
    a = model_fingerprint("pdxe_combo", key)
    assert a != model_fingerprint("pdxe", PDXE_KEY)
    monkeypatch.setitem(vc.COMBO_SETTINGS, "bliss_sd_fallback", 0.25)
    assert model_fingerprint("pdxe_combo", key) != a
    assert model_fingerprint("pdxe", PDXE_KEY) == "ca19197927c0a411"


def test_eligibility_on_the_real_pdxe_data():
    from twin.datasets import load_pdxe

    from calibration.validation import SETTINGS, _dosable, _vol_curve

    tasks = pdxe_combo_tasks()
    assert len(tasks) > 100 and sum(len(t[2]) for t in tasks) > 300
    assert len({t[0] for t in tasks}) == len(tasks)  # one task per PDX
    pdx = load_pdxe()
    for pid, train, combos in tasks:
        assert train[0] == "untreated" and combos
        assert len(train) - 1 <= COMBO_SETTINGS["max_single_arms"]
        p = pdx[pid]
        h = p.history.table
        for c in combos:
            assert "+" in c and "-" not in c
            assert set(combo_components(c)) <= set(train[1:])  # every component is a training arm
            assert len(_vol_curve(p, c)[0]) >= SETTINGS["pdx_min_volumes"]
            assert all(_dosable(d) for d in h.loc[h["arm"] == c, "drug"].str.lower())
        assert not any("+" in a for a in train)  # no combination arm is seen by the calibration
        for a in train:
            assert len(_vol_curve(p, a)[0]) >= SETTINGS["pdx_min_volumes"]
    # a known PDX: X-1004 has alpelisib+ribociclib and both single-agent arms
    k = {t[0]: t for t in tasks}["X-1004"]
    assert "alpelisib+ribociclib" in k[2] and {"alpelisib", "ribociclib"} <= set(k[1])
    # a combination with a drug without a standard dose (lfw527) is not eligible
    combos, _ = pdxe_combo_candidates(pdx["X-1004"])
    assert "lfw527+everolimus" not in combos
    assert pdxe_combo_tasks(3) == tasks[:3]


def test_bliss_baseline_is_additive_in_log_growth():
    t = np.array([0.0, 5.0, 10.0, 20.0])
    untreated = (t, 100.0 * np.exp(0.10 * t))
    a = (t + 2.0, 50.0 * np.exp(0.04 * t))  # own start day and first volume: only log-ratios matter
    b = (t, 80.0 * np.exp(-0.02 * t))
    days = np.array([0.0, 3.0, 10.0, 20.0, 30.0])  # day 30 is past every curve's end: extrapolated (exact for exponentials)
    got = bliss_log_ratio(untreated, [a, b], days)
    # 0.10 d + (0.04 - 0.10) d + (-0.02 - 0.10) d = -0.08 d
    np.testing.assert_allclose(got, -0.08 * days, atol=1e-12)
    # one component: its own curve; no component: the untreated curve
    np.testing.assert_allclose(bliss_log_ratio(untreated, [a], days), 0.04 * days, atol=1e-12)
    np.testing.assert_allclose(bliss_log_ratio(untreated, [], days), 0.10 * days, atol=1e-12)
    # piecewise-linear curves: exact interpolation arithmetic
    tu, vu = np.array([0.0, 10.0]), np.array([100.0, 100.0 * np.e])  # log-ratio 0 -> 1
    ta, va = np.array([0.0, 10.0]), np.array([10.0, 10.0 * np.exp(0.5)])  # 0 -> 0.5
    np.testing.assert_allclose(bliss_log_ratio((tu, vu), [(ta, va), (ta, va)], np.array([0.0, 5.0, 10.0])), [0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(bliss_log_ratio((tu, vu), [(ta, va)], np.array([4.0])), [0.2], atol=1e-12)


def test_pdxe_split_and_combo_share_the_forecasting_code():
    """The held-arm forecast + metrics of pdxe_split is one helper that the combination split reuses."""
    import inspect

    import calibration.validation as v
    import calibration.validation_combo as vc

    assert "_pdx_held_arm(" in inspect.getsource(v.pdxe_split)
    assert "_pdx_held_arm(" in inspect.getsource(vc.pdxe_combo_split)
    assert "forecast_draws(" not in inspect.getsource(vc)


def test_one_real_combo_task_end_to_end(tmp_path):  # ~20 s: one PDX (X-1004), one calibration, 20 draws
    from calibration.validation import run_validation

    s = run_validation(tmp_path, datasets=("pdxe_combo",), quick=True, n_workers=1, max_pdx=1, n_draws=20, page=tmp_path / "page.md",
                       log=lambda *a: None)
    c = s["pdxe_combo"]
    assert c["n_pdx"] == 1 and c["n_combos"] >= 1
    for m in ("twin", "pop", "untr", "bliss"):
        assert np.isfinite(c[f"{m}_med_abslogerr"]) and 0 <= c[f"{m}_cov90"] <= 1 and np.isfinite(c[f"{m}_crps_mean_of_splits"])
    assert c["best_baseline"] in ("pop", "untr", "bliss") and np.isfinite(c["err_ratio"])
    row = json.loads(next((tmp_path / "_work" / "pdxe_combo").glob("*.json")).read_text())["arms"][0]["row"]
    assert row["status"] == "ok" and row["train_arms"].startswith("untreated|")
    assert (tmp_path / "pdxe_combo.csv").exists() and (tmp_path / "pdxe_combo.png").exists()
    text = (tmp_path / "page.md").read_text()
    assert "combination arms predicted from the monotherapies" in text and f"{c['twin_med_abslogerr']:.3f}" in text
    assert text.rstrip().splitlines()[-1].startswith("BENCH validation bruchovsky_err_ratio=")


def test_page_says_not_run_without_combination_results(tmp_path):
    from calibration.validation import results_markdown
    from calibration.validation_combo import combo_discussion_markdown

    s = {"settings": {"level": 0.9}, "bench_line": "BENCH validation x"}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    md = results_markdown(tmp_path)
    assert "combination arms" in md and "Not run" in md and md.rstrip().endswith("BENCH validation x")
    assert "Not run" in combo_discussion_markdown(s)


def _fake_combo_results(work, rng):
    """Per-PDX files as pdxe_combo_split writes them, with made-up errors (real task keys)."""
    from calibration.validation import _result_path

    out = []
    for key in pdxe_combo_tasks(2):
        arms = []
        for c in key[2]:
            row = {"pdx": key[0], "tissue": "T", "held_out": c, "train_arms": "|".join(key[1]), "n_points": 4, "status": "ok", "error": "",
                   "class_obs": "PD", "forecast_s": 1.0, "wall_s": 2.0, "components": "|".join(combo_components(c)), "bliss_sd_source": "untr"}
            for i, m in enumerate(("twin", "pop", "untr", "bliss")):
                e = [round(float(x), 5) for x in (0.1 * (i + 1)) * (1 + rng.uniform(size=4))]
                row |= {f"{m}_med_abslogerr": float(np.median(e)), f"{m}_cov90": 0.75, f"{m}_crps": 0.2 * (i + 1), f"class_{m}": "PD",
                        f"{m}_abslogerr_list": json.dumps(e), f"{m}_in90_list": json.dumps([1, 1, 1, 0])}
            arms.append({"row": row, "curve": {}, "obs": {}})
        f = _result_path(work, "pdxe_combo", key)
        f.parent.mkdir(parents=True, exist_ok=True)
        res = {"row": {"pdx": key[0], "status": "ok", "n_combos": len(key[2]), "calibrate_s": 10.0, "wall_s": 12.0}, "arms": arms}
        f.write_text(json.dumps(res))
        out.append(res)
    return out


def test_combo_summary_and_page_from_fake_results(tmp_path):
    from calibration.validation import summarize

    _fake_combo_results(tmp_path / "_work", np.random.default_rng(0))
    page = tmp_path / "page.md"
    s = summarize(tmp_path, datasets=("pdxe_combo",), page=page, log=lambda *a: None)
    c = s["pdxe_combo"]
    assert c["n_pdx"] == 2 and c["n_combos"] == c["n_combos_common"] == sum(len(k[2]) for k in pdxe_combo_tasks(2))
    assert c["best_baseline"] == "pop" and c["best_method"] == "twin"  # errors grow twin < pop < untr < bliss
    assert c["err_ratio"] == pytest.approx(c["twin_med_abslogerr"] / c["pop_med_abslogerr"])
    assert c["twin_cov90"] == 0.75 and c["twin_balanced_accuracy"] == 1.0
    assert (tmp_path / "pdxe_combo.csv").exists() and (tmp_path / "pdxe_combo.png").exists()
    text = page.read_text()
    assert f"{c['twin_med_abslogerr']:.3f}" in text and "Bliss" in text and "the twin beats every baseline" in text
    assert text.rstrip().splitlines()[-1] == s["bench_line"]
    assert s["bench_line"] == ("BENCH validation bruchovsky_err_ratio=nan bruchovsky_cov90=nan bruchovsky_auc=nan "
                               "pdxe_err_ratio=nan pdxe_cov90=nan")  # the BENCH line keeps its keys
