"""cBioPortal study folders and MAF files: patients with covariates and omics.

A study folder holds tab-separated files with leading ``#`` metadata lines:
``data_clinical_patient.txt`` (PATIENT_ID, AGE [year], SEX ...), ``data_clinical_sample.txt``
(SAMPLE_ID, PATIENT_ID), a MAF (``data_mutations*.txt``), a discrete GISTIC matrix
(``data_cna.txt``, genes x samples, -2..2), expression matrices (``data_mrna*.txt``) and RPPA
matrices (``data_rppa*.txt``), each described by a ``meta_*.txt`` file. See
https://docs.cbioportal.org/file-formats/.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import pandas as pd

from ..errors import InputError, PatientFileError, Problem, ProblemList, close_matches
from ..patient import Cohort
from . import _Capped, _build_cohort, _is_missing, _line_of_parser_error, _NA_TOKENS, _sha256, _Trace

__all__ = ["read_cbioportal", "read_maf", "attach_omics"]

_MATRIX_ID_COLUMNS = ("Hugo_Symbol", "Entrez_Gene_Id", "Cytoband", "Composite.Element.REF")
_COVARIATES = ("age", "sex", "weight", "height", "bsa")
_SEX_TEXT = {"m": "male", "male": "male", "f": "female", "female": "female", "other": "other", "unknown": "unknown"}
_DEFAULT_COVARIATES = {"AGE": "age", "SEX": "sex"}
_MAF_FIELDS = {"gene": "Hugo_Symbol", "classification": "Variant_Classification", "sample": "Tumor_Sample_Barcode"}
_KEYS = {"mutations": ("gene", "protein_change", "sample"), "copy_number": ("gene", "sample"), "expression": ("gene", "sample"), "protein": ("protein", "sample")}


# -- reading tab-separated files ----------------------------------------------------------


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def _read_tsv(path: Path, problems: ProblemList, required: Iterable[str] = ()) -> tuple[pd.DataFrame | None, int]:
    """A tab-separated file as strings with a ``_line`` column; leading '#' lines skipped.

    Returns (table, header line); the table is ``None`` when the file cannot be read.
    """
    file = path.name
    try:
        with _open_text(path) as fh:
            meta = 0
            for line in fh:
                if not line.startswith("#"):
                    break
                meta += 1
        df = pd.read_csv(path, sep="\t", skiprows=meta, dtype=str, keep_default_na=False, skip_blank_lines=False, quoting=csv.QUOTE_NONE)
    except (OSError, UnicodeDecodeError) as exc:
        problems.error(file, f"cannot read the file ({exc})", fix="check that it exists and is UTF-8 text")
        return None, 0
    except pd.errors.EmptyDataError:
        problems.error(file, "the file has no header line", expected="a tab-separated header line after the '#' metadata lines")
        return None, 0
    except pd.errors.ParserError as exc:
        problems.error(file, "a row has more cells than the header", row=_line_of_parser_error(exc), expected="tab-separated cells, as many as header columns", fix="check for stray tabs in that line")
        return None, 0
    header = meta + 1
    df.columns = [str(c).strip() for c in df.columns]
    ok = True
    for col in required:
        if col not in df.columns:
            problems.error(file, f"required column '{col}' is missing." + close_matches(col, df.columns), row=header, field=col, expected="columns " + ", ".join(required), received=", ".join(list(df.columns)[:12]), fix=f"add or rename the '{col}' column")
            ok = False
    if not ok:
        return None, header
    df["_line"] = np.arange(len(df)) + header + 1
    cells = df.drop(columns="_line")
    df = df[(cells.apply(lambda c: c.str.strip()) != "").any(axis=1)]
    return df.reset_index(drop=True), header


def _numbers(values: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(floats with NaN for missing, mask of missing cells, mask of unreadable cells)."""
    text = values.astype(str).str.strip()
    missing = text.str.lower().isin(_NA_TOKENS)
    num = pd.to_numeric(text.where(~missing), errors="coerce")
    bad = ~missing & (num.isna() | ~np.isfinite(num.fillna(0.0)))
    return num.where(~bad), missing, bad


