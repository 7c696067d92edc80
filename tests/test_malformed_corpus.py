"""The malformed-file corpus: every broken patient file gets a located, helpful message.

Each case under ``tests/malformed/`` (a bundle folder, or one .json/.yaml file) carries
one deliberate defect; a few carry several, to check that *all* are reported in one run.
``EXPECTED`` lists, for each case, every error and warning the loader must report:
(severity, file, row, field, a substring of the message). Rows are line numbers for CSV
files (the header is row 1) and record positions for tables inside JSON/YAML files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from twin.cli import main
from twin.errors import PatientFileError
from twin.io import load_patient, validate_patient
from twin.io.load import MAX_SAME_KIND

MALFORMED = Path(__file__).parent / "malformed"
E, W = "error", "warning"
M, D = "measurements.csv", "dosing.csv"
T = "patient.toml"

# case -> every error and warning expected: (severity, file, row, field, message substring)
EXPECTED: dict[str, list[tuple[str, str, int | None, str | None, str]]] = {
    # --- units -----------------------------------------------------------------------
    "missing_unit": [(E, M, 3, "unit", "unit is missing")],
    "unknown_unit": [(E, M, 3, "unit", "unit 'ng/mX' is not a unit twin can read. Did you mean 'ng/mL'")],
    "wrong_unit_for_observable": [(E, M, 3, "unit", "unit 'mm3' is not a unit of psa")],
    "bad_dose_unit": [(E, D, 2, "unit", "unit 'mL' is not a unit of a dose amount")],
    # --- times -----------------------------------------------------------------------
    "impossible_month": [(E, M, 3, "time", "'2019-13-01' is not a real calendar date (month must be 1-12)")],
    "impossible_day": [(E, M, 3, "time", "'2019-02-30' is not a real calendar date (day is out of range")],
    "bad_date_format": [(E, M, 3, "time", "'03/02/2019' is neither a day number nor a date")],
    "negative_time": [(E, M, 2, "time", "time is negative (day -7")],
    "unsorted_times": [(E, M, 4, "time", "not in time order: day 28 comes after day 56 (row 3)")],
    "mixed_dates_and_days": [(E, D, 2, "time", "times mix day numbers and dates: day 0 here, date 2019-01-15 in measurements.csv row 2")],
    "mixed_dates_within_dosing": [(E, D, 3, "time", "times mix day numbers and dates: day 28 here, date 2019-01-15 in row 2")],
    "phase_ends_before_start": [(E, "phases.csv", 3, "end", "the phase ends (day 60) before it starts (day 84)")],
    # --- rows ------------------------------------------------------------------------
    "duplicate_rows": [(E, M, 4, "time", "duplicate of row 3")],
    "conflicting_duplicate": [(E, M, 4, "value", "conflicts with row 3: two different values of psa at day 28")],
    "duplicate_dose": [(E, D, 3, "time", "duplicate of row 2: abiraterone given twice at day 0")],
    "missing_value": [(E, M, 3, "value", "the value is missing")],
    # --- columns and CSV syntax --------------------------------------------------------
    "missing_required_column": [(E, M, 1, "unit", "required column 'unit' is missing")],
    "misspelt_column": [
        (E, M, 1, "obervable", "unknown column 'obervable'. Did you mean 'observable'?"),
        (E, M, 1, "observable", "required column 'observable' is missing"),
    ],
    "duplicate_column": [(E, M, 1, "unit", "column 'unit' appears more than once")],
    "unnamed_column": [(E, M, 1, None, "column 5 has no name")],
    "non_numeric_value": [(E, M, 3, "value", "'high' is not a number")],
    "decimal_comma": [(E, M, 3, "value", "'8,1' is not a number")],
    "inf_nan": [(E, M, 2, "value", "'inf' is not a finite number"), (E, M, 3, "value", "'nan' is not a finite number")],
    "empty_measurements": [(E, M, None, None, "the file is empty")],
    "semicolon_csv": [(E, M, 1, None, "the columns are separated by ';', not commas")],
    "ragged_row": [(E, M, 3, None, "the row has 5 cells but the header has 4 columns")],
    "latin1_encoding": [(E, M, 3, None, "the file is not UTF-8 text (byte 0xb5 on line 3)")],
    # --- the header (patient.toml) -------------------------------------------------------
    "empty_patient_toml": [(E, T, None, "id", "the patient id is missing")],
    "no_patient_toml": [(E, "no_patient_toml/", None, None, "the folder has no patient.toml")],
    "invalid_toml": [(E, T, 1, None, "not valid TOML")],
    "bad_patient_id": [(E, T, None, "id", "the patient id 'P 001/Smith' contains characters that are not allowed (a space, '/')")],
    "unknown_covariate_key": [(E, T, None, "covariates.wieght", "unknown key 'wieght' in [covariates]. Did you mean 'weight'")],
    "bad_sex_value": [(E, T, None, "covariates.sex", "sex 'M' is not one of the allowed values")],
    "conflicting_covariates": [(E, T, None, "covariates.bsa", "covariates conflict: bsa = 1.2 m² but weight and height give 2.00 m²")],
    "height_in_metres": [(E, T, None, "covariates.height", "height = 1.8 cm is implausible for a human; did you give metres?")],
    "unsupported_format_version": [(E, T, None, "format_version", "format_version 2 is not supported")],
    # --- names -------------------------------------------------------------------------
    "unknown_drug": [(E, D, 2, "drug", "unknown drug 'docetaxl'. Did you mean 'docetaxel'")],
    "unknown_observable": [(E, M, 3, "observable", "unknown observable 'psaa'. Did you mean 'psa'?")],
    "unknown_route": [(E, D, 2, "route", "unknown route of administration 'infusion'")],
    # --- dosing ------------------------------------------------------------------------
    "mg_m2_without_size": [(E, D, 2, "unit", "a dose in mg/m2 needs the patient's body-surface area")],
    "mg_kg_without_weight": [(E, D, 2, "unit", "a dose in mg/kg needs the patient's weight")],
    "count_without_interval": [(E, D, 2, "interval", "count = 28 repeated administrations need the interval")],
    "negative_dose": [(E, D, 2, "amount", "a dose amount cannot be negative")],
    "bad_duration": [(E, D, 2, "duration", "cannot read the infusion duration 'one hour'")],
    "interval_without_count": [(W, D, 2, "count", "interval = 1 is given but count is 1")],
    # --- censoring ---------------------------------------------------------------------
    "censored_without_lloq": [(E, M, 3, "lloq", "flagged below the limit of quantification (below_lloq = true) but no lloq")],
    "censored_value_above_lloq": [(E, M, 3, "value", "the value 0.5 is flagged below the limit of quantification (below_lloq = true) but is above the lloq 0.1")],
    "value_below_lloq_not_flagged": [(W, M, 3, "below_lloq", "the value 0.05 is below the lloq 0.1 but is not flagged")],
    # --- omics -------------------------------------------------------------------------
    "vaf_as_percent": [(E, "omics/mutations.csv", 2, "vaf", "variant allele fraction 45 is above 1; it looks like a percentage")],
    "duplicate_copy_number_gene": [(E, "omics/copy_number.csv", 4, "gene", "duplicate copy number entry for AR (same as row 2)")],
    # --- bundle layout -------------------------------------------------------------------
    "unexpected_file_name": [(W, "dosage.csv", None, None, "file not part of the patient format; it is ignored. Did you mean 'dosing.csv'")],
    # the test links measurements.csv to a file outside the folder (see prepared_case)
    "symlink_escape": [(E, M, None, None, "the file points outside the patient folder (symbolic link)")],
    # --- several defects: every one is reported, also when the header is invalid ------------
    "several_defects": [
        (E, T, None, "id", "the patient id 'P 001' contains characters that are not allowed (a space)"),
        (E, T, None, "covariates.sex", "sex 'M' is not one of the allowed values"),
        (E, M, 3, "observable", "unknown observable 'psaa'"),
        (E, M, 4, "time", "'2019-13-01' is not a real calendar date"),
        (E, D, 2, "drug", "unknown drug 'docetaxl'"),
        (E, D, 3, "amount", "a dose amount cannot be negative"),
        (E, "omics/mutations.csv", 2, "vaf", "variant allele fraction 45 is above 1"),
    ],
    "invalid_toml_with_table_errors": [
        (E, T, 1, None, "not valid TOML"),
        (E, M, 3, "observable", "unknown observable 'psaa'. Did you mean 'psa'?"),
    ],
    "many_same_problem": [(E, M, r, "observable", "unknown observable 'psaa'") for r in range(2, 2 + MAX_SAME_KIND)]
    + [(E, M, None, "observable", f"{15 - MAX_SAME_KIND} more row(s) with the same problem as above (unknown observable 'psaa'")],
    # --- single JSON / YAML files ----------------------------------------------------------
    "invalid_json.json": [(E, "invalid_json.json", 3, None, "not valid JSON: Expecting property name enclosed in double quotes (line 3, column 28)")],
    "invalid_yaml.yaml": [(E, "invalid_yaml.yaml", 4, None, "not valid YAML: mapping values are not allowed here (line 4")],
    "empty_file.yaml": [(E, "empty_file.yaml", None, None, "the file is empty")],
    "wrong_extension.csv": [(E, "wrong_extension.csv", None, None, "not a patient file")],
    "unknown_top_level_key.json": [(E, "unknown_top_level_key.json", None, "measurments", "unknown top-level key 'measurments'. Did you mean 'measurements'?")],
    "json_table_not_a_list.json": [(E, "json_table_not_a_list.json › measurements", None, None, "'measurements' must be a list of records")],
    "json_top_level_list.json": [(E, "json_top_level_list.json", None, None, "the top level must be an object (mapping), not a list")],
    "json_duplicate_key.json": [(E, "json_duplicate_key.json", None, "weight", "key 'weight' appears twice in the same object")],
    "json_id_number.json": [(E, "json_id_number.json", None, "id", "the patient id 17 is a number, not text")],
    "json_unknown_omics_layer.json": [(E, "json_unknown_omics_layer.json", None, "omics.mutation", "unknown omics layer 'mutation'. Did you mean 'mutations'?")],
    "yaml_unknown_field.yaml": [(E, "yaml_unknown_field.yaml › measurements", 2, "valeu", "unknown field 'valeu'. Did you mean 'value'?")],
    "yaml_vaf_percent.yaml": [(E, "yaml_vaf_percent.yaml › omics.mutations", 1, "vaf", "variant allele fraction 45 is above 1")],
    "yaml_duplicate_key.yaml": [(E, "yaml_duplicate_key.yaml", 4, None, "the key 'age' appears twice")],
    "yaml_impossible_date.yaml": [(E, "yaml_impossible_date.yaml › measurements", 2, "time", "'2019-02-30' is not a real calendar date")],
    # checks across rows name the table inside the file, not a CSV file that does not exist
    "json_wrong_unit.json": [(E, "json_wrong_unit.json › measurements", 2, "unit", "unit 'mm3' is not a unit of psa")],
    "yaml_unsorted_doses.yaml": [(E, "yaml_unsorted_doses.yaml › dosing", 2, "time", "not in time order: day 0 comes after day 21 (row 1) for docetaxel")],
}

# Cases whose file is fine to load (warnings only): `twin validate` exits 0.
WARNING_ONLY = {case for case, items in EXPECTED.items() if all(sev == W for sev, *_ in items)}

# Substrings that betray raw library wording instead of a message written for people.
RAW_WORDING = ("Input should be", "String should match", "Extra inputs are not permitted", "Field required", "valid string", "Value error", "pydantic", "Traceback")


def _is_summary(problem) -> bool:
    return "more row(s) with the same problem" in problem.message


@pytest.fixture
def prepared_case(tmp_path):
    """Path of a corpus case, ready to read (the symlink case gets its link here)."""

    def prepare(case: str) -> Path:
        path = MALFORMED / case
        if case != "symlink_escape":
            return path
        bundle = tmp_path / "bundle"
        shutil.copytree(path, bundle)
        outside = tmp_path / "outside.csv"
        outside.write_text("time,observable,value,unit\n0,psa,1,ng/mL\n", encoding="utf-8")
        try:
            os.symlink(outside, bundle / "measurements.csv")
        except (OSError, NotImplementedError):  # pragma: no cover - e.g. Windows without privileges
            pytest.skip("symbolic links are not available here")
        return bundle

    return prepare


def test_corpus_is_complete():
    cases = {p.name for p in MALFORMED.iterdir() if p.name != "README.md"}
    assert len(cases) >= 35
    assert cases == set(EXPECTED), f"cases without expectations: {sorted(cases - set(EXPECTED))}; expectations without a case: {sorted(set(EXPECTED) - cases)}"
    single = [c for c in cases if (MALFORMED / c).is_file()]
    assert any(c.endswith(".json") for c in single) and any(c.endswith(".yaml") for c in single)


def test_corpus_has_no_committed_symlinks():
    assert not [p for p in MALFORMED.rglob("*") if p.is_symlink()]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_problem_is_located(case, prepared_case):
    problems = validate_patient(prepared_case(case))
    reported = [(p.severity, p.file, p.row, p.field, p.message) for p in problems if p.severity in (E, W)]
    remaining = list(reported)
    for sev, file, row, field, text in EXPECTED[case]:
        match = next((r for r in remaining if r[:4] == (sev, file, row, field) and text in r[4]), None)
        assert match is not None, f"{case}: no {sev} at {file} row {row} field {field} containing {text!r}; reported:\n" + "\n".join(map(str, reported))
        remaining.remove(match)
    assert not remaining, f"{case}: unexpected problems:\n" + "\n".join(map(str, remaining))


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_every_error_says_expected_received_and_fix(case, prepared_case):
    for p in validate_patient(prepared_case(case)):
        for text in (p.message, p.expected or "", p.received or "", p.fix or ""):
            assert not any(raw in text for raw in RAW_WORDING), f"{case}: raw wording in {p.format()}"
        if p.severity != E or _is_summary(p):
            continue
        assert p.fix, f"{case}: no fix in {p.format()}"
        assert p.expected, f"{case}: no expected in {p.format()}"
        assert p.received, f"{case}: no received in {p.format()}"


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_cli_validate_exit_code_and_no_traceback(case, prepared_case, capsys):
    rc = main(["validate", str(prepared_case(case))])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if case in WARNING_ONLY:
        assert rc == 0
        assert ": OK (0 error(s)" in out
    else:
        assert rc == 1
    assert ": INVALID (" in out or case in WARNING_ONLY
    for sev, file, row, field, text in EXPECTED[case]:
        location = file + (f" row {row}" if row is not None else "") + (f", field '{field}'" if field is not None else "")
        assert f"{sev}: {location}: " in out
        assert text in out


def test_load_patient_raises_with_every_problem():
    with pytest.raises(PatientFileError) as info:
        load_patient(MALFORMED / "several_defects")
    exc = info.value
    errors = [p for p in exc.problems if p.severity == E]
    assert len(errors) == len(EXPECTED["several_defects"])
    text = str(exc)
    assert "7 problem(s)" in text
    assert "dosing.csv row 2, field 'drug': unknown drug 'docetaxl'" in text
    assert "patient.toml, field 'id'" in text


def test_invalid_header_does_not_hide_table_problems():
    """The patient.toml errors used to stop the checks; every file is now checked in one run."""
    files = {p.file for p in validate_patient(MALFORMED / "several_defects").errors}
    assert files == {"patient.toml", "measurements.csv", "dosing.csv", "omics/mutations.csv"}
    files = {p.file for p in validate_patient(MALFORMED / "invalid_toml_with_table_errors").errors}
    assert files == {"patient.toml", "measurements.csv"}


def test_invalid_header_does_not_invent_dose_errors(good_bundle):
    """A dose in mg/m2 is not reported again when the covariates it needs are themselves wrong."""
    toml = good_bundle.files["patient.toml"].replace("height = 180", "height = 1.8")
    problems = validate_patient(good_bundle(files={"patient.toml": toml}))
    assert [(p.file, p.field) for p in problems.errors] == [("patient.toml", "covariates.height")]
    problems = validate_patient(good_bundle("bad_toml", files={"patient.toml": 'id = "P001\n'}))
    assert [p.file for p in problems.errors] == ["patient.toml"]


def test_repeated_problems_are_capped():
    problems = validate_patient(MALFORMED / "many_same_problem")
    located = [p for p in problems.errors if p.row is not None]
    assert len(located) == MAX_SAME_KIND
    summary = [p for p in problems.errors if _is_summary(p)]
    assert len(summary) == 1 and summary[0].message.startswith(f"{15 - MAX_SAME_KIND} more row(s)")
    assert "twin validate" in summary[0].fix


def test_messages_name_the_fix_for_common_mistakes():
    def first(case):
        return validate_patient(MALFORMED / case).errors[0]

    assert first("decimal_comma").fix == "use a decimal point, not a comma: 8.1"
    assert "0.45" in first("vaf_as_percent").fix
    assert 'height = "1.8 m" or 180' in first("height_in_metres").message
    assert "2019-02-03 if 03 is the day, 2019-03-02 if 03 is the month" in first("bad_date_format").fix
    assert "iconv" in first("latin1_encoding").fix
    assert "decimal comma" in first("ragged_row").fix
    assert "decimal point" in first("semicolon_csv").fix
    assert "Did you mean 'male'?" in first("bad_sex_value").fix
    assert 'id = "P_001_Smith"' in first("bad_patient_id").fix
    assert "iv" in first("unknown_route").fix and "duration" in first("unknown_route").fix
    assert "weight and height" in first("mg_m2_without_size").fix
    assert "set count to 1" in first("count_without_interval").fix
    assert "not closed" in first("invalid_toml").fix
    assert first("invalid_toml").received == 'id = "P001'


def test_cli_quiet_and_missing_path(capsys, tmp_path):
    rc = main(["validate", str(tmp_path / "nowhere")])
    out, err = capsys.readouterr()
    assert rc == 1 and "no such file or folder" in out and "Traceback" not in out + err


NASTY_VALUES = ["", " ", "x", "-1", "0", "1e400", "-inf", "<", "<x", "<-1", "2019-02-30", "31/12/2019", "NaN", "0,5", "1 h", "mg/m2", "µg/L", None, True, [1], {"a": 1}, 10**30]


@pytest.mark.parametrize("table", ["measurements", "dosing", "phases"])
def test_no_value_in_any_field_crashes_the_loader(table):
    """Every odd value in every field gives located problems, never an exception."""
    from twin.io import patient_from_document

    good = {
        "measurements": {"time": 0, "observable": "psa", "value": 1.5, "unit": "ng/mL", "lloq": 0.1, "below_lloq": False, "arm": "main", "note": "n"},
        "dosing": {"drug": "docetaxel", "time": 0, "amount": 75, "unit": "mg/m2", "route": "iv", "duration": "1 h", "interval": 21, "count": 3, "arm": "main"},
        "phases": {"cycle": 1, "phase": "on", "start": 0, "end": 84, "arm": "main"},
    }
    for field in good[table]:
        for value in NASTY_VALUES:
            record = dict(good[table], **{field: value})
            doc = {"id": "P1", "covariates": {"weight": 80, "height": 180}, table: [record]}
            patient, problems = patient_from_document(doc, label="doc")
            for p in problems.errors:
                assert p.fix and p.file.startswith("doc"), p.format()
                assert not any(raw in p.format() for raw in RAW_WORDING), p.format()
