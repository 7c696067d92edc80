"""NONMEM-style event tables (one row per dose or observation) to and from a cohort.

Supported columns (names case-insensitive): ``ID, TIME, AMT, DV, EVID, CMT, DVID, MDV,
RATE, II, ADDL, SS``, censoring ``BLQ`` or ``CENS`` with ``LLOQ``, the comment column
``C``, and covariate columns named by the ``covariates`` argument. ``'.'`` or an empty
cell is a missing value. Only numeric elapsed ``TIME`` is read (no ``DATE``/clock times).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping

import pandas as pd

from ..errors import InputError, PatientFileError, Problem, ProblemList, close_matches
from ..observables import canonical_observable
from ..patient import Cohort, Patient
from ..units import UnitError, conversion_factor
from . import _Capped, _build_cohort, _int_text, _is_missing, _sha256, _Trace

__all__ = ["read_nonmem", "write_nonmem"]

_KNOWN = ("ID", "TIME", "AMT", "DV", "EVID", "CMT", "DVID", "MDV", "RATE", "II", "ADDL", "SS", "BLQ", "CENS", "LLOQ", "C")
_DATE_COLUMNS = ("DATE", "DAT1", "DAT2", "DAT3")
_COVARIATES = ("age", "sex", "weight", "height", "bsa")
_SEXES = ("male", "female", "other", "unknown")
_SEX_TEXT = {"m": "male", "male": "male", "f": "female", "female": "female", "other": "other", "unknown": "unknown"}


class _CellError(ValueError):
    pass


def _num(raw: str) -> float | None:
    """A cell as a float; ``None`` for '.' or an empty cell; :class:`_CellError` otherwise."""
    s = str(raw).strip()
    if s in ("", "."):
        return None
    try:
        x = float(s)
    except ValueError:
        raise _CellError(s) from None
    if not math.isfinite(x):
        raise _CellError(s)
    return x


# -- options -----------------------------------------------------------------------------


def _options(observables, drugs, time_unit, covariates, sex_codes) -> dict:
    """Check the mapping arguments (programming errors raise :class:`InputError` at once)."""
    try:
        factor = conversion_factor(time_unit, "day")
    except UnitError as exc:
        raise InputError(f"time_unit {time_unit!r} is not a unit of time ({exc}); use 'h', 'day', 'min' or 'week'") from None
    obs = {}
    for k, v in dict(observables).items():
        if not isinstance(v, (tuple, list)) or len(v) not in (2, 3):
            raise InputError(f"observables[{k!r}] = {v!r}: expected (observable name, unit) or (name, unit, description) to declare a new observable")
        obs[_int_text(k)] = tuple(v)
    drg = {}
    for k, v in dict(drugs).items():
        if not isinstance(v, (tuple, list)) or len(v) not in (3, 4):
            raise InputError(f"drugs[{k!r}] = {v!r}: expected (drug name, unit, route), e.g. ('docetaxel', 'mg', 'iv'), or with a 4th item, a list of targets, to declare a drug outside twin's catalogue")
        drg[_int_text(k)] = tuple(v)
    cov = {}
    for col, target in dict(covariates or {}).items():
        name, unit = (target, None) if isinstance(target, str) else tuple(target)
        if name not in _COVARIATES:
            raise InputError(f"covariates[{col!r}] = {target!r}: unknown covariate {name!r}.{close_matches(name, _COVARIATES)} Expected one of {', '.join(_COVARIATES)}, optionally with a unit: ('height', 'm')")
        cov[str(col).strip().upper()] = (name, unit)
    codes = {}
    for k, v in dict(sex_codes or {}).items():
        if v not in _SEXES:
            raise InputError(f"sex_codes[{k!r}] = {v!r}: expected one of {', '.join(_SEXES)}")
        codes[_int_text(k)] = v
    return {"factor": factor, "time_unit": time_unit, "observables": obs, "drugs": drg, "covariates": cov, "sex_codes": codes}


# -- reading the table ---------------------------------------------------------------------


def _is_header(line: str) -> bool:
    names = {c.strip().upper() for c in line.strip().lstrip("#").replace(",", " ").split()}
    return {"ID", "TIME"} <= names


def _read_table(path: Path, problems: ProblemList) -> tuple[pd.DataFrame | None, int]:
    """The table as strings, upper-case column names and a ``_line`` column (header = line 1)."""
    file = path.name
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        problems.error(file, f"cannot read the file ({exc.strerror})", fix="check the path")
        return None, 0
    except UnicodeDecodeError as exc:
        problems.error(file, f"the file is not UTF-8 text ({exc.reason})", fix="re-save it as UTF-8 (iconv -f latin1 -t utf-8)")
        return None, 0
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() and (not line.strip().startswith("#") or _is_header(line))]
    if not starts:
        problems.error(file, "the file is empty", expected="a header line (ID TIME AMT DV ...) and data rows")
        return None, 0
    h = starts[0]  # leading '#' lines are comments, unless they name ID and TIME (NONMEM IGNORE=#)
    head = lines[h].strip().lstrip("#").strip()
    comma = "," in head
    names = [c.strip().upper() for c in (head.split(",") if comma else head.split())]
    bad = False
    for c in sorted({c for c in names if names.count(c) > 1}):
        problems.error(file, f"column '{c}' appears more than once", row=h + 1, field=c, fix="keep one column of each name")
        bad = True
    kept: list[tuple[int, str]] = []  # (line number, text) of the data rows
    for i in range(h + 1, len(lines)):
        line = lines[i]
        if not line.strip() or line.strip().startswith("#"):
            continue
        n = len(line.split(",")) if comma else len(line.split())
        if n != len(names):
            problems.error(file, f"the row has {n} cells but the header has {len(names)} columns", row=i + 1, expected=f"{len(names)} {'comma' if comma else 'whitespace'}-separated cells", received=line.strip()[:120], fix="check for missing or extra separators; write '.' for a missing value")
            bad = True
        kept.append((i + 1, line.strip()))
    if bad:
        return None, h + 1
    if not kept:
        problems.error(file, "the table has a header but no data rows", row=h + 1)
        return None, h + 1
    data = "\n".join(text for _, text in kept)
    df = pd.read_csv(io.StringIO(data), sep="," if comma else r"\s+", header=None, names=names, dtype=str, keep_default_na=False, engine="python")
    df["_line"] = [n for n, _ in kept]
    return df, h + 1


def _check_columns(df: pd.DataFrame, header_line: int, opts: dict, file: str, problems: ProblemList, notes: list[Problem]) -> bool:
    cols = [c for c in df.columns if c != "_line"]
    ok = True
    for req in ("ID", "TIME", "DV"):
        if req not in cols:
            problems.error(file, f"required column '{req}' is missing." + close_matches(req, cols), row=header_line, field=req, expected="columns ID, TIME, DV (and AMT, EVID, CMT/DVID ... as needed)", received=", ".join(cols), fix=f"add a '{req}' column or rename the one that holds it")
            ok = False
    for c in cols:
        if c in _DATE_COLUMNS:
            problems.error(file, f"column '{c}' is not supported: only numeric elapsed TIME is read", row=header_line, field=c, expected=f"TIME as elapsed time in {opts['time_unit']} since the first record", received=c, fix="convert DATE + clock time to elapsed TIME, then drop the date column")
            ok = False
    if "BLQ" in cols and "CENS" in cols:
        problems.error(file, "both BLQ and CENS columns: censoring must be given once", row=header_line, field="CENS", fix="keep one of the two columns")
        ok = False
    for c in opts["covariates"]:
        if c not in cols:
            problems.error(file, f"covariate column '{c}' (from the covariates argument) is missing." + close_matches(c, cols), row=header_line, field=c, received=", ".join(cols), fix="correct the covariates mapping or add the column")
            ok = False
    unread = [c for c in cols if c not in _KNOWN and c not in opts["covariates"] and c not in _DATE_COLUMNS]
    if unread:
        notes.append(Problem("note", file, f"column(s) not read: {', '.join(unread)} (map covariates with covariates={{COLUMN: 'age'|'sex'|'weight'|'height'|'bsa'}})", row=header_line))
    return ok


# -- rows to records -----------------------------------------------------------------------


class _Rows:
    """Parse the rows of one table into per-patient documents, collecting located problems."""

    def __init__(self, file: str, cols: list[str], opts: dict, capped: _Capped):
        self.file, self.cols, self.opts, self.capped = file, cols, opts, capped
        self.cens = "BLQ" if "BLQ" in cols else ("CENS" if "CENS" in cols else None)
        self.obs_key = "DVID" if "DVID" in cols else ("CMT" if "CMT" in cols else None)

    def error(self, kind: str, line: int, field: str | None, message: str, **kw) -> None:
        self.capped.error(kind, self.file, message, row=line, field=field, **kw)

    def cell(self, row: dict, col: str) -> str:
        return str(row.get(col, "")).strip()

    def num(self, row: dict, col: str, *, what: str = "a number") -> float | None:
        try:
            return _num(row.get(col, ""))
        except _CellError as exc:
            hint = f"; use a decimal point: {str(exc).replace(',', '.')}" if "," in str(exc) else ""
            if col == "TIME":
                self.error("time_not_a_number", row["_line"], "TIME", "TIME is not a number", expected=f"elapsed time in {self.opts['time_unit']} as a number (dates and clock times are not read)", received=repr(str(exc)), fix="write the elapsed time since the patient's first record" + hint)
            else:
                self.error(f"not_a_number:{col}", row["_line"], col, f"{col} is not a number", expected=what, received=repr(str(exc)), fix="write a plain number, or '.' when missing" + hint)
            raise

    def evid(self, row: dict) -> int | None:
        if "EVID" not in self.cols:
            amt = self.num(row, "AMT") if "AMT" in self.cols else None
            return 1 if amt else 0
        e = self.num(row, "EVID", what="0 (observation) or 1 (dose)")
        e = 0 if e is None else e
        if e in (3, 4):
            what = "reset" if e == 3 else "reset and dose"
            self.error("evid_reset", row["_line"], "EVID", f"EVID {e:g} ({what}) is not supported", expected="EVID 0 (observation), 1 (dose) or 2 (other, ignored)", received=f"{e:g}", fix="split the patient at the reset into two IDs, or drop the reset rows")
            return None
        if e not in (0, 1, 2):
            self.error("evid_unknown", row["_line"], "EVID", f"EVID {e:g} is not a NONMEM event type", expected="EVID 0 (observation), 1 (dose) or 2 (other)", received=f"{e:g}", fix="correct the EVID")
            return None
        return int(e)

    def lookup(self, key: str | None, table: dict, line: int, field: str, what: str) -> tuple | None:
        if key is None:
            if len(table) == 1:
                return next(iter(table.values()))
            self.error(f"no_{what}_key", line, field, f"cannot tell which {what} this row is: the table has no {field} column", expected=f"a {field} column, or exactly one entry in {what}s=", received=f"{len(table)} entries", fix=f"add a {field} column")
            return None
        if key not in table:
            known = ", ".join(f"{k} ({v[0]}, {v[1]})" for k, v in table.items()) or "none"
            fix = f"add it to {what}s={{{key}: (name, unit{', route' if what == 'drug' else ''})}}" + (", or set MDV=1 to skip the row" if what == "observable" else "")
            self.error(f"unknown_{field}", line, field, f"unknown {field} {key}: not in the {what}s mapping", expected=f"one of {known}", received=key, fix=fix)
            return None
        return table[key]

    def measurement(self, row: dict, time: float, notes: dict) -> tuple[dict, dict] | None:
        line = row["_line"]
        key = _int_text(self.cell(row, self.obs_key)) if self.obs_key else None
        spec = self.lookup(key if key not in ("", ".") else None, self.opts["observables"], line, self.obs_key or "DVID", "observable")
        dv = self.num(row, "DV")
        lloq = self.num(row, "LLOQ") if "LLOQ" in self.cols else None
        if spec is None:
            return None
        name, unit = spec[0], spec[1]
        fields = {"time": "TIME", "value": "DV", "observable": self.obs_key or "DV", "unit": self.obs_key or "DV", "lloq": "LLOQ", "below_lloq": self.cens or "DV"}
        flag = self.num(row, self.cens, what="0 or 1") if self.cens else None
        if flag not in (None, 0, 1):
            self.error("bad_censoring", line, self.cens, f"{self.cens} {flag:g} is not supported", expected="0 (quantified) or 1 (below the LLOQ)", received=f"{flag:g}", fix="only lower censoring (BLQ) is supported; drop upper-censored rows or set them to 0")
            return None
        if flag == 1:
            if lloq is None:
                lloq = dv
                fields["lloq"] = "DV"
                notes["dv_as_lloq"] = notes.get("dv_as_lloq", 0) + 1
            if lloq is None:
                self.error("censored_without_limit", line, self.cens, f"{self.cens}=1 but neither LLOQ nor DV gives the quantification limit", expected="the LLOQ (in the LLOQ column, or in DV)", received="'.'", fix="write the assay's LLOQ in the LLOQ column")
                return None
            rec = {"time": time, "observable": name, "value": None, "unit": unit, "lloq": lloq, "below_lloq": True}
        else:
            if dv is None:
                self.error("missing_dv", line, "DV", "DV is missing on an observation row", expected="a measured value", received="'.'", fix="fill in DV, set MDV=1 to skip the row, or BLQ=1 if it was below the LLOQ")
                return None
            rec = {"time": time, "observable": name, "value": dv, "unit": unit, "lloq": lloq}
        return rec, fields

    def dose(self, row: dict, time: float, notes: dict) -> tuple[dict, dict] | None:
        line, f = row["_line"], self.opts["factor"]
        key = _int_text(self.cell(row, "CMT")) if "CMT" in self.cols else None
        spec = self.lookup(key if key not in ("", ".") else None, self.opts["drugs"], line, "CMT", "drug")
        vals = {c: self.num(row, c) if c in self.cols else None for c in ("AMT", "RATE", "II", "ADDL", "SS")}
        if spec is None:
            return None
        amt, rate, ii, addl, ss = (vals[c] for c in ("AMT", "RATE", "II", "ADDL", "SS"))
        if "AMT" not in self.cols or amt is None:
            self.error("missing_amt", line, "AMT", "a dose row (EVID 1) has no AMT", expected="the amount given", received="'.'" if "AMT" in self.cols else "no AMT column", fix="fill in AMT")
            return None
        if ss:
            self.error("steady_state", line, "SS", f"steady-state dosing (SS={ss:g}) is not supported", expected="SS 0 or '.'", received=f"{ss:g}", fix="write the doses explicitly from the start of treatment (II and ADDL)")
            return None
        if rate is not None and rate < 0:
            what = "modelled rate" if rate == -1 else "modelled duration" if rate == -2 else "a negative rate"
            self.error("modelled_rate", line, "RATE", f"RATE {rate:g} ({what}) is not supported", expected="RATE > 0 (infusion: duration = AMT/RATE) or 0 (bolus)", received=f"{rate:g}", fix="write the infusion rate in amount per TIME unit")
            return None
        addl = addl or 0
        if addl < 0 or not float(addl).is_integer():
            self.error("bad_addl", line, "ADDL", "ADDL must be a whole number >= 0", expected="0, 1, 2 ...", received=f"{addl:g}", fix="correct ADDL")
            return None
        if addl > 0 and not (ii and ii > 0):
            self.error("addl_without_ii", line, "II", f"ADDL={addl:g} additional doses need an interval II > 0", expected=f"II > 0 in {self.opts['time_unit']}", received="'.'" if ii is None else f"{ii:g}", fix="fill in II, or set ADDL to 0")
            return None
        if ii and addl == 0:
            notes["ii_without_addl"] = notes.get("ii_without_addl", 0) + 1
        name, unit, route = spec[0], spec[1], spec[2]
        rec = {"drug": name, "time": time, "amount": amt, "unit": unit, "route": route, "count": int(addl) + 1}
        if rate and rate > 0:
            rec["duration"] = amt / rate * f
        if addl > 0:
            rec["interval"] = ii * f
        fields = {"time": "TIME", "amount": "AMT", "unit": "CMT", "drug": "CMT", "route": "CMT", "duration": "RATE", "interval": "II", "count": "ADDL"}
        return rec, fields


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def _covariates(rows: list[dict], parser: _Rows, pid: str) -> tuple[dict, dict]:
    """Baseline covariates of one ID (first non-missing value of each column; must not vary)."""
    values: dict[str, object] = {}
    where: dict[str, tuple[str, int]] = {}
    for col, (name, unit) in parser.opts["covariates"].items():
        first = None
        for row in rows:
            raw = parser.cell(row, col)
            if _is_missing(raw):
                continue
            if first is None:
                first = (raw, row["_line"])
            elif not _same(raw, first[0]):
                parser.error("time_varying_covariate", row["_line"], col, f"{col} differs within patient {pid}: {raw} here, {first[0]} on line {first[1]}", expected="one value per ID (time-varying covariates are not supported)", received=raw, fix="use the baseline value on every row of the ID")
                first = None
                break
        if first is None:
            continue
        raw, line = first
        where[f"covariates.{name}"] = (col, line)
        value = _covariate_value(name, unit, raw, line, col, parser)
        if value is not None:
            values[name] = value
    return values, where


def _covariate_value(name: str, unit: str | None, raw: str, line: int, col: str, parser: _Rows):
    if name == "sex":
        codes = parser.opts["sex_codes"]
        if codes:
            key = _int_text(raw)
            if key not in codes:
                parser.error("unknown_sex_code", line, col, f"{col} code {raw} is not in sex_codes", expected="one of " + ", ".join(map(str, codes)), received=raw, fix="add the code to sex_codes")
                return None
            return codes[key]
        if raw.strip().lower() in _SEX_TEXT:
            return _SEX_TEXT[raw.strip().lower()]
        parser.error("sex_needs_codes", line, col, f"{col} value {raw!r} cannot be read as a sex without sex_codes", expected="male/female (M/F), or numeric codes with sex_codes={1: 'male', 2: 'female'}", received=raw, fix="pass sex_codes: numeric codes differ between datasets")
        return None
    try:
        x = _num(raw)
    except _CellError:
        parser.error(f"not_a_number:{col}", line, col, f"{col} is not a number", expected=f"{name} as a number", received=repr(raw), fix="write a plain number")
        return None
    return x if unit is None else f"{x!r} {unit}"


def _patient_document(pid: str, rows: list[dict], parser: _Rows) -> tuple[dict, _Trace, list[Problem]] | None:
    """One ID's rows as a patient document with its trace; ``None`` when a row has an error."""
    file, opts = parser.file, parser.opts
    n_before = parser.capped.total
    trace = _Trace(file=file, line=rows[0]["_line"], raw_id=parser.cell(rows[0], "ID"))
    trace.header["id"] = ("ID", rows[0]["_line"])
    doc: dict = {"id": pid, "measurements": [], "dosing": []}
    notes: dict[str, int] = {}
    last = None
    for row in rows:
        try:
            t = parser.num(row, "TIME")
            evid = parser.evid(row)
        except _CellError:
            continue
        if t is None:
            parser.error("missing_time", row["_line"], "TIME", "TIME is missing", expected=f"elapsed time in {opts['time_unit']}", received="'.'", fix="fill in TIME")
            continue
        if last is not None and t < last[0]:
            parser.error("unsorted", row["_line"], "TIME", f"TIME {t:g} comes after TIME {last[0]:g} (line {last[1]}) within patient {pid}", expected="rows sorted by TIME within each ID", received=f"{t:g}", fix="sort the table by ID, then TIME")
        last = (max(t, last[0]) if last else t, row["_line"])
        if evid is None:
            continue
        if evid == 2:
            notes["evid2"] = notes.get("evid2", 0) + 1
            continue
        if evid == 0 and "MDV" in parser.cols:
            try:
                mdv = parser.num(row, "MDV")
            except _CellError:
                continue
            if mdv == 1:
                notes["mdv"] = notes.get("mdv", 0) + 1
                continue
        try:
            out = parser.measurement(row, t * opts["factor"], notes) if evid == 0 else parser.dose(row, t * opts["factor"], notes)
        except _CellError:
            continue
        if out is not None:
            table = "measurements" if evid == 0 else "dosing"
            doc[table].append(out[0])
            trace.tables[table].append((file, row["_line"], out[1]))
    cov, where = _covariates(rows, parser, pid)
    if cov:
        doc["covariates"] = cov
        trace.header.update(where)
    _declarations(doc, opts)
    if parser.capped.total > n_before:
        return None
    return doc, trace, _notes(notes, file, pid, opts)