def _meta(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


# -- MAF -----------------------------------------------------------------------------------


def _maf_frame(path: Path, problems: ProblemList, *, vaf_column: str | None, vaf_scale: str | None) -> tuple[pd.DataFrame | None, dict]:
    """Mutations of a MAF as a long table (gene, protein_change, vaf, classification, sample, _line)
    and the source column of each field."""
    df, header = _read_tsv(path, problems, required=("Hugo_Symbol", "Tumor_Sample_Barcode") + ((vaf_column,) if vaf_column else ()))
    if df is None:
        return None, {}
    file, capped = path.name, _Capped(problems)
    out = pd.DataFrame({"gene": df["Hugo_Symbol"].str.strip(), "sample": df["Tumor_Sample_Barcode"].str.strip(), "_line": df["_line"]})
    for col, what in (("Hugo_Symbol", "gene"), ("Tumor_Sample_Barcode", "sample")):
        for line in df.loc[out[what] == "", "_line"]:
            capped.error(f"missing:{col}", file, f"{col} is empty", row=int(line), field=col, expected="a gene symbol" if what == "gene" else "a sample id", fix=f"fill in {col} or delete the row")
    pcol = "HGVSp_Short" if "HGVSp_Short" in df.columns else ("Protein_Change" if "Protein_Change" in df.columns else None)
    if pcol:
        pc = df[pcol].str.strip().str.removeprefix("p.")
        out["protein_change"] = pc.where(~pc.str.lower().isin(_NA_TOKENS), None)
    else:
        out["protein_change"] = None
        problems.note(file, "no HGVSp_Short or Protein_Change column: protein changes left empty", row=header)
    out["classification"] = df["Variant_Classification"].str.strip().replace("", None) if "Variant_Classification" in df.columns else None
    out["vaf"] = _vaf(df, file, capped, problems, header, vaf_column, vaf_scale)
    fields = {"gene": "Hugo_Symbol", "protein_change": pcol or "HGVSp_Short", "vaf": vaf_column or "t_alt_count", "classification": "Variant_Classification", "sample": "Tumor_Sample_Barcode"}
    bad = out["gene"].eq("") | out["sample"].eq("")
    return out[~bad][["gene", "protein_change", "vaf", "classification", "sample", "_line"]].reset_index(drop=True), fields


def _vaf(df: pd.DataFrame, file: str, capped: _Capped, problems: ProblemList, header: int, vaf_column, vaf_scale) -> pd.Series:
    """vaf = t_alt_count / (t_alt_count + t_ref_count), or a given column in fraction/percent."""
    if vaf_column:
        if vaf_scale not in ("fraction", "percent"):
            raise InputError(f"vaf_scale {vaf_scale!r}: say whether {vaf_column} holds a 'fraction' (0-1) or a 'percent' (0-100)")
        num, _, bad = _numbers(df[vaf_column])
        vaf = num / (100.0 if vaf_scale == "percent" else 1.0)
        cols = {vaf_column: bad}
    elif "t_alt_count" in df.columns and "t_ref_count" in df.columns:
        alt, _, bad_a = _numbers(df["t_alt_count"])
        ref, _, bad_r = _numbers(df["t_ref_count"])
        depth = alt + ref
        vaf = (alt / depth).where(depth > 0)
        cols = {"t_alt_count": bad_a, "t_ref_count": bad_r}
        for line, a, r in zip(df.loc[(alt < 0) | (ref < 0), "_line"], alt[(alt < 0) | (ref < 0)], ref[(alt < 0) | (ref < 0)]):
            capped.error("negative_count", file, "read counts cannot be negative", row=int(line), field="t_alt_count", received=f"t_alt_count {a:g}, t_ref_count {r:g}", fix="check the counts")
        vaf = vaf.where((alt >= 0) & (ref >= 0))
    else:
        problems.note(file, "no t_alt_count/t_ref_count columns: allele fractions left empty (pass vaf_column= to read another column)", row=header)
        return pd.Series(np.nan, index=df.index, dtype="float64")
    for col, bad in cols.items():
        for line, raw in zip(df.loc[bad, "_line"], df.loc[bad, col]):
            capped.error(f"not_a_number:{col}", file, f"{col} is not a number", row=int(line), field=col, expected="a number, or NA", received=repr(raw), fix="write a plain number or NA")
    return vaf.astype("float64")


def read_maf(path: str | Path, *, vaf_column: str | None = None, vaf_scale: Literal["fraction", "percent"] | None = None) -> pd.DataFrame:
    """Read a MAF (tab-separated, optionally ``.gz``) as one table of mutations.

    Columns: gene (Hugo_Symbol), protein_change (HGVSp_Short, else Protein_Change, without
    'p.'), vaf (t_alt_count / (t_alt_count + t_ref_count), 0-1; or ``vaf_column`` read in
    ``vaf_scale``), classification (Variant_Classification, verbatim), sample
    (Tumor_Sample_Barcode), line (line in the file, header = 1 after '#' lines).

    Raises
    ------
    PatientFileError
        listing every located problem (missing columns, empty genes, unreadable counts).
    """
    path = Path(path)
    problems = ProblemList()
    frame, _ = _maf_frame(path, problems, vaf_column=vaf_column, vaf_scale=vaf_scale)
    if frame is None or problems.errors:
        raise PatientFileError(str(path), problems)
    return frame.rename(columns={"_line": "line"})


# -- matrices (CNA, expression, RPPA) --------------------------------------------------------


def _matrix_frame(path: Path, problems: ProblemList, *, layer: str, genes: set[str] | None) -> tuple[pd.DataFrame | None, int]:
    """A genes x samples matrix as a long table (name, value, sample, _line) and its header line."""
    key = "Composite.Element.REF" if layer == "protein" else "Hugo_Symbol"
    df, header = _read_tsv(path, problems, required=(key,))
    if df is None:
        return None, header
    file, capped = path.name, _Capped(problems)
    samples = [c for c in df.columns if c not in _MATRIX_ID_COLUMNS and c != "_line"]
    names = df[key].str.strip()
    if layer == "protein":
        gene_part = names.str.split("|").str[0]
        names = names.str.split("|").str[-1].str.strip()
    else:
        gene_part = names
    keep = names != ""
    if (~keep).any():
        problems.note(file, f"{int((~keep).sum())} row(s) without {key} skipped (e.g. line {int(df.loc[~keep, '_line'].iloc[0])})", field=key)
    if genes is not None:
        keep &= gene_part.apply(lambda g: bool(set(str(g).split()) & genes))
    df, names = df[keep], names[keep]
    frames = []
    for s in samples:
        num, missing, bad = _numbers(df[s])
        for line, raw in zip(df.loc[bad, "_line"], df.loc[bad, s]):
            capped.error(f"not_a_number:{layer}", file, "value is not a number", row=int(line), field=s, expected="a number, or NA", received=repr(raw), fix="write a plain number or NA")
        if layer == "copy_number":
            off = num.notna() & ~num.isin([-2, -1, 0, 1, 2])
            for line, v in zip(df.loc[off, "_line"], num[off]):
                capped.error("not_gistic", file, "not a discrete GISTIC level", row=int(line), field=s, expected="-2, -1, 0, 1 or 2 (deep deletion ... amplification)", received=f"{v:g}", fix="discrete CNA files hold integer levels; continuous values belong in a log2 CNA file (not read)")
            num = num.where(~off)
        ok = num.notna()
        frames.append(pd.DataFrame({"name": names[ok].to_numpy(), "value": num[ok].to_numpy(), "sample": s, "_line": df.loc[ok, "_line"].to_numpy()}))
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["name", "value", "sample", "_line"])
    return long, header


