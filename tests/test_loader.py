"""Good-path behaviour of the patient loader: exact conversions, notes, dates, doses,
round trips, the JSON Schema and cohorts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from twin.errors import PatientFileError
from twin.io import json_schema, load_cohort, load_patient, patient_from_document, read_patient, save_patient, validate_patient

TESTOSTERONE_MOLAR_MASS = 288.42  # g/mol


def _notes(problems, file=None):
    return [p.message for p in problems if p.severity == "note" and (file is None or p.file == file)]


def _values(patient, observable):
    return patient.series(observable)["value"].to_numpy()


# --- the default good bundle -----------------------------------------------------------


def test_good_bundle_loads_cleanly(good_bundle):
    patient, problems = read_patient(good_bundle())
    assert patient is not None
    assert not problems.errors and not problems.warnings
    assert patient.id == "P001"
    assert patient.observed == ["psa"]
    assert list(patient.series("psa")["time"]) == [0.0, 28.0, 56.0, 84.0]
    assert patient.labels == {"relapse": False}
    assert patient.omics.layers == ["mutations", "copy_number"]
    assert patient.omics.mutations.loc[0, "vaf"] == 0.45
    assert patient.source["format"] == "folder" and set(patient.source["sha256"]) >= {"patient.toml", "measurements.csv"}
    # every note the loader made is kept on the patient
    assert tuple(problems) == patient.notes


# --- units ---------------------------------------------------------------------------------


def test_unit_conversions_are_exact(good_bundle):
    measurements = """\
time,observable,value,unit,lloq
0,testosterone,400,ng/dL,
0,tumor_volume,0.5,cm3,
0,psa,3.2,ug/L,0.05
7,testosterone,12,nmol/L,
7,tumor_volume,480,mm3,
7,psa,2.9,ng/mL,
"""
    patient, problems = read_patient(good_bundle(files={"measurements.csv": measurements}))
    assert not problems.errors
    # ng/dL -> nmol/L through the molar mass: 400 ng/dL = 4000 ng/L = 4000 / 288.42 nmol/L
    testosterone = _values(patient, "testosterone")
    assert testosterone[0] == pytest.approx(400 * 10 / TESTOSTERONE_MOLAR_MASS, rel=1e-12)
    assert testosterone[1] == 12.0
    # cm3 -> mm3 is x 1000 exactly
    assert list(_values(patient, "tumor_volume")) == [500.0, 480.0]
    # ug/L is the same quantity as ng/mL: values (and the lloq) unchanged, bit for bit
    psa = patient.series("psa")
    assert list(psa["value"]) == [3.2, 2.9]
    assert psa["lloq"].iloc[0] == 0.05
    assert set(patient.measurements["unit"]) == {"nmol/L", "mm**3", "ng/mL"}


def test_every_normalisation_is_a_note(good_bundle):
    toml = good_bundle.files["patient.toml"].replace("weight = 80", 'weight = "176.37 lb"')
    measurements = """\
time,observable,value,unit
2019-01-15,testosterone,400,ng/dL
2019-01-15,tumour_volume,0.5,cm3
2019-01-15,psa,3.2,ug/L
2019-02-12,psa,<0.1,ng/mL
"""
    dosing = """\
