"""The bundled real data sets (twin/data/bruchovsky, twin/data/pdxe) and their converters.

Facts checked against the raw source where it is available (``../shared/data`` next to the
repository; those tests skip cleanly without it) and against numbers read from the source
once and written here.
"""

from __future__ import annotations

import gzip
import math
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import twin.datasets as ds
from twin.errors import InputError
from twin.io import read_patient
from twin.io.save import patient_document

RAW = Path(__file__).resolve().parents[2] / "shared" / "data"
RAW_BRUCHOVSKY = RAW / "bruchovsky_iad_prostate"
RAW_PDXE = RAW / "novartis_pdxe"
needs_raw_bruchovsky = pytest.mark.skipif(not RAW_BRUCHOVSKY.is_dir(), reason="raw Bruchovsky data (../shared/data) not available")
needs_raw_pdxe = pytest.mark.skipif(not RAW_PDXE.is_dir(), reason="raw PDXE data (../shared/data) not available")


def _bundles(name: str) -> list[Path]:
    return sorted(p for p in ds.dataset_path(name).iterdir() if (p / "patient.toml").exists())


def _read_all(paths: list[Path]) -> list:
    return [read_patient(p) for p in paths]


@pytest.fixture(scope="module")
def validated():
    """read_patient on every bundled patient: {set: {id: (patient, problems)}}.

    The 275 bundles are split over up to 4 worker processes (about 10 s of validation on
    one core); without a process pool they are read here.
    """
    paths = {name: _bundles(name) for name in ("bruchovsky", "pdxe")}
    flat = [p for name in paths for p in paths[name]]
    workers = min(4, os.cpu_count() or 1)
    results = None
    if workers > 1:
        chunks = [flat[i::workers] for i in range(workers)]
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                parts = list(pool.map(_read_all, chunks))
            by_path = {p: r for chunk, part in zip(chunks, parts) for p, r in zip(chunk, part)}
            results = [by_path[p] for p in flat]
        except (OSError, ValueError, BrokenProcessPool):
            results = None
    if results is None:
        results = _read_all(flat)
    out, it = {}, iter(results)
    for name in paths:
        out[name] = {p.name: next(it) for p in paths[name]}
    return out


@pytest.fixture(scope="module")
def bruch(validated):
    return {k: v[0] for k, v in validated["bruchovsky"].items()}


@pytest.fixture(scope="module")
def pdxe(validated):
    return {k: v[0] for k, v in validated["pdxe"].items()}


# -- every bundled patient is a valid patient file --------------------------------------
def test_patient_counts(validated):
    ids = list(validated["bruchovsky"])
    assert sum(i.startswith("bruchovsky-") for i in ids) == 54
    assert sum(i.startswith("shaw-") for i in ids) == 13
    assert len(validated["pdxe"]) == 208  # PDXs with volume curves in the shipped copy


@pytest.mark.parametrize("name", ["bruchovsky", "pdxe"])
def test_every_bundled_patient_validates_without_errors(validated, name):
    bad = {pid: [p.format() for p in probs.errors] for pid, (patient, probs) in validated[name].items() if patient is None or probs.errors}
    assert not bad, bad
    for pid, (patient, _) in validated[name].items():
        assert patient.id == pid
        assert patient.source["dataset"] and patient.source["citation"] and patient.source["licence"]


def test_provenance_and_licence_files_ship():
    for name in ("bruchovsky", "pdxe"):
        root = ds.dataset_path(name)
        assert "Citation" in (root / "PROVENANCE.md").read_text(encoding="utf-8")
        assert "licence" in (root / "LICENCE.md").read_text(encoding="utf-8").lower()
    bench = ds.dataset_path("bruchovsky") / "benchmarks" / "strobl2021_LV_fits_trainingPatientsDf_bruchovsky.csv"
    assert bench.exists()


def test_no_calendar_dates_shipped():
    date = re.compile(r"\b(19|20)\d\d[/-]\d{1,2}[/-]\d{1,2}\b")
    for p in _bundles("bruchovsky"):
        for f in p.rglob("*"):
            if f.is_file():
                assert not date.search(f.read_text(encoding="utf-8")), f


