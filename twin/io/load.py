"""Validate raw patient records and build a :class:`~twin.patient.Patient`.

Every problem is collected (not just the first) with file, row, field, expected,
received and fix. Every normalisation (unit conversion, dates to days, synonyms to
canonical drug names, computed body-surface area) is reported as a note.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, get_args, get_origin

import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError

from ..drugs import known_drug_names, lookup_drug
from ..errors import PatientFileError, Problem, ProblemList, close_matches
from ..observables import OBSERVABLES, Observable, canonical_observable
from ..patient import Cohort, Covariates, Omics, Patient
from ..regimen import Regimen
from ..units import UnitError, conversion_factor, is_readable_unit, normalise_unit_text, parse_quantity
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
_COVARIATE_EXAMPLES = {"age": "64 years", "weight": "160 lb", "height": "5.9 ft", "bsa": "1.9 m2"}


def _value_text(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, str):
        if not v.strip():
            return "an empty cell"
        return repr(v if len(v) <= 80 else v[:77] + "...")
    text = repr(v)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(v).__name__})"


def _unit_text(unit: str) -> str:
    if unit == "year":
        return "years"
    return unit.replace("**2", "²").replace("**3", "³")


class _Capped:
    """Adds problems to a list, summarising after MAX_SAME_KIND of one kind per file.

    Call :meth:`finish` once all problems are in: it writes how many were left out.
    """

    def __init__(self, problems: ProblemList):
        self.problems = problems
        self.counts: dict[tuple, int] = defaultdict(int)
        self.first: dict[tuple, Problem] = {}
        self.summary_at: dict[tuple, int] = {}

    def add(self, kind: str, severity: str, file: str, message: str, **kw):
        key = (file, kind)
        self.counts[key] += 1
        n = self.counts[key]
        if n <= MAX_SAME_KIND:
            self.problems.add(severity, file, message, **kw)
            if n == 1:
                self.first[key] = self.problems.items[-1]
        elif n == MAX_SAME_KIND + 1:
            self.summary_at[key] = len(self.problems.items)
            self.problems.add(severity, file, "more rows with the same problem", field=kw.get("field"))

    def finish(self) -> None:
        for key, index in self.summary_at.items():
            first = self.first[key]
            extra = self.counts[key] - MAX_SAME_KIND
            self.problems.items[index] = Problem(
                first.severity,
                first.file,
                f"{extra} more row(s) with the same problem as above ({first.message}) are not listed",
                field=first.field,
                fix="fix the rows above the same way, then run `twin validate` again",
            )
        self.summary_at.clear()


_TYPE_WORDS = {
    "float_parsing": "a number", "float_type": "a number",
    "int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
    "string_type": "text", "not_text": "text",
    "bool_parsing": "true/false", "bool_type": "true/false",
    "date_parsing": "a date YYYY-MM-DD", "date_type": "a date YYYY-MM-DD",
    "date_from_datetime_parsing": "a date YYYY-MM-DD", "date_from_datetime_inexact": "a date YYYY-MM-DD without a time of day",
    "datetime_parsing": "a date and time YYYY-MM-DDTHH:MM", "datetime_type": "a date and time YYYY-MM-DDTHH:MM",
    "dict_type": "a table of key = value pairs", "model_type": "a table of key = value pairs",
    "model_attributes_type": "a table of key = value pairs",
    "list_type": 'a list, e.g. ["AR", "PTEN"]', "none_required": "nothing",
}
_RANGE_WORDS = {"greater_than_equal": ("ge", "below the minimum"), "greater_than": ("gt", "not above"), "less_than_equal": ("le", "above the maximum"), "less_than": ("lt", "not below")}


def _walk(raw: Any, loc: list) -> tuple[int, Any]:
    """How many leading elements of ``loc`` exist in ``raw``, and the value found there."""
    cur = raw
    n = 0
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        else:
            break
        n += 1
    return n, cur


def _model_at(model: type[BaseModel] | None, loc: list) -> type[BaseModel] | None:
    """The record (sub-)model that holds the keys at ``loc`` (``dict[str, Model]`` levels skip the key)."""
    cur = model
    i = 0
    while i < len(loc):
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        f = cur.model_fields.get(loc[i]) or next((f for f in cur.model_fields.values() if f.alias == loc[i]), None)
        if f is None:
            return None
        ann = f.annotation
        if get_origin(ann) is dict:
            ann = get_args(ann)[1]
            i += 1
        cur = ann
        i += 1
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _keys_at(model: type[BaseModel] | None, loc: list) -> list[str] | None:
    """The allowed keys of the record (sub-)model at ``loc``, for 'did you mean'."""
    m = _model_at(model, loc)
    return None if m is None else [f.alias or n for n, f in m.model_fields.items()]


def _description(model: type[BaseModel] | None, loc: list) -> str | None:
    m = _model_at(model, loc[:-1]) if loc else None
    f = m.model_fields.get(loc[-1]) if m is not None else None
    return f.description if f is not None else None


def _pydantic_problems(exc: ValidationError, file: str, row: int | None, raw: dict, capped: _Capped, prefix: str = "", model: type[BaseModel] | None = None):
    """Translate pydantic's errors into located problems in plain words (one per field)."""
    groups: dict[tuple, list[tuple[dict, list]]] = {}
    for e in exc.errors():
        loc = list(e["loc"])
        if e["type"] != "missing":
            # drop the union-member tags pydantic appends ('float', 'str', ...)
            n, _ = _walk(raw, loc)
            loc = loc[:n] if n else loc[:1]
        if not loc and (e.get("ctx") or {}).get("field"):
            loc = [e["ctx"]["field"]]
        groups.setdefault(tuple(loc), []).append((e, loc))
    for key, errs in groups.items():
        e, loc = errs[0]
        kind = e["type"]
        ctx = e.get("ctx") or {}
        fieldname = (prefix + ".".join(str(x) for x in loc)) if loc else None
        leaf = str(loc[-1]) if loc else "value"
        found, value = _walk(raw, loc)
        inp = value if loc and found == len(loc) else e.get("input")
        received = _value_text(inp)
        expected = ctx.get("expected") if kind != "literal_error" else None
        fix = ctx.get("fix")
        msg = e["msg"]
        if len(errs) > 1:  # a union: one message listing every accepted form
            if len(loc) == 2 and loc[0] == "covariates" and leaf in _COVARIATE_UNITS:
                unit = _unit_text(_COVARIATE_UNITS[leaf])
                words = [f"a number in {unit}", f"a quantity with its unit, e.g. \"{_COVARIATE_EXAMPLES[leaf]}\""]
            else:
                words = []
                for ee, _ in errs:
                    w = (ee.get("ctx") or {}).get("expected") if ee["type"] != "literal_error" else None
                    w = w or _TYPE_WORDS.get(ee["type"]) or ee["msg"].replace("Input should be", "").strip()
                    if w not in words:
                        words.append(w)
                if "a number" in words and "a whole number" in words:
                    words.remove("a whole number")
            expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
            msg = f"{leaf} {received} is not a value of the expected kind"
            fix = fix or f"write {leaf} as " + expected
        elif kind in ("missing", "required_empty"):
            if key == ("id",):
                msg, expected, fix = "the patient id is missing", 'a pseudonymous id such as "P001"', 'add the id, e.g. id = "P001"'
            else:
                msg = f"{leaf} is missing"
                expected = _description(model, loc) or "a value"
                fix = f"fill in {leaf}" if row is not None else f"add {leaf}"
            received = "an empty cell" if kind == "required_empty" and isinstance(inp, str) else "nothing"
        elif kind == "extra_forbidden":
            keys = _keys_at(model, loc[:-1]) or []
            where = f" in [{'.'.join(str(x) for x in loc[:-1])}]" if len(loc) > 1 else ""
            msg = f"unknown key '{leaf}'{where}." + close_matches(leaf, keys)
            expected = "keys among " + ", ".join(keys) if keys else None
            fix = "rename the key to one of the expected names, or remove it"
        elif kind == "literal_error":
            allowed = re.findall(r"'([^']*)'", ctx.get("expected", ""))
            msg = f"{leaf} {received} is not one of the allowed values"
            expected = "one of " + ", ".join(allowed)
            hint = [a for a in allowed if isinstance(inp, str) and inp.strip() and a.lower().startswith(inp.strip().lower())]
            suggestion = f" Did you mean {hint[0]!r}?" if len(hint) == 1 else close_matches(str(inp), allowed)
            fix = "write one of " + ", ".join(repr(a) for a in allowed) + "." + suggestion
        elif kind in _RANGE_WORDS:
            bound_key, words = _RANGE_WORDS[kind]
            bound = ctx.get(bound_key)
            msg = f"{leaf} = {inp} is {words} {bound:g}" if isinstance(bound, (int, float)) else f"{leaf} is out of range"
            expected = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound_key] + f" {bound}"
            fix = "check the value and its unit"
            if leaf == "vaf" and kind == "less_than_equal":
                try:
                    pct = float(inp)
                    msg = f"variant allele fraction {pct:g} is above 1; it looks like a percentage"
                    expected = "a fraction between 0 and 1"
                    fix = f"write the VAF as a fraction: {pct / 100:g} (not {pct:g}%)"
                except (TypeError, ValueError):
                    pass
            elif leaf == "count":
                fix = "count is the number of administrations, at least 1"
        elif kind == "string_too_long":
            msg = f"{leaf} is longer than {ctx.get('max_length')} characters"
            expected = f"at most {ctx.get('max_length')} characters"
            fix = f"shorten {leaf}"
        elif kind in _TYPE_WORDS and not ctx.get("fix"):
            expected = _TYPE_WORDS[kind]
            msg = f"{leaf} should be {expected}"
            if kind.startswith("date") and ctx.get("error"):
                msg += f" ({ctx['error']})"
            fix = f"write {leaf} as {expected}"
        elif kind == "string_too_short":
            msg, expected, fix = f"{leaf} is empty", "a value", f"fill in {leaf}"
        elif not ctx.get("fix"):  # any other wording of the validation library
            expected = expected or msg.replace("Input should be", "").strip()
            msg = f"{leaf} {received} is not valid"
            fix = "check the value (docs/patient-format.md lists each field)"
        msg = msg[0].lower() + msg[1:] if msg and not msg[:2].isupper() else msg
        capped.add(kind + ":" + str(fieldname), "error", file, msg, row=row, field=fieldname, expected=expected, received=received, fix=fix)


