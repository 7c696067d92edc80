"""Validate raw patient records and build a :class:`~twin.patient.Patient`.

Every problem is collected (not just the first) with file, row, field, expected,
received and fix. Every normalisation (unit conversion, dates to days, synonyms to
canonical drug names, computed body-surface area) is reported as a note.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from ..drugs import known_drug_names, lookup_drug
from ..errors import PatientFileError, ProblemList, close_matches
from ..observables import OBSERVABLES, Observable, canonical_observable
from ..patient import Cohort, Covariates, Omics, Patient
from ..regimen import Regimen
from ..units import UnitError, conversion_factor, parse_quantity
from .bundle import RawBundle, RawTable, read_bundle, read_document
from .records import TABLES, PatientHeader

__all__ = ["read_patient", "load_patient", "validate_patient", "load_cohort", "patient_from_document"]

MAX_SAME_KIND = 10  # more problems of one kind in one file are summarised in one line

_PLAUSIBLE = {
    # species: covariate -> (low, high) in canonical units
    "human": {"age": (0, 120), "weight": (2, 400), "height": (40, 250), "bsa": (0.1, 3.5)},
    "mouse": {"age": (0, 4), "weight": (0.005, 0.1), "height": (1, 15), "bsa": (0.002, 0.02)},
    "rat": {"age": (0, 5), "weight": (0.02, 1.2), "height": (5, 40), "bsa": (0.01, 0.1)},
}
_COVARIATE_UNITS = {"age": "year", "weight": "kg", "height": "cm", "bsa": "m**2"}


def _value_text(v: Any) -> str:
    if isinstance(v, str):
        return repr(v) if v.strip() else "an empty cell"
    return f"{v!r} ({type(v).__name__})"


class _Capped:
    """Adds problems to a list, summarising after MAX_SAME_KIND of one kind per file."""

    def __init__(self, problems: ProblemList):
        self.problems = problems
        self.counts: dict[tuple, int] = defaultdict(int)

    def add(self, kind: str, severity: str, file: str, message: str, **kw):
        key = (file, kind)
        self.counts[key] += 1
        n = self.counts[key]
        if n <= MAX_SAME_KIND:
            self.problems.add(severity, file, message, **kw)
        elif n == MAX_SAME_KIND + 1:
            self.problems.add(severity, file, f"more rows with the same problem ({kind}); fix the ones above and run `twin validate` again")


def _pydantic_problems(exc: ValidationError, file: str, row: int | None, raw: dict, capped: _Capped, prefix: str = ""):
    for e in exc.errors():
        loc = [str(x) for x in e["loc"]]
        fieldname = prefix + ".".join(loc) if loc else None
        ctx = e.get("ctx") or {}
        kind = e["type"]
        if kind == "missing":
            received = "nothing (field absent)"
            expected = "a value"
            fix = f"fill in '{fieldname}'"
        else:
            inp = e.get("input")
            received = _value_text(inp)
            expected = ctx.get("expected")
            fix = ctx.get("fix")
            if expected is None:
                expected = e["msg"].replace("Input should be", "").strip() or None
                if kind == "literal_error":
                    fix = "use one of the listed values"
                elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
                    fix = "check the value; see docs/patient-format.md for the field's range"
                    if fieldname and fieldname.endswith("vaf") and isinstance(inp, (int, float, str)):
                        fix = "write the variant allele fraction as 0-1 (e.g. 0.45, not 45%)"
        msg = "field is missing" if kind == "missing" else e["msg"].split(",")[0].strip()
        capped.add(kind + ":" + str(fieldname), "error", file, msg[0].lower() + msg[1:] if msg else msg, row=row, field=fieldname, expected=expected, received=received, fix=fix)


def _validate_rows(table: RawTable, model, capped: _Capped) -> list[tuple[int, Any, dict]]:
    out = []
    for row, raw in table.rows:
        try:
            rec = model.model_validate(raw)
        except ValidationError as exc:
            _pydantic_problems(exc, table.file, row, raw, capped)
            continue
        out.append((row, rec, raw))
    return out


def _covariates(header: PatientHeader, file: str, problems: ProblemList) -> Covariates:
    c = header.covariates
    species = c.species
    values: dict[str, float | None] = {}
    for name, unit in _COVARIATE_UNITS.items():
        raw = getattr(c, name)
        if raw is None:
            values[name] = None
            continue
        try:
            v = parse_quantity(raw, unit)
        except UnitError as exc:
            problems.error(file, f"cannot read covariate {name}: {exc}", field=f"covariates.{name}", expected=f"a number in {unit.replace('**2', '²')} or a quantity such as '72 kg'", received=_value_text(raw), fix=f"write e.g. {name} = 72 (in {unit.replace('**2', '²')}) or {name} = \"160 lb\"")
            values[name] = None
            continue
        if isinstance(raw, str):
            problems.note(file, f"covariate {name} '{raw}' converted to {v:.4g} {unit.replace('**2', '²')}", field=f"covariates.{name}")
        lo, hi = _PLAUSIBLE[species][name]
        if not lo <= v <= hi:
            hint = ""
            if name == "height" and v < lo and v * 100 >= lo:
                hint = f"; did you give metres? write height = \"{raw} m\" or {v * 100:g}"
            if name == "weight" and v > hi and species != "human":
                hint = f"; did you give grams? write weight = \"{raw} g\""
            problems.error(file, f"covariate {name} = {v:g} {unit.replace('**2', '²')} is implausible for a {species}{hint}", field=f"covariates.{name}", expected=f"{lo:g}-{hi:g} {unit.replace('**2', '²')}", received=_value_text(raw), fix="check the value and its unit")
            values[name] = None
            continue
        values[name] = v
    w, h, bsa = values["weight"], values["height"], values["bsa"]
    if w is not None and h is not None:
        mosteller = math.sqrt(w * h / 3600.0)
        if bsa is None:
            values["bsa"] = mosteller
            problems.note(file, f"body-surface area computed from weight and height (Mosteller): {mosteller:.3f} m²", field="covariates.bsa")
        elif abs(bsa - mosteller) / mosteller > 0.15:
            problems.error(
                file,
                f"covariates conflict: bsa = {bsa:g} m² but weight and height give {mosteller:.2f} m² (Mosteller)",
                field="covariates.bsa",
                expected=f"bsa within 15% of {mosteller:.2f} m²",
                received=f"{bsa:g} m²",
                fix="correct weight, height or bsa (or drop bsa and let twin compute it)",
            )
    return Covariates(age=values["age"], sex=c.sex, weight=values["weight"], height=values["height"], bsa=values["bsa"], species=species)


def _times_to_days(recs_by_table: dict[str, list], header: PatientHeader, header_file: str, problems: ProblemList) -> str | None:
    """Convert date times to days in place (record.time, phase start/end); return the origin used."""
    kinds = {"number": [], "date": []}
    for name, recs in recs_by_table.items():
        for row, rec, _ in recs:
            for attr in ("time", "start", "end"):
                if hasattr(rec, attr):
                    v = getattr(rec, attr)
                    kinds["date" if isinstance(v, (_dt.date, _dt.datetime)) else "number"].append((TABLES[name][1], row, attr, v))
    if kinds["date"] and kinds["number"]:
        f, row, attr, v = kinds["number"][0]
        f2, row2, _, v2 = kinds["date"][0]
        problems.error(f, f"times mix day numbers and dates (e.g. {v!r} here, {str(v2)!r} in {f2} row {row2})", row=row, field=attr, expected="either days as numbers everywhere, or ISO dates everywhere", received=f"{v!r}", fix="write all times of the patient in one form")
        return None
    if not kinds["date"]:
        return None

    def as_dt(v):
        return v if isinstance(v, _dt.datetime) else _dt.datetime(v.year, v.month, v.day)

    origin = header.time_origin
    if origin is None:
        origin = min(as_dt(v) for *_, v in kinds["date"]).date()
        problems.note(header_file, f"dates converted to days since {origin.isoformat()} (the earliest date); set time_origin to choose day 0", field="time_origin")
    else:
        problems.note(header_file, f"dates converted to days since time_origin {origin.isoformat()}", field="time_origin")
    o = _dt.datetime(origin.year, origin.month, origin.day)
    for name, recs in recs_by_table.items():
        for row, rec, _ in recs:
            for attr in ("time", "start", "end"):
                if hasattr(rec, attr) and isinstance(getattr(rec, attr), (_dt.date, _dt.datetime)):
                    days = (as_dt(getattr(rec, attr)) - o).total_seconds() / 86400.0
                    object.__setattr__(rec, attr, days)
    return origin.isoformat()


def _check_times(name: str, recs: list, capped: _Capped, *, key=lambda rec: (rec.arm,)):
    file = TABLES[name][1]
    last: dict[tuple, tuple[float, int]] = {}
    for row, rec, _ in recs:
        t = rec.time
        if t < 0:
            capped.add("negative_time", "error", file, "time is negative", row=row, field="time", expected="days >= 0 after the time origin", received=f"{t:g}", fix="shift the time origin (day 0) to the first record, or use ISO dates")
        k = key(rec)
        if k in last and t < last[k][0]:
            capped.add("unsorted", "error", file, f"rows are not in time order: day {t:g} comes after day {last[k][0]:g} (row {last[k][1]})" + (f" in arm '{rec.arm}'" if rec.arm != "main" else ""), row=row, field="time", expected="rows sorted by time within each arm", received=f"{t:g}", fix="sort the table by arm, then time; check for a mistyped date")
        last[k] = (max(t, last.get(k, (t, row))[0]), row)


def _measurements(recs: list, header: PatientHeader, custom_obs: dict[str, Observable], capped: _Capped, problems: ProblemList) -> pd.DataFrame:
    file = TABLES["measurements"][1]
    rows = []
    conversions: dict[tuple, int] = defaultdict(int)
    censored_text = 0
    known = list(OBSERVABLES) + list(custom_obs)
    seen: dict[tuple, tuple[int, float | None]] = {}
    for row, rec, raw in recs:
        obs = canonical_observable(rec.observable, custom_obs)
        if obs is None:
            capped.add("unknown_observable", "error", file, f"unknown observable '{rec.observable}'." + close_matches(rec.observable, known), row=row, field="observable", expected="one of " + ", ".join(known), received=repr(rec.observable), fix="use a known observable name, or declare it in patient.toml: [observables.NAME] unit = \"...\"")
            continue
        try:
            factor = conversion_factor(rec.unit, obs.unit, molar_mass=obs.molar_mass)
        except UnitError:
            capped.add("bad_unit:" + obs.name, "error", file, f"unit '{rec.unit}' is not a unit of {obs.name} ({obs.description})", row=row, field="unit", expected=f"{obs.unit.replace('**3', '³')} or a compatible unit", received=repr(rec.unit), fix=f"check the unit; {obs.name} is stored in {obs.unit.replace('**3', '³')}")
            continue
        if factor != 1.0 or rec.unit != obs.unit:
            if rec.unit.replace(" ", "") != obs.unit.replace("**", "") and factor != 1.0:
                conversions[(obs.name, rec.unit, obs.unit, factor)] += 1
        if isinstance(raw.get("value"), str) and raw["value"].strip().startswith("<"):
            censored_text += 1
        value = None if rec.value is None else rec.value * factor
        lloq = None if rec.lloq is None else rec.lloq * factor
        if rec.below_lloq and rec.value is not None and rec.value > rec.lloq:
            capped.add("censored_above", "error", file, "below_lloq is true but the value is above the lloq", row=row, field="value", expected=f"a value <= lloq ({rec.lloq:g}) or empty", received=f"{rec.value:g}", fix="check the censoring flag or the lloq")
            continue
        k = (rec.arm, rec.time, obs.name)
        if k in seen:
            prev_row, prev_val = seen[k]
            same = (prev_val == value) or (prev_val is None and value is None)
            capped.add("duplicate", "error", file, (f"duplicate of row {prev_row}" if same else f"conflicts with row {prev_row}: two values of {obs.name} at day {rec.time:g}"), row=row, expected=f"one {obs.name} value per time (and arm)", received=f"{_fmt(value)} (row {prev_row}: {_fmt(prev_val)})", fix="delete the duplicate row" if same else "keep the correct value; replicate measurements belong in separate arms or should be averaged before import")
            continue
        seen[k] = (row, value)
        rows.append({"arm": rec.arm, "time": rec.time, "observable": obs.name, "value": np.nan if value is None else value, "lloq": np.nan if lloq is None else lloq, "below_lloq": rec.below_lloq, "unit": obs.unit, "note": rec.note})
    for (name, src, dst, factor), n in sorted(conversions.items()):
        problems.note(file, f"{n} {name} value(s) converted from {src} to {dst.replace('**3', '³')} (x {factor:.6g})", field="unit")
    if censored_text:
        problems.note(file, f"{censored_text} value(s) written as '<LLOQ' read as censored (below_lloq = true, lloq from the text)", field="value")
    cols = ["arm", "time", "observable", "value", "lloq", "below_lloq", "unit", "note"]
    return pd.DataFrame(rows, columns=cols)


def _fmt(v):
    return "censored" if v is None else f"{v:g}"


def _dosing(recs: list, header: PatientHeader, covariates: Covariates, capped: _Capped, problems: ProblemList) -> Regimen:
    file = TABLES["dosing"][1]
    declared = {k.lower(): k for k in header.drugs}
    synonyms_used: dict[tuple, int] = defaultdict(int)
    per_size: dict[tuple, int] = defaultdict(int)
    unrecorded = 0
    out = []
    seen: dict[tuple, int] = {}
    for row, rec, raw in recs:
        drug = lookup_drug(rec.drug)
        if drug is not None:
            name = drug.name
            if rec.drug != name:
                synonyms_used[(rec.drug, name)] += 1
        elif rec.drug.lower() in declared:
            name = declared[rec.drug.lower()]
        else:
            capped.add("unknown_drug", "error", file, f"unknown drug '{rec.drug}'." + close_matches(rec.drug, known_drug_names() + list(header.drugs)), row=row, field="drug", expected="a drug of twin's catalogue (twin.drugs.catalogue()) or one declared in patient.toml", received=repr(rec.drug), fix="correct the name, or declare it: [drugs.NAME] targets = [\"GENE\"]")
            continue
        amount = rec.amount
        if amount is None:
            unrecorded += 1
        else:
            unit = rec.unit.replace(" ", "")
            low = unit.lower().replace("²", "2")
            try:
                if low in ("mg/kg", "mpk"):
                    if covariates.weight is None:
                        raise ValueError("weight")
                    amount = amount * covariates.weight
                    per_size[("mg/kg", "weight")] += 1
                elif low in ("mg/m2", "mg/m**2", "mg/m^2"):
                    if covariates.bsa is None:
                        raise ValueError("bsa")
                    amount = amount * covariates.bsa
                    per_size[("mg/m²", "body-surface area")] += 1
                else:
                    f = conversion_factor(unit, "mg")
                    if f != 1.0:
                        per_size[(unit, f"x {f:g}")] += 1
                    amount = amount * f
            except ValueError as exc:
                what = str(exc)
                capped.add("dose_needs_" + what, "error", file, f"a dose in {rec.unit} needs the patient's {'weight' if what == 'weight' else 'body-surface area (or weight and height)'}", row=row, field="unit", expected=f"covariates.{what} in patient.toml", received="no " + what, fix=f"add covariates.{what}" + (" (or weight and height)" if what == "bsa" else "") + ", or give the dose in mg")
                continue
            except UnitError:
                capped.add("bad_dose_unit", "error", file, f"unit '{rec.unit}' is not a dose unit", row=row, field="unit", expected="mg, g, ug, mg/kg or mg/m2", received=repr(rec.unit), fix="give the amount of drug per administration in mass units")
                continue
        duration = 0.0
        if rec.duration is not None:
            try:
                duration = parse_quantity(rec.duration, "day")
            except UnitError:
                capped.add("bad_duration", "error", file, "cannot read the infusion duration", row=row, field="duration", expected="days as a number, or a time such as '1 h' or '30 min'", received=_value_text(rec.duration), fix="write the duration in days or with a unit")
                continue
            if duration < 0:
                capped.add("bad_duration", "error", file, "duration is negative", row=row, field="duration", expected="duration >= 0", received=f"{duration:g}", fix="check the sign")
                continue
        k = (rec.arm, name, rec.time, rec.route)
        if k in seen:
            capped.add("duplicate_dose", "error", file, f"duplicate of row {seen[k]}: {name} given twice at day {rec.time:g} by the same route", row=row, expected="one row per administration (repeats via interval and count)", fix="delete the duplicate, or put the total amount in one row")
            continue
        seen[k] = row
        out.append({"arm": rec.arm, "drug": name, "time": rec.time, "amount": amount, "route": rec.route, "duration": duration, "interval": rec.interval, "count": rec.count})
    for (src, dst), n in sorted(synonyms_used.items()):
        problems.note(file, f"drug name '{src}' read as catalogue name '{dst}' ({n} row(s))", field="drug")
    for (unit, how), n in sorted(per_size.items()):
        problems.note(file, f"{n} dose(s) in {unit} converted to mg ({how})", field="unit")
    if unrecorded:
        problems.warning(file, f"{unrecorded} dosing row(s) have no amount (dose not recorded); exposure models will use the drug's standard dose", field="amount", fix="fill in amount and unit where they are known")
    return Regimen.from_records(out)


def _omics(recs_by_table: dict[str, list], capped: _Capped) -> Omics:
    frames = {}
    keys = {"mutations": ("gene", "protein_change", "sample"), "copy_number": ("gene", "sample"), "expression": ("gene", "scale", "sample"), "protein": ("protein", "scale", "sample")}
    for name, key in keys.items():
        recs = recs_by_table.get(name, [])
        file = TABLES[name][1]
        seen = {}
        rows = []
        for row, rec, _ in recs:
            k = tuple(getattr(rec, f) for f in key)
            if k in seen:
                capped.add("duplicate_" + name, "error", file, f"duplicate {name.replace('_', ' ')} entry for {k[0]} (same as row {seen[k]})", row=row, field=key[0], expected=f"one row per {' + '.join(key)}", received=str(k[0]), fix="keep one row; conflicting calls must be resolved before import")
                continue
            seen[k] = row
            rows.append(rec.model_dump())
        frames[name] = pd.DataFrame(rows, columns=list(TABLES[name][0].model_fields))
    return Omics(**frames)


def read_patient(path: str | Path) -> tuple[Patient | None, ProblemList]:
    """Read and check a patient file; return the patient (``None`` on errors) and every problem."""
    return _build(read_bundle(path), path)


def patient_from_document(doc: dict, label: str = "document") -> tuple[Patient | None, ProblemList]:
    """Check an in-memory patient document (the single-file JSON layout) and build the patient.

    Importers (NONMEM, cBioPortal) and dataset converters use this so that every patient,
    wherever it comes from, passes the same checks.
    """
    return _build(read_document(doc, label), label)


def _build(raw: RawBundle, path) -> tuple[Patient | None, ProblemList]:
    problems = raw.problems
    capped = _Capped(problems)
    if raw.header is None:
        if not problems.errors:
            problems.error(raw.header_file, "no patient header", fix="add patient.toml")
        return None, problems
    try:
        header = PatientHeader.model_validate(raw.header)
    except ValidationError as exc:
        _pydantic_problems(exc, raw.header_file, None, raw.header, capped)
        return None, problems
    recs = {name: _validate_rows(table, TABLES[name][0], capped) for name, table in raw.tables.items()}
    covariates = _covariates(header, raw.header_file, problems)
    origin = _times_to_days(recs, header, raw.header_file, problems)
    custom_obs = {k.lower(): Observable(k, v.unit, v.description) for k, v in header.observables.items()}
    for k, v in custom_obs.items():
        try:
            conversion_factor(v.unit, v.unit)
        except UnitError:
            problems.error(raw.header_file, f"observable '{k}' declares an unreadable unit", field=f"observables.{k}.unit", received=repr(v.unit), expected="a unit such as ng/mL", fix="write a standard unit")
    if origin is not None or not any(p.field in ("time", "start", "end") and p.severity == "error" for p in problems):
        for name in ("measurements", "dosing"):
            _check_times(name, recs.get(name, []), capped)
    measurements = _measurements(recs.get("measurements", []), header, custom_obs, capped, problems)
    history = _dosing(recs.get("dosing", []), header, covariates, capped, problems)
    phases = pd.DataFrame([{"arm": r.arm, "cycle": r.cycle, "phase": r.phase, "start": r.start, "end": r.end} for _, r, _ in recs.get("phases", [])], columns=["arm", "cycle", "phase", "start", "end"])
    for row, r, _ in recs.get("phases", []):
        if isinstance(r.start, float) and isinstance(r.end, float) and r.end < r.start:
            problems.error(TABLES["phases"][1], "phase ends before it starts", row=row, field="end", expected=f"end >= start ({r.start:g})", received=f"{r.end:g}", fix="swap or correct start and end")
    omics = _omics(recs, capped)
    if "measurements" not in raw.tables or not len(measurements):
        if not problems.errors:
            problems.warning(raw.header_file, "the patient has no measurements; it can be simulated but not calibrated", fix="add measurements.csv")
    if problems.errors:
        return None, problems
    source = {"path": str(Path(path)), "format": raw.kind, "sha256": dict(raw.hashes), **header.source}
    patient = Patient(
        id=header.id,
        covariates=covariates,
        omics=omics,
        measurements=measurements,
        history=history,
        phases=phases,
        labels=dict(header.labels),
        drugs={k: v.model_dump(by_alias=True) for k, v in header.drugs.items()},
        observables={k: v.model_dump() for k, v in header.observables.items()},
        time_origin=origin,
        source=source,
        notes=tuple(problems),
    )
    return patient, problems


def load_patient(path: str | Path) -> Patient:
    """Load a patient file (folder with ``patient.toml`` or a ``.json``/``.yaml`` file).

    Raises
    ------
    PatientFileError
        listing every problem (file, row, field, expected, received, fix).
    """
    patient, problems = read_patient(path)
    if patient is None:
        raise PatientFileError(str(path), problems)
    return patient


def validate_patient(path: str | Path) -> ProblemList:
    """Every problem, warning and normalisation note of a patient file."""
    return read_patient(path)[1]


def load_cohort(path: str | Path, *, name: str | None = None) -> Cohort:
    """Load every patient bundle in a folder (sub-folders with patient.toml, and .json/.yaml files).

    All files are checked; a :class:`PatientFileError` lists the problems of every bad file.
    """
    root = Path(path)
    if not root.is_dir():
        from ..errors import InputError

        raise InputError(f"{root}: expected a folder of patient bundles, received {'a file' if root.exists() else 'a path that does not exist'}; fix: point to the cohort folder")
    entries = sorted(p for p in root.iterdir() if (p.is_dir() and (p / "patient.toml").exists()) or p.suffix.lower() in (".json", ".yaml", ".yml"))
    patients, all_problems = [], []
    for e in entries:
        p, probs = read_patient(e)
        if p is None:
            all_problems.extend(
                type(x)(x.severity, f"{e.name}/{x.file}" if e.is_dir() else x.file, x.message, x.row, x.field, x.expected, x.received, x.fix) for x in probs.errors
            )
        else:
            patients.append(p)
    if all_problems:
        raise PatientFileError(str(root), all_problems)
    return Cohort(tuple(patients), name=name or root.name, source={"path": str(root)})
