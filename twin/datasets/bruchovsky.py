"""Converter for the Bruchovsky et al. intermittent androgen deprivation (IAD) data.

The source ("dataTanaka", distributed by N. Bruchovsky and G. Tanaka; re-hosted in
github.com/Michaelrising/PPOProstateCancer) is a folder::

    Bruchovsky_et_al/patientNNN.txt     Canadian phase II IAS trial (Bruchovsky 2006, 2007)
    Shaw_et_al/patientNNNN.txt          St Bartholomew's cohort (Shaw 2007)
    classificationsofpatients.txt       relapse classes of Hirata, Bruchovsky & Aihara 2010

Each patient file is headerless, comma-separated, one row per visit::

    1 patient number   2 date            3 CPA (mg/day)    4 LEU (mg depot)
    5 PSA (ng/mL)      6 testosterone (nmol/L)             7 cycle number
    8 on (1) / off (0) treatment         9 day number      10 day number (other origin)

:func:`from_raw` turns such a folder into a :class:`~twin.patient.Cohort`; every patient
passes the same checks as a patient file (:func:`twin.io.patient_from_document`). The
decisions (times, dosing, phases, censoring, quirks of the source) are documented in
``docs/datasets.md`` and in the module constants below.

Regenerate the bundled copy with::

    python -m twin.datasets.bruchovsky /path/to/bruchovsky_iad_prostate OUTDIR
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, PatientFileError
from ..patient import Cohort, Patient

__all__ = ["from_raw", "read_raw_file", "read_classification", "patient_document", "write_bundles", "DATASET", "CITATION", "LICENCE", "PSA_ZERO_LLOQ", "PSA_REPORTING_FLOORS"]

DATASET = "Bruchovsky et al. intermittent androgen deprivation, prostate cancer (dataTanaka; Bruchovsky 2006/2007 and Shaw 2007 cohorts)"
CITATION = (
    "Bruchovsky N, et al. Cancer 2006;107:389-395 and Cancer 2007;109:858-867 (Canadian phase II IAS trial); "
    "Shaw GL, et al. BJU Int 2007;99:1056-1065 (Shaw cohort); "
    "Hirata Y, Bruchovsky N, Aihara K. J Theor Biol 2010;264:517-527 (relapse classification)"
)
LICENCE = (
    "no explicit licence: publicly released by the trial PI (N. Bruchovsky) for research use; "
    "attribution required; confirm before redistributing outside research/testing"
)
SOURCE_URL = "https://github.com/Michaelrising/PPOProstateCancer/tree/ab3d168ab70d671780c2967d366cc1e88ea564ac/data/dataTanaka"

#: PSA written as 0 in the source is read as censored below this limit [ng/mL]: 0.02 is the
#: smallest positive PSA of the cohort and its most frequent low value (the assay's
#: reporting floor); a true zero is not a measurement.
PSA_ZERO_LLOQ = 0.02

#: PSA values written exactly at an assay's reporting floor [ng/mL] are read as left-censored
#: at that value (``below_lloq``, ``lloq`` = the value): in this cohort 0.2, 0.1 and 0.02 are
#: 10-40 x more frequent than their neighbours (0.2: 161 values vs 9 at 0.19 and 2 at 0.21;
#: 0.1: 83 vs 4 and 7; 0.02: 112 vs 1 and 8), come in runs at the nadir, and 83% of the 0.2s
#: precede the patient's first value below 0.2 (an older assay's floor). Decision D19.
PSA_REPORTING_FLOORS = (0.2, 0.1, 0.02)

_COLUMNS = ("patient", "date", "cpa", "leu", "psa", "testosterone", "cycle", "on", "day", "day2")
_COHORTS = {"Bruchovsky_et_al": ("bruchovsky", 3), "Shaw_et_al": ("shaw", 4)}

# Drugs recorded in the CPA / LEU columns other than cyproterone acetate and leuprolide.
# Codes as written in the source -> (drug, route, declaration for drugs not in twin's catalogue).
_CPA_CODES = {
    "FLU": "flutamide",
    "CAS": "bicalutamide",  # Casodex
    "NIL": "nilutamide",
}
_LEU_CODES = {
    "ZOL": "goserelin",  # Zoladex 3.6 mg implant (monthly)
}
_DECLARED = {
    "flutamide": {"targets": ["AR"], "class": "nonsteroidal antiandrogen"},
    "bicalutamide": {"targets": ["AR"], "class": "nonsteroidal antiandrogen"},
    "nilutamide": {"targets": ["AR"], "class": "nonsteroidal antiandrogen"},
    "goserelin": {"targets": ["GNRHR"], "class": "GnRH agonist (androgen deprivation)"},
}
_ROUTES = {"cyproterone_acetate": "oral", "flutamide": "oral", "bicalutamide": "oral", "nilutamide": "oral", "leuprolide": "im", "goserelin": "sc"}


@dataclass(frozen=True)
class RawRow:
    """One visit of a raw patient file (text cells as written, numbers parsed)."""

    line: int
    date: str
    cpa: str
    leu: str
    psa: str
    testosterone: str
    cycle: int
    on: int
    day: int
    day2: str


def read_raw_file(path: str | Path) -> list[RawRow]:
    """Read one raw patient file into rows; raises :class:`InputError` with the line on bad syntax."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, cells in enumerate(csv.reader(fh), start=1):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(_COLUMNS):
                raise InputError(f"{path.name} line {i}: expected {len(_COLUMNS)} comma-separated columns ({', '.join(_COLUMNS)}), received {len(cells)}; fix: check the file layout")
            c = dict(zip(_COLUMNS, (x.strip() for x in cells)))
            try:
                rows.append(RawRow(i, c["date"], c["cpa"], c["leu"], c["psa"], c["testosterone"], int(c["cycle"]), int(c["on"]), int(c["day"]), c["day2"]))
            except ValueError:
                raise InputError(f"{path.name} line {i}: cycle, on/off and day number (columns 7-9) must be integers, received {c['cycle']!r}, {c['on']!r}, {c['day']!r}") from None
    if not rows:
        raise InputError(f"{path.name}: no rows")
    return rows