def _validate_rows(table: RawTable, model, capped: _Capped) -> list[tuple[int, Any, dict]]:
    out = []
    for row, raw in table.rows:
        try:
            rec = model.model_validate(raw)
        except ValidationError as exc:
            _pydantic_problems(exc, table.file, row, raw, capped, model=model)
            continue
        out.append((row, rec, raw))
    return out


def _covariates(header: PatientHeader, file: str, problems: ProblemList, rejected: set[str]) -> Covariates:
    """Covariates in canonical units; names given but unusable are added to ``rejected``."""
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
            example = {"age": ("64", '"64 years"'), "weight": ("72", '"160 lb"'), "height": ("175", '"5 ft 9 in"'), "bsa": ("1.9", '"1.9 m2"')}[name]
            problems.error(
                file,
                f"cannot read covariate {name} {_value_text(raw)}",
                field=f"covariates.{name}",
                expected=f"a number in {_unit_text(unit)}, or a quantity with its unit such as {example[1]}",
                received=_value_text(raw),
                fix=f"write e.g. {name} = {example[0]} (in {_unit_text(unit)}) or {name} = {example[1]}",
            )
            values[name] = None
            rejected.add(name)
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
            if name == "age" and v > hi and species == "human" and v > 1800:
                hint = "; did you give the year of birth? write the age in years"
            problems.error(file, f"covariate {name} = {v:g} {_unit_text(unit)} is implausible for a {species}{hint}", field=f"covariates.{name}", expected=f"{lo:g}-{hi:g} {_unit_text(unit)} for a {species}", received=_value_text(raw), fix=f"check the value and its unit; a bare number is read in {_unit_text(unit)}, other units are written with the number, e.g. {name} = \"{raw} ...\"")
            values[name] = None
            rejected.add(name)
            continue
        values[name] = v
    w, h, bsa = values["weight"], values["height"], values["bsa"]
    if w is not None and h is not None:
        mosteller = math.sqrt(w * h / 3600.0)
        if bsa is None:
            values["bsa"] = mosteller
            problems.note(file, f"body-surface area computed from weight and height (Mosteller): {mosteller:.3f} m²", field="covariates.bsa")
        elif abs(bsa - mosteller) / mosteller > 0.15:
            rejected.add("bsa")
            problems.error(
                file,
                f"covariates conflict: bsa = {bsa:g} m² but weight and height give {mosteller:.2f} m² (Mosteller)",
                field="covariates.bsa",
                expected=f"bsa within 15% of {mosteller:.2f} m²",
                received=f"{bsa:g} m²",
                fix="correct weight, height or bsa (or drop bsa and let twin compute it)",
            )
    return Covariates(age=values["age"], sex=c.sex, weight=values["weight"], height=values["height"], bsa=values["bsa"], species=species)