drug,time,amount,unit,route,interval,count
taxotere,2019-01-15,75,mg/m2,IV,21,3
abiraterone,2019-01-15,1,g,po,1,28
"""
    patient, problems = read_patient(good_bundle(files={"patient.toml": toml, "measurements.csv": measurements, "dosing.csv": dosing}))
    assert not problems.errors and not problems.warnings
    notes = "\n".join(_notes(problems))
    expected = [
        "covariate weight '176.37 lb' converted to 80 kg",
        "body-surface area computed from weight and height (Mosteller)",
        "dates converted to days since 2019-01-15 (the earliest date)",
        "1 testosterone value(s) converted from ng/dL to nmol/L (x 0.0346717) (molar mass 288.42 g/mol)",
        "1 tumor_volume value(s) converted from cm3 to mm³ (x 1000)",
        "1 psa value(s) in ug/L read as ng/mL (the same quantity; values unchanged)",
        "observable 'tumour_volume' read as 'tumor_volume'",
        "1 value(s) written as '<LLOQ' read as censored",
        "drug name 'taxotere' read as catalogue name 'docetaxel'",
        "route 'po' read as 'oral'",
        "1 dose(s) in mg/m² converted to mg",
        "1 dose(s) in g converted to mg (x 1000)",
    ]
    for text in expected:
        assert text in notes
    assert len(_notes(problems)) == len(expected)
    # a route written in capitals is the same route: no note for 'IV'
    assert "route 'IV'" not in notes


def test_nothing_to_normalise_gives_only_the_bsa_note(good_bundle):
    toml = good_bundle.files["patient.toml"] + "\n"
    dosing = "drug,time,amount,unit,route,interval,count\nabiraterone,0,1000,mg,oral,1,84\n"
    problems = validate_patient(good_bundle(files={"patient.toml": toml.replace("height = 180\n", ""), "dosing.csv": dosing}))
    assert list(problems) == []


# --- times -----------------------------------------------------------------------------------


def test_dates_become_days_from_the_earliest_date(good_bundle):
    measurements = "time,observable,value,unit\n2019-01-15,psa,12.5,ng/mL\n2019-02-12,psa,8.1,ng/mL\n2019-03-01T12:00,psa,6.0,ng/mL\n"
    dosing = "drug,time,amount,unit,route\nabiraterone,2019-01-20,1000,mg,oral\n"
    patient, problems = read_patient(good_bundle(files={"measurements.csv": measurements, "dosing.csv": dosing}))
    assert not problems.errors
    assert list(patient.series("psa")["time"]) == [0.0, 28.0, 45.5]
    assert list(patient.history.table["time"]) == [5.0]
    assert patient.time_origin == "2019-01-15"
    assert any("dates converted to days since 2019-01-15 (the earliest date)" in n for n in _notes(problems, "patient.toml"))


def test_dates_become_days_from_time_origin(good_bundle):
    toml = good_bundle.files["patient.toml"].replace('id = "{id}"', 'id = "{id}"\ntime_origin = 2019-01-01')
    measurements = "time,observable,value,unit\n2019-01-15,psa,12.5,ng/mL\n2019-02-12,psa,8.1,ng/mL\n"
    phases = "cycle,phase,start,end\n1,on,2019-01-01,2019-03-01\n1,off,2019-03-01,2019-04-01\n"
    patient, problems = read_patient(good_bundle(files={"patient.toml": toml, "measurements.csv": measurements, "dosing.csv": None, "phases.csv": phases}))
    assert not problems.errors
    assert list(patient.series("psa")["time"]) == [14.0, 42.0]
    assert patient.phases[["start", "end"]].to_numpy().tolist() == [[0.0, 59.0], [59.0, 90.0]]
    assert patient.time_origin == "2019-01-01"
    assert any("dates converted to days since time_origin 2019-01-01" in n for n in _notes(problems))


def test_rows_may_be_grouped_by_observable(good_bundle):
    measurements = "time,observable,value,unit\n0,psa,12.5,ng/mL\n28,psa,8.1,ng/mL\n0,testosterone,12,nmol/L\n28,testosterone,0.5,nmol/L\n"
    patient, problems = read_patient(good_bundle(files={"measurements.csv": measurements}))
    assert not problems.errors
    assert patient.observed == ["psa", "testosterone"]


# --- censoring ------------------------------------------------------------------------------


def test_text_below_lloq_becomes_a_censored_value(good_bundle):
    measurements = "time,observable,value,unit\n0,psa,12.5,ng/mL\n28,psa,<0.1,ng/mL\n56,psa,< 0.2,ug/L\n"
    patient, problems = read_patient(good_bundle(files={"measurements.csv": measurements}))
    assert not problems.errors
    psa = patient.series("psa")
    assert list(psa["below_lloq"]) == [False, True, True]
    assert math.isnan(psa["value"].iloc[1]) and math.isnan(psa["value"].iloc[2])
    assert psa["lloq"].iloc[1] == 0.1 and psa["lloq"].iloc[2] == 0.2
    assert any("2 value(s) written as '<LLOQ' read as censored" in n for n in _notes(problems))


def test_flagged_censoring_with_lloq_column(good_bundle):
    measurements = "time,observable,value,unit,lloq,below_lloq\n0,psa,12.5,ng/mL,0.1,false\n28,psa,,ng/mL,0.1,true\n"
    patient, problems = read_patient(good_bundle(files={"measurements.csv": measurements}))
    assert not problems.errors
    psa = patient.series("psa")
    assert list(psa["below_lloq"]) == [False, True] and math.isnan(psa["value"].iloc[1])


# --- doses ---------------------------------------------------------------------------------


def test_bsa_is_computed_with_mosteller_when_absent(good_bundle):
    toml = good_bundle.files["patient.toml"].replace("weight = 80", "weight = 70").replace("height = 180", "height = 175")
    patient, problems = read_patient(good_bundle(files={"patient.toml": toml}))
    assert patient.covariates.bsa == pytest.approx(math.sqrt(70 * 175 / 3600), rel=1e-12)
    assert any("body-surface area computed from weight and height (Mosteller): 1.845 m²" in n for n in _notes(problems))


def test_given_bsa_is_kept(good_bundle):
    toml = good_bundle.files["patient.toml"] + "bsa = 1.9\n"
    toml = toml.replace("\n[labels]\nrelapse = false\n", "\n") + "\n[labels]\nrelapse = false\n"
    patient, problems = read_patient(good_bundle(files={"patient.toml": toml}))
    assert not problems.errors
    assert patient.covariates.bsa == 1.9
    assert not any("Mosteller" in n for n in _notes(problems))
    docetaxel = patient.history.table.query("drug == 'docetaxel'")
    assert docetaxel["amount"].iloc[0] == pytest.approx(75 * 1.9, rel=1e-12)


def test_per_size_doses_are_resolved_to_mg(good_bundle):
    dosing = "drug,time,amount,unit,route\ndocetaxel,0,75,mg/m2,iv\nbinimetinib,0,2,mg/kg,oral\nabiraterone,0,1,g,oral\nenzalutamide,0,160000,ug,oral\n"
    patient, problems = read_patient(good_bundle(files={"dosing.csv": dosing}))
    assert not problems.errors
    amounts = dict(zip(patient.history.table["drug"], patient.history.table["amount"]))
    assert amounts == {"docetaxel": 150.0, "binimetinib": 160.0, "abiraterone": 1000.0, "enzalutamide": 160.0}  # BSA 2.0 m², weight 80 kg
    notes = "\n".join(_notes(problems, "dosing.csv"))
    assert "1 dose(s) in mg/m² converted to mg (x body-surface area 2 m²)" in notes
    assert "1 dose(s) in mg/kg converted to mg (x weight 80 kg)" in notes


def test_interval_and_count_expand_into_events(good_bundle):
    patient = load_patient(good_bundle())
    table = patient.history.table
    assert len(table) == 2
    events = patient.history.events()
    docetaxel = events[events["drug"] == "docetaxel"]
    assert list(docetaxel["time"]) == [0.0, 21.0, 42.0]
    assert list(docetaxel["amount"]) == [150.0, 150.0, 150.0]
    assert set(docetaxel["route"]) == {"iv"}
    abiraterone = events[events["drug"] == "abiraterone"]
    assert len(abiraterone) == 84 and list(abiraterone["time"]) == [float(d) for d in range(84)]
    assert patient.history.total_amount("abiraterone") == 84 * 1000.0


def test_infusion_duration_with_unit(good_bundle):
    dosing = "drug,time,amount,unit,route,duration\ndocetaxel,0,75,mg/m2,iv,1 h\ndocetaxel,21,75,mg/m2,iv,\n"
    patient = load_patient(good_bundle(files={"dosing.csv": dosing}))
    assert list(patient.history.table["duration"]) == pytest.approx([1 / 24, 0.0], rel=1e-12)


# --- declarations ----------------------------------------------------------------------------


def test_declared_drug_and_observable(good_bundle):
    toml = good_bundle.files["patient.toml"] + '\n[drugs.xyz123]\ntargets = ["AR"]\nclass = "experimental"\n\n[observables.ca19_9]\nunit = "U/mL"\n'
    dosing = "drug,time,amount,unit,route\nxyz123,0,10,mg,oral\n"
    measurements = "time,observable,value,unit\n0,psa,12.5,ng/mL\n0,ca19_9,35,U/mL\n28,ca19_9,20,kU/L\n"
    patient, problems = read_patient(good_bundle(files={"patient.toml": toml, "dosing.csv": dosing, "measurements.csv": measurements}))
    assert not problems.errors, [p.format() for p in problems.errors]
    assert patient.drugs == {"xyz123": {"targets": ["AR"], "class": "experimental"}}
    assert list(_values(patient, "ca19_9")) == [35.0, 20.0]  # 1 kU/L = 1 U/mL
    assert any("1 ca19_9 value(s) in kU/L read as U/mL" in n for n in _notes(problems))


# --- round trips and the schema -------------------------------------------------------------


def _rich_bundle(good_bundle):
    measurements = """\
