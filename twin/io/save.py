"""Write a :class:`~twin.patient.Patient` as a bundle folder or a single JSON/YAML file.

Values are written in canonical units (days, mg, the observables' units), so a saved
patient loads back identically. Output is atomic: a crash leaves no half-written bundle.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .._atomic import atomic_directory, atomic_write_text
from ..patient import Patient
from .records import FORMAT_VERSION, TABLES

__all__ = ["save_patient", "save_cohort", "patient_document"]


def _clean(v):
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def _records(df: pd.DataFrame, columns: list[str]) -> list[dict]:
    cols = [c for c in columns if c in df.columns]
    out = []
    for rec in df[cols].to_dict("records"):
        out.append({k: _clean(v) for k, v in rec.items() if _clean(v) is not None and _clean(v) != ""})
    return out


def _tables(patient: Patient) -> dict[str, list[dict]]:
    m = patient.measurements.copy()
    dosing = patient.history.table.copy()
    dosing["unit"] = "mg"
    dosing.loc[dosing["amount"].isna(), "unit"] = None
    dosing.loc[dosing["duration"] == 0, "duration"] = np.nan
    dosing.loc[dosing["count"] == 1, "interval"] = np.nan
    return {
        "measurements": _records(m, ["arm", "time", "observable", "value", "unit", "lloq", "below_lloq", "note"]),
        "dosing": _records(dosing, ["arm", "drug", "time", "amount", "unit", "route", "duration", "interval", "count", "note"]),
        "phases": _records(patient.phases, ["arm", "cycle", "phase", "start", "end"]),
        "mutations": _records(patient.omics.mutations, list(TABLES["mutations"][0].model_fields)),
        "copy_number": _records(patient.omics.copy_number, list(TABLES["copy_number"][0].model_fields)),
        "expression": _records(patient.omics.expression, list(TABLES["expression"][0].model_fields)),
        "protein": _records(patient.omics.protein, list(TABLES["protein"][0].model_fields)),
    }


def _header(patient: Patient) -> dict:
    c = patient.covariates
    cov = {k: getattr(c, k) for k in ("age", "sex", "weight", "height", "bsa") if getattr(c, k) is not None}
    cov["species"] = c.species
    header = {"format_version": FORMAT_VERSION, "id": patient.id}
    if patient.time_origin:
        header["time_origin"] = patient.time_origin
    header["covariates"] = cov
    for key in ("labels", "drugs", "observables"):
        if getattr(patient, key):
            header[key] = getattr(patient, key)
    src = {k: v for k, v in patient.source.items() if k not in ("path", "format", "sha256") and isinstance(v, str)}
    if src:
        header["source"] = src
    return header


def patient_document(patient: Patient) -> dict:
    """The patient as one JSON-compatible document (canonical units, times in days)."""
    doc = _header(patient)
    tables = _tables(patient)
    for name in ("measurements", "dosing", "phases"):
        if tables[name]:
            doc[name] = tables[name]
    omics = {n: tables[n] for n in ("mutations", "copy_number", "expression", "protein") if tables[n]}
    if omics:
        doc["omics"] = omics
    return doc


def _toml(header: dict) -> str:
    """Minimal TOML writer for the header (scalars, flat tables, one nesting level)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)

    lines, tables = [], []
    for k, v in header.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {val(v)}")
    for k, v in tables:
        flat = {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
        nested = {kk: vv for kk, vv in v.items() if isinstance(vv, dict)}
        if flat or not nested:
            lines.append(f"\n[{k}]")
            lines.extend(f"{json.dumps(kk) if not kk.isidentifier() else kk} = {val(vv)}" for kk, vv in flat.items())
        for kk, vv in nested.items():
            lines.append(f"\n[{k}.{kk}]")
            lines.extend(f"{k3} = {val(v3)}" for k3, v3 in vv.items())
    return "\n".join(lines) + "\n"


def save_patient(patient: Patient, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``patient`` to ``path``: a folder (no suffix), ``.json`` or ``.yaml``/``.yml`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        doc = patient_document(patient)
        if suffix == ".json":
            atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        else:
            import yaml

            atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        return path
    tables = _tables(patient)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "patient.toml").write_text(_toml(_header(patient)), encoding="utf-8")
        for name, rows in tables.items():
            if not rows:
                continue
            fname = TABLES[name][1]
            cols = [c for c in TABLES[name][0].model_fields if any(c in r for r in rows)]
            buf = io.StringIO()
            pd.DataFrame(rows, columns=cols).to_csv(buf, index=False, lineterminator="\n", float_format="%.10g")
            target = tmp / fname
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(buf.getvalue(), encoding="utf-8")
    return path


def save_cohort(cohort, outdir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Save every patient of a :class:`~twin.patient.Cohort` as ``outdir/<id>/`` bundle folders."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    return [save_patient(p, out / p.id, overwrite=overwrite) for p in cohort]