def _times_to_days(recs_by_table: dict[str, list], header: PatientHeader, header_file: str, problems: ProblemList, files: dict[str, str] | None = None) -> tuple[str | None, bool]:
    """Convert date times to days in place (record.time, phase start/end).

    Returns the calendar date of day 0 (``None`` when unknown) and whether the file mixes
    dates and day numbers (an error; the dates are still converted so later checks run).
    """
    kinds = {"number": [], "date": []}
    for name, recs in recs_by_table.items():
        for row, rec, _ in recs:
            for attr in ("time", "start", "end"):
                if hasattr(rec, attr):
                    v = getattr(rec, attr)
                    kinds["date" if isinstance(v, (_dt.date, _dt.datetime)) else "number"].append(((files or {}).get(name, TABLES[name][1]), row, attr, v))
    origin = header.time_origin
    if not kinds["date"]:
        return (origin.isoformat() if origin is not None else None), False
    mixed = bool(kinds["number"])
    if mixed:
        f, row, attr, v = kinds["number"][0]
        f2, row2, _, v2 = kinds["date"][0]
        where = f"row {row2}" if f2 == f else f"{f2} row {row2}"
        problems.error(
            f,
            f"times mix day numbers and dates: day {v:g} here, date {v2.isoformat()} in {where}",
            row=row,
            field=attr,
            expected="either days as numbers everywhere, or dates YYYY-MM-DD everywhere (in every table of the patient)",
            received=f"{v:g}",
            fix="write all times of the patient in one form; with dates, set time_origin in patient.toml to choose day 0",
        )

    def as_dt(v):
        return v if isinstance(v, _dt.datetime) else _dt.datetime(v.year, v.month, v.day)

    if origin is None:
        origin = min(as_dt(v) for *_, v in kinds["date"]).date()
        if not mixed:
            problems.note(header_file, f"dates converted to days since {origin.isoformat()} (the earliest date); set time_origin to choose day 0", field="time_origin")
    elif not mixed:
        problems.note(header_file, f"dates converted to days since time_origin {origin.isoformat()}", field="time_origin")
    o = _dt.datetime(origin.year, origin.month, origin.day)
    for name, recs in recs_by_table.items():
        for row, rec, _ in recs:
            for attr in ("time", "start", "end"):
                if hasattr(rec, attr) and isinstance(getattr(rec, attr), (_dt.date, _dt.datetime)):
                    days = (as_dt(getattr(rec, attr)) - o).total_seconds() / 86400.0
                    object.__setattr__(rec, attr, days)
    return origin.isoformat(), mixed