def read_classification(path: str | Path) -> dict[str, dict]:
    """Labels from ``classificationsofpatients.txt``: patient id -> {relapse, hirata_class, metastasis, cohort}."""
    labels: dict[str, dict] = {}
    cohort = klass = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s:
            continue
        if s.rstrip(":") in _COHORTS:
            cohort = _COHORTS[s.rstrip(":")][0]
            continue
        low = s.lower()
        if low.endswith(":") and ("relapse" in low or "metastasis" in low):
            klass = re.sub(r"\s*\(", " (", low.rstrip(":"))  # "with metastasis(without relapse)" -> "... (without relapse)"
            continue
        if cohort and klass and re.fullmatch(r"[\d,\s]+", s):
            for num in re.findall(r"\d+", s):
                pid = _patient_id(cohort, int(num))
                labels[pid] = {
                    "cohort": cohort,
                    "hirata_class": klass,
                    "relapse": klass.startswith("with relapse"),
                    "metastasis": "metastasis" in klass,
                }
    return labels


def _patient_id(cohort: str, number: int) -> str:
    width = 3 if cohort == "bruchovsky" else 4
    return f"{cohort}-{number:0{width}d}"


def _num(text: str) -> float | None:
    return float(text) if text != "" else None


def _parse_drug_cell(text: str, column: str, default_drug: str, codes: dict[str, str], where: str) -> tuple[str, float | None] | None:
    """(drug, amount) from a CPA/LEU cell; ``None`` when blank or 0 (no dose)."""
    if text == "":
        return None
    try:
        amount = float(text)
        return None if amount == 0 else (default_drug, amount)
    except ValueError:
        pass
    m = re.fullmatch(r"([A-Za-z]+)\s*([\d.]+)?", text)
    if not m or m.group(1).upper() not in codes:
        raise InputError(f"{where}: unknown entry {text!r} in the {column} column; expected a dose in mg or one of {', '.join(f'{k} (= {v})' for k, v in codes.items())} followed by a dose")
    return codes[m.group(1).upper()], (float(m.group(2)) if m.group(2) else None)