def _declarations(doc: dict, opts: dict) -> None:
    used_obs = {m["observable"] for m in doc["measurements"]}
    used_drugs = {d["drug"] for d in doc["dosing"]}
    obs = {v[0]: {"unit": v[1], "description": v[2]} for v in opts["observables"].values() if len(v) == 3 and v[0] in used_obs}
    drugs = {v[0]: {"targets": list(v[3])} for v in opts["drugs"].values() if len(v) == 4 and v[0] in used_drugs}
    if obs:
        doc["observables"] = obs
    if drugs:
        doc["drugs"] = drugs


def _notes(counts: dict, file: str, pid: str, opts: dict) -> list[Problem]:
    text = {
        "mdv": "observation row(s) with MDV=1 skipped",
        "evid2": "EVID 2 (other event) row(s) ignored",
        "dv_as_lloq": "censored row(s) without an LLOQ value: DV read as the quantification limit",
        "ii_without_addl": "dose row(s) with II but ADDL=0: a single dose (II ignored, as in NONMEM without SS)",
    }
    out = [Problem("note", file, f"patient {pid}: {n} {text[k]}") for k, n in counts.items()]
    f = opts["factor"]
    if f != 1.0:
        out.append(Problem("note", file, f"patient {pid}: TIME, II and infusion durations converted from {opts['time_unit']} to days (x {f:.6g})", field="TIME"))
    return out