# -- Bruchovsky -------------------------------------------------------------------------
def test_first_psa_values_and_days_of_patient_001(bruch):
    psa = bruch["bruchovsky-001"].series("psa")
    # raw patient001.txt: day numbers 9308, 9336, 9364, 9392, (9420: no PSA), 9448 -> days 0, 28, 56, 84, 140
    assert psa["time"].tolist()[:5] == [0, 28, 56, 84, 140]
    assert psa["value"].tolist()[:5] == [29, 7.4, 4.6, 3.5, 2.4]
    t = bruch["bruchovsky-001"].series("testosterone")
    assert t["value"].tolist()[:3] == [16, 0.4, 0.3]


@needs_raw_bruchovsky
def test_psa_series_equal_raw_file(bruch):
    for pid, f in [("bruchovsky-001", "Bruchovsky_et_al/patient001.txt"), ("shaw-1003", "Shaw_et_al/patient1003.txt")]:
        raw = pd.read_csv(RAW_BRUCHOVSKY / f, header=None)
        raw = raw[raw[4].notna()]
        day0 = pd.read_csv(RAW_BRUCHOVSKY / f, header=None)[8].iloc[0]
        s = bruch[pid].series("psa")
        assert s["time"].tolist() == (raw[8] - day0).astype(float).tolist()
        assert np.allclose(s["value"], raw[4])


def test_relapse_labels(bruch):
    expect = {  # classificationsofpatients.txt (Hirata et al. 2010)
        "bruchovsky-001": (False, False, "without relapse"),
        "bruchovsky-012": (True, False, "with relapse"),
        "bruchovsky-101": (True, False, "with relapse"),
        "bruchovsky-032": (False, True, "with metastasis (without relapse)"),
        "shaw-1003": (False, False, "without relapse"),
        "shaw-1721": (True, False, "with relapse"),
    }
    for pid, (relapse, meta, klass) in expect.items():
        lab = bruch[pid].labels
        assert (lab["relapse"], lab["metastasis"], lab["hirata_class"]) == (relapse, meta, klass), pid
        assert lab["cohort"] == pid.split("-")[0]
    assert sum(p.labels["relapse"] for p in bruch.values()) == 9 + 5  # relapse patients present: 9 of 12 Bruchovsky, 5 of 7 Shaw


@needs_raw_bruchovsky
def test_labels_match_classification_file(bruch):
    from twin.datasets.bruchovsky import read_classification

    labels = read_classification(RAW_BRUCHOVSKY / "classificationsofpatients.txt")
    assert len(labels) == 72 + 18
    for pid, p in bruch.items():
        assert p.labels == labels[pid]


def test_dosing_and_phases_of_patient_001(bruch):
    p = bruch["bruchovsky-001"]
    h = p.history.table
    cpa = h[h["drug"] == "cyproterone_acetate"]
    # first visit: CPA 200 mg/day until the next visit 28 days later
    assert cpa.iloc[0][["time", "amount", "route", "interval", "count"]].tolist() == [0, 200, "oral", 1, 28]
    leu = h[h["drug"] == "leuprolide"]
    assert leu.iloc[0][["time", "amount", "route", "count"]].tolist() == [28, 7.5, "im", 1]
    ph = p.phases
    assert ph[["cycle", "phase", "start", "end"]].iloc[:2].values.tolist() == [[1, "on", 0, 280], [1, "off", 280, 399]]
    # the 3-monthly depot appears as 22.5 mg single injections
    amounts = set(pd.concat([b.history.table for b in bruch.values()]).query("drug == 'leuprolide'")["amount"])
    assert amounts == {7.5, 22.5, 30.0}


def test_shaw_on_phases_are_daily_androgen_deprivation(bruch):
    p = bruch["shaw-1003"]
    h = p.history.table
    assert set(h["drug"]) == {"androgen_deprivation"} and h["amount"].isna().all()
    on = p.phases[p.phases["phase"] == "on"]
    assert h["time"].tolist() == on["start"].tolist()
    assert (h["interval"] == 1).all()
    assert h["count"].iloc[0] == on["end"].iloc[0] - on["start"].iloc[0] == 574