_ORDER_KEYS = {
    # rows must be in time order within each of these groups
    "measurements": (lambda rec: (rec.arm, rec.observable.lower()), "arm and observable"),
    "dosing": (lambda rec: (rec.arm, rec.drug.lower()), "arm and drug"),
}


def _check_times(name: str, recs: list, capped: _Capped, file: str | None = None):
    file = file or TABLES[name][1]
    key, group = _ORDER_KEYS[name]
    last: dict[tuple, tuple[float, int]] = {}
    for row, rec, _ in recs:
        t = rec.time
        if t < 0:
            capped.add("negative_time", "error", file, f"time is negative (day {t:g}, before day 0)", row=row, field="time", expected="days >= 0 after the time origin", received=f"{t:g}", fix="count days from the first record (day 0), or use dates YYYY-MM-DD; with dates, time_origin must not be after the first date")
        k = key(rec)
        if k in last and t < last[k][0]:
            what = " / ".join(str(x) for x in (k[1:] if rec.arm == "main" else k))
            capped.add(
                "unsorted", "error", file,
                f"rows are not in time order: day {t:g} comes after day {last[k][0]:g} (row {last[k][1]}) for {what}",
                row=row, field="time", expected=f"rows sorted by time within each {group}", received=f"{t:g}",
                fix="sort the rows by time; if they are already meant to be in order, check both rows for a mistyped date",
            )
        if k not in last or t >= last[k][0]:
            last[k] = (t, row)