def _group_ids(df: pd.DataFrame, parser: _Rows, id_prefix: str) -> dict[str, list[dict]]:
    """Rows by patient id, in file order; an ID that comes back after another ID is an error."""
    groups: dict[str, list[dict]] = {}
    previous = None
    for row in df.to_dict("records"):
        if "C" in parser.cols and parser.cell(row, "C").upper() == "C":
            continue
        raw = parser.cell(row, "ID")
        if _is_missing(raw):
            parser.error("missing_id", row["_line"], "ID", "ID is missing", expected="a patient identifier", received="'.'", fix="fill in the ID")
            continue
        pid = id_prefix + _int_text(raw)
        if pid in groups and pid != previous:
            first = groups[pid][0]["_line"]
            parser.error("id_not_contiguous", row["_line"], "ID", f"ID {raw} appears again after other IDs (its rows start on line {first}); NONMEM reads it as a new individual", expected="the rows of each ID together", received=raw, fix="sort the table by ID, then TIME (give a new ID to a truly new individual)")
            continue
        groups.setdefault(pid, []).append(row)
        previous = pid
    return groups


def read_nonmem(
    path: str | Path,
    *,
    observables: Mapping[int | str, tuple],
    drugs: Mapping[int | str, tuple],
    time_unit: str = "h",
    covariates: Mapping[str, str | tuple[str, str]] | None = None,
    sex_codes: Mapping[int | str, str] | None = None,
    id_prefix: str = "",
    name: str | None = None,
) -> Cohort:
    """Read a NONMEM-style event table (CSV or whitespace-separated) into a cohort.

    Parameters
    ----------
    path : the table; header row first, one row per event, '.' = missing.
    observables : DVID (CMT when the table has no DVID column) -> (observable, unit of DV),
        e.g. ``{1: ("psa", "ng/mL")}``; a third item (a description) declares an observable
        outside twin's list.
    drugs : dosing CMT -> (drug, unit of AMT, route), e.g. ``{1: ("docetaxel", "mg", "iv")}``;
        a fourth item (list of target genes) declares a drug outside twin's catalogue.
    time_unit : unit of TIME, II and of the time in RATE (amount per time unit); converted to days.
    covariates : column -> covariate (``age`` [year], ``sex``, ``weight`` [kg], ``height`` [cm],
        ``bsa`` [m²]), or (covariate, unit) such as ``("height", "m")``. Baseline only.
    sex_codes : numeric SEX codes -> ``male``/``female``/``other``/``unknown``.
    id_prefix : prepended to every ID (NONMEM IDs are numbers; twin ids may carry a study code).

    Rows: EVID 0 observation (skipped when MDV=1), 1 dose, 2 ignored; EVID 3/4 and SS≠0
    are errors. RATE > 0 gives an infusion of duration AMT/RATE; ADDL doses follow every II
    (count = ADDL + 1). BLQ (or CENS) = 1 marks a value below the LLOQ, taken from the LLOQ
    column or else from DV. Without an EVID column, rows with AMT > 0 are doses.

    Raises
    ------
    PatientFileError
        listing every problem with its line (header = line 1) and column, after each
        patient has also passed the patient-file checks (units, names, covariate ranges).
    """
    path = Path(path)
    opts = _options(observables, drugs, time_unit, covariates, sex_codes)
    problems = ProblemList()
    file_notes: list[Problem] = []
    df, header_line = _read_table(path, problems)
    if df is None or not _check_columns(df, header_line, opts, path.name, problems, file_notes):
        raise PatientFileError(str(path), problems)
    parser = _Rows(path.name, [c for c in df.columns if c != "_line"], opts, _Capped(problems))
    docs = []
    for pid, rows in _group_ids(df, parser, id_prefix).items():
        out = _patient_document(pid, rows, parser)
        if out is not None:
            docs.append(out)
    problems.extend(file_notes)
    source = {"path": str(path), "format": "nonmem", "sha256": {path.name: _sha256(path)}, "time_unit": time_unit}
    return _build_cohort(docs, problems, path=path, name=name or path.stem, source=source)