_EXPRESSION_SCALES = (("rsem", "rsem"), ("tpm", "tpm"), ("fpkm", "fpkm"), ("rpkm", "rpkm"), ("count", "counts"))


def _infer_scale(layer: str, meta: dict, file: str, given: str | None) -> str:
    """The value scale of an expression or protein file, from the argument or its meta file."""
    datatype = meta.get("datatype", "").upper()
    words = (meta.get("stable_id", "") + " " + meta.get("profile_name", "")).lower()
    inferred = None
    if datatype == "Z-SCORE":
        inferred = "rppa_zscore" if layer == "protein" and "rppa" in words else "zscore"
    elif layer == "expression" and datatype == "CONTINUOUS":
        hits = [scale for word, scale in _EXPRESSION_SCALES if word in words]
        if len(hits) == 1:
            inferred = ("log2_" + hits[0]) if "log" in words and hits[0] in ("tpm", "fpkm") else hits[0]
    elif layer == "protein" and datatype == "LOG2-VALUE":
        inferred = "rppa_log2" if "rppa" in words else "log2_intensity"
    arg = "expression_scale" if layer == "expression" else "protein_scale"
    if given is not None and inferred is not None and given != inferred:
        raise InputError(f"{file}: {arg}={given!r} conflicts with its meta file (datatype {datatype}, stable_id {meta.get('stable_id')!r}) which reads as {inferred!r}; pass {arg}={inferred!r} or check the file")
    if given is None and inferred is None:
        seen = f"datatype {datatype or '(none)'}, stable_id {meta.get('stable_id', '(none)')!r}" if meta else "no meta file"
        raise InputError(f"{file}: cannot tell the scale of the {layer} values ({seen}); pass {arg}= e.g. 'tpm', 'log2_tpm', 'rsem', 'zscore' (twin never guesses a scale)")
    return given or inferred