def _measurements(recs: list, header: PatientHeader, custom_obs: dict[str, Observable], capped: _Capped, problems: ProblemList, file: str | None = None) -> pd.DataFrame:
    file = file or TABLES["measurements"][1]
    rows = []
    conversions: dict[tuple, int] = defaultdict(int)
    relabels: dict[tuple, int] = defaultdict(int)
    aliases: dict[tuple, int] = defaultdict(int)
    censored_text = 0
    known = list(OBSERVABLES) + list(custom_obs)
    seen: dict[tuple, tuple[int, float | None]] = {}
    for row, rec, raw in recs:
        obs = canonical_observable(rec.observable, custom_obs)
        if obs is not None and rec.observable.strip().lower() != obs.name.lower():
            aliases[(rec.observable, obs.name)] += 1
        if obs is None:
            capped.add("unknown_observable", "error", file, f"unknown observable '{rec.observable}'." + close_matches(rec.observable, known), row=row, field="observable", expected="one of " + ", ".join(known), received=repr(rec.observable), fix="use a known observable name, or declare it in patient.toml: [observables.NAME] unit = \"...\"")
            continue
        try:
            factor = _snap(conversion_factor(rec.unit, obs.unit, molar_mass=obs.molar_mass))
        except UnitError:
            examples = _compatible_units(obs)
            if is_readable_unit(rec.unit):
                msg = f"unit '{rec.unit}' is not a unit of {obs.name} ({obs.description}): it cannot be converted to {_unit_text(obs.unit)}"
                fix = f"check the unit, and that this value is really {obs.name}"
            else:
                msg = f"unit '{rec.unit}' is not a unit twin can read." + close_matches(rec.unit, examples)
                fix = "check the spelling (e.g. ng/mL, ug/L, mm3, copies/mL; write µ as u)"
            capped.add("bad_unit:" + obs.name, "error", file, msg, row=row, field="unit", expected=f"a unit of {obs.name}: " + ", ".join(examples), received=repr(rec.unit), fix=fix)
            continue
        if _same_unit_text(rec.unit, obs.unit):
            pass
        elif factor != 1.0:
            conversions[(obs.name, rec.unit, obs.unit, factor)] += 1
        else:
            relabels[(obs.name, rec.unit, obs.unit)] += 1
        if isinstance(raw.get("value"), str) and raw["value"].strip().startswith("<"):
            censored_text += 1
        value = None if rec.value is None else rec.value * factor
        lloq = None if rec.lloq is None else rec.lloq * factor
        if rec.below_lloq and rec.value is not None and rec.value > rec.lloq:
            capped.add("censored_above", "error", file, f"the value {rec.value:g} is flagged below the limit of quantification (below_lloq = true) but is above the lloq {rec.lloq:g}", row=row, field="value", expected=f"a value <= lloq ({rec.lloq:g}), or an empty value", received=f"{rec.value:g}", fix="check the below_lloq flag, the value and the lloq: a quantified value has below_lloq = false")
            continue
        if not rec.below_lloq and rec.value is not None and rec.lloq is not None and rec.value < rec.lloq:
            capped.add("under_lloq_not_flagged", "warning", file, f"the value {rec.value:g} is below the lloq {rec.lloq:g} but is not flagged below_lloq; it is used as measured", row=row, field="below_lloq", expected=f"below_lloq = true for values under {rec.lloq:g}", received=f"{rec.value:g}", fix=f"if the assay reported it as not quantifiable, write '<{rec.lloq:g}' or set below_lloq = true")
        k = (rec.arm, rec.time, obs.name)
        if k in seen:
            prev_row, prev_val = seen[k]
            same = (prev_val == value) or (prev_val is None and value is None)
            capped.add("duplicate", "error", file, (f"duplicate of row {prev_row}: {obs.name} at day {rec.time:g} twice" if same else f"conflicts with row {prev_row}: two different values of {obs.name} at day {rec.time:g}"), row=row, field="time" if same else "value", expected=f"one {obs.name} value per time (and arm)", received=f"{_fmt(value)} (row {prev_row}: {_fmt(prev_val)})", fix="delete the duplicate row" if same else "keep the correct value; replicate measurements belong in separate arms or should be averaged before import")
            continue
        seen[k] = (row, value)
        rows.append({"arm": rec.arm, "time": rec.time, "observable": obs.name, "value": np.nan if value is None else value, "lloq": np.nan if lloq is None else lloq, "below_lloq": rec.below_lloq, "unit": obs.unit, "note": rec.note})
    for (name, src, dst, factor), n in sorted(conversions.items()):
        how = f" (molar mass {OBSERVABLES[name].molar_mass:g} g/mol)" if name in OBSERVABLES and OBSERVABLES[name].molar_mass and not _same_dimension(src, dst) else ""
        problems.note(file, f"{n} {name} value(s) converted from {src} to {_unit_text(dst)} (x {factor:.6g}){how}", field="unit")
    for (name, src, dst), n in sorted(relabels.items()):
        problems.note(file, f"{n} {name} value(s) in {src} read as {_unit_text(dst)} (the same quantity; values unchanged)", field="unit")
    for (src, dst), n in sorted(aliases.items()):
        problems.note(file, f"observable '{src}' read as '{dst}' ({n} row(s))", field="observable")
    if censored_text:
        problems.note(file, f"{censored_text} value(s) written as '<LLOQ' read as censored (below_lloq = true, lloq from the text)", field="value")
    cols = ["arm", "time", "observable", "value", "lloq", "below_lloq", "unit", "note"]
    return pd.DataFrame(rows, columns=cols)


