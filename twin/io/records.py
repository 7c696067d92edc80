"""The records of a patient file, as pydantic models: one definition serves validation
and the published JSON Schema (``twin/schema/patient.schema.json``).

Tables (measurements, dosing, omics layers) are lists of records; in a bundle folder
each is a CSV file with one column per field. Field-level checks live here; checks that
need several rows or the covariates (sorting, duplicates, units, names) live in
:mod:`twin.io.load`.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..errors import close_matches

__all__ = [
    "FORMAT_VERSION",
    "ROUTES",
    "MeasurementRecord",
    "DoseRecord",
    "MutationRecord",
    "CopyNumberRecord",
    "ExpressionRecord",
    "ProteinRecord",
    "PhaseRecord",
    "Covariates",
    "PatientHeader",
    "PatientDocument",
    "TABLES",
    "OMICS_LAYERS",
]

FORMAT_VERSION = 1
ROUTES = ("oral", "iv", "sc", "im", "ip")
_ROUTE_ALIASES = {
    "po": "oral", "per os": "oral", "by mouth": "oral", "intravenous": "iv", "i.v.": "iv",
    "subcutaneous": "sc", "s.c.": "sc", "subq": "sc", "intramuscular": "im", "i.m.": "im",
    "intraperitoneal": "ip", "i.p.": "ip",
}


def _err(kind: str, message: str, expected: str, fix: str, field: str | None = None) -> PydanticCustomError:
    """A validation error that carries what was expected and how to fix it.

    ``field`` locates errors raised by a whole-record check (which pydantic reports
    without a field) on the column that is wrong.
    """
    ctx = {"expected": expected, "fix": fix}
    if field is not None:
        ctx["field"] = field
    # pydantic formats {name} placeholders of the message from ctx: escape user text.
    return PydanticCustomError(kind, message.replace("{", "(").replace("}", ")"), ctx)


def _short(v: Any, n: int = 40) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _blank_to_none(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, str) and v.strip() == "":
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _number(v: Any) -> Any:
    v = _blank_to_none(v)
    if v is None or isinstance(v, bool):
        if isinstance(v, bool):
            raise _err("not_a_number", f"{v} is not a number", "a number such as 12.5", "write a plain number (decimal point '.', no units or text)")
        return v
    if isinstance(v, (int, float)):
        if not math.isfinite(float(v)):
            raise _err("not_finite", f"{v} is not a finite number", "a finite number", "replace inf/nan by the measured number, or leave the cell empty if nothing was measured")
        return float(v)
    if isinstance(v, (list, dict)):
        raise _err("not_a_number", "a list or table is not a number", "a single number such as 12.5", "write one plain number")
    s = str(v).strip()
    try:
        x = float(s)
    except ValueError:
        hint = "write a plain number (decimal point '.', no units or text)"
        if re.fullmatch(r"[-+]?\d+,\d+", s):
            hint = f"use a decimal point, not a comma: {s.replace(',', '.')}"
        elif re.fullmatch(r"[-+]?\d+(\.\d+)?\s*[A-Za-zµμ/%].*", s):
            hint = "write the number alone and put the unit in the unit column"
        raise _err("not_a_number", f"'{_short(s)}' is not a number", "a number such as 12.5", hint) from None
    if not math.isfinite(x):
        raise _err("not_finite", f"'{s}' is not a finite number", "a finite number", "replace inf/nan by the measured number, or leave the cell empty if nothing was measured")
    return x


def _time(v: Any) -> Any:
    """Days as a number, or an ISO date (kept as a date for conversion at load time)."""
    v = _blank_to_none(v)
    if v is None:
        raise _err("missing", "time is missing", "days as a number, or a date YYYY-MM-DD", "fill in the time of this row")
    if isinstance(v, (_dt.date, _dt.datetime)):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _number(v)
    s = str(v).strip()
    try:
        return float(s) if math.isfinite(float(s)) else _number(s)
    except ValueError:
        pass
    m = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?", s)
    if m:
        parts = [int(x) if x is not None else 0 for x in m.groups()]
        try:
            if m.group(4) is None:
                return _dt.date(*parts[:3])
            return _dt.datetime(*parts)
        except ValueError as exc:
            why = str(exc).replace("must be in 1..12", "must be 1-12")
            raise _err(
                "impossible_date",
                f"'{s}' is not a real calendar date ({why})",
                "a real date YYYY-MM-DD (month 1-12, day within the month)",
                "check the month and the day of month; year-month-day order is required",
            ) from None
    fix = "write days since the time origin (e.g. 14), or the date as YYYY-MM-DD (e.g. 2019-03-01)"
    d = re.fullmatch(r"(\d{1,2})[./](\d{1,2})[./](\d{4})", s)
    if d:
        a, b, y = d.groups()
        fix = f"write the date as YYYY-MM-DD: {y}-{b.zfill(2)}-{a.zfill(2)} if {a} is the day, {y}-{a.zfill(2)}-{b.zfill(2)} if {a} is the month"
    raise _err("bad_time", f"'{_short(s)}' is neither a day number nor a date", "days as a number (e.g. 14) or a date YYYY-MM-DD (e.g. 2019-03-01)", fix)


def _bool(v: Any) -> Any:
    v = _blank_to_none(v)
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "t"):
        return True
    if s in ("0", "false", "no", "n", "f"):
        return False
    raise _err("not_a_flag", f"'{_short(v)}' is not true/false", "true or false (also 1/0, yes/no)", "write true or false")


def _text(v: Any) -> Any:
    v = _blank_to_none(v)
    return None if v is None else str(v).strip()


def _required_text(v: Any) -> Any:
    v = _blank_to_none(v)
    if v is None:
        raise _err("required_empty", "required value is empty", "a value", "fill in the cell")
    if isinstance(v, (list, dict)):
        raise _err("not_text", "a list or table is not a name", "a single name or unit", "write one value")
    return str(v).strip()


def _route(v: Any) -> Any:
    v = _blank_to_none(v)
    if v is None:
        raise _err("missing", "route is missing", "one of " + ", ".join(ROUTES), "add the route of administration")
    s = str(v).strip().lower()
    s = _ROUTE_ALIASES.get(s, s)
    if s not in ROUTES:
        if "infus" in s or "drip" in s:
            fix = "an infusion is route iv, with the infusion time in the duration column (e.g. 1 h)"
        else:
            fix = "use oral, iv (bolus, or infusion with a duration), sc, im or ip" + close_matches(s, list(ROUTES) + list(_ROUTE_ALIASES))
        raise _err("bad_route", f"unknown route of administration '{_short(v)}'", "one of " + ", ".join(ROUTES) + " (also po, intravenous, subcutaneous ...)", fix)
    return s


Number = Annotated[Union[float, None], BeforeValidator(_number)]
Time = Annotated[Union[float, _dt.datetime, _dt.date], BeforeValidator(_time), Field(description="days since the time origin (number) or an ISO date YYYY-MM-DD")]
Flag = Annotated[bool, BeforeValidator(_bool)]
Text = Annotated[Union[str, None], BeforeValidator(_text)]
Name = Annotated[str, BeforeValidator(_required_text), Field(min_length=1)]
Route = Annotated[Literal["oral", "iv", "sc", "im", "ip"], BeforeValidator(_route)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class MeasurementRecord(_Record):
    """One measured value. ``value`` may be written ``<0.1`` (below the limit of quantification)."""

    arm: Annotated[str, BeforeValidator(lambda v: _text(v) or "main")] = Field("main", description="arm / animal / lesion group; 'main' when omitted")
    time: Time
    observable: Name = Field(description="e.g. psa, tumor_volume, sld, ctdna, testosterone")
    value: Number = Field(None, description="measured value in `unit`; empty when below_lloq")
    unit: Name = Field(description="unit of value and lloq, e.g. ng/mL, mm3")
    lloq: Number = Field(None, description="lower limit of quantification, in `unit`")
    below_lloq: Flag = Field(False, description="true when the value is below the LLOQ (censored)")
    note: Text = None

    @model_validator(mode="before")
    @classmethod
    def _censored_text(cls, data: Any) -> Any:
        if isinstance(data, dict):
            v = data.get("value")
            if isinstance(v, str) and v.strip().startswith("<"):
                limit = v.strip()[1:].strip()
                data = dict(data)
                data["value"] = None
                data["below_lloq"] = True
                if _blank_to_none(data.get("lloq")) is None:
                    data["lloq"] = limit
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.below_lloq:
            if self.lloq is None:
                raise _err(
                    "censored_without_lloq",
                    "the value is flagged below the limit of quantification (below_lloq = true) but no lloq is given",
                    "the assay's lower limit of quantification in the lloq column",
                    "fill in lloq (e.g. 0.1), or write the value as '<0.1'",
                    field="lloq",
                )
            if self.lloq <= 0:
                raise _err("bad_lloq", "the limit of quantification (lloq) must be above 0", "lloq > 0", "write the assay's positive quantification limit", field="lloq")
        elif self.value is None:
            raise _err("missing_value", "the value is missing", "a number, or '<LLOQ' (e.g. '<0.1') for a value below the limit of quantification", "fill in the value, or delete the row if nothing was measured", field="value")
        if self.value is not None and self.value < 0:
            raise _err("negative_value", "a measured value cannot be negative", "a value >= 0", "check the sign; a value under the limit of quantification is written '<LLOQ', e.g. '<0.1'", field="value")
        return self


class DoseRecord(_Record):
    """One administration, or a series of ``count`` administrations ``interval`` days apart."""

    arm: Annotated[str, BeforeValidator(lambda v: _text(v) or "main")] = "main"
    drug: Name
    time: Time
    amount: Number = Field(None, description="amount per administration in `unit`; empty = not recorded")
    unit: Text = Field(None, description="mg, g, ug, mg/kg or mg/m2 (resolved with the patient's weight / BSA)")
    route: Route
    duration: Annotated[Union[float, str, None], BeforeValidator(_blank_to_none)] = Field(
        None, description="infusion duration: days as a number, or with a unit ('1 h'); empty = bolus"
    )
    interval: Number = Field(None, description="days between repeated administrations")
    count: Annotated[int, BeforeValidator(lambda v: 1 if _blank_to_none(v) is None else v)] = Field(1, ge=1, description="number of administrations")
    note: Text = None

    @model_validator(mode="after")
    def _check(self):
        if self.amount is not None and self.amount < 0:
            raise _err("negative_amount", "a dose amount cannot be negative", "amount >= 0", "check the sign of the amount", field="amount")
        if self.amount is not None and not self.unit:
            raise _err("missing_unit", "the amount has no unit", "a unit such as mg, mg/kg or mg/m2", "fill in the unit column", field="unit")
        if self.count > 100_000:
            raise _err("count_too_large", f"count = {self.count} administrations is implausibly large", "at most 100000 administrations per row", "check the count (the number of administrations of this row)", field="count")
        if self.count > 1 and (self.interval is None or self.interval <= 0):
            raise _err(
                "missing_interval",
                f"count = {self.count} repeated administrations need the interval between them",
                "interval in days > 0 (e.g. 1 for daily, 21 for every 3 weeks)",
                "fill in the interval column, or set count to 1",
                field="interval",
            )
        return self


class MutationRecord(_Record):
    gene: Name = Field(description="HGNC symbol")
    protein_change: Text = Field(None, description="e.g. V600E (HGVS p. without prefix accepted)")
    vaf: Number = Field(None, ge=0, le=1, description="variant allele fraction, 0-1")
    classification: Text = Field(None, description="e.g. missense, nonsense, frameshift, known_functional")
    sample: Text = None


class CopyNumberRecord(_Record):
    gene: Name
    log2_ratio: Number = None
    copies: Number = Field(None, ge=0, description="absolute copy number (or lower bound, see `call`)")
    gistic: Annotated[Union[int, None], BeforeValidator(_blank_to_none)] = Field(None, ge=-2, le=2, description="discrete level: -2 deep deletion ... 2 amplification")
    call: Text = Field(None, description="the source's call verbatim, e.g. Amp8")
    sample: Text = None

    @model_validator(mode="after")
    def _one_of(self):
        if self.log2_ratio is None and self.copies is None and self.gistic is None:
            raise _err("no_copy_number", "the row has no copy-number value", "at least one of log2_ratio, copies, gistic", "fill in one of the three columns, or delete the row")
        return self


class _ValueRecord(_Record):
    """A record whose ``value`` is required (a measured level on some ``scale``)."""

    @field_validator("value", check_fields=False)
    @classmethod
    def _present(cls, v):
        if v is None:
            raise _err("missing_value", "the value is missing", "a number", "fill in the value or delete the row")
        return v


class ExpressionRecord(_ValueRecord):
    gene: Name
    value: Number
    scale: Name = Field(description="tpm, fpkm, counts, log2_tpm, log2_fpkm, zscore, rsem ...")
    sample: Text = None


class ProteinRecord(_ValueRecord):
    protein: Name = Field(description="protein or antibody, e.g. AKT_pS473")
    value: Number
    scale: Name = Field(description="e.g. rppa_zscore, log2_intensity")
    sample: Text = None


class PhaseRecord(_Record):
    """A treatment phase, e.g. an on- or off-treatment period of intermittent therapy."""

    arm: Annotated[str, BeforeValidator(lambda v: _text(v) or "main")] = "main"
    cycle: int = Field(ge=1)
    phase: Literal["on", "off"]
    start: Time
    end: Time


class Covariates(BaseModel):
    """Baseline covariates. Numbers are in the canonical unit; strings may carry a unit ("160 lb")."""

    model_config = ConfigDict(extra="forbid")
    age: Union[float, str, None] = Field(None, description="years")
    sex: Union[Literal["male", "female", "other", "unknown"], None] = None
    weight: Union[float, str, None] = Field(None, description="kg")
    height: Union[float, str, None] = Field(None, description="cm")
    bsa: Union[float, str, None] = Field(None, description="body-surface area, m2 (Mosteller from weight and height if absent)")
    species: Literal["human", "mouse", "rat"] = "human"


class DrugDeclaration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    targets: list[str] = []
    drug_class: str = Field("", alias="class")


class ObservableDeclaration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit: str
    description: str = ""


class PatientHeader(BaseModel):
    """The scalar part of a patient: ``patient.toml`` in a folder, the top level of a JSON/YAML file."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=64, description="pseudonymous id; letters, digits, _ . -")
    time_origin: Union[_dt.date, None] = Field(None, description="day 0 when times are dates (default: the earliest date)")
    covariates: Covariates = Covariates()
    labels: dict[str, Union[str, bool, int, float]] = Field({}, description="outcome labels, e.g. relapse = true")
    drugs: dict[str, DrugDeclaration] = Field({}, description="drugs not in twin's catalogue")
    observables: dict[str, ObservableDeclaration] = Field({}, description="observables not in twin's list")
    source: dict[str, str] = Field({}, description="provenance: dataset, citation, licence")

    @field_validator("format_version")
    @classmethod
    def _supported(cls, v):
        if v != FORMAT_VERSION:
            raise _err(
                "unsupported_format",
                f"format_version {v} is not supported by this version of twin",
                f"format_version = {FORMAT_VERSION}",
                "upgrade twin, or write the file in format version 1" if v > FORMAT_VERSION else f"set format_version = {FORMAT_VERSION}",
            )
        return v

    @field_validator("id", mode="before")
    @classmethod
    def _readable_id(cls, v):
        expected = "a pseudonymous id of letters, digits, '_', '.' or '-', starting with a letter or digit, at most 64 characters (e.g. P001)"
        if isinstance(v, bool) or v is None:
            raise _err("bad_id", "the patient id is missing", expected, 'write e.g. id = "P001"')
        if isinstance(v, (int, float)):
            raise _err("bad_id", f"the patient id {v} is a number, not text", expected, f'write the id as text, in quotes: "{v}"')
        if not isinstance(v, str):
            raise _err("bad_id", "the patient id must be text", expected, 'write e.g. id = "P001"')
        s = v
        if not s.strip():
            raise _err("bad_id", "the patient id is empty", expected, 'write e.g. id = "P001"')
        bad = sorted({c for c in s if not re.fullmatch(r"[A-Za-z0-9_.\-]", c)})
        if bad or not re.match(r"[A-Za-z0-9]", s):
            suggestion = re.sub(r"[^A-Za-z0-9_.\-]+", "_", s.strip()).strip("_.-") or "P001"
            what = ", ".join("a space" if c == " " else repr(c) for c in bad) if bad else f"the first character {s[0]!r}"
            raise _err(
                "bad_id",
                f"the patient id '{_short(s)}' contains characters that are not allowed ({what})",
                expected,
                f'write e.g. id = "{suggestion[:64]}"; the id must not contain names, dates of birth or record numbers',
            )
        if len(s) > 64:
            raise _err("bad_id", f"the patient id is {len(s)} characters long", expected, "shorten the id to at most 64 characters")
        return s


