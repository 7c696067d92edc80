"""Importers for the tables users already have (see ``docs/how-to/import-data.md``).

- :func:`read_nonmem` / :func:`write_nonmem`: NONMEM-style event tables (doses and
  observations, one row per event) to and from a :class:`~twin.patient.Cohort`.
- :func:`read_cbioportal`: a cBioPortal study folder (clinical files, MAF, discrete CNA,
  expression and RPPA matrices) to a cohort of patients with omics and covariates.
- :func:`read_maf`: a MAF file as one table of mutations.
- :func:`attach_omics`: merge omics and covariates into patients loaded from another
  source (e.g. a NONMEM table) by id.

Every patient an importer builds goes through :func:`twin.io.patient_from_document`, so it
gets exactly the checks of a patient file; problems are reported against the source
file, line (header = line 1) and column, all of them at once, as a
:class:`~twin.errors.PatientFileError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PatientFileError, Problem, ProblemList
from ..io.records import TABLES
from ..patient import Cohort

__all__ = ["read_nonmem", "write_nonmem", "read_cbioportal", "read_maf", "attach_omics"]

_MAX_SAME_KIND = 10
_SEP = " › "  # separator used by twin.io.bundle in document table labels


# -- shared helpers (private; used by nonmem.py and cbioportal.py) ----------------------


class _Capped:
    """Adds located problems, summarising after ``_MAX_SAME_KIND`` of one kind per file."""

    def __init__(self, problems: ProblemList):
        self.problems = problems
        self.counts: dict[tuple, int] = defaultdict(int)
        self.total = 0  # every error, including those summarised

    def error(self, kind: str, file: str, message: str, **kw) -> None:
        self.total += 1
        self.counts[(file, kind)] += 1
        n = self.counts[(file, kind)]
        if n <= _MAX_SAME_KIND:
            self.problems.error(file, message, **kw)
        elif n == _MAX_SAME_KIND + 1:
            self.problems.error(file, f"more rows with the same problem ({kind}); fix the ones above and import again")


@dataclass
class _Trace:
    """Where each record of a generated patient document came from.

    file, line : the source of the patient's header (its first row in the source table).
    header : document field (e.g. ``covariates.age``) -> (source column, line of the value).
    tables : per document table, one (file, line, {field: column}) per record, in order.
    raw_id : the patient's id as written in the source.
    """

    file: str
    line: int | None
    raw_id: str
    header: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    tables: dict[str, list[tuple[str, int, dict[str, str]]]] = field(default_factory=lambda: defaultdict(list))


# twin.io.load labels some row checks with the bundle file name ("measurements.csv") even
# for in-memory documents; rows are then 1-based record numbers, as for document tables.
_TABLE_OF_FILE = {fname: name for name, (_, fname) in TABLES.items()}


def _relocate(p: Problem, label: str, pid: str, trace: _Trace) -> Problem:
    """Rewrite a problem located in a generated document to its source file, line and column."""
    if p.file == label:
        column, line = trace.header.get(p.field or "", (p.field, trace.line))
        return dataclasses.replace(p, file=trace.file, row=line, field=column, message=f"patient {pid}: {p.message}")
    table = _TABLE_OF_FILE.get(p.file)
    if p.file.startswith(label + _SEP):
        table = p.file[len(label + _SEP):].removeprefix("omics.")
    if table is not None:
        recs = trace.tables.get(table, [])
        if p.row is not None and 1 <= p.row <= len(recs):
            file, line, fields = recs[p.row - 1]
            return dataclasses.replace(p, file=file, row=line, field=fields.get(p.field or "", p.field), message=_lines(p.message, recs), received=_lines(p.received, recs))
        file, _, fields = recs[0] if recs else (trace.file, None, {})
        return dataclasses.replace(p, file=file, row=None, field=fields.get(p.field or "", p.field), message=f"patient {pid}: {p.message}")
    return p


def _lines(text: str | None, recs: list) -> str | None:
    """Rewrite 'row N' (a record number of the document) as 'line L' of the source file."""
    if text is None:
        return None

    def sub(m: re.Match) -> str:
        n = int(m.group(1))
        return f"line {recs[n - 1][1]}" if 1 <= n <= len(recs) else m.group(0)

    return re.sub(r"\brow (\d+)\b", sub, text)


def _build_cohort(
    docs: list[tuple[dict, _Trace, list[Problem]]], problems: ProblemList, *, path: Path, name: str, source: dict
) -> Cohort:
    """Check each document with :func:`twin.io.patient_from_document`; raise on any error.

    ``docs`` holds (document, trace, importer notes of that patient). Errors of every
    patient (and those already in ``problems``) are raised together.
    """
    from ..io import patient_from_document

    patients = []
    for doc, trace, own_notes in docs:
        pid = str(doc["id"])
        label = f"patient {pid}"
        patient, found = patient_from_document(doc, label)
        located = [_relocate(p, label, pid, trace) for p in found]
        problems.extend(p for p in located if p.severity == "error")
        if patient is not None:
            src = {**source, "id_in_file": trace.raw_id}
            patients.append(dataclasses.replace(patient, source=src, notes=tuple(own_notes) + tuple(located)))
    if problems.errors:
        raise PatientFileError(str(path), problems)
    return Cohort(tuple(patients), name=name, source={**source, "notes": tuple(p for p in problems if p.severity != "error")})


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_NA_TOKENS = frozenset({"", ".", "na", "nan", "n/a", "null", "none", "[not available]", "[not applicable]", "[unknown]", "[not evaluated]", "[discrepancy]", "[not reported]", "[missing]"})


def _is_missing(raw: str) -> bool:
    return str(raw).strip().lower() in _NA_TOKENS


def _int_text(raw: str) -> str:
    """'1', '1.0', '1e0' -> '1'; other text unchanged (ids, codes)."""
    s = str(raw).strip()
    try:
        x = float(s)
    except ValueError:
        return s
    return str(int(x)) if x.is_integer() else s


def _line_of_parser_error(exc: Exception) -> int | None:
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else None


from .cbioportal import attach_omics, read_cbioportal, read_maf  # noqa: E402  (helpers above are used by the submodules)
from .nonmem import read_nonmem, write_nonmem  # noqa: E402