arm,time,observable,value,unit,lloq,below_lloq,note
main,0,psa,12.5,ng/mL,0.1,false,baseline
main,28,psa,,ng/mL,0.1,true,
main,0,tumor_volume,0.25,cm3,,,
lesion2,0,sld,42,mm,,,
lesion2,30,sld,38.5,mm,,,
"""
    dosing = "arm,drug,time,amount,unit,route,duration,interval,count\nmain,docetaxel,0,75,mg/m2,iv,1 h,21,3\nmain,abiraterone,0,1000,mg,oral,,1,84\nmain,leuprolide,0,,,sc,,,\n"
    phases = "cycle,phase,start,end\n1,on,0,84\n1,off,84,120\n"
    expression = "gene,value,scale,sample\nAR,8.5,log2_tpm,biopsy1\n"
    protein = "protein,value,scale\nAKT_pS473,1.2,rppa_zscore\n"
    return good_bundle(
        "rich",
        files={"measurements.csv": measurements, "dosing.csv": dosing, "phases.csv": phases, "omics/expression.csv": expression, "omics/protein.csv": protein},
    )


def _assert_same_patient(a, b):
    pd.testing.assert_frame_equal(a.measurements.reset_index(drop=True), b.measurements.reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(a.history.table, b.history.table)
    pd.testing.assert_frame_equal(a.phases.reset_index(drop=True), b.phases.reset_index(drop=True), check_dtype=False)
    for layer in ("mutations", "copy_number", "expression", "protein"):
        pd.testing.assert_frame_equal(getattr(a.omics, layer), getattr(b.omics, layer), check_dtype=False)
    assert a.covariates == b.covariates
    assert (a.id, a.labels, a.drugs, a.observables) == (b.id, b.labels, b.drugs, b.observables)


@pytest.mark.parametrize("target", ["folder", "patient.json", "patient.yaml"])
def test_save_and_load_round_trip(good_bundle, tmp_path, target):
    original, problems = read_patient(_rich_bundle(good_bundle))
    assert original is not None, [p.format() for p in problems.errors]
    assert len(original.history.table) == 3 and np.isnan(original.history.table.query("drug == 'leuprolide'")["amount"].iloc[0])
    path = save_patient(original, tmp_path / "out" / target if target != "folder" else tmp_path / "out_folder")
    again, problems = read_patient(path)
    assert again is not None, [p.format() for p in problems.errors]
    _assert_same_patient(original, again)
    # saved in canonical units: loading again converts nothing
    assert not any("converted" in n for n in _notes(problems) if "Mosteller" not in n)
    # and a second save/load is a fixed point
    again2 = load_patient(save_patient(again, tmp_path / "second" / (target if target != "folder" else "f")))
    _assert_same_patient(again, again2)


def test_saved_json_validates_against_the_schema(good_bundle, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    patient = load_patient(_rich_bundle(good_bundle))
    path = save_patient(patient, tmp_path / "p.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)
    # and the schema rejects what the loader rejects
    bad = dict(document, unknown_key=1)
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(bad))


def test_patient_from_document_uses_the_same_checks():
    doc = {"id": "P9", "measurements": [{"time": 0, "observable": "psa", "value": 3, "unit": "ng/mL"}, {"time": 7, "observable": "psa", "value": "1,5", "unit": "ng/mL"}]}
    patient, problems = patient_from_document(doc, label="import")
    assert patient is None
    [error] = problems.errors
    assert (error.file, error.row, error.field) == ("import › measurements", 2, "value")
    assert error.fix == "use a decimal point, not a comma: 1.5"


# --- cohorts ---------------------------------------------------------------------------------


def test_load_cohort(good_bundle, tmp_path):
    good_bundle("cohort/P001")
    good_bundle("cohort/P002", patient_id="P002")
    cohort = load_cohort(tmp_path / "cohort")
    assert [p.id for p in cohort] == ["P001", "P002"]
    assert cohort.name == "cohort"


def test_load_cohort_reports_every_bad_patient(good_bundle, tmp_path):
    good_bundle("cohort/P001")
    good_bundle("cohort/P002", {"dosing.csv": "drug,time,amount,unit,route\ndocetaxl,0,75,mg/m2,iv\n"}, patient_id="P002")
    good_bundle("cohort/P003", {"measurements.csv": "time,observable,value,unit\n0,psa,12.5,mm3\n"}, patient_id="P003")
    (tmp_path / "cohort" / "P004.json").write_text(json.dumps({"id": "P004", "omics": {"mutations": [{"gene": "TP53", "vaf": 45}]}}), encoding="utf-8")
    good_bundle("cohort/P005", patient_id="P001")  # the id of P001 again
    with pytest.raises(PatientFileError) as info:
        load_cohort(tmp_path / "cohort")
    located = {(p.file, p.row, p.field) for p in info.value.problems}
    assert located == {
        ("P002/dosing.csv", 2, "drug"),
        ("P003/measurements.csv", 2, "unit"),
        ("P004.json › omics.mutations", 1, "vaf"),
        ("P005/patient.toml", None, "id"),
    }
    text = str(info.value)
    assert "P002/dosing.csv row 2, field 'drug': unknown drug 'docetaxl'" in text
    assert "patient id 'P001' is already used by P001/patient.toml" in text