class Omics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mutations: list[MutationRecord] = []
    copy_number: list[CopyNumberRecord] = []
    expression: list[ExpressionRecord] = []
    protein: list[ProteinRecord] = []


class PatientDocument(PatientHeader):
    """A whole patient in one JSON or YAML file."""

    measurements: list[MeasurementRecord] = []
    dosing: list[DoseRecord] = []
    phases: list[PhaseRecord] = []
    omics: Omics = Omics()


# table name -> (record model, CSV file name inside a bundle folder)
TABLES: dict[str, tuple[type[BaseModel], str]] = {
    "measurements": (MeasurementRecord, "measurements.csv"),
    "dosing": (DoseRecord, "dosing.csv"),
    "phases": (PhaseRecord, "phases.csv"),
    "mutations": (MutationRecord, "omics/mutations.csv"),
    "copy_number": (CopyNumberRecord, "omics/copy_number.csv"),
    "expression": (ExpressionRecord, "omics/expression.csv"),
    "protein": (ProteinRecord, "omics/protein.csv"),
}
OMICS_LAYERS = ("mutations", "copy_number", "expression", "protein")


def required_fields(model: type[BaseModel]) -> list[str]:
    return [n for n, f in model.model_fields.items() if f.is_required()]


def json_schema() -> dict:
    """The JSON Schema of a single-file patient document."""
    schema = PatientDocument.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://twin-oncology.org/schema/patient-v1.json"
    schema["title"] = "twin patient file (format version 1)"
    return schema
