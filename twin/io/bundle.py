"""Low-level reading of a patient bundle (folder, JSON or YAML) into raw, located records.

Nothing is interpreted here beyond the file syntax: every cell stays a string (CSV) or
the parsed JSON/YAML value, tagged with its file and row so later checks can say where.
Files are untrusted: no pickle, ``yaml.safe_load`` only, symlinks may not leave the
bundle, sizes are capped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProblemList, close_matches
from .records import TABLES, OMICS_LAYERS, PatientDocument, required_fields

__all__ = ["RawBundle", "read_bundle", "read_document", "MAX_FILE_BYTES"]

MAX_FILE_BYTES = 256 * 1024 * 1024
_HEADER_KEYS = set(PatientDocument.model_fields) - set(TABLES) - {"omics"}


@dataclass
class RawTable:
    """Rows of one table: ``rows`` is a list of (row number, {field: raw value})."""

    file: str
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class RawBundle:
    path: Path
    kind: str  # "folder" | "json" | "yaml"
    header_file: str
    header: dict[str, Any] | None
    tables: dict[str, RawTable]
    hashes: dict[str, str]
    problems: ProblemList


def _decode(data: bytes, label: str, problems: ProblemList) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.error(
            label,
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})",
            expected="UTF-8 encoded text",
            received="another encoding (often Latin-1/Windows-1252 from a spreadsheet export)",
            fix="re-save the file as 'CSV UTF-8' (Excel) or convert it: iconv -f latin1 -t utf-8",
        )
        return None


def _read_bytes(path: Path, root: Path, label: str, problems: ProblemList, hashes: dict) -> bytes | None:
    try:
        resolved = path.resolve(strict=True)
    except OSError as exc:
        problems.error(label, f"cannot read the file ({exc.strerror})", fix="check that the file exists and is readable")
        return None
    if root.is_dir() and not resolved.is_relative_to(root.resolve()):
        problems.error(
            label,
            "the file points outside the patient folder (symbolic link)",
            expected=f"a file inside {root.name}/",
            received=f"a link to another location",
            fix="copy the file into the patient folder instead of linking to it",
        )
        return None
    size = resolved.stat().st_size
    if size > MAX_FILE_BYTES:
        problems.error(label, f"the file is too large ({size} bytes)", expected=f"at most {MAX_FILE_BYTES} bytes", fix="split the cohort into smaller files")
        return None
    data = resolved.read_bytes()
    hashes[label] = hashlib.sha256(data).hexdigest()
    return data


def _read_csv(text: str, label: str, model, problems: ProblemList) -> RawTable:
    table = RawTable(label)
    if not text.strip():
        problems.error(
            label,
            "the file is empty",
            expected="a header line naming the columns, e.g. " + ",".join(model.model_fields),
            received="no content",
            fix="add the header and data rows, or delete the file if there is nothing to record",
        )
        return table
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as exc:  # pragma: no cover - csv rarely fails on the header
        problems.error(label, f"the header line is not valid CSV ({exc})", fix="check quotes and separators")
        return table
    header = [h.strip() for h in header]
    known = list(model.model_fields)
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        sep = ";" if ";" in header[0] else "tab"
        problems.error(
            label,
            f"the columns are separated by '{sep}', not commas",
            row=1,
            expected="comma-separated values",
            received=header[0][:80],
            fix="re-export the table as comma-separated CSV",
        )
        return table
    bad_header = False
    for h in header:
        if h == "":
            problems.error(label, "a column has no name", row=1, expected="a name for every column", fix="name the column or delete it")
            bad_header = True
        elif h not in known:
            problems.error(
                label,
                f"unknown column '{h}'." + close_matches(h, known),
                row=1,
                field=h,
                expected="columns among " + ", ".join(known),
                received=h,
                fix="rename the column to one of the expected names, or remove it (free text belongs in 'note')"
                if "note" in known
                else "rename the column to one of the expected names, or remove it",
            )
            bad_header = True
    dups = sorted({h for h in header if h and header.count(h) > 1})
    for h in dups:
        problems.error(label, f"column '{h}' appears more than once", row=1, field=h, fix="keep one column of each name")
        bad_header = True
    missing = [f for f in required_fields(model) if f not in header]
    for f in missing:
        problems.error(
            label,
            f"required column '{f}' is missing",
            row=1,
            field=f,
            expected="columns " + ", ".join(required_fields(model)) + " (required)",
            received=", ".join(header),
            fix=f"add a '{f}' column",
        )
        bad_header = True
    if bad_header:
        return table
    try:
        for i, cells in enumerate(reader, start=2):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                problems.error(
                    label,
                    f"the row has {len(cells)} cells but the header has {len(header)} columns",
                    row=i,
                    expected=f"{len(header)} comma-separated cells",
                    received=",".join(cells)[:120],
                    fix="quote cells that contain commas, and check for missing or extra separators",
                )
                continue
            table.rows.append((i, dict(zip(header, cells))))
    except csv.Error as exc:
        problems.error(label, f"invalid CSV ({exc})", row=reader.line_num, fix="check unbalanced quotes")
    return table


def _tables_from_document(doc: dict, label: str, problems: ProblemList) -> dict[str, RawTable]:
    tables: dict[str, RawTable] = {}
    omics = doc.pop("omics", None) or {}
    if not isinstance(omics, dict):
        problems.error(label, "'omics' must be a mapping of layers", field="omics", expected="{mutations: [...], copy_number: [...], ...}", received=type(omics).__name__)
        omics = {}
    for key in list(omics):
        if key not in OMICS_LAYERS:
            problems.error(label, f"unknown omics layer '{key}'." + close_matches(key, OMICS_LAYERS), field=f"omics.{key}", expected=", ".join(OMICS_LAYERS), fix="rename or remove the layer")
            omics.pop(key)
    sources = {**{k: doc.pop(k, None) for k in ("measurements", "dosing", "phases")}, **omics}
    for name, rows in sources.items():
        if rows is None:
            continue
        sub = f"{label} › {name if name not in OMICS_LAYERS else 'omics.' + name}"
        if not isinstance(rows, list):
            problems.error(sub, f"'{name}' must be a list of records", expected="a list of objects", received=type(rows).__name__, fix="write the table as a list of {field: value} objects")
            continue
        t = RawTable(sub)
        model = TABLES[name][0]
        for i, rec in enumerate(rows, start=1):
            if not isinstance(rec, dict):
                problems.error(sub, "a record must be an object of field: value", row=i, received=repr(rec)[:80])
                continue
            unknown = [k for k in rec if k not in model.model_fields]
            for k in unknown:
                problems.error(sub, f"unknown field '{k}'." + close_matches(k, list(model.model_fields)), row=i, field=k, expected=", ".join(model.model_fields), fix="rename or remove the field")
            if unknown:
                continue
            t.rows.append((i, rec))
        tables[name] = t
    return tables


def read_document(doc: dict, label: str = "document") -> RawBundle:
    """Raw located records from an in-memory patient document (as in a single JSON file).

    Importers build such documents and pass them through the same checks as files.
    """
    import copy

    problems = ProblemList()
    doc = copy.deepcopy(doc)
    tables = _tables_from_document(doc, label, problems)
    for key in list(doc):
        if key not in _HEADER_KEYS:
            problems.error(label, f"unknown top-level key '{key}'." + close_matches(key, sorted(_HEADER_KEYS | set(TABLES) | {"omics"})), field=key, fix="rename or remove the key")
            doc.pop(key)
    return RawBundle(Path(label), "document", label, doc, tables, {}, problems)


def read_bundle(path: str | Path) -> RawBundle:
    """Read a patient bundle into raw located records; syntax problems go to ``problems``."""
    path = Path(path)
    problems = ProblemList()
    hashes: dict[str, str] = {}
    if not path.exists():
        problems.error(str(path), "no such file or folder", expected="a patient folder (with patient.toml) or a .json/.yaml file", fix="check the path")
        return RawBundle(path, "missing", str(path), None, {}, hashes, problems)
    if path.is_dir():
        label = "patient.toml"
        header = None
        hp = path / label
        if not hp.exists():
            problems.error(
                path.name + "/",
                "the folder has no patient.toml",
                expected="patient.toml with at least: id = \"P001\"",
                received=", ".join(sorted(p.name for p in path.iterdir())[:10]) or "an empty folder",
                fix="add patient.toml (see docs/patient-format.md), or point to a .json/.yaml patient file",
            )
        else:
            data = _read_bytes(hp, path, label, problems, hashes)
            text = _decode(data, label, problems) if data is not None else None
            if text is not None:
                try:
                    header = tomllib.loads(text)
                except tomllib.TOMLDecodeError as exc:
                    problems.error(label, f"not valid TOML: {exc}", expected="TOML key = value lines", fix="check quotes around text values and the line it names")
        tables: dict[str, RawTable] = {}
        expected_files = {fname: name for name, (_, fname) in TABLES.items()}
        for name, (model, fname) in TABLES.items():
            fp = path / fname
            if not fp.exists():
                continue
            data = _read_bytes(fp, path, fname, problems, hashes)
            text = _decode(data, fname, problems) if data is not None else None
            if text is not None:
                tables[name] = _read_csv(text, fname, model, problems)
        for fp in sorted(path.rglob("*")):
            rel = fp.relative_to(path).as_posix()
            if fp.is_file() and rel not in expected_files and rel != "patient.toml" and not rel.startswith(".") and rel.lower() not in ("readme.md", "provenance.md", "licence.md", "license.md"):
                problems.warning(
                    rel,
                    "file not part of the patient format; it is ignored." + close_matches(rel, list(expected_files)),
                    expected="patient.toml, " + ", ".join(expected_files),
                    received=rel,
                    fix="rename it to one of the expected names, or move it out of the patient folder",
                )
        return RawBundle(path, "folder", label, header, tables, hashes, problems)

    label = path.name
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        problems.error(label, "not a patient file", expected="a folder with patient.toml, or a .json / .yaml / .yml file", received=f"a '{suffix or 'no extension'}' file", fix="convert it (see docs/patient-format.md; NONMEM tables: twin.importers.read_nonmem)")
        return RawBundle(path, "unknown", label, None, {}, hashes, problems)
    data = _read_bytes(path, path.parent, label, problems, hashes)
    text = _decode(data, label, problems) if data is not None else None
    if text is None:
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    if not text.strip():
        problems.error(label, "the file is empty", expected="a patient document with at least an 'id'", fix="write the patient (see docs/patient-format.md)")
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    doc: Any = None
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.error(label, f"not valid JSON: {exc.msg}", row=exc.lineno, expected="a JSON object", fix=f"fix the syntax at line {exc.lineno}, column {exc.colno}")
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problems.error(label, f"not valid YAML: {getattr(exc, 'problem', exc)}", row=(mark.line + 1) if mark else None, expected="a YAML mapping", fix="check indentation and quotes at the line named")
    if doc is None:
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    if not isinstance(doc, dict):
        problems.error(label, "the top level must be an object (mapping)", expected="{id: ..., covariates: ..., measurements: [...]}", received=type(doc).__name__)
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    raw = read_document(doc, label)
    problems.extend(raw.problems)
    return RawBundle(path, suffix.lstrip("."), label, raw.header, raw.tables, hashes, problems)