# -- study folder ---------------------------------------------------------------------------


_LAYER_OF = {"MUTATION_EXTENDED": "mutations", "COPY_NUMBER_ALTERATION": "copy_number", "MRNA_EXPRESSION": "expression", "PROTEIN_LEVEL": "protein"}
_CONVENTIONAL = (("clinical_patient", "data_clinical_patient.txt"), ("clinical_sample", "data_clinical_sample.txt"), ("mutations", "data_mutations*.txt"), ("copy_number", "data_cna.txt"), ("expression", "data_mrna*.txt"), ("protein", "data_rppa*.txt"))


def _study_files(root: Path, notes: list[Problem], problems: ProblemList) -> dict[str, list[tuple[Path, dict]]]:
    """Data files by kind (clinical_patient, clinical_sample, and omics layers) with their meta."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    known: set[Path] = set()
    for mp in sorted(root.glob("meta_*.txt")):
        meta = _meta(mp)
        data = meta.get("data_filename")
        if not data:
            continue
        kind = meta.get("genetic_alteration_type", "").upper()
        datatype = meta.get("datatype", "").upper()
        if kind == "CLINICAL":
            layer = {"PATIENT_ATTRIBUTES": "clinical_patient", "SAMPLE_ATTRIBUTES": "clinical_sample"}.get(datatype)
        elif kind == "COPY_NUMBER_ALTERATION" and datatype != "DISCRETE":
            layer = None
        else:
            layer = _LAYER_OF.get(kind)
        known.add((root / data).resolve())
        if layer is not None and not (root / data).is_file():
            problems.error(mp.name, f"data_filename {data} does not exist in the study folder", field="data_filename", received=data, fix="correct data_filename or add the file." + close_matches(data, [p.name for p in root.glob("data_*")]))
            continue
        if layer is None:
            notes.append(Problem("note", mp.name, f"{data} ({kind} {datatype}) is not read by twin"))
            continue
        found.setdefault(layer, []).append((root / data, meta))
    for layer, pattern in _CONVENTIONAL:
        for p in sorted(root.glob(pattern)):
            if p.resolve() not in known:
                found.setdefault(layer, []).append((p, {}))
                known.add(p.resolve())
    return found


def _pick(files: list[tuple[Path, dict]], chosen: str | None, arg: str) -> tuple[Path, dict] | None:
    if chosen is not None:
        for p, meta in files:
            if p.name == chosen:
                return p, meta
        raise InputError(f"{arg}={chosen!r} is not among the study's files: {', '.join(p.name for p, _ in files) or 'none'}.{close_matches(chosen, [p.name for p, _ in files])}")
    if len(files) > 1:
        raise InputError(f"the study has several files for {arg.removesuffix('_file')}: {', '.join(p.name for p, _ in files)}; choose one with {arg}=")
    return files[0] if files else None


def _clinical_patients(path: Path, problems: ProblemList, covariates: dict, labels: Iterable[str], capped: _Capped) -> dict[str, dict]:
    """Patients of data_clinical_patient.txt: id -> {line, covariates, labels, where}."""
    df, header = _read_tsv(path, problems, required=("PATIENT_ID",))
    if df is None:
        return {}
    file = path.name
    optional = covariates if covariates is _DEFAULT_COVARIATES else {}
    for col in list(covariates) + list(labels):
        if col not in df.columns and col not in optional:
            problems.error(file, f"column '{col}' (named in the arguments) is missing." + close_matches(col, df.columns), row=header, field=col, fix="correct the argument or the column name")
    out: dict[str, dict] = {}
    for row in df.to_dict("records"):
        pid, line = row["PATIENT_ID"].strip(), int(row["_line"])
        if pid in out:
            capped.error("duplicate_patient", file, f"patient {pid} appears twice (first on line {out[pid]['line']})", row=line, field="PATIENT_ID", fix="keep one row per patient")
            continue
        rec = {"line": line, "covariates": {}, "labels": {}, "where": {"id": ("PATIENT_ID", line)}}
        for col, (name, unit) in ((c, _as_target(t)) for c, t in covariates.items()):
            if col in row and not _is_missing(row[col]):
                value = _covariate(name, unit, row[col].strip(), line, col, file, capped)
                if value is not None:
                    rec["covariates"][name] = value
                    rec["where"][f"covariates.{name}"] = (col, line)
        for col in labels:
            if col in row and not _is_missing(row[col]):
                rec["labels"][col] = _label(row[col].strip())
        out[pid] = rec
    return out


def _as_target(t) -> tuple[str, str | None]:
    name, unit = (t, None) if isinstance(t, str) else tuple(t)
    if name not in _COVARIATES:
        raise InputError(f"unknown covariate {name!r}.{close_matches(name, _COVARIATES)} Expected one of {', '.join(_COVARIATES)}")
    return name, unit


def _covariate(name: str, unit: str | None, raw: str, line: int, col: str, file: str, capped: _Capped):
    if name == "sex":
        if raw.lower() in _SEX_TEXT:
            return _SEX_TEXT[raw.lower()]
        capped.error("bad_sex", file, f"{col} {raw!r} is not a sex", row=line, field=col, expected="Male or Female (also M/F), or NA", received=repr(raw), fix="write Male or Female")
        return None
    try:
        x = float(raw)
    except ValueError:
        capped.error(f"not_a_number:{col}", file, f"{col} is not a number", row=line, field=col, expected=f"{name} as a number", received=repr(raw), fix="write a plain number, or NA when unknown")
        return None
    return x if unit is None else f"{x!r} {unit}"


def _label(raw: str):
    try:
        x = float(raw)
    except ValueError:
        return raw
    return int(x) if x.is_integer() and "." not in raw else x


def _clinical_samples(path: Path, problems: ProblemList, patients: dict | None, capped: _Capped) -> dict[str, tuple[str, int]]:
    """sample id -> (patient id, line); a sample whose patient is unknown is an error."""
    df, header = _read_tsv(path, problems, required=("PATIENT_ID", "SAMPLE_ID"))
    if df is None:
        return {}
    file = path.name
    out: dict[str, tuple[str, int]] = {}
    for row in df.to_dict("records"):
        sid, pid, line = row["SAMPLE_ID"].strip(), row["PATIENT_ID"].strip(), int(row["_line"])
        if sid in out:
            capped.error("duplicate_sample", file, f"sample {sid} appears twice (first on line {out[sid][1]})", row=line, field="SAMPLE_ID", fix="keep one row per sample")
            continue
        if not sid or not pid:
            capped.error("missing_id", file, "SAMPLE_ID or PATIENT_ID is empty", row=line, field="SAMPLE_ID" if not sid else "PATIENT_ID", fix="fill in both ids")
            continue
        if patients is not None and pid not in patients:
            capped.error("sample_without_patient", file, f"sample {sid} belongs to patient {pid}, who is not in data_clinical_patient.txt." + close_matches(pid, patients), row=line, field="PATIENT_ID", expected="a PATIENT_ID of data_clinical_patient.txt", received=pid, fix="add the patient to data_clinical_patient.txt or correct the id")
            continue
        out[sid] = (pid, line)
    return out


def _check_samples(long: pd.DataFrame, samples: dict, file: str, capped: _Capped, header: int, matrix: bool) -> pd.DataFrame:
    unknown = ~long["sample"].isin(list(samples))
    if matrix:
        for s in sorted(set(long.loc[unknown, "sample"])):
            capped.error("unknown_sample", file, f"sample column {s} is not in data_clinical_sample.txt." + close_matches(s, samples), row=header, field=s, fix="add the sample to data_clinical_sample.txt or correct the column name")
    else:
        for line, s in zip(long.loc[unknown, "_line"], long.loc[unknown, "sample"]):
            capped.error("unknown_sample", file, f"sample {s} is not in data_clinical_sample.txt." + close_matches(s, samples), row=int(line), field="Tumor_Sample_Barcode", fix="add the sample to data_clinical_sample.txt or correct the id")
    return long[~unknown]


def _deduplicate(long: pd.DataFrame, layer: str, file: str, policy: str, capped: _Capped, problems: ProblemList) -> pd.DataFrame:
    key = ["name" if k in ("gene", "protein") and "name" in long.columns else k for k in _KEYS[layer]]
    keyed = long[key].astype(str)
    dup = keyed.duplicated(keep="first")
    if not dup.any():
        return long
    if policy == "first":
        problems.warning(file, f"{int(dup.sum())} duplicate {layer.replace('_', ' ')} row(s) dropped, the first kept (e.g. line {int(long.loc[dup, '_line'].iloc[0])})", fix="resolve duplicates before import to choose which to keep")
        return long[~dup]
    first = {tuple(k): int(line) for k, line in zip(keyed[~dup].itertuples(index=False), long.loc[~dup, "_line"])}
    for k, line in zip(keyed[dup].itertuples(index=False), long.loc[dup, "_line"]):
        column = "Composite.Element.REF" if layer == "protein" else "Hugo_Symbol"
        capped.error(f"duplicate_{layer}", file, f"duplicate {layer.replace('_', ' ')} entry {' / '.join(k)} (same as line {first[tuple(k)]})", row=int(line), field=column, expected=f"one row per {' + '.join(_KEYS[layer])}", fix="remove the duplicate, or pass duplicates='first' to keep the first")
    return long[~dup]


def _records(long: pd.DataFrame, layer: str, scale: str | None, fields: dict) -> pd.DataFrame:
    """One row per record: the document record (``rec``), ``_line``, field map (``fmap``), sample."""
    if layer == "mutations":
        cols = long[["gene", "protein_change", "vaf", "classification", "sample"]].astype(object)
        recs = [{k: v for k, v in r.items() if v is not None and v == v} for r in cols.where(cols.notna(), None).to_dict("records")]
        fmaps = [fields] * len(long)
    else:
        name = {"copy_number": "gene", "expression": "gene", "protein": "protein"}[layer]
        key = "Composite.Element.REF" if layer == "protein" else "Hugo_Symbol"
        value = "gistic" if layer == "copy_number" else "value"
        names, samples = long["name"].tolist(), long["sample"].tolist()
        if layer == "copy_number":
            recs = [{"gene": n, "gistic": int(v), "sample": s} for n, v, s in zip(names, long["value"].tolist(), samples)]
        else:
            recs = [{name: n, "value": float(v), "scale": scale, "sample": s} for n, v, s in zip(names, long["value"].tolist(), samples)]
        per_sample = {s: {name: key, value: s, "sample": s} for s in set(samples)}
        fmaps = [per_sample[s] for s in samples]
    return pd.DataFrame({"rec": recs, "_line": long["_line"].astype(int).to_numpy(), "fmap": fmaps, "sample": long["sample"].to_numpy()})


def read_cbioportal(
    study_dir: str | Path,
    *,
    expression_scale: str | None = None,
    expression_file: str | None = None,
    protein_scale: str | None = None,
    protein_file: str | None = None,
    covariates: Mapping[str, str | tuple[str, str]] | None = None,
    labels: Iterable[str] = (),
    genes: Iterable[str] | None = None,
    duplicates: Literal["error", "first"] = "error",
    vaf_column: str | None = None,
    vaf_scale: Literal["fraction", "percent"] | None = None,
    name: str | None = None,
) -> Cohort:
    """Read a cBioPortal study folder into a cohort (covariates, labels and omics; no measurements).

    Parameters
    ----------
    study_dir : folder with ``data_clinical_sample.txt`` (required), ``data_clinical_patient.txt``
        and omics files, found through their ``meta_*.txt`` files or conventional names.
    expression_scale, protein_scale : scale of the values ('tpm', 'log2_tpm', 'rsem', 'zscore',
        'rppa_zscore' ...); read from the meta file when it says (datatype Z-SCORE, or a
        stable_id naming RSEM/TPM/FPKM); required otherwise; a conflict is an error.
    expression_file, protein_file : which data file to read when the study has several.
    covariates : clinical column -> covariate (age [year], sex, weight [kg], height [cm],
        bsa [m²]) or (covariate, unit); default ``{"AGE": "age", "SEX": "sex"}``.
    labels : clinical patient columns kept as outcome labels (e.g. ``["OS_STATUS", "OS_MONTHS"]``).
    genes : keep only these genes (HGNC symbols) in every omics layer.
    duplicates : 'error' (default) or 'first' (keep the first of duplicate entries, with a warning).
    vaf_column, vaf_scale : read allele fractions from this MAF column ('fraction' or 'percent')
        instead of t_alt_count / (t_alt_count + t_ref_count).

    Raises
    ------
    PatientFileError
        every located problem of every file (file, line, column), after each patient has
        also passed the patient-file checks.
    """
    root = Path(study_dir)
    if duplicates not in ("error", "first"):
        raise InputError(f"duplicates={duplicates!r}: expected 'error' or 'first'")
    if not root.is_dir():
        raise InputError(f"{root}: expected a cBioPortal study folder, received {'a file' if root.exists() else 'a path that does not exist'}")
    problems, file_notes = ProblemList(), []
    capped = _Capped(problems)
    files = _study_files(root, file_notes, problems)
    if not files.get("clinical_sample"):
        problems.error(root.name + "/", "no data_clinical_sample.txt (SAMPLE_ID -> PATIENT_ID)", fix="add the sample clinical file and its meta_clinical_sample.txt")
    if problems.errors:
        raise PatientFileError(str(root), problems)
    cov = dict(covariates) if covariates is not None else _DEFAULT_COVARIATES
    labels = list(labels)
    patient_file = _pick(files.get("clinical_patient", []), None, "clinical_patient_file")
    patients = _clinical_patients(patient_file[0], problems, cov, labels, capped) if patient_file else None
    sample_file = _pick(files["clinical_sample"], None, "clinical_sample_file")[0]
    samples = _clinical_samples(sample_file, problems, patients, capped)
    if patients is None:
        patients = {pid: {"line": line, "covariates": {}, "labels": {}, "where": {"id": ("PATIENT_ID", line)}} for pid, line in sorted(set(samples.values()), key=lambda x: x[1])}
    gene_set = set(genes) if genes is not None else None
    read = {sample_file.name} | ({patient_file[0].name} if patient_file else set())
    layers = _omics_layers(files, samples, problems, capped, gene_set, duplicates, expression_scale, expression_file, protein_scale, protein_file, vaf_column, vaf_scale, read)
    docs = _documents(patients, layers, (patient_file[0] if patient_file else sample_file).name)
    problems.extend(file_notes)
    hashes = {name: _sha256(root / name) for name in sorted(read)}
    source = {"path": str(root), "format": "cbioportal", "sha256": hashes}
    return _build_cohort(docs, problems, path=root, name=name or root.name, source=source)


def _omics_layers(files, samples, problems, capped, genes, duplicates, expression_scale, expression_file, protein_scale, protein_file, vaf_column, vaf_scale, read: set) -> dict[str, pd.DataFrame]:
    """Per layer: records (rec, _line, fmap, sample, file, pid) checked against the samples."""
    out: dict[str, list[pd.DataFrame]] = {}
    for layer in ("mutations", "copy_number", "expression", "protein"):
        chosen = {"expression": expression_file, "protein": protein_file}.get(layer)
        picked = _pick(files.get(layer, []), chosen, f"{layer}_file") if layer in ("expression", "protein") else None
        todo = [picked] if picked else ([] if layer in ("expression", "protein") else files.get(layer, []))
        for path, meta in todo:
            read.add(path.name)
            scale = _infer_scale(layer, meta, path.name, expression_scale if layer == "expression" else protein_scale) if layer in ("expression", "protein") else None
            if layer == "mutations":
                long, fields = _maf_frame(path, problems, vaf_column=vaf_column, vaf_scale=vaf_scale)
                if long is not None and genes is not None:
                    long = long[long["gene"].isin(genes)]
                header = 1
            else:
                (long, header), fields = _matrix_frame(path, problems, layer=layer, genes=genes), {}
            if long is None:
                continue
            long = _check_samples(long, samples, path.name, capped, header, matrix=layer != "mutations")
            long = _deduplicate(long, layer, path.name, duplicates, capped, problems)
            recs = _records(long, layer, scale, fields)
            recs["file"] = path.name
            recs["pid"] = recs["sample"].map({s: pid for s, (pid, _) in samples.items()})
            out.setdefault(layer, []).append(recs)
    return {layer: pd.concat(frames, ignore_index=True) for layer, frames in out.items()}


def _documents(patients: dict, layers: dict[str, pd.DataFrame], clinical_file: str) -> list:
    by_patient: dict[str, dict[str, pd.DataFrame]] = {}
    for layer, frame in layers.items():
        for pid, group in frame.groupby("pid", sort=False):
            by_patient.setdefault(pid, {})[layer] = group
    docs = []
    for pid, info in patients.items():
        trace = _Trace(file=clinical_file, line=info["line"], raw_id=pid, header=dict(info["where"]))
        doc: dict = {"id": pid}
        if info["covariates"]:
            doc["covariates"] = dict(info["covariates"])
        if info["labels"]:
            doc["labels"] = dict(info["labels"])
        omics = {}
        for layer, group in by_patient.get(pid, {}).items():
            omics[layer] = group["rec"].tolist()
            trace.tables[layer] = list(zip(group["file"], group["_line"].tolist(), group["fmap"]))
        if omics:
            doc["omics"] = omics
        docs.append((doc, trace, []))
    return docs


# -- attach omics to patients from another source ----------------------------------------------


def _merge_header(doc: dict, odoc: dict, pid: str, oid: str, problems: ProblemList) -> None:
    cov = doc.setdefault("covariates", {})
    for k, v in odoc.get("covariates", {}).items():
        mine = cov.get(k)
        if mine is None:
            cov[k] = v
        elif mine != v and not (isinstance(v, float) and isinstance(mine, float) and abs(mine - v) <= 1e-9 * max(abs(v), 1.0)):
            problems.error("attach_omics", f"patient {pid}: covariate {k} is {mine!r} but omics patient {oid} says {v!r}", field=f"covariates.{k}", fix="correct one of the sources, or drop the covariate from one of them")
    labels = doc.setdefault("labels", {})
    for k, v in odoc.get("labels", {}).items():
        if k in labels and labels[k] != v:
            problems.error("attach_omics", f"patient {pid}: label {k} is {labels[k]!r} but omics patient {oid} says {v!r}", field=f"labels.{k}", fix="correct one of the sources")
        labels[k] = v
    layers = doc.setdefault("omics", {})
    for layer, rows in odoc.get("omics", {}).items():
        if layer in layers:
            problems.error("attach_omics", f"patient {pid} already has {layer.replace('_', ' ')}; omics patient {oid} has them too", field=f"omics.{layer}", fix="keep one source per omics layer")
        layers[layer] = rows


def attach_omics(
    cohort: Cohort, omics: Cohort, *, id_map: Mapping[str, str] | None = None, unmatched: Literal["error", "keep"] = "error"
) -> Cohort:
    """Merge omics layers, covariates and labels of ``omics`` patients into ``cohort`` patients.

    ``id_map`` maps a cohort id to an omics id (e.g. ``{"PK-1": "TCGA-AB-2802"}``); without it
    ids must be equal. Every cohort patient needs an omics patient unless ``unmatched='keep'``
    (then it is kept as it is, with a note); omics patients nobody asks for are left out.
    Covariates present on both sides must agree; each merged patient passes the patient-file
    checks again (e.g. body-surface area from weight and height).

    Raises
    ------
    PatientFileError
        listing every id that does not match (with close matches) and every conflict.
    """
    from ..io import patient_from_document
    from ..io.save import patient_document

    if unmatched not in ("error", "keep"):
        raise InputError(f"unmatched={unmatched!r}: expected 'error' or 'keep'")
    id_map = dict(id_map or {})
    problems = ProblemList()
    for k in sorted(set(id_map) - set(cohort.ids)):
        problems.error("id_map", f"id_map key {k!r} is not a patient of the cohort." + close_matches(k, cohort.ids), fix="correct the key")
    out = []
    for p in cohort:
        oid = id_map.get(p.id, p.id)
        if oid not in omics.ids:
            if unmatched == "keep" and p.id not in id_map:
                out.append(dataclasses.replace(p, notes=p.notes + (Problem("note", "attach_omics", f"no omics patient {oid!r}: kept without omics"),)))
                continue
            problems.error("attach_omics", f"patient {p.id}: no omics patient {oid!r}." + close_matches(oid, omics.ids), expected=f"an id among the {len(omics)} omics patients", received=oid, fix="map the id with id_map={cohort id: omics id}" + ("" if unmatched == "keep" else ", or pass unmatched='keep'"))
            continue
        o = omics[oid]
        doc, n_errors = patient_document(p), len(problems.errors)
        _merge_header(doc, patient_document(o), p.id, oid, problems)
        if len(problems.errors) > n_errors:
            continue
        merged, found = patient_from_document(doc, f"patient {p.id}")
        if merged is None:
            problems.extend(found.errors)
            continue
        note = Problem("note", "attach_omics", f"omics layers {o.omics.layers} and covariates of {oid} ({o.source.get('format', '')}) attached")
        kept = tuple(n for n in o.notes if "has no measurements" not in n.message or not len(merged.measurements))
        out.append(dataclasses.replace(merged, time_origin=p.time_origin, source={**p.source, "omics_source": {**o.source, "id": oid}}, notes=p.notes + kept + (note,)))
    if problems.errors:
        raise PatientFileError("attach_omics", problems)
    return Cohort(tuple(out), name=cohort.name, source={**cohort.source, "omics": omics.source})