def _fmt(v):
    return "censored" if v is None else f"{v:g}"


def _snap(factor: float) -> float:
    """Round a unit factor to 12 significant digits (pint gives 0.9999999999999999 for ug/L -> ng/mL)."""
    return float(f"{factor:.12g}")


@functools.lru_cache(maxsize=1024)
def _same_unit_text(a: str, b: str) -> bool:
    try:
        return normalise_unit_text(a).replace(" ", "") == normalise_unit_text(b).replace(" ", "")
    except Exception:  # pragma: no cover - defensive
        return False


def _same_dimension(a: str, b: str) -> bool:
    try:
        conversion_factor(a, b)
        return True
    except UnitError:
        return False


_UNIT_EXAMPLES = {
    "ng/mL": ["ng/mL", "ug/L", "ng/dL", "pg/mL", "mg/L"],
    "nmol/L": ["nmol/L", "pmol/L", "ng/dL", "ng/mL"],
    "mm**3": ["mm3", "cm3", "mL"],
    "mm": ["mm", "cm"],
    "copies/mL": ["copies/mL", "copies/uL"],
    "U/mL": ["U/mL", "kU/L", "IU/mL"],
    "U/L": ["U/L", "IU/L", "kU/L"],
    "kg": ["kg", "g", "lb"],
    "dimensionless": ["1", "%"],
}


def _compatible_units(obs: Observable) -> list[str]:
    return _UNIT_EXAMPLES.get(obs.unit, [_unit_text(obs.unit)])


class _NeedsCovariate(Exception):
    """A per-weight or per-surface dose without the covariate that resolves it."""


