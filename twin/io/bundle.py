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
import re
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
            row=line,
            expected="UTF-8 encoded text",
            received="another encoding (often Latin-1/Windows-1252 from a spreadsheet export)",
            fix="re-save the file as 'CSV UTF-8' (Excel) or convert it: iconv -f latin1 -t utf-8",
        )
        return None


def _read_bytes(path: Path, root: Path, label: str, problems: ProblemList, hashes: dict) -> bytes | None:
    try:
        resolved = path.resolve(strict=True)
    except OSError as exc:
        problems.error(
            label,
            f"cannot read the file ({exc.strerror or exc})" + (" (a symbolic link to a file that does not exist?)" if path.is_symlink() else ""),
            expected="a readable file",
            received=exc.strerror or type(exc).__name__,
            fix="check that the file exists and that you may read it",
        )
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
        problems.error(label, "the file is too large to be a patient file", expected=f"at most {MAX_FILE_BYTES} bytes", received=f"{size} bytes", fix="split the cohort into one file per patient")
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
        problems.error(label, f"the header line is not valid CSV ({exc})", row=1, expected="column names separated by commas", received=_line(text, 1), fix="check quotes and separators")
        return table
    header = [h.strip() for h in header]
    known = list(model.model_fields)
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        sep = ";" if ";" in header[0] else "tab"
        decimal_comma = sep == ";" and re.search(r"\d,\d", text) is not None
        problems.error(
            label,
            f"the columns are separated by '{sep}', not commas",
            row=1,
            expected="comma-separated values (CSV) with a decimal point",
            received=header[0][:80],
            fix="re-export the table as comma-separated CSV ('CSV UTF-8' in Excel)"
            + ("; the numbers use decimal commas: write them with a decimal point (12.5, not 12,5)" if decimal_comma else ""),
        )
        return table
    bad_header = False
    for pos, h in enumerate(header, start=1):
        if h == "":
            problems.error(
                label,
                f"column {pos} has no name" + (" (a trailing comma at the end of the header line?)" if pos == len(header) else ""),
                row=1,
                expected="a name for every column",
                received=",".join(header)[:120],
                fix="name the column or delete it",
            )
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
        problems.error(label, f"column '{h}' appears more than once", row=1, field=h, expected="each column once", received=",".join(header)[:120], fix="keep one column of each name (delete or rename the other)")
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
            fix=f"add a column named '{f}'",
        )
        bad_header = True
    if bad_header:
        return table
    # ``row`` is the line number in the file (the header is row 1), as a spreadsheet shows it.
    while True:
        i = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.error(label, f"the line is not valid CSV ({exc})", row=i, expected="cells separated by commas; quotes in pairs", received=_line(text, i), fix="check for an unbalanced quote (\") on this line")
            break
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            fix = "quote cells that contain commas, and check for missing or extra separators"
            if len(cells) > len(header) and any(a.strip().lstrip("-").isdigit() and b.strip().isdigit() for a, b in zip(cells, cells[1:])):
                fix = "a number written with a decimal comma (8,1) splits into two cells: write it with a decimal point (8.1); " + fix
            problems.error(
                label,
                f"the row has {len(cells)} cells but the header has {len(header)} columns",
                row=i,
                expected=f"{len(header)} comma-separated cells ({','.join(header)})",
                received=",".join(cells)[:120],
                fix=fix,
            )
            continue
        table.rows.append((i, dict(zip(header, cells))))
    return table


def _tables_from_document(doc: dict, label: str, problems: ProblemList) -> dict[str, RawTable]:
    tables: dict[str, RawTable] = {}
    omics = doc.pop("omics", None) or {}
    if not isinstance(omics, dict):
        problems.error(label, "'omics' must be a mapping of layers", field="omics", expected="{mutations: [...], copy_number: [...], ...}", received=type(omics).__name__, fix="write omics as an object whose keys are the layers: " + ", ".join(OMICS_LAYERS))
        omics = {}
    for key in list(omics):
        if key not in OMICS_LAYERS:
            problems.error(label, f"unknown omics layer '{key}'." + close_matches(str(key), OMICS_LAYERS), field=f"omics.{key}", expected="layers among " + ", ".join(OMICS_LAYERS), received=repr(key), fix="rename the layer to one of the expected names, or remove it")
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
                problems.error(
                    sub,
                    "a record must be an object of field: value pairs",
                    row=i,
                    expected='{"time": 0, "observable": "psa", "value": 12.5, "unit": "ng/mL"}' if name == "measurements" else "an object of field: value pairs",
                    received=repr(rec)[:80],
                    fix="write each row of the table as one object",
                )
                continue
            unknown = [k for k in rec if k not in model.model_fields]
            for k in unknown:
                problems.error(
                    sub,
                    f"unknown field '{k}'." + close_matches(str(k), list(model.model_fields)),
                    row=i,
                    field=str(k),
                    expected="fields among " + ", ".join(model.model_fields),
                    received=f"{k!r}: {rec[k]!r}"[:120],
                    fix="rename the field to one of the expected names, or remove it",
                )
            if unknown:
                continue
            t.rows.append((i, rec))
        tables[name] = t
    return tables


def _line(text: str, lineno: int | None) -> str | None:
    lines = text.splitlines()
    if lineno is None or not 1 <= lineno <= len(lines):
        return None
    s = lines[lineno - 1].strip()
    return s if len(s) <= 100 else s[:97] + "..."