# -- writing -------------------------------------------------------------------------------


def _observable_unit(patient: Patient, name: str) -> tuple[str, float | None]:
    obs = canonical_observable(name)
    if obs is not None:
        return obs.unit, obs.molar_mass
    declared = {k.lower(): v for k, v in patient.observables.items()}
    return declared[name.lower()]["unit"], None


def _mg_per(unit: str, patient: Patient) -> float:
    """mg per one ``unit`` of AMT for this patient (mass units, mg/kg, mg/m2)."""
    low = unit.replace(" ", "").lower().replace("²", "2")
    c = patient.covariates
    if low in ("mg/kg", "mpk"):
        if c.weight is None:
            raise InputError(f"patient {patient.id}: AMT in mg/kg needs the weight covariate")
        return c.weight
    if low in ("mg/m2", "mg/m**2", "mg/m^2"):
        if c.bsa is None:
            raise InputError(f"patient {patient.id}: AMT in mg/m2 needs the body-surface area")
        return c.bsa
    return conversion_factor(unit, "mg")


def _observation_rows(p: Patient, pid: str, by_name: dict, f: float) -> list[dict]:
    rows = []
    for m in p.measurements.to_dict("records"):
        if m["observable"] not in by_name:
            raise InputError(f"patient {p.id}: observable {m['observable']!r} is not in the observables mapping (known: {', '.join(by_name) or 'none'}); add it as DVID: (name, unit)")
        dvid, unit = by_name[m["observable"]]
        canon, molar = _observable_unit(p, m["observable"])
        k = conversion_factor(unit, canon, molar_mass=molar)
        cens = bool(m["below_lloq"])
        lloq = None if pd.isna(m["lloq"]) else m["lloq"] / k
        dv = lloq if cens else m["value"] / k
        rows.append({"ID": pid, "TIME": m["time"] / f, "EVID": 0, "AMT": None, "RATE": None, "II": None, "ADDL": None, "SS": None, "CMT": None, "DVID": dvid, "DV": dv, "MDV": 0, "BLQ": int(cens), "LLOQ": lloq})
    return rows