def test_psa_zero_and_reporting_floors_are_censored(bruch):
    from twin.datasets.bruchovsky import PSA_REPORTING_FLOORS

    m = bruch["bruchovsky-100"].measurements
    s = m[m["observable"] == "psa"]
    cens = s[s["below_lloq"].astype(bool)]
    zero = cens[cens["note"].astype(str).str.contains("written as 0 in")]
    assert len(zero) == 1 and zero["lloq"].iloc[0] == 0.02 and math.isnan(zero["value"].iloc[0])
    floors = cens.drop(zero.index)
    assert len(floors) == 12 and set(floors["lloq"]) <= set(PSA_REPORTING_FLOORS) and floors["value"].isna().all()
    # no uncensored PSA sits at a floor anywhere in the cohort; its neighbours stay values
    allpsa = pd.concat([q.measurements[q.measurements["observable"] == "psa"] for q in bruch.values()])
    assert not allpsa.loc[~allpsa["below_lloq"].astype(bool), "value"].isin(PSA_REPORTING_FLOORS).any()
    assert (allpsa["value"] == 0.3).sum() == 50


def test_strobl_benchmark_agrees_with_bundle(bruch):
    b = pd.read_csv(ds.dataset_path("bruchovsky") / "benchmarks" / "strobl2021_LV_fits_trainingPatientsDf_bruchovsky.csv")
    checked = 0
    for _, r in b.iterrows():
        pid = f"bruchovsky-{int(r.PatientId):03d}"
        if pid not in bruch:  # patient 20 is not in this copy of the data
            continue
        p = bruch[pid]
        assert p.phases["cycle"].max() == r.NCycles
        assert p.phases["end"].max() == r.TimeInTrial
        assert p.labels["relapse"] == bool(r.Progression)
        checked += 1
    assert checked == 6


@needs_raw_bruchovsky
def test_from_raw_reproduces_bundled_bruchovsky(tmp_path, bruch):
    from twin.datasets.bruchovsky import from_raw

    for sub, f in [("Bruchovsky_et_al", "patient100.txt"), ("Shaw_et_al", "patient5257.txt")]:
        (tmp_path / sub).mkdir()
        shutil.copyfile(RAW_BRUCHOVSKY / sub / f, tmp_path / sub / f)
    shutil.copyfile(RAW_BRUCHOVSKY / "classificationsofpatients.txt", tmp_path / "classificationsofpatients.txt")
    cohort = from_raw(tmp_path)
    assert cohort.ids == ["bruchovsky-100", "shaw-5257"]
    for p in cohort:
        assert patient_document(p) == patient_document(bruch[p.id])


# -- PDXE -------------------------------------------------------------------------------
def _several(p) -> dict[str, list[str]]:
    text = p.source.get("mutations_several_classes", "")
    return {m.group(1): m.group(2).split(";") for m in re.finditer(r"(\S+) \(([^)]*)\)", text)}


def test_pdxe_arms_and_units(pdxe):
    p = pdxe["X-1004"]
    assert p.covariates.species == "mouse"
    assert p.labels == {"tissue": "BRCA", "tissue_name": "Breast Cancer"}
    assert {"untreated", "alpelisib", "alpelisib+elgemtumab", "binimetinib"} <= set(p.arms)
    m = p.measurements
    assert set(m["observable"]) == {"tumor_volume", "body_weight"}
    bw = m[m["observable"] == "body_weight"]["value"]
    assert bw.between(0.005, 0.05).all()  # grams shipped as kg
    assert not len(p.history.for_arm("untreated"))