def _dosing(recs: list, header: PatientHeader, covariates: Covariates, capped: _Capped, problems: ProblemList, *, rejected: frozenset = frozenset(), header_known: bool = True, file: str | None = None) -> Regimen:
    """The dose history in mg. ``rejected`` names covariates given but unusable (their
    error is already reported, so doses depending on them are not reported again)."""
    file = file or TABLES["dosing"][1]
    declared = {k.lower(): k for k in header.drugs}
    synonyms_used: dict[tuple, int] = defaultdict(int)
    routes_used: dict[tuple, int] = defaultdict(int)
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
            unread = "" if header_known else " (the patient header could not be read, so drugs declared there are not known)"
            capped.add("unknown_drug", "error", file, f"unknown drug '{rec.drug}'{unread}." + close_matches(rec.drug, known_drug_names() + list(header.drugs)), row=row, field="drug", expected="a drug of twin's catalogue (twin.drugs.catalogue()) or one declared in patient.toml", received=repr(rec.drug), fix="correct the name, or declare a drug twin does not know in patient.toml: [drugs.NAME] targets = [\"GENE\"]")
            continue
        raw_route = str(raw.get("route", "")).strip()
        if raw_route.lower() != rec.route:
            routes_used[(raw_route, rec.route)] += 1
        amount = rec.amount
        if amount is None:
            unrecorded += 1
        else:
            unit = rec.unit.replace(" ", "")
            low = unit.lower().replace("²", "2")
            try:
                if low in ("mg/kg", "mpk"):
                    if covariates.weight is None:
                        raise _NeedsCovariate("weight")
                    amount = amount * covariates.weight
                    per_size[("mg/kg", f"x weight {covariates.weight:g} kg")] += 1
                elif low in ("mg/m2", "mg/m**2", "mg/m^2"):
                    if covariates.bsa is None:
                        raise _NeedsCovariate("bsa")
                    amount = amount * covariates.bsa
                    per_size[("mg/m²", f"x body-surface area {covariates.bsa:.3g} m²")] += 1
                else:
                    f = _snap(conversion_factor(unit, "mg"))
                    if f != 1.0:
                        per_size[(unit, f"x {f:g}")] += 1
                    amount = amount * f
            except _NeedsCovariate as exc:
                what = str(exc)
                if what in rejected or (what == "bsa" and rejected & {"weight", "height"}):
                    continue  # the covariate's own error is reported; the patient is invalid anyway
                if what == "weight":
                    capped.add("dose_needs_weight", "error", file, f"a dose in {rec.unit} needs the patient's weight, which patient.toml does not give", row=row, field="unit", expected="covariates.weight in patient.toml (kg)", received="no weight", fix="add weight under [covariates] in patient.toml (e.g. weight = 72), or give the dose in mg")
                else:
                    capped.add("dose_needs_bsa", "error", file, f"a dose in {rec.unit} needs the patient's body-surface area, and patient.toml gives neither bsa nor both weight and height", row=row, field="unit", expected="covariates.bsa (m²), or weight (kg) and height (cm) in patient.toml", received="no body-surface area", fix="add weight and height (twin computes the body-surface area) or bsa under [covariates], or give the dose in mg")
                continue
            except UnitError:
                capped.add("bad_dose_unit", "error", file, f"unit '{rec.unit}' is not a unit of a dose amount", row=row, field="unit", expected="mg, g, ug, mg/kg or mg/m2", received=repr(rec.unit), fix="give the amount of drug per administration in mass units (a volume needs the concentration: convert it to mg)")
                continue
        duration = 0.0
        if rec.duration is not None:
            try:
                duration = parse_quantity(rec.duration, "day")
            except UnitError:
                capped.add("bad_duration", "error", file, f"cannot read the infusion duration {_value_text(rec.duration)}", row=row, field="duration", expected="days as a number, or a time with its unit such as '1 h' or '30 min'", received=_value_text(rec.duration), fix="write the duration in days (e.g. 0.0417) or with a unit (e.g. 1 h); leave it empty for a bolus")
                continue
            if duration < 0:
                capped.add("bad_duration", "error", file, "the infusion duration is negative", row=row, field="duration", expected="duration >= 0", received=f"{duration:g} day(s)", fix="check the sign")
                continue
        k = (rec.arm, name, rec.time, rec.route)
        if k in seen:
            capped.add("duplicate_dose", "error", file, f"duplicate of row {seen[k]}: {name} given twice at day {rec.time:g} by the same route", row=row, field="time", expected="one row per administration (repeats via interval and count)", received=f"{name} at day {rec.time:g} (row {seen[k]}: the same)", fix="delete the duplicate, or put the total amount in one row")
            continue
        seen[k] = row
        if rec.count == 1 and rec.interval is not None:
            capped.add("interval_without_count", "warning", file, f"interval = {rec.interval:g} is given but count is 1, so {name} is given once", row=row, field="count", expected="count = the number of administrations when an interval is given", received="count 1" if raw.get("count") not in (None, "") else "no count", fix="fill in count (e.g. 28 for 28 daily doses), or leave interval empty for a single dose")
        out.append({"arm": rec.arm, "drug": name, "time": rec.time, "amount": amount, "route": rec.route, "duration": duration, "interval": rec.interval, "count": rec.count, "note": rec.note})
    for (src, dst), n in sorted(synonyms_used.items()):
        problems.note(file, f"drug name '{src}' read as catalogue name '{dst}' ({n} row(s))", field="drug")
    for (src, dst), n in sorted(routes_used.items()):
        problems.note(file, f"route '{src}' read as '{dst}' ({n} row(s))", field="route")
    for (unit, how), n in sorted(per_size.items()):
        problems.note(file, f"{n} dose(s) in {unit} converted to mg ({how})", field="unit")
    if unrecorded:
        problems.warning(file, f"{unrecorded} dosing row(s) have no amount (dose not recorded); exposure models will use the drug's standard dose", field="amount", fix="fill in amount and unit where they are known")
    return Regimen.from_records(out)


def _omics(recs_by_table: dict[str, list], capped: _Capped, files: dict[str, str] | None = None) -> Omics:
    frames = {}
    keys = {"mutations": ("gene", "protein_change", "sample"), "copy_number": ("gene", "sample"), "expression": ("gene", "scale", "sample"), "protein": ("protein", "scale", "sample")}
    for name, key in keys.items():
        recs = recs_by_table.get(name, [])
        file = (files or {}).get(name, TABLES[name][1])
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


def _prune(data: Any, loc: list) -> None:
    """Remove the deepest part of ``data`` named by ``loc`` (a key or the list holding an item)."""
    parent, key, cur = None, None, data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            parent, key, cur = cur, part, cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            break  # drop the whole list: its items may be indexed by other errors
        else:
            break
    if parent is not None:
        parent.pop(key, None)