def _dose_rows(p: Patient, pid: str, by_drug: dict, f: float) -> list[dict]:
    rows = []
    for d in p.history.table.to_dict("records"):
        if d["drug"] not in by_drug:
            raise InputError(f"patient {p.id}: drug {d['drug']!r} is not in the drugs mapping (known: {', '.join(by_drug) or 'none'}); add it as CMT: (drug, unit, route)")
        cmt, unit, route = by_drug[d["drug"]]
        if d["route"] != route:
            raise InputError(f"patient {p.id}: {d['drug']} is given by route {d['route']!r} but the drugs mapping says {route!r}; one CMT per drug and route")
        if pd.isna(d["amount"]):
            raise InputError(f"patient {p.id}: a {d['drug']} dose at day {d['time']:g} has no recorded amount; NONMEM needs AMT")
        amt = d["amount"] / _mg_per(unit, p)
        rate = amt / (d["duration"] / f) if d["duration"] > 0 else None
        repeat = d["count"] > 1
        rows.append({"ID": pid, "TIME": d["time"] / f, "EVID": 1, "AMT": amt, "RATE": rate, "II": d["interval"] / f if repeat else None, "ADDL": d["count"] - 1 if repeat else None, "SS": 0, "CMT": cmt, "DVID": None, "DV": None, "MDV": 1, "BLQ": None, "LLOQ": None})
    return rows