def patient_document(rows: list[RawRow], cohort: str, number: int, labels: dict | None, *, file_label: str = "") -> dict:
    """The patient document (single-file layout, times in days) of one raw patient file."""
    pid = _patient_id(cohort, number)
    where = file_label or pid
    notes: list[str] = []
    day0 = rows[0].day
    days = [r.day - day0 for r in rows]
    if any(b <= a for a, b in zip(days, days[1:])):
        raise InputError(f"{where}: day numbers (column 9) are not strictly increasing; fix: sort the rows, merge duplicated visits")

    # -- measurements -------------------------------------------------------------------
    meas = []
    zero_psa = 0
    floors = 0
    for r, t in zip(rows, days):
        psa = _num(r.psa)
        if psa is not None:
            if psa == 0:
                zero_psa += 1
                meas.append({"time": t, "observable": "psa", "unit": "ng/mL", "below_lloq": True, "lloq": PSA_ZERO_LLOQ, "note": "written as 0 in the source"})
            elif psa in PSA_REPORTING_FLOORS:
                floors += 1
                meas.append({"time": t, "observable": "psa", "unit": "ng/mL", "below_lloq": True, "lloq": psa, "note": f"written as {psa:g}, an assay reporting floor"})
            else:
                meas.append({"time": t, "observable": "psa", "value": psa, "unit": "ng/mL"})
        tst = _num(r.testosterone)
        if tst is not None:
            meas.append({"time": t, "observable": "testosterone", "value": tst, "unit": "nmol/L"})
    if zero_psa:
        notes.append(f"{zero_psa} PSA value(s) written as 0 read as censored below {PSA_ZERO_LLOQ} ng/mL")
    if floors:
        notes.append(f"{floors} PSA value(s) written exactly at a reporting floor ({', '.join(f'{x:g}' for x in PSA_REPORTING_FLOORS)} ng/mL) read as censored below that value")

    # -- phases: runs of (cycle, on/off); each ends where the next begins ---------------
    runs: list[tuple[int, int, int, int]] = []  # cycle, on, first row index, last row index
    for i, r in enumerate(rows):
        if runs and runs[-1][:2] == (r.cycle, r.on):
            runs[-1] = (r.cycle, r.on, runs[-1][2], i)
        else:
            runs.append((r.cycle, r.on, i, i))
    phases = []
    bad_coding = set()
    for k, (cyc, on, i0, i1) in enumerate(runs):
        if cyc < 1 or on not in (0, 1):
            bad_coding.add((cyc, on))
            continue
        end = days[runs[k + 1][2]] if k + 1 < len(runs) else days[i1]
        phases.append({"cycle": cyc, "phase": "on" if on else "off", "start": days[i0], "end": end})
    if bad_coding:
        notes.append("rows with cycle/on-off codes outside the documented values (cycle >= 1, on/off 1 or 0) " + ", ".join(f"cycle {c} on/off {o}" for c, o in sorted(bad_coding)) + ": no phase or treatment is inferred for them")

    # -- dosing -------------------------------------------------------------------------
    dosing = []
    declared = set()
    if cohort == "bruchovsky":
        stop_visit = []
        for i, (r, t) in enumerate(zip(rows, days)):
            cpa = _parse_drug_cell(r.cpa, "CPA", "cyproterone_acetate", _CPA_CODES, f"{where} line {r.line}")
            leu = _parse_drug_cell(r.leu, "LEU", "leuprolide", _LEU_CODES, f"{where} line {r.line}")
            if r.on != 1:
                if cpa is not None or leu is not None:
                    stop_visit.append(f"day {t}")
                continue
            if cpa is not None:
                drug, amount = cpa
                count = days[i + 1] - t if i + 1 < len(rows) else 1
                rec = {"drug": drug, "time": t, "route": _ROUTES[drug], "interval": 1, "count": count}
                if amount is not None:
                    rec.update(amount=amount, unit="mg")
                dosing.append(rec)
                if drug in _DECLARED:
                    declared.add(drug)
                if i + 1 == len(rows):
                    notes.append(f"daily {drug} recorded at the last visit (day {t}): one dose, nothing assumed after follow-up ends")
            if leu is not None:
                drug, amount = leu
                rec = {"drug": drug, "time": t, "route": _ROUTES[drug]}
                if amount is not None:
                    rec.update(amount=amount, unit="mg")
                dosing.append(rec)
                if drug in _DECLARED:
                    declared.add(drug)
        if stop_visit:
            notes.append("CPA column filled on off-treatment rows (" + ", ".join(stop_visit) + "): read as the stop visit, no dose added")
    else:
        for ph in phases:
            if ph["phase"] != "on":
                continue
            last = ph is phases[-1]
            count = int(ph["end"] - ph["start"]) + (1 if last else 0)
            dosing.append({"drug": "androgen_deprivation", "time": ph["start"], "route": "oral", "interval": 1, "count": max(count, 1)})
    dosing.sort(key=lambda d: (d["time"], d["drug"]))

    # -- header -------------------------------------------------------------------------
    header_labels = {"cohort": cohort}
    if labels:
        header_labels.update({k: v for k, v in labels.items() if k != "cohort"})
    else:
        notes.append("not listed in classificationsofpatients.txt: no relapse label")
    source = {"dataset": DATASET, "citation": CITATION, "licence": LICENCE, "url": SOURCE_URL, "source_file": file_label or pid, "time": "days since the patient's first record (column 9 minus its first value); calendar dates not shipped"}
    if cohort == "shaw":
        source["dosing"] = "agents and doses not recorded in the source: each on-treatment phase is daily rows of androgen_deprivation (interval 1 day, amount blank, route nominal)"
    if notes:
        source["conversion_notes"] = "; ".join(notes)
    doc = {
        "id": pid,
        "covariates": {"species": "human", "sex": "male"},
        "labels": header_labels,
        "source": source,
        "measurements": meas,
        "phases": phases,
    }
    if dosing:
        doc["dosing"] = dosing
    if declared:
        doc["drugs"] = {d: _DECLARED[d] for d in sorted(declared)}
    return doc