def _header(data: Any, file: str, capped: _Capped) -> tuple[PatientHeader, set[str]]:
    """Validate the header; on errors report them and salvage what is valid.

    The table checks then run with the salvaged header, so one run lists the problems of
    every file. Returns the header and the names of covariates that could not be used.
    """
    try:
        return PatientHeader.model_validate(data), set()
    except ValidationError as exc:
        _pydantic_problems(exc, file, None, data, capped, model=PatientHeader)
        errors = exc.errors()
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    rejected: set[str] = set()
    for _ in range(8):
        for e in errors:
            loc = list(e["loc"])
            if loc[:1] == ["id"]:
                data["id"] = "unnamed"
                continue
            if loc[:1] == ["covariates"]:
                rejected.add(str(loc[1]) if len(loc) > 1 else "*")
            _prune(data, loc)
        try:
            header = PatientHeader.model_validate(data)
            break
        except ValidationError as exc:
            errors = exc.errors()
    else:
        header = PatientHeader(id="unnamed")
        rejected.add("*")
    if "*" in rejected:
        rejected |= {"age", "weight", "height", "bsa"}
    return header, rejected


def _build(raw: RawBundle, path) -> tuple[Patient | None, ProblemList]:
    problems = raw.problems
    capped = _Capped(problems)
    header_known = raw.header is not None
    if not header_known:
        if not problems.errors:
            problems.error(raw.header_file, "no patient header", expected='a header with at least id = "P001"', received="nothing", fix="add patient.toml")
        if not raw.tables:
            return None, problems
    header, rejected = _header(raw.header if header_known else {"id": "unnamed"}, raw.header_file, capped)
    if not header_known:
        rejected |= {"age", "weight", "height", "bsa"}
    recs = {name: _validate_rows(table, TABLES[name][0], capped) for name, table in raw.tables.items()}
    covariates = _covariates(header, raw.header_file, problems, rejected)
    # where each table's problems are reported: its CSV file, or "P.json › measurements"
    files = {name: table.file for name, table in raw.tables.items()}
    origin, mixed = _times_to_days(recs, header, raw.header_file, problems, files)
    custom_obs = {k.lower(): Observable(k, v.unit, v.description) for k, v in header.observables.items()}
    for k, v in custom_obs.items():
        if not is_readable_unit(v.unit):
            problems.error(raw.header_file, f"observable '{k}' declares a unit twin cannot read", field=f"observables.{k}.unit", received=repr(v.unit), expected="a unit such as ng/mL, U/mL or mm3", fix="write a standard unit (µ as u, powers as mm3)")
    if not mixed:
        for name in ("measurements", "dosing"):
            _check_times(name, recs.get(name, []), capped, files.get(name))
    measurements = _measurements(recs.get("measurements", []), header, custom_obs, capped, problems, files.get("measurements"))
    history = _dosing(recs.get("dosing", []), header, covariates, capped, problems, rejected=frozenset(rejected), header_known=header_known, file=files.get("dosing"))
    phases = pd.DataFrame([{"arm": r.arm, "cycle": r.cycle, "phase": r.phase, "start": r.start, "end": r.end} for _, r, _ in recs.get("phases", [])], columns=["arm", "cycle", "phase", "start", "end"])
    for row, r, _ in recs.get("phases", []):
        if r.end < r.start:
            problems.error(files.get("phases", TABLES["phases"][1]), f"the phase ends (day {r.end:g}) before it starts (day {r.start:g})", row=row, field="end", expected=f"end >= start ({r.start:g})", received=f"{r.end:g}", fix="swap or correct start and end")
    omics = _omics(recs, capped, files)
    if "measurements" not in raw.tables or not len(measurements):
        if not problems.errors:
            problems.warning(raw.header_file, "the patient has no measurements; it can be simulated but not calibrated", fix="add measurements.csv")
    capped.finish()
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
    first_file: dict[str, str] = {}
    for e in entries:
        p, probs = read_patient(e)
        where = e.name + "/" if e.is_dir() else ""
        if p is None:
            all_problems.extend(dataclasses.replace(x, file=f"{where}{x.file}") for x in probs.errors)
            continue
        label = f"{where}patient.toml" if e.is_dir() else e.name
        if p.id in first_file:
            all_problems.append(
                Problem(
                    "error",
                    label,
                    f"patient id '{p.id}' is already used by {first_file[p.id]}",
                    field="id",
                    expected="a different id for every patient of the cohort",
                    received=repr(p.id),
                    fix="give each patient its own id (or remove the duplicate file)",
                )
            )
            continue
        first_file[p.id] = label
        patients.append(p)
    if all_problems:
        raise PatientFileError(str(root), all_problems)
    return Cohort(tuple(patients), name=name or root.name, source={"path": str(root)})