def _toml_problem(exc: Exception, text: str) -> dict:
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    line = int(m.group(1)) if m else getattr(exc, "lineno", None)
    what = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) if m else msg
    fix = "check this line: text values need double quotes on both sides (id = \"P001\"); numbers and true/false have none; dates are written 2019-01-15"
    if "newline" in what.lower() or "\\n" in what:
        fix = "a quote is probably not closed on this line: " + fix
    if "duplicate" in what.lower() or "cannot overwrite" in what.lower() or "cannot declare" in what.lower():
        fix = "each key (and each [section]) may appear only once: remove or merge the repeated one"
    return dict(
        message=f"not valid TOML: {what}" + (f" (line {line})" if line else ""),
        row=line,
        expected='TOML lines of key = value, e.g. id = "P001", and [sections] such as [covariates]',
        received=_line(text, line),
        fix=fix,
    )


def _no_duplicates(pairs: list, duplicates: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            duplicates.append(k)
        out[k] = v
    return out


def _yaml_loader():
    """A ``yaml.SafeLoader`` that keeps dates as text and rejects repeated keys.

    Dates stay text so the patient checks can report an impossible date (2019-02-30)
    with its row instead of failing inside the YAML reader.
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark, f"the key '{key}' appears twice", key_node.start_mark
                        )
                    seen.add(key)
                except TypeError:  # unhashable key: the base class reports it
                    pass
            return super().construct_mapping(node, deep=deep)

    _Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return _Loader


def read_document(doc: dict, label: str = "document") -> RawBundle:
    """Raw located records from an in-memory patient document (as in a single JSON file).

    Importers build such documents and pass them through the same checks as files.
    """
    import copy

    problems = ProblemList()
    doc = copy.deepcopy(doc)
    tables = _tables_from_document(doc, label, problems)
    allowed = sorted(_HEADER_KEYS | {"measurements", "dosing", "phases", "omics"})
    for key in list(doc):
        if key not in _HEADER_KEYS:
            problems.error(
                label,
                f"unknown top-level key '{key}'." + close_matches(str(key), allowed),
                field=str(key),
                expected="top-level keys among " + ", ".join(allowed),
                received=repr(key),
                fix="rename the key to one of the expected names, or remove it",
            )
            doc.pop(key)
    return RawBundle(Path(label), "document", label, doc, tables, {}, problems)


def read_bundle(path: str | Path) -> RawBundle:
    """Read a patient bundle into raw located records; syntax problems go to ``problems``."""
    path = Path(path)
    problems = ProblemList()
    hashes: dict[str, str] = {}
    if not path.exists():
        problems.error(str(path), "no such file or folder", expected="a patient folder (with patient.toml) or a .json/.yaml file", received="a path that does not exist", fix="check the path (spelling, and the folder you run twin from)")
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
                    problems.error(label, **_toml_problem(exc, text))
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
        problems.error(label, "the file is empty", expected="a patient document with at least an 'id'", received="no content", fix="write the patient (see docs/patient-format.md), or remove the file")
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    doc: Any = None
    if suffix == ".json":
        duplicates: list[str] = []
        try:
            doc = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, duplicates))
        except json.JSONDecodeError as exc:
            problems.error(
                label,
                f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                row=exc.lineno,
                expected="a JSON object: {\"id\": \"P001\", ...}",
                received=_line(text, exc.lineno),
                fix=f"fix the syntax at line {exc.lineno}, column {exc.colno} (or just before it): JSON needs double quotes and no trailing commas",
            )
        for key in duplicates:
            problems.error(label, f"key '{key}' appears twice in the same object", field=key, expected="each key once per object", received=f"'{key}' twice", fix="keep one of the two values (JSON readers silently keep the last one)")
    else:
        import yaml

        try:
            doc = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader (see _yaml_loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = (mark.line + 1) if mark else None
            problems.error(
                label,
                f"not valid YAML: {getattr(exc, 'problem', None) or exc}" + (f" (line {line}, column {mark.column + 1})" if mark else ""),
                row=line,
                expected="a YAML mapping: id: P001, then one key per line",
                received=_line(text, line) if line else None,
                fix="keep one of the two values"
                if "appears twice" in str(getattr(exc, "problem", ""))
                else "check indentation (spaces, not tabs; keys of one level aligned) and quotes at the line named",
            )
        except (ValueError, TypeError, OverflowError) as exc:  # pragma: no cover - defensive
            problems.error(label, f"not valid YAML: {exc}", expected="a YAML mapping", received=type(exc).__name__, fix="check the values of the file")
    if doc is None:
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    if not isinstance(doc, dict):
        problems.error(
            label,
            "the top level must be an object (mapping), not a " + {"list": "list", "str": "text", "int": "number", "float": "number", "bool": "true/false"}.get(type(doc).__name__, type(doc).__name__),
            expected="{id: ..., covariates: ..., measurements: [...]}",
            received=type(doc).__name__,
            fix="write one patient per file as an object; for several patients use one file each (a cohort folder)",
        )
        return RawBundle(path, suffix.lstrip("."), label, None, {}, hashes, problems)
    raw = read_document(doc, label)
    problems.extend(raw.problems)
    return RawBundle(path, suffix.lstrip("."), label, raw.header, raw.tables, hashes, problems)