def test_combo_arm_has_one_row_per_drug(pdxe):
    p = pdxe["X-1004"]
    h = p.history.for_arm("alpelisib+elgemtumab").table  # source treatment "BYL719 + LJM716"
    assert h["drug"].tolist() == ["alpelisib", "elgemtumab"]
    assert h["route"].tolist() == ["oral", "iv"]
    assert (h["time"] == 0).all() and h["amount"].isna().all()
    follow_up = p.series("tumor_volume", "alpelisib+elgemtumab")["time"].max()
    assert (h["duration"] == follow_up).all()
    triple = [a for pt in pdxe.values() for a in pt.arms if a.count("+") == 2]
    assert set(triple) == {"alpelisib+cetuximab+encorafenib"}


def test_mg_per_kg_arms_converted_with_day0_body_weight(pdxe):
    n = 0
    for p in pdxe.values():
        for arm, mpk, drug in (("binimetinib-3.5mpk", 3.5, "binimetinib"), ("gemcitabine-50mpk", 50.0, "gemcitabine")):
            if arm not in p.arms:
                continue
            h = p.history.for_arm(arm).table
            assert h["drug"].tolist() == [drug]
            bw0 = p.series("body_weight", arm).query("time == 0")["value"].iloc[0]  # kg
            assert h["amount"].iloc[0] == pytest.approx(mpk * bw0, rel=1e-9)
            n += 1
    assert n == 30 + 29
    h = pdxe["X-2428"].history.for_arm("binimetinib-3.5mpk").table
    assert h["amount"].iloc[0] == pytest.approx(3.5 * 0.0276)  # 27.6 g at day 0


def test_pdxe_omics_counts_equal_raw_calls(pdxe):
    p = pdxe["X-1004"]
    mut, cn = p.omics.mutations, p.omics.copy_number
    # pdxe_mutation_cn_calls_long.csv.gz, biobase_id X-1004: 788 genes (3 both mutated and
    # amplified/deleted); calls Amp5 519, MutNovel 122, Del0.8 99, Amp8 48, MutKnownFunctional 4
    assert len(set(mut["gene"]) | set(cn["gene"])) == 788 and len(mut) + len(cn) == 791
    assert (cn["call"] == "Amp5").sum() == 519 and (cn["call"] == "Amp8").sum() == 48 and (cn["call"] == "Del0.8").sum() == 99
    assert set(cn.loc[cn["call"] == "Amp8", "copies"]) == {8} and set(cn.loc[cn["call"] == "Del0.8", "gistic"]) == {-2}
    assert mut["classification"].value_counts().to_dict() == {"novel": 121, "known_functional": 4}
    # the gene with two mutation classes keeps the most functional one; all classes in source
    assert _several(p) == {"ZNF888": ["known_functional", "novel"]}
    assert mut.set_index("gene").loc["ZNF888", "classification"] == "known_functional"
    assert mut["protein_change"].isna().all()


@needs_raw_pdxe
def test_pdxe_omics_tokens_equal_raw_calls(pdxe):
    calls = pd.read_csv(RAW_PDXE / "pdxe_mutation_cn_calls_long.csv.gz")
    names = {"MutKnownFunctional": "known_functional", "MutLikelyFunctional": "likely_functional", "MutNovel": "novel"}
    for pid in ("X-1004", "X-2428"):
        raw = calls[calls["biobase_id"] == pid]["call"].str.split(";").explode().value_counts()
        p = pdxe[pid]
        got = p.omics.copy_number["call"].str.split(";").explode().value_counts()
        classes = [c for g, c in zip(p.omics.mutations["gene"], p.omics.mutations["classification"]) for c in _several(p).get(g, [c])]
        got = pd.concat([got, pd.Series(classes).map({v: k for k, v in names.items()}).value_counts()])
        assert got.sort_index().to_dict() == raw.sort_index().to_dict()