def _covariate_cells(p: Patient, opts: dict) -> dict:
    inverse = {v: k for k, v in opts["sex_codes"].items()}
    out = {}
    for col, (name, unit) in opts["covariates"].items():
        v = getattr(p.covariates, name)
        if v is None:
            out[col] = None
        elif name == "sex":
            out[col] = inverse.get(v, v) if inverse else v
        else:
            canon = {"age": "year", "weight": "kg", "height": "cm", "bsa": "m**2"}[name]
            out[col] = v / conversion_factor(unit, canon) if unit else v
    return out


def write_nonmem(
    cohort: Cohort | Patient,
    path: str | Path,
    *,
    observables: Mapping[int | str, tuple],
    drugs: Mapping[int | str, tuple],
    time_unit: str = "h",
    covariates: Mapping[str, str | tuple[str, str]] | None = None,
    sex_codes: Mapping[int | str, str] | None = None,
    id_prefix: str = "",
    sep: str = ",",
) -> Path:
    """Write patients as a NONMEM-style event table (the inverse of :func:`read_nonmem`).

    Takes the same mappings as :func:`read_nonmem`, so ``read_nonmem(write_nonmem(c, p, **m), **m)``
    gives back the same patients. Columns: ID TIME EVID AMT RATE II ADDL SS CMT DVID DV MDV
    BLQ LLOQ and the covariate columns; TIME in ``time_unit``; '.' = missing. ``id_prefix``
    is removed from ids (NONMEM itself needs numeric IDs). Only the 'main' arm is written.
    """
    patients = (cohort,) if isinstance(cohort, Patient) else tuple(cohort)
    opts = _options(observables, drugs, time_unit, covariates, sex_codes)
    by_name = {v[0]: (k, v[1]) for k, v in opts["observables"].items()}
    by_drug = {v[0]: (k, v[1], v[2]) for k, v in opts["drugs"].items()}
    frames = []
    for p in patients:
        if [a for a in p.arms if a != "main"]:
            raise InputError(f"patient {p.id}: arms {p.arms} cannot be written to one NONMEM ID; write one patient per arm")
        pid = p.id[len(id_prefix):] if id_prefix and p.id.startswith(id_prefix) else p.id
        rows = _observation_rows(p, pid, by_name, opts["factor"]) + _dose_rows(p, pid, by_drug, opts["factor"])
        t = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "RATE", "II", "ADDL", "SS", "CMT", "DVID", "DV", "MDV", "BLQ", "LLOQ"])
        for col, v in _covariate_cells(p, opts).items():
            t[col] = v
        frames.append(t.sort_values(["TIME", "EVID"], kind="stable"))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in ("TIME", "EVID", "AMT", "RATE", "II", "ADDL", "SS", "DV", "MDV", "BLQ", "LLOQ"):
        if col in table:
            table[col] = pd.to_numeric(table[col]).astype("float64")
    if sep not in (",", " "):
        raise InputError(f"sep {sep!r}: NONMEM tables are comma- (',') or space-separated (' ')")
    text = table.to_csv(sep=sep, index=False, na_rep=".", float_format="%.12g", lineterminator="\n")
    from .._atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, text)
    return path
