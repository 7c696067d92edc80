"""Importers: NONMEM event tables, cBioPortal studies, MAF files, attach_omics.

Fixtures live in tests/data/importers/; each test states the exact values a reader must
produce from them (times in days, amounts in mg, censoring, allele fractions, GISTIC levels).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from twin.errors import InputError, PatientFileError
from twin.importers import attach_omics, read_cbioportal, read_maf, read_nonmem, write_nonmem

DATA = Path(__file__).parent / "data" / "importers"
NONMEM = DATA / "nonmem"
STUDY = DATA / "cbioportal" / "mini_study"
SHARED = Path(__file__).parents[2] / "shared"
REPO = Path(__file__).parents[1]

MAPPING = dict(
    observables={1: ("psa", "ng/mL"), 2: ("tumor_volume", "cm3"), 3: ("ca125", "U/mL")},
    drugs={1: ("docetaxel", "mg/m2", "iv"), 2: ("enzalutamide", "mg", "oral"), 3: ("leuprolide", "mg", "sc")},
    covariates={"AGE": "age", "SEX": "sex", "WT": "weight", "HT": "height"},
    sex_codes={1: "male", 2: "female"},
)
HEADER = "ID,TIME,AMT,RATE,II,ADDL,SS,EVID,MDV,CMT,DVID,DV,BLQ,LLOQ,AGE,SEX,WT,HT"


def _located(exc: PatientFileError) -> set[tuple[str, int | None, str | None]]:
    return {(p.file, p.row, p.field) for p in exc.problems if p.severity == "error"}


def _error(exc: PatientFileError, row: int, field: str):
    hits = [p for p in exc.problems if p.severity == "error" and p.row == row and p.field == field]
    assert hits, f"no error at row {row}, field {field}: {exc}"
    return hits[0]


def _table(tmp_path: Path, *rows: str, header: str = HEADER, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# -- NONMEM: reading --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pk():
    return read_nonmem(NONMEM / "events.csv", **MAPPING)


def test_nonmem_patients_in_file_order(pk):
    assert pk.ids == ["1", "2", "3"]
    assert pk.name == "events"
    assert pk.source["format"] == "nonmem" and pk.source["time_unit"] == "h"
    assert set(pk.source["sha256"]) == {"events.csv"}


def test_nonmem_observations_hours_to_days_mdv_and_blq(pk):
    m = pk["1"].measurements
    psa = pk["1"].series("psa")
    # TIME 0, 168, 336 h -> 0, 7, 14 days; the MDV=1 row at 504 h is skipped
    assert psa["time"].tolist() == [0.0, 7.0, 14.0]
    assert psa["value"].tolist()[:2] == [12.5, 6.2] and math.isnan(psa["value"][2])
    assert psa["below_lloq"].tolist() == [False, False, True]
    assert psa["lloq"].tolist() == [0.1, 0.1, 0.1]
    tv = pk["1"].series("tumor_volume")
    # DVID 2 is in cm3: 1.2 cm3 = 1200 mm3 at 672 h = 28 days
    assert tv["time"].tolist() == [28.0] and tv["value"].tolist() == pytest.approx([1200.0])
    assert len(m) == 4
    assert any("MDV=1" in n.message for n in pk["1"].notes)


def test_nonmem_blq_without_lloq_uses_dv_as_limit(pk):
    ca = pk["2"].series("ca125")
    assert ca["time"].tolist() == [0.0, 21.0]
    assert ca["value"][0] == 35.0 and math.isnan(ca["value"][1])
    assert bool(ca["below_lloq"][1]) and ca["lloq"][1] == 5.0
    assert any("DV read as the quantification limit" in n.message for n in pk["2"].notes)
    assert any("EVID 2" in n.message for n in pk["2"].notes)
    assert pk["2"].series("tumor_volume")["time"].tolist() == [42.0]


def test_nonmem_doses_ii_addl_and_oral(pk):
    h = pk["1"].history.table
    assert len(h) == 1
    row = h.iloc[0]
    assert (row["drug"], row["route"], row["time"], row["amount"]) == ("enzalutamide", "oral", 0.0, 160.0)
    # II = 24 h -> 1 day; ADDL = 27 -> 28 administrations
    assert row["interval"] == 1.0 and row["count"] == 28 and row["duration"] == 0.0
    ev = pk["1"].history.events()
    assert len(ev) == 28 and ev["time"].iloc[-1] == 27.0


def test_nonmem_infusion_rate_gives_duration_and_mg_per_m2(pk):
    row = pk["2"].history.table.iloc[0]
    bsa = math.sqrt(65 * 160 / 3600)  # Mosteller from WT 65 kg, HT 160 cm
    assert row["drug"] == "docetaxel" and row["route"] == "iv"
    assert row["amount"] == pytest.approx(75 * bsa)  # 75 mg/m2
    assert row["duration"] == pytest.approx(1 / 24)  # AMT/RATE = 75/75 = 1 h
    assert row["interval"] == pytest.approx(21.0) and row["count"] == 3  # II 504 h, ADDL 2


def test_nonmem_bolus_and_fractional_days(pk):
    row = pk["3"].history.table.iloc[0]
    assert (row["drug"], row["route"], row["amount"], row["duration"], row["count"]) == ("leuprolide", "sc", 7.5, 0.0, 1)
    assert math.isnan(row["interval"])
    assert pk["3"].series("psa")["time"].tolist() == [0.0, 0.5, 1.5]


def test_nonmem_covariates_from_columns_with_sex_codes(pk):
    c1, c2 = pk["1"].covariates, pk["2"].covariates
    assert (c1.age, c1.sex, c1.weight, c1.height) == (63.0, "male", 80.0, 175.0)
    assert c1.bsa == pytest.approx(math.sqrt(80 * 175 / 3600))
    assert (c2.age, c2.sex) == (58.0, "female")


def test_nonmem_whitespace_table_with_comments_equals_csv(pk):
    ws = read_nonmem(NONMEM / "events_whitespace.txt", **MAPPING)
    assert ws.ids == pk.ids
    for a, b in zip(pk, ws):
        pd.testing.assert_frame_equal(a.measurements, b.measurements)
        pd.testing.assert_frame_equal(a.history.table, b.history.table)
        assert a.covariates == b.covariates


def test_nonmem_comment_lines_and_hash_header(tmp_path):
    text = "# PK study 12, version 3\n#ID TIME DV DVID C\n1 0 4 1 .\nC 1 5 1 C\n1 12 3 1 .\n"
    (tmp_path / "t.txt").write_text(text)
    p = read_nonmem(tmp_path / "t.txt", observables={1: ("psa", "ng/mL")}, drugs={})["1"]
    assert p.series("psa")["value"].tolist() == [4.0, 3.0]  # the C row is a comment


def test_nonmem_covariate_units_and_id_prefix(tmp_path):
    path = _table(tmp_path, "7,0,.,.,.,.,.,0,0,.,1,4,0,.,60,M,70,1.8", "7,24,.,.,.,.,.,0,0,.,1,3,0,.,60,M,70,1.8")
    c = read_nonmem(path, observables={1: ("psa", "ng/mL")}, drugs={}, time_unit="day", covariates={"AGE": "age", "SEX": "sex", "WT": "weight", "HT": ("height", "m")}, id_prefix="PK-")
    p = c["PK-7"]
    assert p.covariates.height == pytest.approx(180.0) and p.covariates.sex == "male"
    assert p.series("psa")["time"].tolist() == [0.0, 24.0]  # time_unit = day: no conversion
    assert p.source["id_in_file"] == "7"


def test_nonmem_without_evid_or_dvid_columns(tmp_path):
    # no EVID: AMT > 0 marks a dose; no DVID: CMT tells the observable
    path = _table(tmp_path, "1,0,100,2,.", "1,0,.,.,3", "1,12,.,.,2.5", header="ID,TIME,AMT,CMT,DV")
    c = read_nonmem(path, observables={"1": ("psa", "ng/mL")}, drugs={2: ("abiraterone", "mg", "oral")})
    p = c["1"]
    assert p.history.table["amount"].tolist() == [100.0]
    assert p.series("psa")["value"].tolist() == [3.0, 2.5]
    assert p.series("psa")["time"].tolist() == [0.0, 0.5]


def test_nonmem_declares_custom_observable_and_drug(tmp_path):
    path = _table(tmp_path, "1,0,50,.,1,2", "1,1,.,.,0,0.8", header="ID,TIME,AMT,RATE,EVID,DV")
    c = read_nonmem(path, observables={1: ("drugx_conc", "ng/mL", "plasma concentration of drug X")}, drugs={1: ("drugx", "mg", "oral", ["EGFR"])})
    p = c["1"]
    assert p.observables == {"drugx_conc": {"unit": "ng/mL", "description": "plasma concentration of drug X"}}
    assert p.drugs["drugx"]["targets"] == ["EGFR"]
    assert p.series("drugx_conc")["value"].tolist() == [0.8]


# -- NONMEM: located errors ------------------------------------------------------------------


def test_nonmem_bad_table_lists_every_problem_with_line_and_column():
    with pytest.raises(PatientFileError) as info:
        read_nonmem(NONMEM / "bad_events.csv", **MAPPING)
    exc = info.value
    assert _located(exc) == {
        ("bad_events.csv", 3, "DVID"),  # unknown DVID 9
        ("bad_events.csv", 4, "SS"),  # SS=1
        ("bad_events.csv", 6, "TIME"),  # TIME '1O'
        ("bad_events.csv", 7, "EVID"),  # EVID 4
        ("bad_events.csv", 7, "AGE"),  # AGE 61, but 58 on line 5
        ("bad_events.csv", 8, "DV"),  # negative DV: found by the patient-file checks, located back
    }
    assert "unknown DVID 9" in _error(exc, 3, "DVID").message
    assert "1 (psa, ng/mL)" in _error(exc, 3, "DVID").expected
    assert "not supported" in _error(exc, 4, "SS").message
    t = _error(exc, 6, "TIME")
    assert t.message == "TIME is not a number" and t.received == "'1O'"
    assert "EVID 4" in _error(exc, 7, "EVID").message and "not supported" in _error(exc, 7, "EVID").message
    age = _error(exc, 7, "AGE")
    assert "61 here, 58 on line 5" in age.message and "time-varying" in age.expected
    assert "negative" in _error(exc, 8, "DV").message
    text = str(exc)
    assert "bad_events.csv row 6, field 'TIME'" in text and "6 problem(s)" in text


@pytest.mark.parametrize(
    "rows, header, row, field, fragment",
    [
        (["1,0,.,3,0,1,5"], "ID,TIME,AMT,EVID,MDV,DVID,DV", 2, "EVID", "EVID 3 (reset) is not supported"),
        (["1,0,100,1,0,.,.,-2,1"], "ID,TIME,AMT,EVID,MDV,DVID,DV,RATE,CMT", 2, "RATE", "RATE -2 (modelled duration) is not supported"),
        (["1,0,100,1,1,.,.,3,.,1"], "ID,TIME,AMT,EVID,MDV,DVID,DV,ADDL,II,CMT", 2, "II", "ADDL=3 additional doses need an interval II > 0"),
        (["1,0,.,0,0,1,."], "ID,TIME,AMT,EVID,MDV,DVID,DV", 2, "DV", "DV is missing"),
        (["1,0,.,0,0,1,4", "1,-1,.,0,0,1,3"], "ID,TIME,AMT,EVID,MDV,DVID,DV", 3, "TIME", "TIME -1 comes after TIME 0 (line 2)"),
        (["1,0,.,0,0,1,4", "2,0,.,0,0,1,3", "1,5,.,0,0,1,3"], "ID,TIME,AMT,EVID,MDV,DVID,DV", 4, "ID", "ID 1 appears again after other IDs"),
        (["1,0,.,0,0,1,4,-1"], "ID,TIME,AMT,EVID,MDV,DVID,DV,CENS", 2, "CENS", "CENS -1 is not supported"),
        (["1,0,.,0,0,1,4", "1,1,.,0,0,1,4,9"], "ID,TIME,AMT,EVID,MDV,DVID,DV", 3, None, "the row has 8 cells but the header has 7 columns"),
        (["1,0,.,0,0,1,4,2"], "ID,TIME,AMT,EVID,MDV,DVID,DV,SEX", 2, "SEX", "cannot be read as a sex without sex_codes"),
        (["1,0,.,0,0,1,4,1,2024-01-01"], "ID,TIME,AMT,EVID,MDV,DVID,DV,SEX,DATE", 1, "DATE", "only numeric elapsed TIME is read"),
        (["1,0,.,0,0,1,4"], "ID,TIMES,AMT,EVID,MDV,DVID,DV", 1, "TIME", "required column 'TIME' is missing. Did you mean 'TIMES'?"),
    ],
)
def test_nonmem_single_problem_is_located(tmp_path, rows, header, row, field, fragment):
    path = _table(tmp_path, *rows, header=header)
    covariates = {"SEX": "sex"} if "SEX" in header else None
    with pytest.raises(PatientFileError) as info:
        read_nonmem(path, observables={1: ("psa", "ng/mL")}, drugs={1: ("docetaxel", "mg", "iv")}, covariates=covariates)
    hit = _error(info.value, row, field)
    assert fragment in hit.message, hit.format()


def test_nonmem_negative_time_is_reported_against_the_file(tmp_path):
    path = _table(tmp_path, "1,-2,.,0,0,1,4", "1,0,.,0,0,1,3", header="ID,TIME,AMT,EVID,MDV,DVID,DV")
    with pytest.raises(PatientFileError) as info:
        read_nonmem(path, observables={1: ("psa", "ng/mL")}, drugs={})
    assert ("t.csv", 2, "TIME") in _located(info.value)


def test_nonmem_duplicates_name_the_source_lines(tmp_path):
    path = _table(tmp_path, "1,0,1,4,0,.,.", "1,0,1,5,0,.,.", "1,1,.,.,1,10,1", "1,1,.,.,1,10,1", header="ID,TIME,DVID,DV,EVID,AMT,CMT")
    with pytest.raises(PatientFileError) as info:
        read_nonmem(path, observables={1: ("psa", "ng/mL")}, drugs={1: ("docetaxel", "mg", "iv")})
    obs = _error(info.value, 3, "DV")
    assert obs.message.startswith("conflicts with line 2") and obs.received == "5 (line 2: 4)"
    assert _error(info.value, 5, "TIME").message.startswith("duplicate of line 4: docetaxel given twice")


def test_nonmem_bad_arguments_raise_at_once(tmp_path):
    path = NONMEM / "events.csv"
    with pytest.raises(InputError, match="not a unit of time"):
        read_nonmem(path, **MAPPING, time_unit="mg")
    with pytest.raises(InputError, match="Did you mean 'weight'"):
        read_nonmem(path, **{**MAPPING, "covariates": {"WT": "wieght"}})
    with pytest.raises(InputError, match=r"\(drug name, unit, route\)"):
        read_nonmem(path, **{**MAPPING, "drugs": {1: "docetaxel"}})
    with pytest.raises(PatientFileError, match="covariate column 'BMI'"):
        read_nonmem(path, **{**MAPPING, "covariates": {"BMI": "weight"}})


def test_nonmem_unknown_drug_name_in_mapping_is_located_at_the_dose_rows(tmp_path):
    path = _table(tmp_path, "1,0,100,1,1,1,.", header="ID,TIME,AMT,EVID,MDV,CMT,DV")
    with pytest.raises(PatientFileError) as info:
        read_nonmem(path, observables={}, drugs={1: ("docetaxol", "mg", "iv")})
    hit = _error(info.value, 2, "CMT")
    assert "unknown drug 'docetaxol'" in hit.message and "Did you mean 'docetaxel'" in hit.message


# -- NONMEM: writing and round trips -----------------------------------------------------------


def _assert_same_patients(a, b):
    assert a.ids == b.ids
    for p, q in zip(a, b):
        pd.testing.assert_frame_equal(p.measurements, q.measurements, rtol=1e-10)
        pd.testing.assert_frame_equal(p.history.table, q.history.table, rtol=1e-10)
        assert p.covariates.age == q.covariates.age and p.covariates.sex == q.covariates.sex
        for k in ("weight", "height", "bsa"):
            assert getattr(p.covariates, k) == pytest.approx(getattr(q.covariates, k), rel=1e-10)


@pytest.mark.parametrize("time_unit, sep", [("h", ","), ("day", " "), ("min", ",")])
def test_write_then_read_nonmem_round_trip(pk, tmp_path, time_unit, sep):
    out = write_nonmem(pk, tmp_path / "rt.csv", **MAPPING, time_unit=time_unit, sep=sep)
    again = read_nonmem(out, **MAPPING, time_unit=time_unit)
    _assert_same_patients(pk, again)


def test_write_nonmem_table_contents(pk, tmp_path):
    out = write_nonmem(pk, tmp_path / "rt.csv", **MAPPING)
    t = pd.read_csv(out, dtype=str)
    assert list(t.columns[:14]) == ["ID", "TIME", "EVID", "AMT", "RATE", "II", "ADDL", "SS", "CMT", "DVID", "DV", "MDV", "BLQ", "LLOQ"]
    dose = t[(t["ID"] == "2") & (t["EVID"] == "1")].iloc[0]
    assert (dose["AMT"], dose["RATE"], dose["II"], dose["ADDL"], dose["CMT"]) == ("75", "75", "504", "2", "1")
    blq = t[(t["ID"] == "1") & (t["BLQ"] == "1")].iloc[0]
    assert (blq["TIME"], blq["DV"], blq["LLOQ"]) == ("336", "0.1", "0.1")
    assert len(t) == 13  # 15 rows read; the MDV=1 and EVID 2 rows are not patient data


def test_write_nonmem_refuses_what_it_cannot_write(pk, tmp_path):
    with pytest.raises(InputError, match="observable 'ca125' is not in the observables mapping"):
        write_nonmem(pk, tmp_path / "x.csv", **{**MAPPING, "observables": {1: ("psa", "ng/mL"), 2: ("tumor_volume", "cm3")}})
    with pytest.raises(InputError, match="drug 'leuprolide' is not in the drugs mapping"):
        write_nonmem(pk, tmp_path / "x.csv", **{**MAPPING, "drugs": {1: ("docetaxel", "mg/m2", "iv"), 2: ("enzalutamide", "mg", "oral")}})


# -- cBioPortal -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    return read_cbioportal(STUDY, expression_file="data_mrna_seq_v2_rsem.txt", labels=["OS_STATUS", "OS_MONTHS"])


def test_cbioportal_patients_covariates_and_labels(study):
    assert study.ids == ["P-0001", "P-0002"]
    c1, c2 = study["P-0001"].covariates, study["P-0002"].covariates
    assert (c1.age, c1.sex, c2.age, c2.sex) == (63.0, "male", 58.0, "female")
    assert study["P-0001"].labels == {"OS_STATUS": "1:DECEASED", "OS_MONTHS": 14.2}
    assert study.source["format"] == "cbioportal"
    assert "data_mrna_seq_v2_rsem_zscores_ref_all_samples.txt" not in study.source["sha256"]


def test_cbioportal_mutations_from_maf(study):
    m = study["P-0001"].omics.mutations.set_index("gene")
    assert m.loc["BRAF", "protein_change"] == "V600E"  # HGVSp_Short without 'p.'
    assert m.loc["BRAF", "vaf"] == pytest.approx(30 / (30 + 70))
    assert m.loc["TP53", "vaf"] == pytest.approx(12 / (12 + 36))
    assert m.loc["BRAF", "classification"] == "Missense_Mutation" and m.loc["BRAF", "sample"] == "P-0001-T01"
    m2 = study["P-0002"].omics.mutations.set_index("gene")
    assert m2.loc["KRAS", "vaf"] == pytest.approx(0.45)
    assert m2.loc["APC", "protein_change"] == "R1450*" and pd.isna(m2.loc["APC", "vaf"])  # NA counts


def test_cbioportal_discrete_copy_number(study):
    cn1 = study["P-0001"].omics.copy_number.set_index("gene")["gistic"].to_dict()
    cn2 = study["P-0002"].omics.copy_number.set_index("gene")["gistic"].to_dict()
    assert cn1 == {"BRAF": 1, "CDKN2A": -2, "ERBB2": 2}
    assert cn2 == {"BRAF": 0, "CDKN2A": -1}  # ERBB2 is NA for this sample


def test_cbioportal_expression_and_rppa_scales_from_meta(study):
    e1 = study["P-0001"].omics.expression
    assert set(e1["scale"]) == {"rsem"}  # profile_name says RNA Seq V2 RSEM
    assert e1.set_index("gene")["value"].to_dict() == {"BRAF": 812.5, "EGFR": 120.0}  # MYC NA
    pr = study["P-0002"].omics.protein.set_index("protein")
    assert pr.loc["Akt_pS473", "value"] == -0.42 and pr.loc["Akt_pS473", "scale"] == "rppa_zscore"


def test_cbioportal_several_expression_files_need_a_choice():
    with pytest.raises(InputError, match="several files for expression.*expression_file="):
        read_cbioportal(STUDY)
    z = read_cbioportal(STUDY, expression_file="data_mrna_seq_v2_rsem_zscores_ref_all_samples.txt")
    assert set(z["P-0002"].omics.expression["scale"]) == {"zscore"}


def _copy_study(tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    dst = tmp_path / "study"
    shutil.copytree(STUDY, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_cbioportal_never_guesses_an_expression_scale(tmp_path):
    d = _copy_study(tmp_path, drop=("meta_mrna_seq_v2_rsem.txt", "meta_mrna_seq_v2_rsem_zscores_ref_all_samples.txt", "data_mrna_seq_v2_rsem_zscores_ref_all_samples.txt"))
    with pytest.raises(InputError, match="cannot tell the scale.*expression_scale="):
        read_cbioportal(d)
    c = read_cbioportal(d, expression_scale="tpm")
    assert set(c["P-0001"].omics.expression["scale"]) == {"tpm"}
    with pytest.raises(InputError, match="conflicts with its meta file"):
        read_cbioportal(STUDY, expression_file="data_mrna_seq_v2_rsem.txt", expression_scale="tpm")


def test_cbioportal_sample_without_patient(tmp_path):
    d = _copy_study(tmp_path)
    with open(d / "data_clinical_sample.txt", "a") as fh:
        fh.write("P-0003\tP-0003-T01\tMelanoma\n")
    with pytest.raises(PatientFileError) as info:
        read_cbioportal(d, expression_file="data_mrna_seq_v2_rsem.txt")
    hit = _error(info.value, 8, "PATIENT_ID")  # 4 '#' lines, header on line 5
    assert hit.file == "data_clinical_sample.txt"
    assert "sample P-0003-T01 belongs to patient P-0003, who is not in data_clinical_patient.txt" in hit.message
    assert "Did you mean 'P-0002'" in hit.message


def test_maf_without_hugo_symbol_is_located(tmp_path):
    d = _copy_study(tmp_path)
    maf = d / "data_mutations.txt"
    maf.write_text(maf.read_text().replace("Hugo_Symbol", "Gene_Symbol"))
    with pytest.raises(PatientFileError) as info:
        read_maf(maf)
    hit = _error(info.value, 2, "Hugo_Symbol")  # '#version 2.4' is line 1
    assert hit.message.startswith("required column 'Hugo_Symbol' is missing")
    with pytest.raises(PatientFileError) as info:
        read_cbioportal(d, expression_file="data_mrna_seq_v2_rsem.txt")
    assert ("data_mutations.txt", 2, "Hugo_Symbol") in _located(info.value)


def test_cbioportal_bad_cells_are_located(tmp_path):
    d = _copy_study(tmp_path)
    cna = d / "data_cna.txt"
    cna.write_text(cna.read_text().replace("CDKN2A\t1029\t-2\t-1", "CDKN2A\t1029\t-1.5\t-1"))
    maf = d / "data_mutations.txt"
    maf.write_text(maf.read_text().replace("\t36\t12\n", "\tmany\t12\n"))
    with pytest.raises(PatientFileError) as info:
        read_cbioportal(d, expression_file="data_mrna_seq_v2_rsem.txt")
    assert "not a discrete GISTIC level" in _error(info.value, 3, "P-0001-T01").message
    assert _error(info.value, 4, "t_ref_count").received == "'many'"


def test_cbioportal_duplicates_error_or_first(tmp_path):
    d = _copy_study(tmp_path)
    with open(d / "data_cna.txt", "a") as fh:
        fh.write("BRAF\t673\t2\t0\n")
    with pytest.raises(PatientFileError) as info:
        read_cbioportal(d, expression_file="data_mrna_seq_v2_rsem.txt")
    assert "duplicate copy number entry BRAF / P-0001-T01 (same as line 2)" in _error(info.value, 5, "Hugo_Symbol").message
    c = read_cbioportal(d, expression_file="data_mrna_seq_v2_rsem.txt", duplicates="first")
    assert c["P-0001"].omics.copy_number.set_index("gene").loc["BRAF", "gistic"] == 1
    assert any(n.severity == "warning" and "duplicate" in n.message for n in c.source["notes"])


def test_cbioportal_gene_filter():
    c = read_cbioportal(STUDY, expression_file="data_mrna_seq_v2_rsem.txt", genes=["BRAF", "EGFR"])
    o = c["P-0001"].omics
    assert o.mutations["gene"].tolist() == ["BRAF"]
    assert o.copy_number["gene"].tolist() == ["BRAF"]
    assert sorted(o.expression["gene"]) == ["BRAF", "EGFR"]
    assert o.protein["protein"].tolist() == ["EGFR_pY1068"]


# -- attach_omics -----------------------------------------------------------------------------


def test_attach_omics_by_id_map(pk, study):
    both = attach_omics(pk, study, id_map={"1": "P-0001", "2": "P-0002"}, unmatched="keep")
    p1 = both["1"]
    assert p1.omics.layers == ["mutations", "copy_number", "expression", "protein"]
    assert p1.omics.mutations.set_index("gene").loc["BRAF", "vaf"] == pytest.approx(0.3)
    assert (p1.covariates.age, p1.covariates.weight) == (63.0, 80.0)  # NONMEM and cBioPortal agree on age
    assert p1.labels["OS_STATUS"] == "1:DECEASED"
    pd.testing.assert_frame_equal(p1.measurements, pk["1"].measurements)
    pd.testing.assert_frame_equal(p1.history.table, pk["1"].history.table)
    assert p1.source["omics_source"]["id"] == "P-0001" and p1.source["format"] == "nonmem"
    assert both["3"].omics.layers == []
    assert any("kept without omics" in n.message for n in both["3"].notes)


def test_attach_omics_reports_ids_that_do_not_match(pk, study):
    with pytest.raises(PatientFileError) as info:
        attach_omics(pk, study, id_map={"1": "P-0001", "2": "P-0003", "9": "P-0002"})
    messages = [p.message for p in info.value.problems]
    assert any("id_map key '9' is not a patient of the cohort" in m for m in messages)
    assert any("patient 2: no omics patient 'P-0003'. Did you mean 'P-0002'" in m for m in messages)
    assert any("patient 3: no omics patient '3'" in m for m in messages)  # unmatched='error' by default


def test_attach_omics_conflicting_covariates(pk, study):
    with pytest.raises(PatientFileError, match="covariate age is 63.0 but omics patient P-0002 says 58.0"):
        attach_omics(pk, study, id_map={"1": "P-0002"}, unmatched="keep")


# -- real data ------------------------------------------------------------------------------


LAML = SHARED / "data" / "tcga_laml_maftools" / "tcga_laml.maf.gz"


@pytest.mark.skipif(not LAML.exists(), reason="shared TCGA-LAML data not present")
def test_real_tcga_laml_maf():
    m = read_maf(LAML, vaf_column="i_TumorVAF_WU", vaf_scale="percent")
    # maftools' tcga_laml.maf.gz: 2,207 variants in 193 samples; DNMT3A is the most mutated gene
    assert len(m) == 2207 and m["sample"].nunique() == 193
    counts = m["gene"].value_counts()
    assert counts.index[0] == "DNMT3A" and counts["DNMT3A"] == 54 and counts["FLT3"] == 52
    first = m.iloc[0]
    assert (first["gene"], first["protein_change"], first["sample"], first["line"]) == ("ABCA10", "K960R", "TCGA-AB-2988", 2)
    assert first["vaf"] == pytest.approx(0.4566)
    assert m["vaf"].notna().sum() == 2114  # 93 rows have i_TumorVAF_WU = NA
    assert m["vaf"].dropna().between(0, 1).all()
    plain = read_maf(LAML)  # no t_alt_count/t_ref_count: allele fractions left empty
    assert plain["vaf"].isna().all()


# -- the how-to page runs ---------------------------------------------------------------------


def test_import_how_to_examples_run(monkeypatch):
    page = REPO / "docs" / "how-to" / "import-data.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(REPO)
    namespace: dict = {"__name__": "docs_example"}
    for code in blocks:
        exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own documentation