@needs_raw_pdxe
def test_from_raw_reproduces_bundled_pdxe(tmp_path, pdxe):
    from twin.datasets.pdxe import from_raw

    keep = {"X-1004", "X-166"}  # its untreated arm holds three animals and is dropped
    info = pd.read_csv(RAW_PDXE / "model_info.csv")
    info.to_csv(tmp_path / "model_info.csv", index=False)
    models = set(info.loc[info["patient.id"].isin(keep), "model.id"])
    with open(RAW_PDXE / "pdxe_tumor_volume_timeseries.csv", encoding="utf-8") as fh, open(tmp_path / "pdxe_tumor_volume_timeseries.csv", "w", encoding="utf-8") as out:
        out.write(fh.readline())
        out.writelines(line for line in fh if line.split(",", 1)[0] in models)
    calls = pd.read_csv(RAW_PDXE / "pdxe_mutation_cn_calls_long.csv.gz")
    with gzip.open(tmp_path / "pdxe_mutation_cn_calls_long.csv.gz", "wt", encoding="utf-8") as out:
        calls[calls["biobase_id"].isin(keep)].to_csv(out, index=False)
    shutil.copyfile(RAW_PDXE / "pdxe_mutation_samples.csv", tmp_path / "pdxe_mutation_samples.csv")
    cohort = from_raw(tmp_path)
    assert cohort.ids == ["X-1004", "X-166"]
    assert "untreated" not in cohort["X-166"].arms
    for p in cohort:
        assert patient_document(p) == patient_document(pdxe[p.id])


# -- loaders ----------------------------------------------------------------------------
@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TWIN_NO_CACHE", raising=False)
    ds._cohort.cache_clear()
    yield tmp_path / "cache"
    ds._cohort.cache_clear()


def test_load_bruchovsky(fresh_cache, bruch, monkeypatch):
    all_ = ds.load_bruchovsky()
    assert len(all_) == 67 and set(all_.ids) == set(bruch)
    shaw = ds.load_bruchovsky("shaw")
    assert len(shaw) == 13 and all(i.startswith("shaw-") for i in shaw.ids)
    assert len(ds.load_bruchovsky("Bruchovsky")) == 54
    assert ds.load_bruchovsky() is all_  # cached in memory
    assert list(fresh_cache.rglob("bruchovsky-*.pickle"))  # and on disk
    ds._cohort.cache_clear()

    def no_validation(*a, **k):
        raise AssertionError("the disk cache should have been used")

    monkeypatch.setattr("twin.io.load_cohort", no_validation)
    t = time.perf_counter()
    again = ds.load_bruchovsky()  # a new process would do the same: read the disk cache
    assert time.perf_counter() - t < 5.0
    assert patient_document(again["bruchovsky-101"]) == patient_document(bruch["bruchovsky-101"])
    with pytest.raises(InputError, match="expected one of all, bruchovsky, shaw"):
        ds.load_bruchovsky("shaww")


def test_load_pdxe_by_tissue(pdxe, monkeypatch):
    # the validation itself is covered above; here only selection and caching, with the
    # read of the bundles replaced by the patients already validated
    from twin.patient import Cohort

    monkeypatch.setenv("TWIN_NO_CACHE", "1")
    monkeypatch.setattr("twin.io.load_cohort", lambda root, name=None: Cohort(tuple(pdxe[k] for k in sorted(pdxe)), name=name))
    ds._cohort.cache_clear()
    try:
        counts = {t: len(ds.load_pdxe(t)) for t in ("BRCA", "CM", "CRC", "GC", "NSCLC", "PDAC")}
        assert counts == {"BRCA": 32, "CM": 25, "CRC": 44, "GC": 48, "NSCLC": 27, "PDAC": 32}
        assert len(ds.load_pdxe()) == 208 and all(p.labels["tissue"] == "CRC" for p in ds.load_pdxe("crc"))
        with pytest.raises(InputError):
            ds.load_pdxe("lung")
    finally:
        ds._cohort.cache_clear()


def test_load_patient_example(fresh_cache):
    p = ds.load_patient_example()
    assert p is ds.load_bruchovsky()[ds.EXAMPLE_PATIENT]
    assert p.id == ds.EXAMPLE_PATIENT and p.labels["relapse"] is True
    assert p.phases["cycle"].max() == 4 and len(p.series("psa")) == 42


def test_cache_key_follows_file_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "patient.toml").write_text('id = "a"\n')
    k1 = ds._fingerprint(tmp_path)
    (tmp_path / "a" / "patient.toml").write_text('id = "b"\n')
    assert ds._fingerprint(tmp_path) != k1