def _check_dates(rows: list[RawRow]) -> list[str]:
    """Rows whose date disagrees with the day number by another offset than the file's usual one.

    The message names the line and the size of the disagreement, never the date itself.
    """
    import datetime as dt

    offsets = []
    for r in rows:
        d = dt.datetime.strptime(r.date.split()[0], "%Y/%m/%d").date()
        offsets.append(r.day - (d - dt.date(1970, 1, 1)).days)
    common = max(set(offsets), key=offsets.count)
    return [f"line {r.line}: the date (column 2) is {o - common:+d} day(s) off the day number (column 9)" for r, o in zip(rows, offsets) if o != common]


def from_raw(path: str | Path, *, cohorts: tuple[str, ...] = ("bruchovsky", "shaw")) -> Cohort:
    """Convert a folder in the dataTanaka layout into a :class:`~twin.patient.Cohort`.

    Parameters
    ----------
    path : folder holding ``Bruchovsky_et_al/``, ``Shaw_et_al/`` (either may be absent) and
        optionally ``classificationsofpatients.txt`` (labels; patients not listed get no
        relapse label).
    cohorts : which sub-cohorts to convert.

    Returns
    -------
    Cohort of patients ``bruchovsky-NNN`` then ``shaw-NNNN``, in file-name order; each passed
    the patient-file checks. Raises :class:`~twin.errors.PatientFileError` listing the
    problems if a converted patient fails them, :class:`InputError` on an unreadable file.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: expected the dataTanaka folder (Bruchovsky_et_al/, Shaw_et_al/, classificationsofpatients.txt)")
    from ..io import patient_from_document

    cls_file = root / "classificationsofpatients.txt"
    labels = read_classification(cls_file) if cls_file.exists() else {}
    patients: list[Patient] = []
    found = False
    for folder, (cohort, _width) in _COHORTS.items():
        if cohort not in cohorts or not (root / folder).is_dir():
            continue
        found = True
        for f in sorted((root / folder).glob("patient*.txt")):
            m = re.fullmatch(r"patient(\d+)\.txt", f.name)
            if not m:
                continue
            number = int(m.group(1))
            rows = read_raw_file(f)
            label = f"{folder}/{f.name}"
            doc = patient_document(rows, cohort, number, labels.get(_patient_id(cohort, number)), file_label=label)
            date_quirks = _check_dates(rows)
            if date_quirks:
                extra = "date/day-number disagreement (day number used): " + "; ".join(date_quirks)
                src = doc["source"]
                src["conversion_notes"] = (src["conversion_notes"] + "; " if "conversion_notes" in src else "") + extra
            patient, problems = patient_from_document(doc, label)
            if patient is None:
                raise PatientFileError(label, problems.errors)
            patients.append(patient)
    if not found:
        raise InputError(f"{root}: no Bruchovsky_et_al/ or Shaw_et_al/ folder; fix: point to the dataTanaka folder")
    return Cohort(tuple(patients), name="bruchovsky_iad", source={"dataset": DATASET, "citation": CITATION, "licence": LICENCE, "path": str(root)})


def write_bundles(cohort: Cohort, outdir: str | Path, *, overwrite: bool = True) -> list[Path]:
    """Save every patient as a bundle folder ``outdir/<id>/`` (canonical units)."""
    from ..io import save_cohort

    return save_cohort(cohort, outdir, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """``python -m twin.datasets.bruchovsky SRC OUTDIR``: convert and write the bundles."""
    import argparse
    import shutil

    ap = argparse.ArgumentParser(prog="python -m twin.datasets.bruchovsky", description="Convert the dataTanaka IAD folder into twin patient bundles.")
    ap.add_argument("src", help="folder with Bruchovsky_et_al/, Shaw_et_al/, classificationsofpatients.txt")
    ap.add_argument("outdir", help="output folder (one sub-folder per patient)")
    args = ap.parse_args(argv)
    cohort = from_raw(args.src)
    paths = write_bundles(cohort, args.outdir)
    bench = Path(args.src) / "benchmarks"
    if bench.is_dir():
        (Path(args.outdir) / "benchmarks").mkdir(exist_ok=True)
        for f in bench.glob("*.csv"):
            shutil.copyfile(f, Path(args.outdir) / "benchmarks" / f.name)
    print(f"wrote {len(paths)} patients to {args.outdir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
